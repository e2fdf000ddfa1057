"""Chaos for ``rehearse``: kill the server or a hospital during a chosen round, record what happened.

``python -m fedmed rehearse --fault KIND:ROUND`` (repeatable). ``ROUND`` counts from 1, as the
server's progress lines do (``[fedmed] round N/M`` is logged when round N completes), so "during
round N" is: after the line for round N-1 (for round 1: once the job runs at every hospital) and
before the line for round N.

- ``kill-hospital:N``: SIGKILL one hospital's client and its job processes (the last hospital not
  yet killed). FLARE keeps the dead client "connected" until its heartbeat times out; the round
  engine goes on with the others as long as ``min_clients`` answer, and cross-site evaluation skips
  it (:func:`fedmed.flare.cross_site.sites_to_evaluate`).
- ``partition-hospital:N`` (``--hosts netns`` only): cut one hospital's network link during round N
  (the last hospital not yet cut or killed); heal it once round N is over at the server, or after
  ``PARTITION_MAX_S`` seconds. The hospital's processes keep running; the job must go on without it
  and the hospital must come back: it trains in a later round, or, when it is too slow to make the
  next rounds' deadline, at least validates the final model.
- ``restart-server:N``: SIGKILL the server and its job process, start the server again from its kit
  and wait until it is up; the job must then resume from its last completed round (FLARE's snapshot
  persistence in the server's ``resources.json`` and the controller's saved state).

Only processes this rehearsal started are ended, by PID: the kit process and its descendants
(FLARE's job processes, found by parent PID). Every fault's record (times in seconds since the job
was submitted, PIDs, outcome) goes into ``rehearsal.json``.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedmed.deploy.processes import process_tree, wait_ready

FAULT_KINDS = ("restart-server", "kill-hospital", "partition-hospital")
PARTITION_MAX_S = 300.0  # a partitioned hospital's link comes back after this long even if its round is not over
ROUND_LINE = re.compile(r"\[fedmed\] round (\d+)/(\d+)")


class FaultError(ValueError):
    """A ``--fault`` value that cannot be used; the message names it and says what is allowed."""


@dataclass
class Fault:
    kind: str
    round: int
    record: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.round}"


def parse_fault(text: str, num_rounds: int | None = None) -> Fault:
    kind, _, round_text = text.partition(":")
    if kind not in FAULT_KINDS or not round_text.isdigit() or int(round_text) < 1:
        raise FaultError(f"--fault {text!r}: use KIND:ROUND with KIND one of {', '.join(FAULT_KINDS)} and ROUND "
                         f"counting from 1, e.g. kill-hospital:1")
    if num_rounds is not None and int(round_text) > num_rounds:
        raise FaultError(f"--fault {text!r}: the job runs {num_rounds} round(s); ROUND must be 1..{num_rounds}")
    return Fault(kind, int(round_text))


def rounds_in_logs(paths: list[Path]) -> dict[int, int]:
    """``{round N: total M}`` of every ``[fedmed] round N/M`` line in these logs (missing files skipped)."""
    seen = {}
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in ROUND_LINE.finditer(text):
            seen[int(match.group(1))] = int(match.group(2))
    return seen


def kill_tree(pid: int) -> list[int]:
    """SIGKILL the process ``pid`` and every descendant (children first found by parent PID); return their PIDs."""
    tree = process_tree(pid)
    for proc in reversed(tree):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    return [p.pid for p in tree]


class FaultInjector:
    """Fires each fault when its round is running; called from the job-monitoring loop."""

    def __init__(self, faults: list[Fault], federation, server: str, hospitals: list[str], log=print, network=None):
        if network is None and any(f.kind == "partition-hospital" for f in faults):
            raise FaultError("--fault partition-hospital cuts a hospital's network link and needs --hosts netns "
                             "(each participant on its own network host)")
        self.network = network
        self.partitioned: dict[str, Fault] = {}  # hospital -> its partition fault, while its link is down
        self.faults = sorted(faults, key=lambda f: f.round)
        self.federation = federation
        self.server = server
        self.hospitals = list(hospitals)
        self.killed_hospitals: list[str] = []
        self.log = log
        self.started = time.time()
        self.round_times: dict[int, float] = {}
        self.server_restarted = False  # the caller reopens its admin session when this turns True
        self.job_ids: list[str] = []  # the submitted job, then each job that resumed it after a restart

    def now(self) -> float:
        return round(time.time() - self.started, 1)

    def log_paths(self) -> list[Path]:
        """The server's process log and every job log in its workspace (both carry the controller's lines)."""
        server_kit = self.federation.kit(self.server)
        return [*sorted(self.federation.log_dir.glob(f"{self.server}*.log")), *sorted(server_kit.glob("*/log.txt"))]

    def rounds_done(self) -> int:
        seen = rounds_in_logs(self.log_paths())
        for n in seen:
            self.round_times.setdefault(n, self.now())
        return max(seen, default=0)

    def _job_running_everywhere(self) -> bool:
        """The server and every live hospital have started a job process (children of the kit process)."""
        names = [self.server] + [h for h in self.hospitals if h not in self.killed_hospitals]
        for name in names:
            proc = self.federation.processes.get(name)
            if proc is None or len(process_tree(proc.pid)) < 2:
                return False
        return True

    def pending(self) -> list[Fault]:
        return [f for f in self.faults if not f.record]

    def poll(self) -> None:
        done = self.rounds_done()
        self._heal_partitions(done)
        for fault in self.pending():
            if done >= fault.round:  # the round finished before the fault could fire (a very short round)
                fault.record = {"fault": fault.spec, "fired": False, "outcome": f"round {fault.round} finished before "
                                f"the fault could fire (polled every second)"}
                self.log(f"  [{self.now():5.0f} s] fault {fault.spec}: round {fault.round} already over; not fired")
                continue
            if done == fault.round - 1 and (fault.round > 1 or self._job_running_everywhere()):
                if fault.kind == "kill-hospital":
                    self._kill_hospital(fault, done)
                elif fault.kind == "partition-hospital":
                    self._partition_hospital(fault, done)
                else:
                    self._restart_server(fault, done)

    def _kill_hospital(self, fault: Fault, done: int) -> None:
        alive = [h for h in self.hospitals if h not in self.killed_hospitals]
        if not alive:
            fault.record = {"fault": fault.spec, "fired": False, "outcome": "no hospital left to kill"}
            return
        victim = alive[-1]
        at = self.now()
        pids = kill_tree(self.federation.processes[victim].pid)
        self.killed_hospitals.append(victim)
        fault.record = {"fault": fault.spec, "fired": True, "kind": fault.kind, "round": fault.round,
                        "hospital": victim, "at_s": at, "rounds_completed_before": done, "killed_pids": pids,
                        "signal": "SIGKILL"}
        self.log(f"  [{at:5.0f} s] fault {fault.spec}: SIGKILLed hospital {victim} (pids {pids}) during round {fault.round}")

    def _partition_hospital(self, fault: Fault, done: int) -> None:
        reachable = [h for h in self.hospitals if h not in self.killed_hospitals and h not in self.partitioned]
        if not reachable:
            fault.record = {"fault": fault.spec, "fired": False, "outcome": "no connected hospital left to cut off"}
            return
        victim = reachable[-1]
        at = self.now()
        self.network.cut(victim)
        self.partitioned[victim] = fault
        host = self.network.host(victim)
        fault.record = {"fault": fault.spec, "fired": True, "kind": fault.kind, "round": fault.round,
                        "hospital": victim, "address": host.address, "cut_at_s": at, "rounds_completed_before": done}
        self.log(f"  [{at:5.0f} s] fault {fault.spec}: cut hospital {victim}'s network link ({host.address}) "
                 f"during round {fault.round}")

    def _heal_partitions(self, done: int) -> None:
        for victim, fault in list(self.partitioned.items()):
            if done >= fault.round or self.now() - fault.record["cut_at_s"] >= PARTITION_MAX_S:
                self.network.heal(victim)
                del self.partitioned[victim]
                fault.record["healed_at_s"] = self.now()
                self.log(f"  [{self.now():5.0f} s] fault {fault.spec}: {victim}'s link is back up "
                         f"(round {done} done at the server)")

    def heal_all(self) -> None:
        """Bring back every link still cut (the job ended first)."""
        for victim, fault in list(self.partitioned.items()):
            self.network.heal(victim)
            fault.record["healed_at_s"] = self.now()
        self.partitioned.clear()

    def _restart_server(self, fault: Fault, done: int) -> None:
        at = self.now()
        old = self.federation.processes[self.server]
        pids = kill_tree(old.pid)
        self.log(f"  [{at:5.0f} s] fault {fault.spec}: SIGKILLed the server (pids {pids}) during round {fault.round}; "
                 f"restarting it from its kit")
        fault.record = {"fault": fault.spec, "fired": True, "kind": fault.kind, "round": fault.round, "at_s": at,
                        "rounds_completed_before": done, "killed_pids": pids, "signal": "SIGKILL"}
        retired = self.federation.processes.pop(self.server)
        self.federation.retired.append(retired)  # still ended by PID at stop(), should anything be left
        try:
            restarts = sum(1 for f in self.faults if f.kind == "restart-server" and f.record.get("fired"))
            proc = self.federation.start(self.server, wait=False, log_name=f"{self.server}.restart{restarts}")
            wait_ready(proc, timeout=120)
        except Exception as exc:  # recorded; the job monitor then fails on the dead server with its own reason
            fault.record.update({"restarted": False, "outcome": f"the server did not come back: {exc}"})
            self.log(f"  fault {fault.spec}: the server did not come back: {exc}")
            return
        fault.record.update({"restarted": True, "new_pid": proc.pid, "up_at_s": self.now(),
                             "down_s": round(self.now() - at, 1)})
        self.server_restarted = True
        self.log(f"  [{self.now():5.0f} s] fault {fault.spec}: server up again (pid {proc.pid}); waiting for the job to resume")

    def finish(self, metrics: dict | None, status: str | None) -> list[dict]:
        """Fill in each fault's outcome from the finished job's ``metrics.json`` and status; return the records."""
        rounds = (metrics or {}).get("rounds") or []
        seen = self.rounds_done()
        completed = len(rounds) if metrics else seen
        for fault in self.faults:
            record = fault.record or {"fault": fault.spec, "fired": False, "outcome": (
                f"round {fault.round} finished before the fault could fire" if seen >= fault.round
                else f"the job ended (status {status}) before round {fault.round} ran")}
            fault.record = record
            if not record.get("fired"):
                continue
            after = [r for r in rounds if int(r.get("round", -1)) + 1 >= fault.round]
            if fault.kind == "partition-hospital":
                victim = record["hospital"]
                without = [int(r["round"]) + 1 for r in after if victim not in (r.get("contributors") or [])]
                rejoined = [int(r["round"]) + 1 for r in after
                            if int(r["round"]) + 1 > fault.round and victim in (r.get("contributors") or [])]
                final = ((metrics or {}).get("evaluations") or [{}])[-1]
                validated = final.get("model_version") == completed and victim in (final.get("sites") or [])
                record.update({"rounds_without_it": without, "rounds_after_rejoining": rejoined,
                               "validated_final_model": validated, "rejoined": bool(rejoined) or validated})
                back = ([f"trained again in round(s) {rejoined}"] if rejoined else []) + (
                    ["validated the final model"] if validated else [])
                record["outcome"] = (f"job {status}; {completed} round(s) completed; {victim} missed round(s) {without}"
                                     + (f" and rejoined: {', '.join(back)}" if back else " and did not rejoin"))
            elif fault.kind == "kill-hospital":
                victim = record["hospital"]
                without = [int(r["round"]) + 1 for r in after if victim not in (r.get("contributors") or [])]
                record["rounds_without_it"] = without
                record["outcome"] = (f"job {status}; {completed} round(s) completed, {len(without)} of them from round "
                                     f"{fault.round} on without {victim}")
            else:
                resumed = [n for n, t in self.round_times.items() if n >= fault.round and t >= record["at_s"]]
                record["rounds_completed_after_restart"] = sorted(resumed)
                record["resumed"] = bool(resumed) and status == "FINISHED:COMPLETED"
                record["outcome"] = (f"job {status}; resumed and completed rounds {sorted(resumed)} after the restart"
                                     if record["resumed"] else
                                     f"job {status}; no round completed after the restart"
                                     if not resumed else f"job {status} after rounds {sorted(resumed)} completed")
        return [f.record for f in self.faults]
