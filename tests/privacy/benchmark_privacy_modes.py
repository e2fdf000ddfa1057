"""Benchmark the privacy modes on PneumoniaMNIST with 5 hospitals (not a test; run by hand).

    python tests/privacy/benchmark_privacy_modes.py --data ../shared/data/pneumoniamnist.npz --rounds 10 --out runs/privacy_bench

standard / compressed / compressed_int8 / dp (record-level DP-SGD at the budgets ``--epsilons``,
delta 1e-5) run in the FLARE simulator (``simulate --privacy``);
he runs in a real loopback deployment with HE-built kits (the simulator cannot do HE), on the same
seeded partition. Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmed.privacy.scopes import template_privacy_file  # noqa: E402
from fedmed.simulate import DEFAULT_JOB, resolve_job, simulate  # noqa: E402


def summarize(metrics: dict) -> dict:
    rounds = metrics["rounds"]
    per_round = [sum(s.get("upload_bytes", 0) for s in r["sites"].values()) for r in rounds]
    final = metrics["evaluations"][-1] if metrics.get("evaluations") else {}
    eps = [s.get("privacy_epsilon") for s in rounds[-1]["sites"].values()] if rounds else []
    eps = [e for e in eps if e is not None]
    return {
        "final_mean_val_auc": final.get("mean_val_auc"),
        "best_mean_val_auc": (metrics.get("best") or {}).get("mean_val_auc"),
        "bytes_per_round_all_sites": sum(per_round) / len(per_round) if per_round else None,
        "bytes_per_site_per_round": (sum(per_round) / len(per_round) / len(rounds[0]["sites"])) if per_round else None,
        "epsilon_final_max_over_sites": max(eps) if eps else None,
        "rounds": len(rounds),
        "external_auc": {set_name: {model: figures.get("auc") for model, figures in by_model.items()}
                         for set_name, by_model in ((metrics.get("external") or {}).get("results") or {}).items()},
    }


def dp_policy(path: Path, epsilon: float) -> Path:
    """The template's sites' privacy.json with the dp scope's budget set to ``epsilon``."""
    policy = json.loads(template_privacy_file("client").read_text())
    for scope in policy["scopes"]:
        for f in scope.get("task_data_filters", []):
            if f["path"].endswith("DPTrainingPolicy"):
                f["args"].update({"epsilon": epsilon})
    path.write_text(json.dumps(policy, indent=2))
    return path


def run_he(out: Path, data: str, rounds: int, sites: int, seed: int, alpha: float) -> tuple[dict, float]:
    from loopback import LoopbackFederation, tiny_job

    from fedmed.flare.he import he_job
    from fedmed.tasks import build_task

    server = json.loads((resolve_job(DEFAULT_JOB) / "app" / "config" / "config_fed_server.json").read_text())
    task = build_task(server["workflows"][0]["args"]["task"])
    site_configs, _ = task.prepare_simulation(sites, out / "he_sites", data, alpha, seed)
    fed = LoopbackFederation(out / "he_fed", sites=list(site_configs), he=True, site_configs=site_configs)
    fed.provision()
    started = time.time()
    try:
        fed.start()
        base = tiny_job(out / "he_job_plain", num_rounds=rounds, width=None, min_clients=sites)
        client_path = base / "app" / "config" / "config_fed_client.json"
        client = json.loads(client_path.read_text())
        client["executors"][0]["executor"]["args"].update({"batch_size": 32})  # as the simulated runs
        client_path.write_text(json.dumps(client, indent=2))
        job = he_job(base, out / "he_job")
        _, meta, result = fed.run_job(job, timeout=3600)
        if meta.get("status") != "FINISHED:COMPLETED":
            raise RuntimeError(f"he job ended {meta.get('status')}; see {fed.root}")
        metrics = json.loads((result / "workspace" / "app_server" / "fedmed" / "metrics.json").read_text())
    finally:
        fed.stop()
    return metrics, time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job folder (default {DEFAULT_JOB})")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the job's num_rounds)")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--out", default="runs/privacy_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0], help="dp budgets (record level, delta 1e-5)")
    parser.add_argument("--modes", nargs="+", default=["standard", "compressed", "compressed_int8", "dp", "he"])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.rounds is None:
        server = json.loads((resolve_job(args.job) / "app" / "config" / "config_fed_server.json").read_text())
        args.rounds = int(server["workflows"][0]["args"]["num_rounds"])
    results = {
        "command": " ".join(sys.argv),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "sites": args.sites, "rounds": args.rounds, "alpha": args.alpha, "seed": args.seed, "runs": {},
    }
    runs = []
    for mode in args.modes:
        if mode == "dp":
            runs += [(f"dp eps={e:g}", "dp", dp_policy(out / f"privacy_dp_eps{e:g}.json", e)) for e in args.epsilons]
        elif mode != "he":
            runs.append((mode, mode, None))
    for name, mode, policy in runs:
        print(f"=== {name}", flush=True)
        started = time.time()
        run_dir = simulate(job=args.job, num_sites=args.sites, rounds=args.rounds, data=args.data, out=str(out / name.replace(" ", "_").replace("=", "")),
                           seed=args.seed, alpha=args.alpha, force=True, privacy=mode, privacy_file=str(policy) if policy else None)
        summary = summarize(json.loads((run_dir / "metrics.json").read_text()))
        if (run_dir / "privacy_ledger.json").is_file():
            summary["privacy_ledger"] = json.loads((run_dir / "privacy_ledger.json").read_text())
        summary.update({"where": "FLARE simulator", "wall_seconds": round(time.time() - started, 1)})
        results["runs"][name] = summary
        print(json.dumps(summary), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if "he" in args.modes:
        print("=== he (loopback deployment, HE kits)", flush=True)
        metrics, seconds = run_he(out, args.data, args.rounds, args.sites, args.seed, args.alpha)
        summary = summarize(metrics)
        summary.update({"where": f"loopback deployment (real server + {args.sites} clients, HE kits)", "wall_seconds": round(seconds, 1)})
        results["runs"]["he"] = summary
        print(json.dumps(summary), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| mode | final mean val AUC | best mean val AUC | external AUC (final model) | upload bytes per site per round | epsilon (delta 1e-5) at the end | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        auc = f"{r['final_mean_val_auc']:.3f}" if r["final_mean_val_auc"] is not None else "-"
        best = f"{r['best_mean_val_auc']:.3f}" if r["best_mean_val_auc"] is not None else "-"
        eps = f"{r['epsilon_final_max_over_sites']:.4g}" if r["epsilon_final_max_over_sites"] is not None else "-"
        external = ", ".join(f"{k} {v.get('global_model'):.3f}" for k, v in r.get("external_auc", {}).items() if v.get("global_model") is not None) or "-"
        print(f"| {name} | {auc} | {best} | {external} | {r['bytes_per_site_per_round']:,.0f} | {eps} | {r['wall_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
