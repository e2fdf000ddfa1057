"""A provisioned federation started from its kits on this machine: server, hospitals, admin sessions.

``LocalFederation`` is what ``rehearse`` and the deployment tests drive: it starts kits as real
processes (:mod:`fedmed.deploy.processes`), opens admin sessions through FLARE's admin API
(``nvflare.fuel.flare_api.flare_api.new_secure_session``) and, on ``stop()``, asks the server to shut
the system down (as the project admin) and then ends every process it started by PID.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import time
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import new_secure_session

from fedmed.deploy.processes import DeploymentError, KitProcess, start_kit, stop_processes, wait_ready


class LocalFederation:
    def __init__(self, prod_dir: str | Path, log_dir: str | Path, env: dict | None = None, project_admin: str | None = None,
                 network=None):
        """Args:
            prod_dir: the provisioned kits folder (``.../prod_NN``), one subfolder per participant.
            log_dir: where each started process's output goes (``<name>.log``).
            env: environment for the started processes (default: this process's).
            project_admin: admin user whose kit is used to shut the system down at ``stop()``.
            network: a :class:`fedmed.deploy.netns.HostNetwork`: each kit starts on its own network host
                (default: all on this machine's loopback).
        """
        self.prod_dir = Path(prod_dir)
        self.log_dir = Path(log_dir)
        self.env = env
        self.project_admin = project_admin
        self.network = network
        self.processes: dict[str, KitProcess] = {}
        self.retired: list[KitProcess] = []  # replaced by a restart (rehearse --fault): still ended by PID at stop()
        self._sessions = []

    def kit(self, name: str) -> Path:
        path = self.prod_dir / name
        if not (path / "startup").is_dir():
            raise FileNotFoundError(f"no startup kit for '{name}' in {self.prod_dir}")
        return path

    def start(self, name: str, kit_dir: str | Path | None = None, wait: bool = True, timeout: float = 90.0,
              log_name: str | None = None) -> KitProcess:
        """Start the kit of ``name`` (or another kit folder) and, with ``wait``, wait until it is ready.

        The output goes to ``log_dir/<log_name or name>.log``; a restarted kit needs a new log name, or
        the ready line of its first start would be taken for the new one."""
        kit = Path(kit_dir) if kit_dir else self.kit(name)
        prefix = self.network.command(name, []) if self.network is not None else None
        proc = start_kit(kit, self.log_dir / f"{log_name or name}.log", self.env, prefix)
        self.processes[name] = proc
        if wait:
            wait_ready(proc, timeout)
        return proc

    def start_all(self, server: str, clients: list[str], timeout: float | None = None, log=print) -> None:
        """Start the server, then every client at once; wait until each registered.

        ``timeout`` (default ``90 + 10 x clients`` seconds: clients starting together share the CPU while
        they import FLARE) bounds the server's start and each client's registration."""
        timeout = timeout or 90.0 + 10.0 * len(clients)
        started = time.time()
        self.start(server, timeout=timeout)
        log(f"  server {server} up ({time.time() - started:.1f} s; log {self.processes[server].log_path})")
        procs = [self.start(c, wait=False) for c in clients]
        for proc in procs:
            try:
                wait_ready(proc, timeout)
            except DeploymentError as exc:  # FLARE's client retries silently: say why it cannot reach the server
                raise DeploymentError(f"{exc}\n{self.diagnose(proc.name)}") from exc
            log(f"  {proc.name} registered ({time.time() - started:.1f} s; log {proc.log_path})")

    def diagnose(self, name: str, timeout: float = 5.0) -> str:
        """The server name / port / TLS checks (``fedmed.deploy.reachability``) run from ``name``'s own host."""
        command = [sys.executable, "-m", "fedmed.deploy.reachability", str(self.kit(name)), str(timeout)]
        if self.network is not None:
            command = self.network.command(name, command)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=4 * timeout + 120)
        except subprocess.TimeoutExpired:
            return f"network checks from {name}'s host did not finish within {4 * timeout + 120:.0f} s"
        return f"network checks from {name}'s host:\n{result.stdout}{result.stderr}".rstrip()

    def session(self, user: str, timeout: float = 30.0):
        """An admin API session as ``user`` from that user's kit (closed at ``stop()``)."""
        with contextlib.redirect_stdout(io.StringIO()):  # the API prints "Connecting to FLARE ..."
            session = new_secure_session(user, str(self.kit(user)), timeout=timeout)
        self._sessions.append(session)
        return session

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def stop(self, timeout: float = 20.0) -> list[int]:
        """Shut the system down through the admin API, then end every started process by PID.

        Returns PIDs that were still alive after being killed (empty when all ended)."""
        for session in self._sessions:  # close user sessions while the server still answers
            with contextlib.suppress(Exception):
                session.close()
        self._sessions.clear()
        if self.project_admin and any(p.alive() for p in self.processes.values()):
            previous = logging.root.manager.disable
            logging.disable(logging.ERROR)  # the admin API logs 'no connection' once the server has gone
            try:
                self.session(self.project_admin, timeout=10).shutdown_system()
                deadline = time.time() + timeout
                while time.time() < deadline and any(p.alive() for p in self.processes.values()):
                    time.sleep(0.3)
            except Exception:  # the server may be down already; the PID stop below ends everything
                pass
            finally:
                for session in self._sessions:
                    with contextlib.suppress(Exception):
                        session.close()
                self._sessions.clear()
                logging.disable(previous)
        return stop_processes(list(self.processes.values()) + self.retired)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
