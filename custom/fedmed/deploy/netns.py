"""Separate network hosts on one machine for ``rehearse --hosts netns``: Linux network namespaces.

Each participant (the server, every hospital, the admins' workstation) gets its own network
namespace with one interface ``eth0`` holding its own address, joined to the others by a virtual
bridge that lives in a namespace of its own; the machine's own network (its root namespace) gets
no interface, route or address. Each namespace resolves names through its own hosts file
(``/etc/netns/<namespace>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``): the server's
real host name, and each participant's own, map to their bridge addresses; ``localhost`` stays
that namespace's own loopback, so nothing can reach another host through 127.0.0.1.

What runs on a host is started with :meth:`HostNetwork.command` (``ip netns exec NS ...``).
:meth:`HostNetwork.cut` / :meth:`HostNetwork.heal` take one participant's link down and up again
(``rehearse --fault partition-hospital:N``). :meth:`HostNetwork.close` ends every process still
inside these namespaces (all of them started by this rehearsal: nothing else runs there), deletes
the namespaces (their links go with them) and the hosts files; it is safe to call twice.

Needs root and iproute2's ``ip`` (CI runs as root); :func:`require_netns` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
SUBNET = "10.231.0"  # /24 on the rehearsal's own bridge; no route to it exists outside these namespaces
BRIDGE = "br0"


class NetnsError(RuntimeError):
    """Network hosts cannot be set up or used; the message says why and what to do."""


@dataclass(frozen=True)
class Host:
    participant: str  # the FLARE participant (server name, hospital name, or "admin")
    namespace: str
    address: str
    host: str  # its host name, resolvable from every namespace of the rehearsal
    link: str  # its veth end inside the bridge namespace (cut / heal)


def require_netns() -> None:
    """Raise :class:`NetnsError` naming what is missing to create network namespaces here."""
    if not shutil.which("ip"):
        raise NetnsError("--hosts netns needs iproute2's 'ip' command (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetnsError("--hosts netns creates network namespaces and needs root (run as root, e.g. in CI or "
                         "with sudo), or use --hosts loopback")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"'ip {' '.join(args)}' failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


class HostNetwork:
    """Namespaces, addresses and host names for ``participants``; ``create()`` makes them, ``close()`` removes them."""

    def __init__(self, participants: dict[str, str], tag: str | None = None):
        """Args:
            participants: ``{participant: host name}``, in order (addresses are given in this order).
            tag: short unique part of the namespace names (default: this process's PID).
        """
        if len(participants) > 240:
            raise NetnsError(f"{len(participants)} hosts do not fit the rehearsal's /24 network (at most 240)")
        tag = tag or str(os.getpid())
        self.bridge_ns = f"fedmed-{tag}-net"
        self.hosts = {
            name: Host(name, f"fedmed-{tag}-{i}", f"{SUBNET}.{10 + i}", host, f"v{i}")
            for i, (name, host) in enumerate(participants.items())
        }
        self.created: list[str] = []

    # -- set up / tear down ------------------------------------------------------------------------
    def create(self) -> "HostNetwork":
        require_netns()
        try:
            self._add_namespace(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
            hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.host}\n" for h in self.hosts.values())
            for h in self.hosts.values():
                self._add_namespace(h.namespace)
                _ip("-n", h.namespace, "link", "add", "eth0", "type", "veth", "peer", "name", h.link,
                    "netns", self.bridge_ns)
                _ip("-n", self.bridge_ns, "link", "set", h.link, "master", BRIDGE)
                _ip("-n", self.bridge_ns, "link", "set", h.link, "up")
                _ip("-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", "eth0")
                _ip("-n", h.namespace, "link", "set", "eth0", "up")
                _ip("-n", h.namespace, "link", "set", "lo", "up")
                etc = NETNS_ETC / h.namespace
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts_file)
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        if name in _ip("netns", "list").stdout.split():
            raise NetnsError(f"network namespace {name} already exists (a rehearsal with the same tag is running, "
                             f"or one was killed before it cleaned up: 'ip netns del {name}')")
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def pids(self, namespace: str) -> list[int]:
        result = _ip("netns", "pids", namespace, check=False)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    def close(self, timeout: float = 10.0) -> list[int]:
        """End the processes left in these namespaces, delete them and their hosts files; return PIDs that survived."""
        namespaces = [n for n in self.created if n in _ip("netns", "list", check=False).stdout.split()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for n in namespaces for p in self.pids(n)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
            while pids and time.time() < deadline:
                pids = [p for n in namespaces for p in self.pids(n)]
                time.sleep(0.2)
        survivors = [p for n in namespaces for p in self.pids(n)]
        for name in reversed(namespaces):
            _ip("netns", "del", name, check=False)
        for name in self.created:
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        self.created = []
        return survivors

    def __enter__(self) -> "HostNetwork":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- use -----------------------------------------------------------------------------------------
    def host(self, participant: str) -> Host:
        try:
            return self.hosts[participant]
        except KeyError:
            raise NetnsError(f"no network host for '{participant}' (hosts: {', '.join(self.hosts)})") from None

    def command(self, participant: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``participant``'s host."""
        return ["ip", "netns", "exec", self.host(participant).namespace, *argv]

    def cut(self, participant: str) -> None:
        """Take ``participant``'s link to the bridge down: its host can reach nobody, nobody reaches it."""
        _ip("-n", self.bridge_ns, "link", "set", self.host(participant).link, "down")

    def heal(self, participant: str) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.host(participant).link, "up")

    def describe(self) -> dict:
        """``{participant: {"address", "host", "namespace"}}`` (``rehearsal.json`` ``participants``)."""
        return {h.participant: {"address": h.address, "host": h.host, "namespace": h.namespace}
                for h in self.hosts.values()}

    def to_json(self) -> dict:
        return {"bridge_ns": self.bridge_ns, "created": list(self.created), "hosts": self.describe()}

    @classmethod
    def from_json(cls, data: dict) -> "HostNetwork":
        """The network another process created (the rehearsal driver runs inside the admin host)."""
        net = cls.__new__(cls)
        net.bridge_ns = data["bridge_ns"]
        net.created = []  # owned (and closed) by the process that created it
        net.hosts = {}
        for i, (name, h) in enumerate(data["hosts"].items()):
            net.hosts[name] = Host(name, h["namespace"], h["address"], h["host"], f"v{i}")
        return net
