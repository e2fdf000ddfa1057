"""``python -m fedmed simulate``: a simulated federation of hospitals on this machine.

Goes through the one runner (:mod:`fedmed.runner`): checks the job and its ``--set`` values before
anything starts, prepares every simulated hospital's data (a seeded non-IID partition of an npz, or
synthetic X-rays) and its ``local/fedmed_site.json``, runs the real FLARE simulator on the run's job
folder (``OUT/job``) in its own process group, shows progress per round with an ETA, and writes the
outputs (bundle, metrics with the external evaluation, report, provenance card) into ``--out``.
``python jobs/<name>/job.py`` runs the same steps with FLARE's ``SimEnv`` (``engine="simenv"``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# Heavy modules (torch, monai, nvflare) are imported inside the functions that need them, so that
# `python -m fedmed simulate --help` answers at once (issue 13).
from fedmed.jobfolder import JobFolder, JobFolderError, parse_assignments
from fedmed.jobspec import JobSpec
from fedmed.runner import DEFAULT_JOB, INCOMPLETE_MARKER, RunError, RunOptions

SIMULATOR_MODULE = "nvflare.private.fed.app.simulator.simulator"
ENGINES = ("simulator", "simenv")  # FLARE's simulator in a subprocess (simulate), FLARE's SimEnv (job.py)
SimulationError = RunError  # the name simulate's callers and tests know


class SimulationInterrupted(RunError):
    """Ctrl-C: every process this command started was ended; the output folder is marked incomplete."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_job(job: str) -> Path:
    try:
        return JobFolder.resolve(job).path
    except JobFolderError as exc:
        raise SimulationError(str(exc)) from exc


def prepare_job(job_dir: Path, dest: Path, num_sites: int, rounds: int | None, settings: dict | None = None) -> dict:
    """Write ``job_dir``'s job with ``--set`` overrides and rounds / ``min_clients`` fitted to this
    simulation into ``dest`` (checked: a refused value raises); return the controller args.
    Kept for callers written before :func:`fedmed.runner.plan_job`, which it uses."""
    from fedmed.runner import plan_job, say, write_job_folder

    spec = plan_job(job_dir, RunOptions(sites=num_sites, rounds=rounds, settings=dict(settings or {})),
                    log=lambda line: say("  " + line))
    write_job_folder(spec, dest)
    return spec.controller_args()


class _Progress:
    """Echo the server's ``[fedmed]`` lines with an ETA: setup until the first round, then per round.

    Round 1 also pays for FLARE starting the sites and the sites loading their data, so from round 2
    on the estimate uses the rounds after the first."""

    ROUND = re.compile(r"round (\d+)/(\d+)")

    def __init__(self, num_rounds: int | None, started: float):
        self.num_rounds = num_rounds
        self.started = started
        self.first_round_started: float | None = None
        self.first_round_done: float | None = None
        self.rounds_done = 0

    def line(self, text: str, now: float) -> str:
        match = self.ROUND.search(text)
        if not match:
            return text
        done, total = int(match.group(1)), int(match.group(2))
        if self.first_round_started is None:
            seconds = re.search(r"; ([0-9.]+) s$", text)
            self.first_round_started = now - (float(seconds.group(1)) if seconds else 0.0)
        if done == 1 or self.first_round_done is None:
            self.first_round_done = now
            per_round = now - self.first_round_started
        else:
            per_round = (now - self.first_round_done) / (done - 1)
        self.rounds_done = done
        left = max(total - done, 0) * per_round
        return f"{text} [{now - self.started:.0f} s elapsed, about {left:.0f} s left for training]"


_SETUP_MILESTONES = (
    (re.compile(r"Initialize ClientRunner for client: (\S+)"), "{0} joined the federation"),
    (re.compile(r"site (\S+): (\d+) training and (\d+) validation samples"), "{0} loaded {1} training / {2} validation samples"),
)


def _setup_milestone(line: str) -> str | None:
    """What a simulator log line says about the federation getting ready (sites joining, data loaded)."""
    for pattern, text in _SETUP_MILESTONES:
        match = pattern.search(line)
        if match:
            return text.format(*match.groups())
    return None


def _heartbeat(progress: _Progress, now: float, last: float) -> float:
    """While nothing has been printed for a while (FLARE's setup, a long round), say so."""
    if now - last < 10:
        return last
    elapsed = now - progress.started
    if progress.rounds_done == 0:
        print(f"  ... setting up the simulated federation and training round 1 ({elapsed:.0f} s elapsed)", flush=True)
    else:
        print(f"  ... round {progress.rounds_done + 1}/{progress.num_rounds} running ({elapsed:.0f} s elapsed)", flush=True)
    return now


def _end_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the simulator and every process it spawned: its own process group (by its PID), SIGTERM then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)  # any process of the group left?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.2)


def run_simulator(job_dir: Path, workspace: Path, sites: list[str], threads: int, log_path: Path,
                  num_rounds: int | None = None) -> int:
    """Run the real FLARE simulator; echo this project's progress lines with an ETA; return its exit code.

    The simulator starts in its own session (process group); Ctrl-C or any error here ends the whole
    group, so no simulator or site process outlives this command.
    """
    import threading

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // threads)))
    cmd = [sys.executable, "-u", "-m", SIMULATOR_MODULE, str(job_dir), "-w", str(workspace),
           "-n", str(len(sites)), "-t", str(threads), "-c", ",".join(sites)]
    progress = _Progress(num_rounds, time.time())
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        last_output = [time.time()]
        stop = threading.Event()

        def beat():
            while not stop.wait(2.0):
                last_output[0] = _heartbeat(progress, time.time(), last_output[0])

        ticker = threading.Thread(target=beat, daemon=True)
        ticker.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if "[fedmed]" in line:
                    print("  " + progress.line(line.split("[fedmed]", 1)[1].strip(), time.time()), flush=True)
                    last_output[0] = time.time()
                elif progress.rounds_done == 0 and (milestone := _setup_milestone(line)):
                    print(f"  setup: {milestone} ({time.time() - progress.started:.0f} s)", flush=True)
                    last_output[0] = time.time()
                elif " ERROR " in line or "Traceback" in line:
                    print("  ! " + line.rstrip()[-300:], flush=True)
            return proc.wait()
        finally:
            stop.set()
            if proc.poll() is None or _group_alive(proc.pid):
                in_main = threading.current_thread() is threading.main_thread()
                # a second Ctrl-C (or a SIGTERM) must not cut the cleanup short
                previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if in_main else {}
                try:
                    _end_process_group(proc)
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def simulate(
    job: str | JobSpec = DEFAULT_JOB,
    num_sites: int = 5,
    rounds: int | None = None,
    data: str | None = None,
    out: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    threads: int | None = None,
    force: bool = False,
    baselines: bool = False,
    privacy: str | None = None,
    privacy_file: str | None = None,
    settings: dict | None = None,
    attacks: list[str] | None = None,
    engine: str = "simulator",
    dry_run: bool = False,
) -> Path:
    """Run a simulated federation and return the output folder (:mod:`fedmed.runner`'s steps).

    ``job``: a job folder or a :class:`~fedmed.jobspec.JobSpec`. ``settings``: ``--set`` overrides
    ``{key: value}``; an unknown key, or a value the executor, controller, network or task refuses,
    raises before anything runs. ``attacks``: ``--attack SITE:KIND=VALUE`` simulated attacks
    (:mod:`fedmed.attacks`), applied at that simulated site by a result filter in the run's job only.
    ``engine``: ``simulator`` (FLARE's simulator in its own process group; ``simulate``) or
    ``simenv`` (the job's FLARE recipe executed in ``SimEnv``; ``python jobs/<name>/job.py``): the
    same job folder, sites and outputs either way.
    ``dry_run``: check the job and its settings, write the run's job folder ``OUT/job`` and stop
    (no data prepared, nothing started).
    While the run is in progress, and after it failed or was interrupted, ``out`` holds an
    ``INCOMPLETE`` marker; such a folder may be reused without ``force``.
    """
    from fedmed import runner

    if engine not in ENGINES:
        raise SimulationError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    options = RunOptions(sites=num_sites, rounds=rounds, settings=dict(settings or {}), privacy=privacy,
                         privacy_file=privacy_file, attacks=list(attacks or []), data=data, alpha=alpha, seed=seed)
    print(f"[0/3] checking the job {getattr(job, 'name', None) or Path(str(job)).name} and its settings "
          "(PyTorch, MONAI, FLARE)", flush=True)
    spec = runner.plan_job(job, options, door="simulate" if engine == "simulator" else "simenv",
                           log=lambda line: runner.say("  " + line))
    out_dir = runner.start_output_folder(out, spec.name, force)
    if dry_run:
        print(f"  dry run: the job is checked and written to {runner.write_run_job(spec, out_dir)}; nothing started", flush=True)
        return out_dir
    print(f"[1/3] preparing {num_sites} simulated hospitals ({'data ' + data if data else 'synthetic data'}, "
          f"Dirichlet alpha {alpha}, seed {seed})", flush=True)
    site_configs, summary = runner.prepare_sites(spec, num_sites, out_dir, data, alpha, seed)
    for line in summary:
        print("  " + line, flush=True)
    run_job = runner.write_run_job(spec, out_dir)
    site_names, threads = list(site_configs), threads or num_sites
    print(f"[2/3] FLARE {'simulator' if engine == 'simulator' else 'SimEnv'}: {num_sites} sites x {spec.num_rounds} rounds "
          f"(job {spec.name}; log {out_dir / 'simulator.log'})", flush=True)
    started, cpu = time.time(), _children_cpu_seconds()
    if engine == "simulator":
        workspace = out_dir / "workspace"
        runner.write_site_locals(workspace / "local", site_configs)
        rc = run_simulator(run_job, workspace, site_names, threads, out_dir / "simulator.log", spec.num_rounds)
        server_app = workspace / "server" / "simulate_job" / "app_server"
    else:
        from fedmed.flare.recipes import recipe_from_spec, run_in_sim_env

        runner.write_site_locals(out_dir / "workspace" / spec.name / "local", site_configs)  # SimEnv: ROOT/<job name>
        rc = 0
        server_app = run_in_sim_env(recipe_from_spec(spec), site_names, out_dir / "workspace", threads)
    print(f"  {engine} finished in {time.time() - started:.0f} s wall, {_children_cpu_seconds() - cpu:.0f} s CPU of its "
          f"processes (exit code {rc})", flush=True)

    print(f"[3/3] writing outputs to {out_dir}", flush=True)
    from fedmed.results import ResultsError

    try:
        runner.finish_outputs(server_app, out_dir, spec, site_configs, baselines)
    except ResultsError as exc:
        error = _server_error(server_app)
        _report_unfinished_run(out_dir)
        raise SimulationError(f"the federated run failed: {error or exc}. Logs: {out_dir / 'simulator.log'}, "
                              f"{server_app.parents[2]}/*/log.txt") from exc
    runner.mark_complete(out_dir)
    return out_dir


def _report_unfinished_run(out_dir: Path) -> None:
    """A failed run still gets its report (OUT/report/), which says so in its first line."""
    from fedmed.report import ReportError, build_report

    try:
        build_report(out_dir, log=lambda line: None)
        print(f"  report of the failed run: {out_dir / 'report' / 'report.md'}", flush=True)
    except (ReportError, OSError, ValueError) as exc:
        print(f"  no report of the failed run: {exc}", flush=True)


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of this command's finished child processes (the simulator and its sites)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _server_error(server_app: Path) -> str | None:
    from fedmed.results import METRICS_FILE

    metrics_path = server_app / "fedmed" / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text()).get("error")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job folder (default {DEFAULT_JOB})")
    add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser, sites_default: int = 5) -> None:
    """The run options ``simulate`` and ``python jobs/<name>/job.py`` share."""
    parser.add_argument("--sites", type=int, default=sites_default, help=f"number of simulated hospitals (default {sites_default})")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's num_rounds)")
    parser.add_argument("--data", default=None, help="data pool to partition: a MedMNIST-style .npz for classification, an MSD-style "
                        "datalist JSON for segmentation (default: synthetic X-rays or volumes)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<job>-<timestamp>)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="partition / synthetic-data seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="simulator threads (default: one per site)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job and its --set values, write the run's job folder to OUT/job and stop (nothing runs)")
    parser.add_argument("--baselines", action="store_true",
                        help="also train each site's local-only model and a pooled model with the same partition and budget")
    parser.add_argument("--privacy", default=None, choices=["standard", "dp", "compressed", "compressed_int8", "he", "dp_he"],
                        help="privacy mode every simulated hospital applies (its scope's filters from --privacy-file); "
                             "he / dp_he run secure aggregation (at least 3 sites)")
    parser.add_argument("--privacy-file", default=None,
                        help="the hospitals' privacy.json (default workspace_templates/client/local/privacy.json)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training or aggregation setting of the run's job, repeatable: e.g. --set lr=0.01 "
                             "--set local_epochs=2 --set batch_size=64 --set network='{\"name\": \"densenet121\", ...}'; "
                             "VALUE is parsed as JSON when it can be; the keys are declared in fedmed.jobspec (an unknown "
                             "key is refused with the list; a value the executor, controller, network or task refuses "
                             "fails before anything starts); a dotted key changes one entry of a dict-valued one: "
                             "--set network.args.width=32")
    parser.add_argument("--attack", action="append", default=[], metavar="SITE:KIND=VALUE",
                        help="simulate a hostile hospital, repeatable: KIND scale (multiply its update; negative flips it), "
                             "samples (claimed sample count), nan (NaN in its update), metric (claimed validation "
                             "AUC/accuracy/Dice), delay (a slow hospital: hold each training reply VALUE seconds); "
                             "e.g. --attack site-2:scale=-10 --attack site-3:samples=1e9 --attack site-4:delay=60")


def main(args: argparse.Namespace, spec: JobSpec | None = None, engine: str = "simulator") -> int:
    """``simulate``'s command (and ``job.py``'s SimEnv run: ``spec`` given, ``engine="simenv"``)."""
    try:
        settings = parse_assignments(getattr(args, "settings", None))
    except JobFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous_handlers = _stop_on_termination()
    try:
        simulate(spec if spec is not None else args.job, args.sites, args.rounds, args.data, args.out, args.alpha, args.seed,
                 args.threads, args.force, args.baselines, args.privacy, args.privacy_file, settings=settings,
                 attacks=getattr(args, "attack", None), engine=engine, dry_run=getattr(args, "dry_run", False))
    except KeyboardInterrupt:
        print(f"\ninterrupted: every process this command started was stopped; the output folder is marked "
              f"{INCOMPLETE_MARKER} (rerun with the same --out to replace it)", file=sys.stderr)
        return 130
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return 0


def _stop_on_termination() -> dict:
    """SIGTERM / SIGHUP (a closed terminal, a job scheduler) stop a run the way Ctrl-C does: the
    simulator's process group is ended and the output folder stays marked incomplete."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
