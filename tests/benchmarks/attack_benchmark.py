"""One hostile hospital out of five: external AUC under each attack, plain FedAvg vs the robust default (issue 12).

The rounds go through the job's own round engine (``fedmed.rounds.RoundEngine`` with
``PlaintextAggregation``: the same update checks, robust aggregation, server optimizer, finite check
and median best-model choice the FLARE controller runs) and the attack through ``fedmed.attacks``
(what ``simulate --attack`` applies at a site); only FLARE's transport is left out, so the ten runs
fit on 2 cores. Sites train with the job's settings (``baselines.job_settings``) on the simulate
partition of the npz; every model is scored on the external hospital no site holds.

    OMP_NUM_THREADS=1 python tests/benchmarks/attack_benchmark.py ../shared/data/pneumoniamnist.npz --rounds 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedmed import data as site_data
from fedmed.aggregation import weight_difference
from fedmed.attacks import apply_attack, parse_attack
from fedmed.baselines import job_settings
from fedmed.jobfolder import JobFolder
from fedmed.networks import build_network, state_to_numpy
from fedmed.rounds import WEIGHT_DIFF, PlaintextAggregation, RoundEngine, RoundFailed, SiteReply
from fedmed.tasks import build_task
from fedmed.threshold import choose_threshold
from fedmed.training import LocalTrainer

ATTACKS = ["none", "scale=-10", "scale=1000", "samples=1e9", "nan", "metric=1.0"]


def run(fed, settings: dict, aggregation: dict, server_optimizer: dict | None, attack: str, rounds: int, attacker: str) -> dict:
    task = build_task(settings["task"])
    network = settings["network"]
    names = [f"site-{i + 1}" for i in range(len(fed.sites))]
    trainers = {name: LocalTrainer(task, task.to_dataset(s.train, train=True), task.to_dataset(s.val), **settings["trainer_args"])
                for name, s in zip(names, fed.sites)}
    engine = RoundEngine(PlaintextAggregation(aggregation, server_optimizer, num_sites=len(names)), "attack-benchmark", task.key_metric, rounds, 2)
    weights = state_to_numpy(build_network(network, seed=settings["network_seed"]))
    best = weights
    hostile = {a: parse_attack(f"{a}:{attack}") for a in attacker.split(",")} if attack != "none" else {}
    started, rejected = time.perf_counter(), 0
    for r in range(rounds):
        replies = {}
        for name, trainer in trainers.items():
            val = trainer.evaluate(network, weights)
            result = trainer.train(network, weights, r, num_rounds=rounds)
            update = weight_difference(result.weights, weights)
            meta = {"num_samples": result.num_samples, "metrics": {**val, **result.metrics}}
            if name in hostile:
                update, meta = apply_attack(hostile[name], update, meta)
            replies[name] = SiteReply(WEIGHT_DIFF, update, meta)
        try:
            outcome = engine.run_round(r, weights, replies)
        except RoundFailed as exc:
            return {"failed": str(exc)}
        if outcome.entering_model_is_best:
            best = weights
        rejected += not outcome.accepted
        weights = outcome.model
    final_val = {name: t.evaluate(network, weights) for name, t in trainers.items()}
    evaluation, improved, _ = engine.record_final_validation(final_val)
    if improved:
        best = weights
    threshold = (choose_threshold(final_val) or {}).get("threshold")
    model = next(iter(trainers.values())).model(network, weights)
    out = {"seconds": round(time.perf_counter() - started, 1), "rejected_rounds": rejected,
           "finite": bool(all(np.all(np.isfinite(v)) for v in weights.values()))}
    for label, w in (("final", weights), ("best", best)):
        model = next(iter(trainers.values())).model(network, w)
        m = task.external_metrics(model, task.to_dataset(fed.external["external-val"]), torch.device("cpu"), threshold)
        out[label] = {"auc": round(m["auc"], 4), "accuracy": round(m["accuracy"], 4)}
    out["failed_sites_per_round"] = [sorted(rec["failed"]) for rec in engine.metrics["rounds"] if rec["failed"]][:1]
    out["flagged_rounds"] = {site: p["rounds_flagged"] for site, p in engine.metrics["participation"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("npz")
    parser.add_argument("--job", default="jobs/cxr_pneumonia_fedavg")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--attacker", default="site-2", help="the hostile site(s), comma-separated: site-2,site-3")
    parser.add_argument("--attacks", nargs="*", default=ATTACKS)
    parser.add_argument("--aggregators", nargs="*", default=["fedavg", "default"],
                        help="fedavg, default (the job's), or any aggregator name (median, geometric_median, ...)")
    args = parser.parse_args()
    settings = job_settings(args.job)
    controller = JobFolder(Path(args.job)).controller_args()
    default = controller.get("aggregation") or {"name": "trimmed_mean", "args": {}}
    fed = site_data.partition_sites(site_data.load_npz(args.npz), args.sites, alpha=0.5, seed=0)
    for attack in args.attacks:
        for agg in args.aggregators:
            spec = default if agg == "default" else {"name": agg}
            result = run(fed, settings, spec, controller.get("server_optimizer"), attack, args.rounds, args.attacker)
            print(json.dumps({"attack": attack, "aggregation": spec, **result}), flush=True)


if __name__ == "__main__":
    main()
