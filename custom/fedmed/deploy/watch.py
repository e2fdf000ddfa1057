"""``python -m fedmed watch ADMIN_KIT [JOB_ID]``: the live rounds of a deployed job, for the project lead.

Through FLARE's admin API with the lead's (or any admin's) kit: the job's status, and, while it runs,
one line per completed round from the server's controller (FLARE's ``show_stats`` command, answered
by :class:`fedmed.flare.controller.FedAvgController` with :func:`fedmed.progress.job_progress`):
the round, the sites that answered and those left out, the sites flagged (update bounded,
down-weighted, trimmed or refused), the median validation metric over sites, time elapsed and an ETA.
It ends with the job's final status and the sites flagged or left out in most rounds.

Without ``JOB_ID`` it watches the most recently submitted job that is not finished. Ctrl-C stops
watching, not the job. Exit codes: 0 the job finished (``FINISHED:COMPLETED``); 1 it ended otherwise,
or there is no job to watch; 2 the kit is not an admin kit or the server cannot be reached; 130 Ctrl-C.
The rehearsal (``python -m fedmed rehearse``) prints its progress with the same :class:`JobWatcher`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from pathlib import Path

from fedmed.progress import STATS_GROUP, final_summary, progress_line

FINISHED_OK = "FINISHED:COMPLETED"


def find_progress(stats) -> dict | None:
    """The controller's progress dict inside a ``show_stats`` answer (``{target: {group: info}}``)."""
    if isinstance(stats, dict):
        if "rounds_completed" in stats and "num_rounds" in stats:
            return stats
        if isinstance(stats.get(STATS_GROUP), dict):
            return stats[STATS_GROUP]
        for value in stats.values():
            found = find_progress(value)
            if found is not None:
                return found
    return None


class JobWatcher:
    """Polls one job through an admin session; prints status changes and each newly completed round."""

    def __init__(self, session, job_id: str, log=print):
        self.session = session
        self.job_id = job_id
        self.log = log
        self.started = time.time()
        self.status: str | None = None
        self.meta: dict = {}
        self.error: Exception | None = None  # the last failed poll's error (cleared by an answer)
        self.rounds_seen = 0
        self.progress: dict | None = None

    def poll(self) -> str | None:
        """One look at the job; return its status (``None`` when the server did not answer)."""
        try:
            meta = self.session.get_job_meta(self.job_id)
        except Exception as exc:  # a restarting server: the caller keeps polling until its deadline
            self.error = exc
            return None
        self.meta, self.error = meta, None
        status = meta.get("status")
        if status != self.status:
            self.log(f"  [{time.time() - self.started:5.0f} s] job status {status}")
            self.status = status
        if status == "RUNNING":
            self.poll_progress()
        return status

    def poll_progress(self) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                progress = find_progress(self.session.show_stats(self.job_id, "server"))
        except Exception:  # the job's server process is starting or gone
            return
        if not progress:
            return
        self.progress = progress
        done = int(progress.get("rounds_completed") or 0)
        if done > self.rounds_seen:
            self.rounds_seen = done
            self.log(f"  [{time.time() - self.started:5.0f} s] {progress_line(progress)}")

    def final_line(self) -> str:
        line = f"job {self.job_id} ended: {self.status} after {time.time() - self.started:.0f} s of watching"
        notes = final_summary(self.progress) if self.progress else ""
        return line + (f"; {notes}" if notes else "")


def latest_unfinished_job(session) -> str | None:
    jobs = [j for j in session.list_jobs(detailed=True) if not str(j.get("status", "")).startswith("FINISHED")]
    jobs.sort(key=lambda j: str(j.get("submit_time") or j.get("submit_time_iso") or ""))
    return jobs[-1].get("job_id") if jobs else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kit", help="your admin startup kit (e.g. the lead researcher's)")
    parser.add_argument("job_id", nargs="?", default=None,
                        help="the job to watch (default: the most recently submitted job that has not finished)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    parser.add_argument("--timeout", type=float, default=None, help="stop watching after this many seconds (default: never)")


def main(args: argparse.Namespace) -> int:
    from nvflare.fuel.flare_api.api_spec import NoConnection
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from fedmed.deploy import kit as kit_files

    try:
        info = kit_files.read_admin_kit(args.kit)
    except kit_files.KitError as exc:
        print(f"watch: {exc}", file=sys.stderr)
        return 2
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # the admin API logs connection errors itself; we say what happened
    session = None
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                session = new_secure_session(info.name, str(Path(args.kit).resolve()), timeout=10.0)
        except (NoConnection, ConnectionError, TimeoutError) as exc:
            print(f"watch: cannot reach the server {info.host}:{info.port} with {info.name}'s kit ({exc}); "
                  f"`python -m fedmed preflight {args.kit}` says why", file=sys.stderr)
            return 2
        job_id = args.job_id or latest_unfinished_job(session)
        if not job_id:
            print("watch: no job is submitted or running; give a JOB_ID to see a finished one", file=sys.stderr)
            return 1
        print(f"watching job {job_id} as {info.name} (server {info.host}:{info.port}); Ctrl-C stops watching, "
              f"not the job", flush=True)
        watcher = JobWatcher(session, job_id, log=lambda line: print(line, flush=True))
        deadline = time.time() + args.timeout if args.timeout else None
        while True:
            status = watcher.poll()
            if status and str(status).startswith("FINISHED"):
                break
            if deadline and time.time() > deadline:
                print(f"watch: stopped after {args.timeout:.0f} s; job {job_id} is {status}", flush=True)
                return 1
            time.sleep(args.interval)
        print(watcher.final_line(), flush=True)
        return 0 if watcher.status == FINISHED_OK else 1
    except KeyboardInterrupt:
        print("\nwatch: stopped watching; the job goes on", file=sys.stderr)
        return 130
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        logging.disable(previous)
