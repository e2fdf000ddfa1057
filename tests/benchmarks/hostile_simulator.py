"""Hostile and slow hospitals through the real FLARE simulator (issue 18): external AUC, flags, wall time.

Each scenario is one ``python -m fedmed simulate`` run of the job as committed (its default robust
aggregation and tolerance f) on the npz pool; the figures come from the run's own outputs:
``metrics.json`` ``external`` (the released model on the external hospitals no site held),
``participation`` (rounds each site contributed / was flagged / was left out) and the wall time of
the whole command. One run at a time; results are appended to ``--results`` as JSON lines.

    nice -n 10 python tests/benchmarks/hostile_simulator.py ../shared/data/pneumoniamnist.npz --rounds 10 \\
        --scenarios clean5 two_of_5 one_of_5 clean3 one_of_3 slow5

Scenarios: clean5 / clean3 (no attack), one_of_5 (site-2 scale=-10), two_of_5 (site-2 and site-3
scale=-10), one_of_3 (site-2 scale=-10 of 3), two_of_3 (site-2 and site-3: one past the tolerance f = 1,
to see what the release gate does with a model the rule could not protect), two_of_5_inside
(site-2 and site-3 send their update x(-1.5): reversed but inside the 2x median-norm bound, so
never bounded; the rule, not the bound, must contain it), slow5 (site-4
delay=--delay seconds). A run that exits non-zero (e.g. the release gate's collapse) is recorded
with its exit code, the release decision and the tail of its output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = {
    "clean5": (5, []),
    "one_of_5": (5, ["site-2:scale=-10"]),
    "two_of_5": (5, ["site-2:scale=-10", "site-3:scale=-10"]),
    "clean3": (3, []),
    "one_of_3": (3, ["site-2:scale=-10"]),
    "two_of_3": (3, ["site-2:scale=-10", "site-3:scale=-10"]),  # one past the tolerance (f = 1 of 3)
    "two_of_5_inside": (5, ["site-2:scale=-1.5", "site-3:scale=-1.5"]),  # reversed, inside the 2x norm bound
    "slow5": (5, ["site-4:delay={delay}"]),
}


def run(npz: str, name: str, rounds: int, out_root: Path, delay: float, extra: list[str]) -> dict:
    sites, attacks = SCENARIOS[name]
    attacks = [a.format(delay=delay) for a in attacks]
    out = out_root / name
    cmd = [sys.executable, "-m", "fedmed", "simulate", "--data", npz, "--sites", str(sites), "--rounds", str(rounds),
           "--out", str(out), "--force", *extra]
    for attack in attacks:
        cmd += ["--attack", attack]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    metrics_path = out / "metrics.json"
    if proc.returncode != 0 and not metrics_path.is_file():
        return {"scenario": name, "exit_code": proc.returncode, "failed": proc.stderr[-2000:] or proc.stdout[-2000:],
                "wall_s": round(wall, 1)}
    metrics = json.loads(metrics_path.read_text())
    external = {}
    for set_name, by_model in (metrics.get("external") or {}).get("results", {}).items():
        model = by_model.get("global_model") or {}
        external[set_name] = {"auc": round(model.get("auc", float("nan")), 4), "accuracy": round(model.get("accuracy", float("nan")), 4)}
    part = metrics.get("participation", {})
    final_line = next((line for line in proc.stdout.splitlines() if "flagged in most rounds" in line or "left out of most rounds" in line), "")
    release = metrics.get("release") or {}
    return {"scenario": name, "sites": sites, "exit_code": proc.returncode,
            "release": {k: release.get(k) for k in ("action", "version", "reason")},
            "rounds": len(metrics.get("rounds", [])), "attacks": attacks, "wall_s": round(wall, 1),
            "aggregation": metrics.get("aggregation"), "external": external,
            "median_val_auc_final": metrics["evaluations"][-1].get("median_val_auc") if metrics.get("evaluations") else None,
            "participation": {s: {k: p[k] for k in ("rounds_contributed", "rounds_flagged", "rounds_left_out")} for s, p in part.items()},
            "status_line": final_line.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("npz")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--delay", type=float, default=60.0, help="seconds the slow site holds each reply (slow5)")
    parser.add_argument("--out", default="runs/hostile-benchmark")
    parser.add_argument("--results", default="runs/hostile-benchmark/results.jsonl")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="passed to simulate --set")
    args = parser.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    extra = [x for s in args.settings for x in ("--set", s)]
    for name in args.scenarios:
        result = run(args.npz, name, args.rounds, out_root, args.delay, extra)
        print(json.dumps(result), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
