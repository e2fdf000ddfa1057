"""Run startup kits as real FLARE processes on this machine, and end exactly those processes.

Used by ``rehearse`` and the deployment tests. A kit is started the way its ``startup/sub_start.sh``
starts it (``server_train`` / ``client_train`` with ``secure_train=true``), without the restart loop,
with the kit's folder as the working folder and the output in a log file, after the kit's own check
(``startup/fedmed_check.py``) and with Python's bytecode kept outside the kit, as ``sub_start.sh`` does. Processes are stopped by
PID: the process we started and the job processes it started (found through the process tree).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography.x509.oid import NameOID

from nvflare.lighter.utils import load_crt

from fedmed.deploy.integrity import CHECK_SCRIPT, PYCACHE_ENV, default_pycache
from fedmed.deploy.kit import SERVER_SETTINGS, STARTUP, read_kit

MODULES = {
    "server": "nvflare.private.fed.app.server.server_train",
    "client": "nvflare.private.fed.app.client.client_train",
}
READY_PATTERNS = {"server": r"Server started", "client": r"Successfully registered client"}
REFUSED_PATTERN = "The following files are not secure content"


class DeploymentError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kit_org(kit_dir: str | Path) -> str:
    info = read_kit(kit_dir)
    cert = load_crt(str(Path(kit_dir) / STARTUP / info.cert))
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return orgs[0].value if orgs else ""


@dataclass
class KitProcess:
    name: str
    kind: str
    kit: Path
    log_path: Path
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None


def kit_environment(env: dict | None = None) -> dict:
    """The environment :func:`start_kit` starts a kit with: ``env`` as given, else this process's
    without ``PYTHONPATH`` (a hospital's ``start.sh`` has none: a developer's ``PYTHONPATH`` naming a
    working copy of fedmed would shadow the kit's signed copy, and the kit would refuse to start),
    and, as the kit's ``sub_start.sh`` sets it, ``PYTHONPYCACHEPREFIX`` (bytecode outside the kit)."""
    if env is None:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env = dict(env)
    env.setdefault(PYCACHE_ENV, default_pycache(env))
    return env


# start_kit's command: the kit's own check (startup/fedmed_check.py, isolated from PYTHONPATH), then FLARE in
# the same process (exec), as sub_start.sh runs them; a refused kit exits with the check's code (3)
_LAUNCH = 'py="$1"; check="$2"; kit="$3"; shift 3; "$py" -I "$check" "$kit" || exit $?; exec "$py" "$@"'


def start_kit(kit_dir: str | Path, log_path: str | Path, env: dict | None = None,
              prefix: list[str] | None = None) -> KitProcess:
    """Start a server or client kit as ``sub_start.sh`` does; return at once (see :func:`wait_for_log`).

    As in ``sub_start.sh``, the kit's ``startup/fedmed_check.py`` runs first (``python -I``) and the
    process ends with its exit code (3) when it refuses the kit; ``env``: see :func:`kit_environment`.
    ``prefix`` runs the command through another one that ``exec``s it (``ip netns exec NS``: the kit's
    own network host), so the PID is still the kit process's."""
    kit = Path(kit_dir).resolve()
    info = read_kit(kit)
    if info.kind not in MODULES:
        raise DeploymentError(f"{kit} is an {info.kind} kit; only server and client kits run as processes")
    check = kit / STARTUP / CHECK_SCRIPT
    if not check.is_file():
        raise DeploymentError(f"{check} is missing: the kit cannot check itself before it starts; provision the kits "
                              f"again with python -m fedmed provision")
    command = [sys.executable, "-u", "-m", MODULES[info.kind], "-m", str(kit), "-s", f"fed_{info.kind}.json",
               "--set", "secure_train=true", "config_folder=config", f"org={kit_org(kit)}"]
    if info.kind == "client":
        command.append(f"uid={info.name}")
    else:  # as the server kit's sub_start.sh passes them
        command += [f"{key}={value}" for key, value in SERVER_SETTINGS.items()]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen([*(prefix or []), "bash", "-c", _LAUNCH, "fedmed-start", sys.executable, str(check), str(kit),
                                  *command[1:]], cwd=kit, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=kit_environment(env))
    return KitProcess(info.name, info.kind, kit, log_path, popen)


def wait_for_log(proc: KitProcess, pattern: str, timeout: float, what: str) -> None:
    """Wait until ``pattern`` appears in the process's log; raise with the log's tail if it exits or times out."""
    deadline = time.time() + timeout
    regex = re.compile(pattern)
    while time.time() < deadline:
        if regex.search(proc.log_text()):
            return
        if not proc.alive():
            raise DeploymentError(f"{proc.kind} {proc.name} exited (code {proc.popen.returncode}) before {what}; "
                                  f"log {proc.log_path}:\n{proc.log_tail()}")
        time.sleep(0.3)
    raise DeploymentError(f"{proc.kind} {proc.name}: no '{what}' within {timeout:.0f} s; log {proc.log_path}:\n{proc.log_tail()}")


def wait_ready(proc: KitProcess, timeout: float = 90.0) -> None:
    wait_for_log(proc, READY_PATTERNS[proc.kind], timeout,
                 "server start" if proc.kind == "server" else "registration with the server")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(procs: list[KitProcess], timeout: float = 15.0) -> list[int]:
    """Terminate each started process and its descendants by PID; kill what is left. Returns PIDs still alive."""
    tree = []
    for proc in procs:
        tree += process_tree(proc.pid)
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=5)
    for proc in procs:
        try:
            proc.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    return [p.pid for p in still]


def listening_addresses(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP/UDP socket held by these processes and their descendants."""
    found = []
    seen = set()
    for pid in pids:
        for p in process_tree(pid):
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                connections = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in connections:
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                    found.append((p.pid, c.laddr.ip, c.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "localhost")


def _hex_endpoint(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (``/proc/net/tcp``) -> ("127.0.0.1", 8080); IPv6 in ``tcp6``'s 32-digit form."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        if ip.startswith("::ffff:"):
            ip = ip[7:]
    return ip, int(port, 16)


def network_facts(pid: int) -> dict:
    """What a started process (and its descendants) exposes and reaches beyond its own loopback:
    ``{"listening": ["ip:port", ...], "connected_to": ["ip:port", ...]}`` (sorted, deduplicated).

    Read from ``/proc/<pid>/net/tcp*``, the socket table of the process's OWN network namespace
    (psutil reads the caller's, which misses a process on another network host)."""
    listening, connected = set(), set()
    for proc in process_tree(pid):
        inodes = set()
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{proc.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or fields[9] not in inodes:
                    continue
                (lip, lport), (rip, rport), state = _hex_endpoint(fields[1]), _hex_endpoint(fields[2]), fields[3]
                if state == "0A" and not is_loopback(lip):  # LISTEN
                    listening.add(f"{lip}:{lport}")
                elif state == "01" and not is_loopback(rip):  # ESTABLISHED
                    connected.add(f"{rip}:{rport}")
    return {"listening": sorted(listening), "connected_to": sorted(connected)}


class MemorySampler:
    """Peak resident memory of each started kit: its own process, and the sum of its descendants (FLARE's
    job process), sampled on every :meth:`sample` call (``rehearse`` calls it once a second)."""

    def __init__(self, processes: dict[str, "KitProcess"]):
        self.processes = processes
        self.peaks: dict[str, dict[str, float]] = {}

    def sample(self) -> None:
        for name, proc in list(self.processes.items()):
            tree = process_tree(proc.pid)
            if not tree:
                continue
            rss = []
            for p in tree:
                try:
                    rss.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    rss.append(0.0)
            peak = self.peaks.setdefault(name, {"kit_process_mb": 0.0, "job_processes_mb": 0.0})
            peak["kit_process_mb"] = max(peak["kit_process_mb"], round(rss[0], 1))
            peak["job_processes_mb"] = max(peak["job_processes_mb"], round(sum(rss[1:]), 1))
