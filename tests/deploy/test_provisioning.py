"""Provisioning with the real `nvflare provision`: project file, kits, templates, package, signatures.

The 20-hospital project is provisioned once per module (about 10 s on 2 cores)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedmed.deploy import kit as kit_files
from fedmed.deploy.builder import package_source
from fedmed.deploy.preflight import run_checks
from fedmed.deploy.processes import start_kit, stop_processes
from fedmed.flare.allow_list import class_allow_list
from fedmed.site_config import SiteConfigError, load_site_config

from deploy_helpers import LEAD, PROJECT_ADMIN, REPO, kit_shell_env, preflight_env, process_env, provision_kits

HOSPITALS = [f"hospital-{i:02d}" for i in range(1, 21)]


def _project():
    return yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())


def test_project_file_has_one_server_twenty_hospitals_each_its_own_org_and_the_admin_roles():
    project = _project()
    assert project["api_version"] == 3
    participants = project["participants"]
    servers = [p for p in participants if p["type"] == "server"]
    clients = [p for p in participants if p["type"] == "client"]
    admins = [p for p in participants if p["type"] == "admin"]
    assert len(servers) == 1
    assert [c["name"] for c in clients] == HOSPITALS
    orgs = [c["org"] for c in clients]
    assert len(set(orgs)) == 20 and all(re.fullmatch(r"[A-Za-z0-9_]+", o) for o in orgs)
    assert servers[0]["org"] not in orgs
    roles = {}
    for a in admins:
        roles.setdefault(a["role"], []).append(a)
    assert [a["name"] for a in roles["project_admin"]] == [PROJECT_ADMIN]
    assert [a["name"] for a in roles["lead"]] == [LEAD]
    assert sorted(a["org"] for a in roles["org_admin"]) == sorted(orgs)  # one org admin per hospital
    paths = [b["path"] for b in project["builders"]]
    assert paths.index("nvflare.lighter.impl.cert.CertBuilder") < paths.index("fedmed.deploy.builder.FedMedKitBuilder") \
        < paths.index("nvflare.lighter.impl.signature.SignatureBuilder")


@pytest.fixture(scope="module")
def kits20(tmp_path_factory):
    out = tmp_path_factory.mktemp("provision20")
    started = time.time()
    prod = provision_kits(out)
    print(f"provisioned 1 server + 20 hospitals + 22 admins in {time.time() - started:.1f} s")
    return prod


def _template_files(side):
    root = REPO / "workspace_templates" / side / "local"
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _no_tokens(value):
    return "@fedmed:" not in json.dumps(value)


@pytest.mark.slow
def test_every_kit_holds_the_templates_the_package_and_a_valid_signature(kits20):
    source_files = sorted(p.relative_to(package_source().parent).as_posix() for p in package_source().rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    sites = [("localhost", "server")] + [(h, "client") for h in HOSPITALS]
    for name, side in sites:
        kit = kits20 / name
        for rel in _template_files(side):
            assert (kit / "local" / rel).is_file(), f"{name}: template {rel} missing from local/"
            if rel.suffix == ".json":
                content = json.loads((kit / "local" / rel).read_text())
                assert _no_tokens(content), f"{name}: {rel} still holds an @fedmed: placeholder"
        resources = json.loads((kit / "local" / "resources.json").read_text())
        assert resources["class_allow_list"] == class_allow_list()
        assert not (kit / "local" / "privacy.json.sample").exists()  # FLARE's sample does not load; ours replaces it
        assert kit_files.package_files(kit) == source_files, f"{name}: pre-deployed package differs from the source"
        assert kit_files.verify_startup_signature(kit) == [], name
        assert kit_files.verify_package_signature(kit) == [], name
        assert kit_files.verify_certificate_chain(kit) == [], name
        assert json.loads((kit / "startup" / "signature.json").read_text()).keys() >= {
            f"fed_{side}.json", f"{side}.crt", f"{side}.key", "rootCA.pem"}
    admins = [p.name for p in kits20.iterdir() if "@" in p.name]
    assert len(admins) == 22
    for admin in admins:
        assert kit_files.verify_startup_signature(kits20 / admin) == [], admin
    # every server and hospital kit checks itself before FLARE starts, with a signed check script (issue 19)
    for name in ("localhost", "hospital-01"):
        sub_start = (kits20 / name / "startup" / "sub_start.sh").read_text()
        assert 'python3 -I "$KIT_WORKSPACE/startup/fedmed_check.py"' in sub_start and "export PYTHONPYCACHEPREFIX=" in sub_start
        assert "fedmed_check.py" in json.loads((kits20 / name / "startup" / "signature.json").read_text())
        assert "fedmed.deploy.integrity.KitIntegrityGuard" in (kits20 / name / "local" / "resources.json").read_text()
    # the server does not wait FLARE's 900 s for the outcome of a dead hospital's job (rehearse --fault kill-hospital)
    assert "--set secure_train=true client_outcome_wait_timeout=30" in (kits20 / "localhost" / "startup" / "sub_start.sh").read_text()
    # the server keeps jobs and snapshots in its own workspace, never in /tmp/nvflare
    server_resources = (kits20 / "localhost" / "local" / "resources.json").read_text()
    assert "fedmed.deploy.storage.WorkspaceStorage" in server_resources
    assert all(not problems for name, problems in run_checks(kits20 / "localhost") if name == "allow-list")


@pytest.mark.slow
def test_hospital_kits_ship_a_data_config_placeholder_that_refuses_to_run(kits20):
    for hospital in ("hospital-01", "hospital-20"):
        path = kits20 / hospital / "local" / "fedmed_site.json"
        with pytest.raises(SiteConfigError) as info:
            load_site_config(path, hospital)
        message = str(info.value)
        assert hospital in message and str(path) in message and "data.format" in message
        checks = dict(run_checks(kits20 / hospital, check_server=False))
        assert checks["site config"] and hospital in checks["site config"][0]


@pytest.mark.slow
def test_kit_authorization_policies_let_only_the_lead_run_jobs_at_hospitals_and_refuse_byoc(kits20):
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.security.security import FLAuthorizer

    lead = Person(LEAD, "coordinator", "lead")
    padmin = Person(PROJECT_ADMIN, "coordinator", "project_admin")
    it01 = Person("it@hospital-01.example.org", "hospital_01", "org_admin")

    def allowed(kit, user, right, submitter=None):
        policy = json.loads((kits20 / kit / "local" / "authorization.json").read_text())
        authorizer = FLAuthorizer(_org(kits20 / kit), policy)  # raises on a policy FLARE cannot load
        ok, _reason = authorizer.authorize(AuthzContext(right=right, user=user, submitter=submitter or user))
        return ok

    assert allowed("hospital-01", lead, "submit_job")
    assert not allowed("hospital-01", padmin, "submit_job")
    assert not allowed("hospital-01", it01, "submit_job")
    assert allowed("hospital-01", it01, "manage_job", submitter=lead)  # IT may abort jobs at its own site
    assert not allowed("hospital-02", it01, "manage_job", submitter=lead)  # ... not at another hospital
    assert allowed("localhost", lead, "submit_job") and not allowed("localhost", it01, "submit_job")
    assert allowed("localhost", lead, "download_job", submitter=lead)
    assert not allowed("localhost", lead, "download_job", submitter=padmin)
    for kit in ("localhost", "hospital-01"):
        for user in (lead, padmin, it01):
            assert not allowed(kit, user, "byoc"), (kit, user.name)


def _org(kit):
    from fedmed.deploy.processes import kit_org

    return kit_org(kit)


@pytest.mark.slow
def test_an_edited_startup_file_makes_the_kit_refuse_to_start(kits20, tmp_path):
    procs = []
    try:
        for name, config in (("hospital-05", "fed_client.json"), ("localhost", "fed_server.json")):
            kit = tmp_path / name
            shutil.copytree(kits20 / name, kit)
            path = kit / "startup" / config
            path.write_text(path.read_text().replace("localhost:8002", "localhost:8003"))  # a plausible edit
            assert any("does not match its signature" in p for p in kit_files.verify_startup_signature(kit))
            proc = start_kit(kit, tmp_path / f"{name}.log")
            procs.append(proc)
            proc.popen.wait(timeout=120)
            log = proc.log_text()
            assert proc.popen.returncode != 0
            # the kit's own check (fedmed.deploy.integrity) refuses first, the server's as a hospital's (issue 19)
            assert "refusing to start" in log and config in log
            assert "Server started" not in log and "Successfully registered" not in log
    finally:
        assert stop_processes(procs) == []


@pytest.mark.slow
def test_an_edited_admin_kit_is_refused_by_the_admin_api(kits20, tmp_path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = tmp_path / "lead"
    shutil.copytree(kits20 / LEAD, kit)
    path = kit / "startup" / "fed_admin.json"
    path.write_text(path.read_text().replace('"port": 8002', '"port": 8003'))
    with pytest.raises(Exception, match="tampered"):
        new_secure_session(LEAD, str(kit), timeout=5)


def test_preflight_names_edited_or_added_package_files_and_an_unreachable_server(tmp_path):
    prod = provision_kits(tmp_path / "out", hospitals=1, port=_closed_port())
    kit = prod / "hospital-01"
    (kit / "local" / "custom" / "fedmed" / "cli.py").write_text("# replaced\n")
    (kit / "local" / "custom" / "fedmed" / "extra.py").write_text("x = 1\n")
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "fedmed", "preflight", str(kit), "--timeout", "3"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    out = result.stdout
    assert "cli.py does not match its signature" in out and "extra.py is not part of the signed package" in out
    assert "placeholder" in out
    assert "FAIL server port" in out and "refused the connection: nothing listens there" in out  # named, with the cause
    assert "OK   server name" in out and "not attempted: the server port check failed" in out
    assert time.time() - started < 30


def _closed_port():
    from fedmed.deploy.processes import free_port

    return free_port()  # nothing listens there during this test


def test_he_kits_carry_tenseal_contexts_and_stay_signed(tmp_path):
    prod = provision_kits(tmp_path / "out", hospitals=1, he=True)
    assert (prod / "localhost" / "startup" / "server_context.tenseal").is_file()
    assert (prod / "hospital-01" / "startup" / "client_context.tenseal").is_file()
    for kit in ("localhost", "hospital-01"):
        assert kit_files.verify_startup_signature(prod / kit) == []
        assert kit_files.verify_package_signature(prod / kit) == []  # FLARE's extra local/ signatures are not package files
        signed = json.loads((prod / kit / "startup" / "signature.json").read_text())
        assert any(name.endswith(".tenseal") for name in signed)


def test_provision_command_writes_kits_for_the_chosen_server_and_hospitals(tmp_path):
    out = tmp_path / "kits"
    result = subprocess.run([sys.executable, "-m", "fedmed", "provision", "--server-name", "fl.example-network.org",
                             "--port", "9443", "--hospitals", "2", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(next(out.glob("fedmed/prod_*/fedmed_provision.json")).read_text())
    prod = Path(summary["prod_dir"])
    assert summary["hospitals"] == ["hospital-01", "hospital-02"] and summary["server"] == "fl.example-network.org"
    kits = sorted(p.name for p in prod.iterdir() if p.is_dir())
    assert kits == sorted(["fl.example-network.org", "hospital-01", "hospital-02", PROJECT_ADMIN, LEAD,
                           "it@hospital-01.example.org", "it@hospital-02.example.org"])
    client = json.loads((prod / "hospital-02" / "startup" / "fed_client.json").read_text())
    assert client["servers"][0]["service"]["target"] == "fl.example-network.org:9443"
    assert kit_files.verify_startup_signature(prod / "hospital-02") == []
    state = out / "fedmed" / "state"
    assert state.is_dir()  # the root CA key stays with the provisioning output, readable by its owner only
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "cert.json" for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]


def test_provision_refuses_an_org_name_flare_would_reject(tmp_path):
    project = _project()
    project["participants"][1]["org"] = "hospital-01"  # dash: not allowed by FLARE
    path = tmp_path / "project.yml"
    path.write_text(yaml.safe_dump(project))
    result = subprocess.run([sys.executable, "-m", "fedmed", "provision", "--project", str(path), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "hospital-01" in result.stderr and "^[A-Za-z0-9_]+$" in result.stderr
    assert not (tmp_path / "out" / "fedmed").exists()


def test_provisioning_output_is_git_ignored():
    from fedmed.deploy.provision import DEFAULT_OUT

    ignored = [line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()]
    assert DEFAULT_OUT in ignored and "state" in ignored and "*.key" in ignored


# ---- integrity at run time (issue 12): the client itself refuses a kit that is not the signed one ------------


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_a_client_kit_without_signature_json_or_with_an_edited_package_or_start_script_refuses_to_start(kits20, tmp_path):
    """Real client processes, started as rehearse starts them (no start script): the in-process guard
    from local/resources.json ends each one before it connects, naming the file and what to do."""
    cases = {
        "no-signature": ("startup/signature.json", lambda kit: (kit / "startup" / "signature.json").unlink()),
        "edited-package": ("local/custom/fedmed/aggregation.py",
                           lambda kit: _edit(kit / "local/custom/fedmed/aggregation.py", "import", "import os, sys  # x\nimport")),
        # an edited start script that no longer runs the check is noticed by the guard
        "edited-sub-start": ("startup/sub_start.sh",
                             lambda kit: _edit(kit / "startup" / "sub_start.sh", 'python3 -I "$KIT_WORKSPACE/startup/fedmed_check.py"', "true")),
    }
    procs = []
    try:
        for name, (named_file, tamper) in cases.items():
            kit = tmp_path / name
            shutil.copytree(kits20 / "hospital-04", kit)
            tamper(kit)
            started = time.time()
            proc = start_kit(kit, tmp_path / f"{name}.log")
            procs.append(proc)
            proc.popen.wait(timeout=120)
            log = proc.log_text()
            assert proc.popen.returncode == 3, (name, proc.popen.returncode, log[-2000:])
            assert "refusing to start" in log and str(kit / named_file) in log, (name, log[-2000:])
            assert "ask the project lead for a fresh kit" in log and "python -m fedmed preflight" in log
            assert "Successfully registered" not in log and "connect" not in log.lower().split("refusing")[0]
            assert named_file.split("/")[-1] in (kit / "log.txt").read_text()  # where hospital IT looks first
            print(f"{name}: refused in {time.time() - started:.1f} s")
    finally:
        assert stop_processes(procs) == []


@pytest.mark.slow
def test_the_start_script_refuses_a_kit_whose_resources_no_longer_load_the_guard(kits20, tmp_path):
    kit = tmp_path / "no-guard"
    shutil.copytree(kits20 / "hospital-06", kit)
    resources = json.loads((kit / "local" / "resources.json").read_text())
    resources["components"] = [c for c in resources["components"] if c["id"] != "fedmed_kit_integrity"]
    (kit / "local" / "resources.json").write_text(json.dumps(resources))
    # sub_start.sh checks before it would start FLARE (it exits instead of entering its restart loop)
    result = subprocess.run(["bash", str(kit / "startup" / "sub_start.sh")], capture_output=True, text=True,
                            timeout=120, cwd=kit, env=kit_shell_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fedmed.deploy.integrity.KitIntegrityGuard" in result.stderr and str(kit / "local" / "resources.json") in result.stderr
    assert "not starting" in result.stdout and not (kit / "daemon_pid.fl").exists()
    # an intact kit passes the same check
    assert subprocess.run([sys.executable, "-m", "fedmed.deploy.integrity", str(kits20 / "hospital-06")],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
def test_a_package_file_removed_with_its_signature_entry_is_still_missed(kits20, tmp_path):
    from fedmed.deploy.integrity import verify_kit

    kit = tmp_path / "dropped"
    shutil.copytree(kits20 / "hospital-07", kit)
    sig_path = kit / "local" / kit_files.PACKAGE_SIGNATURE_FILE
    doc = json.loads(sig_path.read_text())
    del doc["files"]["fedmed/aggregation.py"]
    sig_path.write_text(json.dumps(doc))
    (kit / "local/custom/fedmed/aggregation.py").unlink()
    assert any("aggregation.py is signed but missing" in p for p in verify_kit(kit))
    doc["manifest"]["package_files"].remove("fedmed/aggregation.py")  # ... and from the manifest: its signature fails
    sig_path.write_text(json.dumps(doc))
    assert any("manifest does not match its signature" in p for p in verify_kit(kit))


@pytest.mark.slow
def test_preflight_warns_when_local_policy_is_weaker_than_provisioned_naming_file_and_key(kits20, tmp_path):
    from fedmed.deploy.preflight import policy_warnings

    kit = tmp_path / "weakened"
    shutil.copytree(kits20 / "hospital-08", kit)
    assert policy_warnings(kit) == []
    authz_path, privacy_path = kit / "local" / "authorization.json", kit / "local" / "privacy.json"
    authz = json.loads(authz_path.read_text())
    authz["permissions"]["lead"]["byoc"] = "any"  # BYOC allowed
    authz["permissions"]["org_admin"]["download_job"] = "o:site"  # more rights
    authz["permissions"]["member"] = "any"  # a blanket grant
    authz_path.write_text(json.dumps(authz))
    privacy = json.loads(privacy_path.read_text())
    scopes = {s["name"]: s for s in privacy["scopes"]}
    dp_filters = [f for key in ("task_data_filters", "task_result_filters") for f in scopes["dp"].get(key, [])]
    dp_list, dp = next((key, f) for key in ("task_data_filters", "task_result_filters") for f in scopes["dp"].get(key, [])
                       if {"epsilon", "epsilon_budget"} & set(f.get("args", {})))
    budget_key = "epsilon" if "epsilon" in dp["args"] else "epsilon_budget"
    dp["args"][budget_key] = 1000.0  # a bigger budget
    dp["args"]["delta"] = dp["args"]["delta"] / 10  # a smaller delta: stricter, no warning
    assert dp_filters
    scopes["compressed"]["task_result_filters"] = [f for f in scopes["compressed"]["task_result_filters"]
                                                   if not f["path"].endswith("ReleasePolicyFilter")]  # fewer filters
    privacy["scopes"].append({"name": "open", "task_result_filters": []})  # a scope the template does not allow
    privacy_path.write_text(json.dumps(privacy))
    warnings = policy_warnings(kit)
    text = "\n".join(warnings)
    assert f"{authz_path}: key 'permissions.lead.byoc' is \"any\"" in text and "bring-your-own-code" in text
    assert "key 'permissions.org_admin.download_job'" in text and "key 'permissions.member'" in text
    assert f"{privacy_path}: scope 'dp' {dp_list}: {dp['path']} key '{budget_key}' is 1000.0, bigger" in text
    assert "'delta'" not in text
    assert "scope 'compressed' task_result_filters: filter fedmed.flare.filters.ReleasePolicyFilter was removed" in text
    assert "scope 'open' is not in the provisioned policy" in text
    assert len(warnings) == 6, warnings
    # the command prints them as warnings: the kit still passes (exit code unchanged by warnings)
    fill = {"data": {"format": "synthetic"}}
    (kit / "local" / "fedmed_site.json").write_text(json.dumps(fill))
    result = subprocess.run([sys.executable, "-m", "fedmed", "preflight", str(kit), "--no-server"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, env=preflight_env())
    assert result.returncode == 0, result.stdout
    assert "WARN local policy weaker than provisioned" in result.stdout and "permissions.lead.byoc" in result.stdout
    # tightening is not a warning
    authz = json.loads((kits20 / "hospital-08" / "local" / "authorization.json").read_text())
    authz["permissions"]["lead"]["submit_job"] = "none"
    authz_path.write_text(json.dumps(authz))
    privacy_path.write_text((kits20 / "hospital-08" / "local" / "privacy.json").read_text())
    assert policy_warnings(kit) == []


# ---- the code that runs is the code that was signed (issue 19): bytecode, a shadowing fedmed, the server kit ------


def _forge_pyc(source: Path, extra: str) -> Path:
    """A .pyc of ``source`` with ``extra`` code appended, its header matching the unchanged source (size and
    mtime), where Python looks for it: Python runs it instead of the source."""
    import importlib._bootstrap_external as bootstrap

    code = compile(source.read_text() + "\n" + extra, str(source), "exec")
    stat_ = source.stat()
    target = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(bootstrap._code_to_timestamp_pyc(code, int(stat_.st_mtime), stat_.st_size))
    return target


def _marker_code(marker: Path, what: str) -> str:
    return f"open({str(marker)!r}, 'a').write({what!r} + '\\n')\n"


@pytest.mark.slow
def test_a_kit_with_forged_bytecode_is_refused_before_any_kit_code_runs_and_preflight_names_it(kits20, tmp_path):
    kit = tmp_path / "forged"
    shutil.copytree(kits20 / "hospital-09", kit)
    marker = tmp_path / "forged-code-ran.txt"
    package = kit / "local" / "custom" / "fedmed"
    forged = [_forge_pyc(package / "__init__.py", _marker_code(marker, "fedmed/__init__")),
              # the integrity module itself, with both checks switched off
              _forge_pyc(package / "deploy" / "integrity.py", _marker_code(marker, "integrity") +
                         "verify_kit = lambda kit_dir: []\nlaunch_main = lambda kit_dir: 0\n")]
    # the forgery works: a plain import of the kit's package runs it (the test could fail)
    probe = subprocess.run([sys.executable, "-B", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import fedmed.deploy.integrity as i; print(i.verify_kit(sys.argv[2]))", str(package.parent), str(kit)],
                           capture_output=True, text=True, timeout=120, env=process_env())
    assert probe.stdout.strip() == "[]" and marker.read_text().split() == ["fedmed/__init__", "integrity"], probe.stderr
    marker.unlink()
    assert kit_files.verify_package_signature(kit) == []  # the signed sources are untouched
    proc = start_kit(kit, tmp_path / "forged.log", env=process_env())
    try:
        proc.popen.wait(timeout=120)
        log = proc.log_text()
        assert proc.popen.returncode == 3, log[-2000:]
        for path in forged:
            assert f"{path.parent} is Python bytecode inside the kit" in log, log[-2000:]
        assert "Delete the named folders/files" in log and "Successfully registered" not in log
        assert not marker.exists(), "code from the forged .pyc ran"
    finally:
        assert stop_processes([proc]) == []
    result = subprocess.run([sys.executable, "-m", "fedmed", "preflight", str(kit), "--no-server"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "FAIL bytecode" in result.stdout and f"{forged[0].parent} is Python bytecode" in result.stdout, result.stdout
    assert "what to do: Delete the named" in result.stdout and not marker.exists()


def _foreign_fedmed(root: Path, marker: Path) -> Path:
    """Another fedmed package (as a stray `pip install` or a working copy would be), whose import leaves a marker."""
    package = root / "fedmed"
    (package / "deploy").mkdir(parents=True)
    (package / "__init__.py").write_text(_marker_code(marker, "foreign fedmed imported"))
    (package / "deploy" / "__init__.py").write_text("")
    (package / "deploy" / "integrity.py").write_text("def verify_kit(kit_dir):\n    return []\n")
    return package / "__init__.py"


@pytest.mark.slow
def test_a_kit_never_runs_another_fedmed_ahead_of_it_on_pythonpath_or_installed_in_its_python(kits20, tmp_path):
    import sysconfig

    marker = tmp_path / "foreign-code-ran.txt"
    kit = tmp_path / "hospital-10"
    shutil.copytree(kits20 / "hospital-10", kit)
    own = kit.resolve() / "local" / "custom" / "fedmed" / "__init__.py"
    # 1. another fedmed ahead of the kit on PYTHONPATH, the kit started as rehearse starts it
    foreign = _foreign_fedmed(tmp_path / "working-copy", marker)
    proc = start_kit(kit, tmp_path / "pythonpath.log", env={**process_env(), "PYTHONPATH": str(foreign.parents[1])})
    try:
        proc.popen.wait(timeout=120)
        log = proc.log_text()
        assert proc.popen.returncode == 3, log[-2000:]
        assert f"fedmed resolves to {foreign.resolve()}, not to the kit's signed copy {own}" in log, log[-2000:]
        assert "pip uninstall fedmed" in log and "Successfully registered" not in log
    finally:
        assert stop_processes([proc]) == []
    # 2. fedmed pip-installed in the hospital's Python (a throwaway venv whose site-packages holds it; the
    # requirements reached through a .pth), the kit started with its own startup/sub_start.sh
    venv = tmp_path / "hospital-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = _foreign_fedmed(site, marker)
    (site / "requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = kit_shell_env(PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(kit / "startup" / "sub_start.sh")], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"fedmed resolves to {installed.resolve()}, not to the kit's signed copy {own}" in result.stderr, result.stderr
    assert "not starting" in result.stdout and not (kit / "daemon_pid.fl").exists()
    assert not marker.exists(), f"the foreign fedmed ran: {marker.read_text()}"
    # preflight says the same, naming both paths
    run = subprocess.run(["bash", str(kit / "startup" / "preflight.sh"), "--no-server"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 1 and "FAIL package copy" in run.stdout, run.stdout + run.stderr
    assert str(installed.resolve()) in run.stdout and str(own) in run.stdout
    assert not marker.exists()


@pytest.mark.slow
def test_an_edited_server_kit_refuses_to_start_naming_the_file(kits20, tmp_path):
    """The server kit is checked as a hospital kit is: by its start check (as sub_start.sh runs it) and, when
    started without it, by the guard in its resources.json, before FLARE binds the server's ports."""
    cases = {
        "no-signature": ("startup/signature.json", lambda kit: (kit / "startup" / "signature.json").unlink()),
        "edited-package": ("local/custom/fedmed/flare/resume.py",
                           lambda kit: _edit(kit / "local/custom/fedmed/flare/resume.py", "import", "import os  # x\nimport")),
        "edited-start-script": ("startup/sub_start.sh",
                                lambda kit: _edit(kit / "startup" / "sub_start.sh", "exit 1", "true")),
    }
    procs = []
    try:
        for name, (named_file, tamper) in cases.items():
            kit = tmp_path / name
            shutil.copytree(kits20 / "localhost", kit)
            tamper(kit)
            proc = start_kit(kit, tmp_path / f"{name}.log", env=process_env())
            procs.append(proc)
            proc.popen.wait(timeout=120)
            log = proc.log_text()
            assert proc.popen.returncode == 3 and "refusing to start" in log and str(kit / named_file) in log, (name, log[-2000:])
            assert "Server started" not in log
        # FLARE's server process started directly (no start check): the guard refuses before the server binds
        kit = tmp_path / "edited-package"
        from fedmed.deploy.processes import MODULES, kit_environment, kit_org

        log_path = tmp_path / "direct.log"
        with open(log_path, "wb") as log:
            direct = subprocess.Popen([sys.executable, "-u", "-m", MODULES["server"], "-m", str(kit), "-s", "fed_server.json",
                                       "--set", "secure_train=true", "config_folder=config", f"org={kit_org(kit)}"],
                                      cwd=kit, stdout=log, stderr=subprocess.STDOUT, env=kit_environment(process_env()))
        try:
            assert direct.wait(timeout=180) == 3
        finally:
            if direct.poll() is None:
                direct.kill()
        text = log_path.read_text()
        assert "refusing to start" in text and str(kit / "local/custom/fedmed/flare/resume.py") in text, text[-2000:]
        assert "Server started" not in text
    finally:
        assert stop_processes(procs) == []
