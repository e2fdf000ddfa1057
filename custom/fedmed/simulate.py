"""``python -m fedmed simulate``: a simulated federation of hospitals on this machine.

Prepares every simulated hospital's data (a seeded non-IID partition of an npz, or synthetic
X-rays) and its ``local/fedmed_site.json``, runs the real FLARE simulator on the job folder, shows
progress per round and writes the outputs (see :mod:`fedmed.results`) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedmed.flare.allow_list import class_allow_list
from fedmed.results import METRICS_FILE, ResultsError, export_run_outputs
from fedmed.site_config import SITE_CONFIG_FILE
from fedmed.tasks import build_task

CONTROLLER_PATHS = ("fedmed.flare.controller.FedAvgController",)
DEFAULT_JOB = "jobs/cxr_pneumonia_fedavg"
SIMULATOR_MODULE = "nvflare.private.fed.app.simulator.simulator"


class SimulationError(RuntimeError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_job(job: str) -> Path:
    path = Path(job)
    if not path.is_dir() and not path.is_absolute() and (repo_root() / path).is_dir():
        path = repo_root() / path
    if not (path / "meta.json").is_file() or not (path / "app" / "config" / "config_fed_server.json").is_file():
        raise SimulationError(f"job folder {job} needs meta.json and app/config/config_fed_server.json")
    return path


def load_controller_args(job_dir: Path) -> tuple[dict, dict]:
    """(server config, the FedMed controller's args dict inside it)."""
    server_config = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
    for workflow in server_config.get("workflows", []):
        if workflow.get("path") in CONTROLLER_PATHS:
            return server_config, workflow.setdefault("args", {})
    raise SimulationError(f"{job_dir}: no workflow with path {CONTROLLER_PATHS[0]} in config_fed_server.json")


def prepare_job(job_dir: Path, dest: Path, num_sites: int, rounds: int | None) -> dict:
    """Copy the job to ``dest`` with rounds / min_clients fitted to this simulation; return controller args."""
    shutil.copytree(job_dir, dest)
    server_config, args = load_controller_args(dest)
    if rounds is not None:
        args["num_rounds"] = rounds
    args["min_clients"] = min(int(args.get("min_clients", 1)), num_sites)
    (dest / "app" / "config" / "config_fed_server.json").write_text(json.dumps(server_config, indent=2) + "\n")
    meta_path = dest / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["min_clients"] = min(int(meta.get("min_clients", 1)), num_sites)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return args


def run_simulator(job_dir: Path, workspace: Path, sites: list[str], threads: int, log_path: Path) -> int:
    """Run the real FLARE simulator; echo this project's progress lines; return its exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // threads)))
    cmd = [sys.executable, "-u", "-m", SIMULATOR_MODULE, str(job_dir), "-w", str(workspace),
           "-n", str(len(sites)), "-t", str(threads), "-c", ",".join(sites)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                log.write(line)
                if "[fedmed]" in line:
                    print("  " + line.split("[fedmed]", 1)[1].strip(), flush=True)
                elif " ERROR " in line or "Traceback" in line:
                    print("  ! " + line.rstrip()[-300:], flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            raise


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
) -> Path:
    """Run a simulated federation and return the output folder."""
    if num_sites < 1:
        raise SimulationError(f"--sites must be >= 1, got {num_sites}")
    if rounds is not None and rounds < 1:
        raise SimulationError(f"--rounds must be >= 1, got {rounds}")
    job_dir = resolve_job(job)
    out_dir = Path(out or f"runs/{job_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise SimulationError(f"output folder {out_dir} is not empty; choose another --out or pass --force")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _, controller_args = load_controller_args(job_dir)
    task = build_task(controller_args.get("task", {"name": "classification"}))
    sites_dir, workspace, run_job = out_dir / "sites", out_dir / "workspace", out_dir / "job"
    print(f"[1/3] preparing {num_sites} simulated hospitals ({'data ' + data if data else 'synthetic data'}, "
          f"Dirichlet alpha {alpha}, seed {seed})", flush=True)
    site_configs, summary = task.prepare_simulation(num_sites, sites_dir, data, alpha, seed)
    for line in summary:
        print("  " + line, flush=True)
    args = prepare_job(job_dir, run_job, num_sites, rounds)
    if privacy:  # issue 5: the FLARE simulator does not enforce site scopes; copy the mode's filters in
        from fedmed.privacy.simulation import apply_privacy_mode

        applied = apply_privacy_mode(run_job, privacy, privacy_file)
        print(f"  privacy mode '{privacy}' from {applied['client_privacy_file']}: site filters "
              f"{', '.join(applied['client_filters'])}; server filters {', '.join(applied['server_filters']) or 'none'}", flush=True)
    (workspace / "local").mkdir(parents=True)
    (workspace / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"sites": site_configs}, indent=2) + "\n")
    (workspace / "local" / "resources.json").write_text(json.dumps({"class_allow_list": class_allow_list()}, indent=2) + "\n")

    site_names = list(site_configs)
    threads = threads or num_sites
    print(f"[2/3] FLARE simulator: {num_sites} sites x {args.get('num_rounds')} rounds "
          f"(job {job_dir.name}; log {out_dir / 'simulator.log'})", flush=True)
    started = time.time()
    rc = run_simulator(run_job, workspace, site_names, threads, out_dir / "simulator.log")
    print(f"  simulator finished in {time.time() - started:.0f} s (exit code {rc})", flush=True)

    print(f"[3/3] writing outputs to {out_dir}", flush=True)
    server_app = workspace / "server" / "simulate_job" / "app_server"
    try:
        metrics = export_run_outputs(server_app, out_dir)
    except ResultsError as exc:
        error = _server_error(server_app)
        raise SimulationError(f"the federated run failed: {error or exc}. Logs: {out_dir / 'simulator.log'}, {workspace}/*/log.txt") from exc
    _print_summary(metrics, out_dir)
    _baselines_and_report(run_job, site_configs, args.get("num_rounds"), out_dir, baselines)
    return out_dir


def _baselines_and_report(run_job: Path, site_configs: dict, rounds, out_dir: Path, baselines: bool) -> None:
    """Issue-4 outputs (fedmed.baselines, fedmed.report): OUT/baselines.json, OUT/report/."""
    from fedmed.baselines import BASELINES_FILE, run_for_job
    from fedmed.report import build_report

    if baselines:
        print("  baselines: local-only and pooled models with the same partition and budget", flush=True)
        run_for_job(run_job, site_configs, out_dir / BASELINES_FILE, num_rounds=rounds,
                    federated_model=out_dir / "models" / "global_model.pt", log=lambda line: print(line, flush=True))
    build_report(out_dir, log=lambda line: print("  " + line, flush=True))
    print(f"  report: {out_dir / 'report' / 'report.html'}\n  provenance card: {out_dir / 'provenance.json'} "
          f"(python -m fedmed verify-provenance {out_dir})", flush=True)


def _server_error(server_app: Path) -> str | None:
    metrics_path = server_app / "fedmed" / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text()).get("error")
    return None


def _print_summary(metrics: dict, out_dir: Path) -> None:
    key = metrics["key_metric"]
    evaluations = metrics.get("evaluations", [])
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        print(f"  mean validation {key}: initial model {first.get('mean_' + key):.4f} -> "
              f"final global model {last.get('mean_' + key):.4f}")
        for site, site_metrics in sorted(last["sites"].items()):
            print(f"    {site}: " + ", ".join(f"{k} {v:.4f}" for k, v in site_metrics.items() if k.startswith("val_")))
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
    parser.add_argument("--privacy", default=None, choices=["standard", "dp", "compressed", "he"],
                        help="privacy mode every simulated hospital applies (its scope's filters from --privacy-file); "
                             "he needs HE kits: use rehearse --privacy he")
    parser.add_argument("--privacy-file", default=None,
                        help="the hospitals' privacy.json (default workspace_templates/client/local/privacy.json)")


def main(args: argparse.Namespace) -> int:
    try:
        simulate(args.job, args.sites, args.rounds, args.data, args.out, args.alpha, args.seed, args.threads, args.force,
                 args.baselines, args.privacy, args.privacy_file)
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
