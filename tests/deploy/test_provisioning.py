"""Provisioning with the real `nvflare provision`: project file, kits, templates, package, signatures.

The 20-hospital project is provisioned once per module (about 10 s on 2 cores)."""

import json
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

from deploy_helpers import LEAD, PROJECT_ADMIN, REPO, provision_kits

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
            assert "The following files are not secure content" in log and config in log
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
    assert "placeholder" in out and "not reachable" in out
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
