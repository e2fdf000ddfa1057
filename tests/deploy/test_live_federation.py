"""A real deployment on 127.0.0.1: kits from the real `nvflare provision`, server and hospital
clients started from their kits as processes, jobs submitted through FLARE's admin API.

One federation per module (server + hospital-01 + hospital-02 up; hospital-03 provisioned with its
data config still the placeholder). The tests run in file order and share it; the last one shuts
it down and checks that every process ended."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed.deploy import kit as kit_files
from fedmed.deploy.federation import LocalFederation
from fedmed.deploy.launch_check import bytecode_in
from fedmed.deploy.processes import free_port, kit_environment, is_loopback, listening_addresses, process_tree, stop_processes
from fedmed.deploy.rehearse import FINISHED_OK, prepare_job_copy
from fedmed.results import export_run_outputs, find_server_app_dir

from deploy_helpers import LEAD, PROJECT_ADMIN, REPO, fill_site, preflight_env, process_env, provision_kits
from test_provenance import rewrite_chain

pytestmark = pytest.mark.slow

SERVER = "localhost"
JOB = "jobs/cxr_pneumonia_fedavg"
NVFLARE_TMP = Path("/tmp/nvflare")


class Live:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.prod = provision_kits(root / "provision", hospitals=3, port=self.port, name="fedmed_live")
        for hospital in ("hospital-01", "hospital-02"):
            fill_site(self.prod / hospital)  # hospital-03 keeps the placeholder
        self.federation = LocalFederation(self.prod, root / "logs", env=process_env(), project_admin=PROJECT_ADMIN)
        self.job_ids: list[str] = []
        self.seen_pids: set[int] = set()
        self.listening: list[tuple[int, str, int]] = []
        self.nvflare_tmp_existed = NVFLARE_TMP.exists()

    def sample(self):
        """Record every process of the federation (job processes included) and its listening sockets."""
        for pid in self.federation.pids():
            self.seen_pids.update(p.pid for p in process_tree(pid))
        self.listening += listening_addresses(self.federation.pids())

    def job(self, name: str, min_clients: int = 2, rounds: int = 1) -> Path:
        path = prepare_job_copy(JOB, self.root / "jobs" / name, min_clients, rounds, None)
        meta = json.loads((path / "meta.json").read_text())
        meta["min_clients"] = min_clients
        (path / "meta.json").write_text(json.dumps(meta))
        server_config = path / "app" / "config" / "config_fed_server.json"
        config = json.loads(server_config.read_text())
        for workflow in config["workflows"]:
            if workflow["path"] == "fedmed.flare.controller.FedAvgController":
                workflow["args"]["wait_after_min_clients"] = 5
                workflow["args"]["min_clients"] = min_clients
        server_config.write_text(json.dumps(config))
        return path

    def run(self, session, job_dir: Path, timeout: float = 300) -> tuple[str, dict]:
        job_id = session.submit_job(str(job_dir))
        self.job_ids.append(job_id)

        def watch(*_args):
            self.sample()
            return True

        _rc, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=1.0, cb=watch)
        assert meta is not None, f"job {job_id} did not end within {timeout} s"
        return job_id, meta


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = Live(tmp_path_factory.mktemp("live"))
    try:
        live.federation.start_all(SERVER, ["hospital-01", "hospital-02"], log=lambda line: None)
        live.sample()
        yield live
    finally:
        live.federation.stop()


def test_lead_submits_the_job_it_finishes_and_the_global_model_downloads(live, tmp_path):
    session = live.federation.session(LEAD)
    started = time.time()
    job_id, meta = live.run(session, live.job("cxr_pneumonia_fedavg", rounds=3))
    assert meta["status"] == FINISHED_OK, meta
    download = Path(session.download_job_result(job_id, str(tmp_path / "download")))
    out = tmp_path / "out"
    metrics = export_run_outputs(find_server_app_dir(download), out)
    print(f"job submit -> downloaded: {time.time() - started:.1f} s")
    assert (out / "models" / "global_model.pt").is_file()
    assert (out / "bundle" / "models" / "model.pt").is_file()
    assert metrics["finished"] and metrics["rounds"][0]["contributors"] == ["hospital-01", "hospital-02"]
    # both hospitals ran the fedmed package pre-deployed in their own kit (no BYOC in the job)
    assert not (REPO / JOB / "app" / "custom").exists()
    # ... and kept its bytecode outside the kit: the job processes FLARE spawned inherited the start
    # environment (PYTHONPYCACHEPREFIX), whose tree mirrors the path of the source each one imported
    # (the server's job process likewise: its controller)
    prefix = Path(kit_environment(process_env())["PYTHONPYCACHEPREFIX"])
    for site, module in (("hospital-01", "executor."), ("hospital-02", "executor."), (SERVER, "controller.")):
        kit = (live.prod / site).resolve()
        cache = prefix / kit.relative_to(kit.anchor) / "local" / "custom" / "fedmed" / "flare"
        assert any(p.name.startswith(module) for p in cache.glob("*.pyc")), f"{site} did not import its kit's fedmed"
        assert bytecode_in(str(kit)) == [], f"{site}: bytecode written inside the kit"
    # the provenance card is signed by the server's kit key (the project's PKI); a rewritten chain fails (issue 19)
    card_dir = find_server_app_dir(download) / "fedmed"
    card = json.loads((card_dir / "provenance.json").read_text())
    assert card["signature"]["signer"] == SERVER
    verify = [sys.executable, "-m", "fedmed", "verify-provenance", str(download), "--kit", str(live.prod / LEAD)]
    run = subprocess.run(verify, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and f"VERIFIED: signed by '{SERVER}'" in run.stdout, run.stdout + run.stderr
    (card_dir / "provenance.json").write_text(json.dumps(rewrite_chain(card)))
    run = subprocess.run(verify, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1 and "TAMPERED" in run.stderr and "does not match the card's content" in run.stderr, run.stderr
    # the job store is inside the server's workspace
    assert (live.prod / SERVER / "jobs-storage" / "jobs" / job_id).is_dir()


def test_an_org_admin_without_the_submit_right_is_refused(live):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    session = live.federation.session("it@hospital-01.example.org")
    with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
        session.submit_job(str(live.job("org_admin_try")))


def test_hospitals_refuse_a_job_from_a_user_their_policy_does_not_allow_to_submit(live):
    # the server's policy lets the project admin submit; each hospital's own authorization.json does not
    session = live.federation.session(PROJECT_ADMIN)
    _job_id, meta = live.run(session, live.job("project_admin_try"), timeout=120)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    detail = meta["job_deploy_detail"]
    for hospital in ("hospital-01", "hospital-02"):
        assert f"{hospital}: user '{PROJECT_ADMIN}' is not authorized for 'submit_job'" in detail


def test_a_job_that_brings_its_own_code_is_refused(live):
    # the server refuses it first (its policy: byoc none); each hospital's policy says the same
    # (test_provisioning checks the hospital policies with FLARE's authorizer)
    job = live.job("byoc_try")
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "extra_code.py").write_text("print('code the hospitals did not install')\n")
    session = live.federation.session(LEAD)
    _job_id, meta = live.run(session, job, timeout=120)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    assert meta["byoc"] is True and "server: BYOC not permitted" in meta["job_deploy_detail"]


def test_a_client_with_certificates_from_another_provisioning_run_is_refused_and_preflight_says_why(live):
    foreign = provision_kits(live.root / "foreign", hospitals=1, port=live.port, name="fedmed_foreign")
    fill_site(foreign / "hospital-01")
    proc = live.federation.start(f"foreign-hospital-01", kit_dir=foreign / "hospital-01", wait=False)
    try:
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "fedmed", "preflight", str(foreign / "hospital-01"),
                                 "--timeout", "5"], capture_output=True, text=True, cwd=REPO, timeout=120)
        preflight_seconds = time.time() - started
        print(f"preflight of the foreign kit: {preflight_seconds:.1f} s (incl. Python start)")
        assert result.returncode == 1
        assert "FAIL server" in result.stdout and "different provisioning run" in result.stdout, result.stdout
        assert preflight_seconds < 15
        # the genuine hospital kit passes the same check against the same server
        assert kit_files.check_server_connection(live.prod / "hospital-01") == []
        time.sleep(max(0.0, 12 - (time.time() - started)))
        # FLARE 2.9's client keeps retrying without an error; whether it waits or exits, it never registers
        assert "Successfully registered" not in proc.log_text()
        assert proc.alive() or proc.popen.returncode != 0
        connected = [c.name for c in live.federation.session(PROJECT_ADMIN).get_connected_client_list()]
        assert sorted(connected) == ["hospital-01", "hospital-02"]
    finally:
        assert stop_processes([proc]) == []
    assert not proc.alive()


def test_preflight_passes_for_a_genuine_hospital_kit_with_its_data_config_filled(live):
    result = subprocess.run([sys.executable, "-m", "fedmed", "preflight", str(live.prod / "hospital-02")],
                            capture_output=True, text=True, cwd=REPO, timeout=120, env=preflight_env())
    assert result.returncode == 0, result.stdout
    for check in ("signature", "certificates", "bytecode", "package copy", "start check", "site config", "allow-list", "server"):
        assert f"OK   {check}" in result.stdout
    assert "ready to start" in result.stdout


def test_a_hospital_whose_data_config_is_still_the_placeholder_fails_the_job_naming_site_and_file(live, tmp_path):
    live.federation.start("hospital-03")
    live.sample()
    session = live.federation.session(LEAD)
    job = live.job("placeholder_try", min_clients=3)  # every hospital is needed: min_clients 3
    job_id, meta = live.run(session, job)
    assert meta["status"] != FINISHED_OK
    download = Path(session.download_job_result(job_id, str(tmp_path / "download")))
    metrics = json.loads((find_server_app_dir(download) / "fedmed" / "metrics.json").read_text())
    config_file = live.prod / "hospital-03" / "local" / "fedmed_site.json"
    reason = metrics["rounds"][0]["failed"]["hospital-03"]
    assert "site 'hospital-03'" in reason and str(config_file) in reason and "placeholder" in reason
    assert "hospital-03" in metrics["error"] and str(config_file) in metrics["error"]
    assert str(config_file) in (live.root / "logs" / "hospital-03.log").read_text()
    # `python -m fedmed results` on this download gives the true reason, from any folder of it (issue 14)
    for folder in (download, download / "workspace" / "app_server" / "fedmed"):
        run = subprocess.run([sys.executable, "-m", "fedmed", "results", str(folder), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert run.returncode == 1, run.stdout + run.stderr
        assert f"job {job_id}" in run.stderr and meta["status"] in run.stderr
        assert "site 'hospital-03'" in run.stderr and "placeholder" in run.stderr
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_hospitals_org_admin_may_stop_its_own_site_but_not_another(live):
    it03 = live.federation.session("it@hospital-03.example.org")
    # hospital-02's own policy (org_admin operate: o:site) refuses; FLARE reports it only as a failed shutdown
    with pytest.raises(Exception, match="failed to shut down"):
        it03.shutdown("client", ["hospital-02"], timeout=15)
    time.sleep(2)
    assert live.federation.processes["hospital-02"].alive()
    it03.shutdown("client", ["hospital-03"], timeout=30)
    proc = live.federation.processes["hospital-03"]
    proc.popen.wait(timeout=30)  # the hospital-03 client process ended on its org admin's command
    assert live.federation.processes["hospital-01"].alive() and live.federation.processes["hospital-02"].alive()


def test_the_documented_stop_commands_say_who_may_stop_and_end_a_site_and_the_server(live):
    def stop(user, *target):
        return subprocess.run([sys.executable, "-m", "fedmed", "stop", str(live.prod / user), *target],
                              capture_output=True, text=True, cwd=REPO, timeout=180)

    refused = stop(LEAD, "server")  # the lead's kit is refused by policy: said as a refusal, not CONNECTION_FAILED
    assert refused.returncode == 1 and "REFUSED" in refused.stderr and f"'{LEAD}' is not authorized" in refused.stderr
    not_own = stop("it@hospital-01.example.org", "client", "hospital-02")
    assert not_own.returncode == 1 and "NOT STOPPED: hospital-02 still connected" in not_own.stderr
    assert live.federation.processes[SERVER].alive() and live.federation.processes["hospital-02"].alive()
    own = stop("it@hospital-02.example.org", "client", "hospital-02")  # README: a hospital stops its own site
    assert own.returncode == 0 and "stopped hospital-02 as it@hospital-02.example.org" in own.stdout, own.stderr
    live.federation.processes["hospital-02"].popen.wait(timeout=60)
    everything = stop(PROJECT_ADMIN, "all")  # README: the project admin stops the deployment
    assert everything.returncode == 0 and f"as {PROJECT_ADMIN}" in everything.stdout, everything.stderr
    live.federation.processes[SERVER].popen.wait(timeout=60)
    live.federation.processes["hospital-01"].popen.wait(timeout=60)
    gone = stop(PROJECT_ADMIN, "all")
    assert gone.returncode == 2 and "cannot reach the server" in gone.stderr


def test_nothing_listened_beyond_loopback_or_wrote_to_tmp_nvflare_and_shutdown_ends_every_process(live):
    live.sample()
    assert live.listening, "no listening sockets were seen; the check would be vacuous"
    assert any(port == live.port for _pid, _ip, port in live.listening)
    outside = [entry for entry in live.listening if not is_loopback(entry[1])]
    assert outside == []
    pids = set(live.seen_pids)
    assert len(pids) > 3  # server, 3 hospitals and their job processes were seen
    assert live.federation.stop() == []
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert [pid for pid in pids if _alive(pid)] == []
    if not live.nvflare_tmp_existed:
        assert not NVFLARE_TMP.exists(), "a FLARE process of this deployment wrote under /tmp/nvflare"
    elif NVFLARE_TMP.exists():  # left by something else before this module: none of our jobs may be in it
        leaked = [str(p) for p in NVFLARE_TMP.rglob("*") if any(job_id in p.name for job_id in live.job_ids)]
        assert leaked == []
    for job_id in live.job_ids:
        assert (live.prod / SERVER / "jobs-storage" / "jobs" / job_id).is_dir()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
