"""`rehearse --hosts netns`: the federation across separate network hosts (Linux network namespaces).

One real rehearsal, shared by the assertions: 3 hospitals (seed 4: 239, 148 and 69 training images),
3 rounds, and hospital-03's network link cut during round 2 (`--fault partition-hospital:2`). The server, each hospital and the admins run on
their own host (own address, own host name, resolved through per-host hosts files); the kits are
provisioned for the server's host name; nothing is left behind (namespaces, hosts files, processes)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy_helpers import REPO

from fedmed.deploy.netns import NETNS_ETC, HostNetwork, NetnsError, require_netns
from fedmed.deploy.rehearse import NETNS_PORT, NETNS_SERVER_HOST, RehearsalError, rehearse

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="network namespaces need root and iproute2 (CI runs as root)")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and text in path.read_text(errors="replace"):
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def netns_run(tmp_path_factory):
    """The rehearsal, and `python -m fedmed watch` run by the lead on the admins' host while the job runs."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    tmp = tmp_path_factory.mktemp("netns")
    before = _namespaces()
    started = time.time()
    log = tmp / "rehearse.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedmed", "rehearse", "--hosts", "netns", "--hospitals", "3",
                                 "--rounds", "3", "--fault", "partition-hospital:2", "--set", "min_clients=2",
                                 "--seed", "4",  # hospital-03, the one cut off, has the fewest images: it is not slow
                                 # rounds long enough (several seconds on an idle machine) for the cut, made within
                                 # a second of round 1's end, to land while round 2 is still running
                                 "--set", "local_epochs=10",
                                 # plain FedAvg: a round closes once 2 answered (a median rule at 3 sites waits, with
                                 # patience, for all 3, and would outwait the cut)
                                 "--set", 'aggregation={"name": "fedavg"}',
                                 "--out", str(tmp / "out"), "--workdir", str(tmp / "work")],
                                stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    watch = None
    try:
        if _wait_for(log, "submitted job", proc, 600):
            lead_kit = next((tmp / "work" / "provision").glob("*/prod_*/lead@*"))
            admin_host = f"fedmed-{proc.pid}-4"  # server 0, hospitals 1-3, the admins' host 4
            watch = subprocess.run(["ip", "netns", "exec", admin_host, sys.executable, "-m", "fedmed", "watch",
                                    str(lead_kit), "--interval", "1", "--timeout", "600"],
                                   capture_output=True, text=True, cwd=REPO, timeout=700)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=120)
    output = log.read_text(errors="replace")
    print(f"rehearse --hosts netns: {time.time() - started:.1f} s\n{output[-4000:]}")
    if watch is not None:
        print(f"watch (exit {watch.returncode}):\n{watch.stdout[-3000:]}\n{watch.stderr[-2000:]}")
    summary = json.loads((tmp / "out" / "rehearsal.json").read_text())
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, ""), summary, tmp, before, watch


@pytest.mark.slow
def test_the_rehearsal_completes_every_round_with_each_participant_on_its_own_address(netns_run):
    result, summary, *_ = netns_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["status"] == "FINISHED:COMPLETED" and summary["rounds_completed"] == 3
    hosts = summary["participants"]
    machines = [NETNS_SERVER_HOST, "hospital-01", "hospital-02", "hospital-03"]
    addresses = [hosts[name]["address"] for name in machines]
    assert len(set(addresses)) == 4 and not any(a.startswith("127.") for a in addresses)
    admins = {name: h for name, h in hosts.items() if "@" in name}
    assert admins and len({h["address"] for h in admins.values()} | set(addresses)) == 5  # one more host: the admins'
    assert hosts["hospital-02"]["host"].startswith("hospital-02.")
    # the kits name the server by its host name; the progress lines came through the admin API
    assert f"provisioning server {NETNS_SERVER_HOST}:{NETNS_PORT}" in result.stdout
    assert "round 1/3: " in result.stdout and "round 3/3: " in result.stdout


@pytest.mark.slow
def test_only_the_server_listens_beyond_loopback_and_hospitals_connect_only_to_it(netns_run):
    _, summary, *_ = netns_run
    hosts = summary["participants"]
    server = hosts[NETNS_SERVER_HOST]
    assert server["listening"] and {e.rsplit(":", 1)[1] for e in server["listening"]} == {str(NETNS_PORT)}
    for hospital in ("hospital-01", "hospital-02", "hospital-03"):
        assert hosts[hospital]["listening"] == [], hospital
        assert hosts[hospital]["connected_to"] == [f"{server['address']}:{NETNS_PORT}"], hospital


@pytest.mark.slow
def test_a_hospital_cut_off_for_a_round_misses_it_and_rejoins(netns_run):
    result, summary, *_ = netns_run
    (fault,) = summary["faults"]
    assert fault["fired"] and fault["hospital"] == "hospital-03" and fault["healed_at_s"] > fault["cut_at_s"]
    # back after the heal: it trains in round 3 (unless, on a loaded machine, too slowly for round 3's deadline)
    # and validates the final model
    assert fault["rounds_without_it"][0] == 2 and fault["rejoined"] and fault["validated_final_model"]
    assert fault["rounds_after_rejoining"] in ([3], []) and fault["rounds_without_it"] in ([2], [2, 3])
    assert "hospital-03 missed round(s) [2" in result.stdout and "and rejoined: " in result.stdout


@pytest.mark.slow
def test_no_namespace_hosts_file_or_process_is_left_behind(netns_run):
    _, _, tmp, before, _ = netns_run
    assert _namespaces() == before
    assert not [p for p in NETNS_ETC.glob("fedmed-*")] if NETNS_ETC.is_dir() else True
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(tmp) in part for part in (p.info["cmdline"] or [])):
                left.append(p.info["pid"])
        except psutil.NoSuchProcess:
            pass
    assert left == []


@pytest.mark.slow
def test_watch_follows_the_deployed_jobs_rounds_to_its_final_status_from_the_admins_host(netns_run):
    *_, watch = netns_run
    assert watch is not None, "the job was never submitted"
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-2000:]
    assert "watching job" in watch.stdout and "as lead@" in watch.stdout
    for done in (1, 2, 3):
        assert f"round {done}/3: " in watch.stdout
    assert "round 2/3: 2 of 3 site(s) answered (left out: hospital-03)" in watch.stdout  # the partitioned round
    assert "median val_auc" in watch.stdout and "ETA" in watch.stdout
    assert "ended: FINISHED:COMPLETED" in watch.stdout.splitlines()[-1]


@pytest.mark.unit
def test_without_root_netns_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/sbin/ip")
    with pytest.raises(NetnsError, match="needs root"):
        require_netns()
    with pytest.raises(NetnsError, match="needs root"):
        HostNetwork({"server": "server.test"}).create()


@pytest.mark.unit
def test_a_partition_fault_on_loopback_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(RehearsalError, match="needs --hosts netns"):
        rehearse(hospitals=2, rounds=2, out=str(tmp_path / "out"), faults=["partition-hospital:1"])
    assert not (tmp_path / "out").exists()


@NEEDS_ROOT
@pytest.mark.unit
def test_host_network_gives_each_participant_its_address_and_name_and_removes_everything(tmp_path):
    net = HostNetwork({"srv.test": "srv.test", "h1": "h1.test"}, tag=f"t{os.getpid()}")
    with net:
        namespaces = [h.namespace for h in net.hosts.values()]
        assert set(namespaces) <= _namespaces()
        hosts_file = (NETNS_ETC / namespaces[1] / "hosts").read_text()
        assert f"{net.host('srv.test').address} srv.test" in hosts_file
        out = subprocess.run(net.command("h1", [sys.executable, "-c",
                                                "import socket; print(socket.gethostbyname('srv.test'))"]),
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == net.host("srv.test").address
    assert not set(namespaces) & _namespaces()
    assert not (NETNS_ETC / namespaces[0]).exists()


@NEEDS_ROOT
@pytest.mark.slow
def test_cross_host_faults_are_diagnosed_from_the_hospitals_own_host(tmp_path):
    """A hospital on its own host that cannot reach the server: the checks a rehearsal runs there (and
    preflight runs at a hospital) name the cause: port closed, link cut (firewall-like drop), and a kit
    that names the server by another name than its certificate's."""
    from test_reachability import PKI

    from fedmed.deploy.federation import LocalFederation

    port = 8002
    net = HostNetwork({"srv.fedmed.test": "srv.fedmed.test", "hospital-01": "hospital-01.fedmed.test",
                       "alias": "alias.fedmed.test"}, tag=f"d{os.getpid()}")
    pki = PKI(tmp_path / "pki", server_name="srv.fedmed.test")
    prod = tmp_path / "prod"
    startup = prod / "hospital-01" / "startup"
    startup.mkdir(parents=True)
    for name in ("rootCA.pem", "client.crt", "client.key"):
        shutil.copy(tmp_path / "pki" / name, startup / name)

    def kit_targets(host):
        (startup / "fed_client.json").write_text(json.dumps({
            "servers": [{"name": "fedmed", "service": {"target": f"{host}:{port}"}}],
            "client": {"fqsn": "hospital-01", "ssl_cert": "client.crt", "ssl_private_key": "client.key"}}))

    with net:
        federation = LocalFederation(prod, tmp_path / "logs", network=net)
        kit_targets("srv.fedmed.test")
        closed = federation.diagnose("hospital-01", timeout=2)
        assert "OK   server name" in closed and "FAIL server port" in closed and "refused the connection" in closed
        listener = Path(__file__).with_name("test_reachability.py")  # its TLS listener, run on the server's host
        server = subprocess.Popen(net.command("srv.fedmed.test", [
            sys.executable, str(listener), str(pki.server_cert), str(pki.server_key), str(pki.ca), "0.0.0.0", str(port)]),
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            assert "FAIL" not in federation.diagnose("hospital-01", timeout=2)
            # a kit provisioned for another name of the same machine (an alias on the server's address)
            alias_hosts = (NETNS_ETC / net.host("hospital-01").namespace / "hosts")
            alias_hosts.write_text(alias_hosts.read_text().replace(net.host("alias").address + " alias",
                                                                   net.host("srv.fedmed.test").address + " alias"))
            kit_targets("alias.fedmed.test")
            wrong_name = federation.diagnose("hospital-01", timeout=2)
            assert "OK   server port" in wrong_name and "FAIL server TLS" in wrong_name
            assert "not for 'alias.fedmed.test'" in wrong_name and "another server name" in wrong_name
            # the hospital's link cut: no answer at all, as behind a firewall that drops
            kit_targets("srv.fedmed.test")
            net.cut("hospital-01")
            dropped = federation.diagnose("hospital-01", timeout=2)
            assert "FAIL server port" in dropped and "no answer from srv.fedmed.test:8002" in dropped
        finally:
            server.kill()
            server.wait()
