"""Benchmark the privacy modes on PneumoniaMNIST with 5 hospitals (not a test; run by hand).

    python tests/privacy/benchmark_privacy_modes.py --data ../shared/data/pneumoniamnist.npz --rounds 10 --out runs/privacy_bench

standard / compressed / compressed_int8 / dp (record-level DP-SGD at the budgets ``--epsilons``,
delta 1e-5) / he (secure aggregation) run in the FLARE simulator (``simulate --privacy``) on the
same seeded partition. Writes OUT/results.json and prints a markdown table (with the median round
time from round 2 on, read from the server's round lines).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmed.privacy.scopes import template_privacy_file  # noqa: E402
from fedmed.simulate import DEFAULT_JOB, resolve_job, simulate  # noqa: E402


ROUND_LINE = re.compile(r"\[fedmed\] round (\d+)/\d+: .* ([\d.]+) s\s*$")


def round_seconds(log: Path) -> list[float]:
    """Seconds per round from the server's ``[fedmed] round i/n: ... X s`` lines (round 1 included)."""
    if not log.is_file():
        return []
    return [float(m.group(2)) for m in map(ROUND_LINE.search, log.read_text(errors="replace").splitlines()) if m]


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
        "external": (metrics.get("external") or {}).get("results"),
        "decision_threshold": metrics.get("decision_threshold"),
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
        else:
            runs.append((mode, mode, None))
    for name, mode, policy in runs:
        print(f"=== {name}", flush=True)
        started = time.time()
        run_dir = simulate(job=args.job, num_sites=args.sites, rounds=args.rounds, data=args.data, out=str(out / name.replace(" ", "_").replace("=", "")),
                           seed=args.seed, alpha=args.alpha, force=True, privacy=mode, privacy_file=str(policy) if policy else None)
        summary = summarize(json.loads((run_dir / "metrics.json").read_text()))
        if (run_dir / "privacy_ledger.json").is_file():
            summary["privacy_ledger"] = json.loads((run_dir / "privacy_ledger.json").read_text())
        seconds = round_seconds(run_dir / "simulator.log")
        summary.update({"where": "FLARE simulator", "wall_seconds": round(time.time() - started, 1), "round_seconds": seconds,
                        "median_round_seconds_from_round_2": statistics.median(seconds[1:]) if len(seconds) > 1 else None})
        results["runs"][name] = summary
        print(json.dumps(summary), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| mode | final mean val AUC | best mean val AUC | external AUC (final model) | upload bytes per site per round | epsilon (delta 1e-5) at the end | median round s (from round 2) | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        auc = f"{r['final_mean_val_auc']:.3f}" if r["final_mean_val_auc"] is not None else "-"
        best = f"{r['best_mean_val_auc']:.3f}" if r["best_mean_val_auc"] is not None else "-"
        eps = f"{r['epsilon_final_max_over_sites']:.4g}" if r["epsilon_final_max_over_sites"] is not None else "-"
        external = ", ".join(f"{k} {v.get('global_model'):.3f}" for k, v in r.get("external_auc", {}).items() if v.get("global_model") is not None) or "-"
        median = r.get("median_round_seconds_from_round_2")
        print(f"| {name} | {auc} | {best} | {external} | {r['bytes_per_site_per_round']:,.0f} | {eps} | "
              f"{'-' if median is None else f'{median:.1f}'} | {r['wall_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
