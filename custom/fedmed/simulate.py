"""``python -m fedmed simulate``: a simulated federation of hospitals on this machine.

Prepares every simulated hospital's data (a seeded non-IID partition of an npz, or synthetic
X-rays) and its ``local/fedmed_site.json``, runs the real FLARE simulator on the job folder, shows
progress per round and writes the outputs (see :mod:`fedmed.results`) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Heavy modules (torch, monai, nvflare) are imported inside the functions that need them, so that
# `python -m fedmed simulate --help` answers at once (issue 13).
from fedmed.jobfolder import CONTROLLER_PATHS, JobFolder, JobFolderError, parse_assignments
from fedmed.site_config import SITE_CONFIG_FILE

DEFAULT_JOB = "jobs/cxr_pneumonia_fedavg"
SIMULATOR_MODULE = "nvflare.private.fed.app.simulator.simulator"
INCOMPLETE_MARKER = "INCOMPLETE"  # in --out while a run is in progress or after it failed / was interrupted


class SimulationError(RuntimeError):
    pass


class SimulationInterrupted(SimulationError):
    """Ctrl-C: every process this command started was ended; the output folder is marked incomplete."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_job(job: str) -> Path:
    try:
        return JobFolder.resolve(job).path
    except JobFolderError as exc:
        raise SimulationError(str(exc)) from exc


def load_controller_args(job_dir: Path) -> tuple[dict, dict]:
    """(server config, the FedMed controller's args dict inside it)."""
    folder = JobFolder(job_dir)
    try:
        server_config = folder.load_server()
        return server_config, folder.controller_args(server_config)
    except JobFolderError as exc:
        raise SimulationError(str(exc)) from exc


def prepare_job(job_dir: Path, dest: Path, num_sites: int, rounds: int | None, settings: dict | None = None) -> dict:
    """Copy the job to ``dest`` with rounds / min_clients fitted to this simulation and ``--set``
    overrides applied (:mod:`fedmed.jobfolder`); return the controller args."""
    job = JobFolder(job_dir).copy_to(dest)
    try:
        applied = job.apply_settings(settings or {})
    except JobFolderError as exc:
        raise SimulationError(str(exc)) from exc
    for key, targets in applied.items():
        where = ", ".join(f"{component} argument {argument}" for component, argument in targets)
        print(f"  --set {key}={json.dumps(settings[key])} ({where})", flush=True)
    if applied:
        try:
            job.check_components()
        except JobFolderError as exc:
            raise SimulationError(f"--set: {exc}") from exc
    return job.fit_to_simulation(num_sites, rounds)


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


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of this command's finished child processes (the simulator and its sites)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def simulate(
    job: str = DEFAULT_JOB,
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
) -> Path:
    """Run a simulated federation and return the output folder.

    ``settings``: ``--set`` overrides ``{key: value}`` for the job copy's executor / controller args
    (:meth:`fedmed.jobfolder.JobFolder.apply_settings`); an unknown key raises before anything runs.
    ``attacks``: ``--attack SITE:KIND=VALUE`` simulated attacks (:mod:`fedmed.attacks`), applied at
    that simulated site by a result filter added to the job copy only.
    While the run is in progress, and after it failed or was interrupted, ``out`` holds an
    ``INCOMPLETE`` marker; such a folder may be reused without ``force``.
    """
    if num_sites < 1:
        raise SimulationError(f"--sites must be >= 1, got {num_sites}")
    if rounds is not None and rounds < 1:
        raise SimulationError(f"--rounds must be >= 1, got {rounds}")
    job_dir = resolve_job(job)
    from fedmed.attacks import parse_attack  # issue 12: simulate --attack (bad syntax is refused before any work)

    parsed_attacks = [parse_attack(text) for text in attacks or []]
    if settings:  # refuse an unknown key before any work
        try:
            valid = JobFolder(job_dir).settable_keys()
        except JobFolderError as exc:
            raise SimulationError(str(exc)) from exc
        unknown = sorted(key for key in settings if key.split(".", 1)[0] not in valid)
        if unknown:
            raise SimulationError(f"--set: unknown key(s) {', '.join(unknown)} for job {job_dir.name}; "
                                  f"valid keys: {', '.join(sorted(valid))}")
    out_dir = Path(out or f"runs/{job_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force and not (out_dir / INCOMPLETE_MARKER).exists():
            raise SimulationError(f"output folder {out_dir} is not empty; choose another --out or pass --force")
        if not force:
            print(f"  {out_dir} holds an incomplete run ({INCOMPLETE_MARKER}); replacing it", flush=True)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE_MARKER).write_text(
        "this run has not finished (in progress, failed or interrupted); rerun simulate with the same --out to replace it\n")

    from fedmed.flare.allow_list import class_allow_list
    from fedmed.results import ResultsError, export_run_outputs
    from fedmed.tasks import build_task

    print(f"[0/3] loading the job {job_dir.name} (PyTorch, MONAI, FLARE)", flush=True)
    _, controller_args = load_controller_args(job_dir)
    task = build_task(controller_args.get("task", {"name": "classification"}))
    sites_dir, workspace, run_job = out_dir / "sites", out_dir / "workspace", out_dir / "job"
    print(f"[1/3] preparing {num_sites} simulated hospitals ({'data ' + data if data else 'synthetic data'}, "
          f"Dirichlet alpha {alpha}, seed {seed})", flush=True)
    # external hospitals (OUT/external/): held-out data no site config names (fedmed.external)
    site_configs, summary = task.prepare_simulation(num_sites, sites_dir, data, alpha, seed, external_dir=out_dir / "external")
    for line in summary:
        print("  " + line, flush=True)
    args = prepare_job(job_dir, run_job, num_sites, rounds, settings)
    if privacy:  # issue 5: the FLARE simulator does not enforce site scopes; copy the mode's filters in
        from fedmed.privacy.simulation import apply_privacy_mode

        applied = apply_privacy_mode(run_job, privacy, privacy_file)
        print(f"  privacy mode '{privacy}' from {applied['client_privacy_file']}: site filters "
              f"{', '.join(applied['client_filters'])}; server filters {', '.join(applied['server_filters']) or 'none'}", flush=True)
    if parsed_attacks:  # the attack filter goes into the job copy only; production jobs never carry it
        from fedmed.flare.attack_filter import add_attack_filter

        unknown_sites = sorted({a.site for a in parsed_attacks} - set(site_configs))
        if unknown_sites:
            raise SimulationError(f"--attack: no simulated site {', '.join(unknown_sites)}; the sites are {', '.join(site_configs)}")
        add_attack_filter(run_job, parsed_attacks)
        print("  simulated attack(s): " + "; ".join(f"{a.site} {a.label}" for a in parsed_attacks), flush=True)
    (workspace / "local").mkdir(parents=True)
    (workspace / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"sites": site_configs}, indent=2) + "\n")
    (workspace / "local" / "resources.json").write_text(json.dumps({"class_allow_list": class_allow_list()}, indent=2) + "\n")

    site_names = list(site_configs)
    threads = threads or num_sites
    print(f"[2/3] FLARE simulator: {num_sites} sites x {args.get('num_rounds')} rounds "
          f"(job {job_dir.name}; log {out_dir / 'simulator.log'})", flush=True)
    started, cpu = time.time(), _children_cpu_seconds()
    rc = run_simulator(run_job, workspace, site_names, threads, out_dir / "simulator.log", args.get("num_rounds"))
    print(f"  simulator finished in {time.time() - started:.0f} s wall, {_children_cpu_seconds() - cpu:.0f} s CPU "
          f"(exit code {rc})", flush=True)

    print(f"[3/3] writing outputs to {out_dir}", flush=True)
    server_app = workspace / "server" / "simulate_job" / "app_server"
    try:
        metrics = export_run_outputs(server_app, out_dir)
    except ResultsError as exc:
        error = _server_error(server_app)
        _report_unfinished_run(out_dir)
        raise SimulationError(f"the federated run failed: {error or exc}. Logs: {out_dir / 'simulator.log'}, {workspace}/*/log.txt") from exc
    _print_summary(metrics, out_dir)
    _baselines_and_report(run_job, site_configs, args.get("num_rounds"), out_dir, baselines)
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
    return out_dir


def _baselines_and_report(run_job: Path, site_configs: dict, rounds, out_dir: Path, baselines: bool) -> None:
    """Issue-4 outputs (fedmed.baselines, fedmed.report): OUT/baselines.json, OUT/report/."""
    from fedmed.baselines import BASELINES_FILE, run_for_job
    from fedmed.external import evaluate_run, external_sets
    from fedmed.report import build_report

    if baselines:
        print("  baselines: local-only and pooled models with the same partition and budget", flush=True)
        run_for_job(run_job, site_configs, out_dir / BASELINES_FILE, num_rounds=rounds,
                    federated_model=out_dir / "models" / "global_model.pt", log=lambda line: print(line, flush=True),
                    external=external_sets(out_dir))
    evaluate_run(out_dir, log=lambda line: print("  " + line, flush=True))
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)  # every output is in place: the report may call the run finished
    build_report(out_dir, log=lambda line: print("  " + line, flush=True))
    print(f"  report: {out_dir / 'report' / 'report.html'}\n  provenance card: {out_dir / 'provenance.json'} "
          f"(python -m fedmed verify-provenance {out_dir})", flush=True)


def _report_unfinished_run(out_dir: Path) -> None:
    """A failed run still gets its report (OUT/report/), which says so in its first line."""
    from fedmed.report import ReportError, build_report

    try:
        build_report(out_dir, log=lambda line: None)
        print(f"  report of the failed run: {out_dir / 'report' / 'report.md'}", flush=True)
    except (ReportError, OSError, ValueError) as exc:
        print(f"  no report of the failed run: {exc}", flush=True)


def _server_error(server_app: Path) -> str | None:
    from fedmed.results import METRICS_FILE

    metrics_path = server_app / "fedmed" / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text()).get("error")
    return None


def _print_summary(metrics: dict, out_dir: Path) -> None:
    from fedmed.results import METRICS_FILE

    key = metrics["key_metric"]
    evaluations = metrics.get("evaluations", [])
    release = metrics.get("release") or {}
    if release:
        print(f"  release gate: released model version {release.get('version')} of {metrics.get('num_rounds')} "
              f"({release.get('action')}): {release.get('reason')}", flush=True)
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        print(f"  mean validation {key}: initial model {first.get('mean_' + key):.4f} -> "
              f"final global model {last.get('mean_' + key):.4f}")
        for site, site_metrics in sorted(last["sites"].items()):
            print(f"    {site}: " + ", ".join(f"{k} {v:.4f}" for k, v in site_metrics.items() if k.startswith("val_") and isinstance(v, (int, float))))
    print(f"  bundle: {out_dir / 'bundle'}\n  metrics: {out_dir / METRICS_FILE}\n"
          f"  TensorBoard: tensorboard --logdir {out_dir / 'tb_events'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job folder (default {DEFAULT_JOB})")
    parser.add_argument("--sites", type=int, default=5, help="number of simulated hospitals (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's num_rounds)")
    parser.add_argument("--data", default=None, help="data pool to partition: a MedMNIST-style .npz for classification, an MSD-style "
                        "datalist JSON for segmentation (default: synthetic X-rays or volumes)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<job>-<timestamp>)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="partition / synthetic-data seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="simulator threads (default: one per site)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--baselines", action="store_true",
                        help="also train each site's local-only model and a pooled model with the same partition and budget")
    parser.add_argument("--privacy", default=None, choices=["standard", "dp", "compressed", "compressed_int8", "he"],
                        help="privacy mode every simulated hospital applies (its scope's filters from --privacy-file); "
                             "he needs HE kits: use rehearse --privacy he")
    parser.add_argument("--privacy-file", default=None,
                        help="the hospitals' privacy.json (default workspace_templates/client/local/privacy.json)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training or aggregation setting of the job copy, repeatable: e.g. --set lr=0.01 "
                             "--set local_epochs=2 --set batch_size=64 --set network='{\"name\": \"densenet121\", ...}'; "
                             "VALUE is parsed as JSON when it can be; the keys are the job's executor and controller "
                             "arguments (an unknown key is refused with the list); a dotted key changes one entry of a "
                             "dict-valued one: --set network.args.width=32")


    parser.add_argument("--attack", action="append", default=[], metavar="SITE:KIND=VALUE",
                        help="simulate a hostile hospital, repeatable: KIND scale (multiply its update; negative flips it), "
                             "samples (claimed sample count), nan (NaN in its update), metric (claimed validation "
                             "AUC/accuracy/Dice); e.g. --attack site-2:scale=-10 --attack site-3:samples=1e9")


def main(args: argparse.Namespace) -> int:
    try:
        settings = parse_assignments(getattr(args, "settings", None))
    except JobFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous_handlers = _stop_on_termination()
    try:
        simulate(args.job, args.sites, args.rounds, args.data, args.out, args.alpha, args.seed, args.threads, args.force,
                 args.baselines, args.privacy, args.privacy_file, settings=settings, attacks=getattr(args, "attack", None))
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
