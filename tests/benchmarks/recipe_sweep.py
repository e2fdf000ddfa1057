"""Choose the training recipe by measurement on external data (issue 10).

Runs FedAvg in-process (no FLARE: the same LocalTrainer, robust-free FedAvg weighting and
server optimizers the job uses) on the simulate partition of a MedMNIST npz, for each candidate
recipe, and prints AUC / accuracy on the external hospitals (the pool's val split with its own
scanner profile, the same images re-acquired with a gap no site has (``external-val-acq``), and
the same images as collected). Selection uses external data here on purpose:
this is the recipe study, done once; the job's own best-model and threshold choices never read it.

    OMP_NUM_THREADS=2 python tests/benchmarks/recipe_sweep.py ../shared/data/pneumoniamnist.npz --rounds 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedmed import data as site_data
from fedmed.aggregation import aggregate_updates, weight_difference
from fedmed.networks import build_network, state_to_numpy
from fedmed.server_optim import build_server_optimizer
from fedmed.tasks.classification import ClassificationTask
from fedmed.threshold import choose_threshold
from fedmed.training import LocalTrainer

AUG = {"prob": 0.5, "rotate_degrees": 10, "scale": 0.1, "translate": 0.08, "gamma": [0.7, 1.5],
       "intensity_scale": 0.1, "intensity_shift": 0.05, "noise_std": 0.02}
CANDIDATES = {
    "w16": {"width": 16},
    "cxr": {"network": {"name": "cxr_cnn", "args": {}}},
    "cxr+aug": {"network": {"name": "cxr_cnn", "args": {}}, "aug": AUG},
    "cxr+aug+clipped": {"network": {"name": "cxr_cnn", "args": {}}, "aug": AUG,
                        "aggregation": {"name": "clipped_fedavg", "args": {"norm_multiplier": 2.0}}},
    "w16+aug": {"width": 16, "aug": AUG},
    "w16+aug+fedavgm": {"width": 16, "aug": AUG, "server": {"name": "fedavgm", "args": {"lr": 1.0, "momentum": 0.5}}},
    "w24+aug": {"width": 24, "aug": AUG},
    "w16+aug+trimmed": {"width": 16, "aug": AUG, "aggregation": {"name": "trimmed_mean", "args": {"f": 1, "norm_multiplier": 2.0}}},
    "w16+aug+clipped": {"width": 16, "aug": AUG, "aggregation": {"name": "clipped_fedavg", "args": {"norm_multiplier": 2.0}}},
    "w32": {"width": 32},
    "w32+aug": {"width": 32, "aug": AUG},
    "w32+aug+fedavgm": {"width": 32, "aug": AUG, "server": {"name": "fedavgm", "args": {"lr": 1.0, "momentum": 0.5}}},
    "w32+aug+fedadam": {"width": 32, "aug": AUG, "server": {"name": "fedadam", "args": {"lr": 0.01}}},
    "w48+aug": {"width": 48, "aug": AUG},
    "w32+aug+2ep": {"width": 32, "aug": AUG, "epochs": 2},
}


def run(pool, recipe: dict, rounds: int, sites: int, seed: int = 0) -> dict:
    task = ClassificationTask(class_names=["normal", "pneumonia"], augmentation=recipe.get("aug"))
    fed = site_data.partition_sites(pool, sites, alpha=0.5, seed=seed)
    network = recipe.get("network") or {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": recipe["width"]}}
    trainers = [LocalTrainer(task, task.to_dataset(s.train, train=True), task.to_dataset(s.val),
                             local_epochs=recipe.get("epochs", 1), lr=recipe.get("lr", 0.003), batch_size=32, seed=0)
                for s in fed.sites]
    weights = state_to_numpy(build_network(network, seed=0))
    server = build_server_optimizer(recipe.get("server"))
    started = time.perf_counter()
    for r in range(rounds):
        updates = []
        for t in trainers:
            result = t.train(network, weights, r, num_rounds=rounds)
            updates.append((f"site-{len(updates)}", weight_difference(result.weights, weights), result.num_samples))
        weights = server.step(weights, aggregate_updates(updates, recipe.get("aggregation", {"name": "fedavg"}))[0])
    seconds = time.perf_counter() - started
    site_metrics = {f"site-{i}": t.evaluate(network, weights) for i, t in enumerate(trainers)}
    threshold = choose_threshold(site_metrics)["threshold"]
    model = trainers[0].model(network, weights)
    out = {"train_seconds": round(seconds, 1), "threshold": threshold,
           "site_val_auc_mean": float(np.mean([m["val_auc"] for m in site_metrics.values()]))}
    raw_val = site_data.ImageSplit(pool.val.images, pool.val.labels)
    acq = site_data.ACQUISITION_EXTERNAL
    for name, split in (("external-val", fed.external["external-val"]), (acq, fed.external[acq]), ("val-as-collected", raw_val)):
        m = task.external_metrics(model, task.to_dataset(split), torch.device("cpu"), threshold)
        out[name] = {k: round(m[k], 4) for k in ("auc", "accuracy", "accuracy_argmax", "sensitivity", "specificity")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("npz")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pool = site_data.load_npz(args.npz)
    for name, recipe in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        print(json.dumps({"recipe": name, **run(pool, recipe, args.rounds, args.sites)}), flush=True)


if __name__ == "__main__":
    main()
