"""Clean held-out quality at 5, 10 and 20 hospitals: the job's recipe, plain FedAvg, a stock-FLARE-like peer, pooled (issue 18).

Every candidate trains on the simulate partition of a MedMNIST npz (``fedmed.data.partition_sites``:
the same site files ``simulate --sites N`` writes) and is scored on the external hospitals no site
holds (``external-val``: the pool's val split with its own scanner profile; ``external-val-acq``:
the same images with the acquisition gap of ``fedmed.data.acquisition_hospital``).

- ``job``: the job folder's recipe (network, task and augmentation, trainer settings, aggregation
  and server optimizer from ``--job``), rounds through the job's own round engine
  (``fedmed.rounds.RoundEngine`` + ``PlaintextAggregation``: the checks, robust aggregation and
  server step the FLARE controller runs; FLARE's transport left out so the study fits on 2 cores);
- ``fedavg``: the same with plain sample-weighted FedAvg;
- ``stock``: an in-process copy of ``stock_flare_peer_client.py`` (FLARE's stock ``FedAvgRecipe`` +
  Client API: ``PeerCNN``, Adam 1e-3 kept across rounds, batch 32, one epoch, no augmentation, no
  schedule; FedAvg weighted by steps). The real stock recipe runs in FLARE's simulator with
  ``stock_flare_peer.py`` on a finished ``simulate`` run;
- ``pooled``: the job's trainer on every site's training files in one place, same rounds x epochs;
- any other name: the job's recipe with ``--set KEY=VALUE`` overrides, given as
  ``NAME:KEY=VALUE,KEY=VALUE`` (keys: lr, batch_size, local_epochs, lr_schedule, aggregation
  (fedavg|default), augmentation (none|default), network (a ``fedmed.networks`` name with its
  default args, e.g. small_cnn), min_local_steps).

``--save-models DIR`` keeps each final model (``DIR/<sites>-<recipe name>.pt``, state dict) so it can
be scored again later without retraining.

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/scale_study.py ../shared/data/pneumoniamnist.npz \
        --sites 20 --rounds 20 --recipes job fedavg stock pooled

Prints one JSON line per (sites, recipe); ``--out FILE`` appends them to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmed import data as site_data
from fedmed.aggregation import weight_difference
from fedmed.baselines import job_settings
from fedmed.jobfolder import JobFolder
from fedmed.networks import build_network, state_to_numpy
from fedmed.rounds import WEIGHT_DIFF, PlaintextAggregation, RoundEngine, SiteReply
from fedmed.tasks import build_task
from fedmed.threshold import choose_threshold
from fedmed.training import LocalTrainer

EXTERNAL = ("external-val", site_data.ACQUISITION_EXTERNAL)


def _external(task, model, fed, threshold) -> dict:
    out = {}
    for name in EXTERNAL:
        m = task.external_metrics(model, task.to_dataset(fed.external[name]), torch.device("cpu"), threshold)
        out[name] = {"auc": round(m["auc"], 4), "accuracy": round(m["accuracy"], 4)}
    return out


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = value
    return name, overrides


def run_job(fed, settings: dict, controller: dict, rounds: int, overrides: dict) -> dict:
    task_spec = json.loads(json.dumps(settings["task"]))
    if overrides.get("augmentation") == "none":
        task_spec.setdefault("args", {})["augmentation"] = None
    task = build_task(task_spec)
    network = settings["network"]
    if "network" in overrides:
        network = {"name": overrides["network"], "args": {"in_channels": 1, "num_classes": 2}}
    trainer_args = dict(settings["trainer_args"])
    for key, cast in (("lr", float), ("batch_size", int), ("local_epochs", int), ("lr_schedule", str), ("min_local_steps", int)):
        if key in overrides:
            trainer_args[key] = cast(overrides[key])
    aggregation = controller.get("aggregation") or {"name": "fedavg"}
    if overrides.get("aggregation") == "fedavg":
        aggregation = {"name": "fedavg"}
    names = [f"site-{i + 1}" for i in range(len(fed.sites))]
    trainers = {}
    for name, s in zip(names, fed.sites):
        trainers[name] = LocalTrainer(task, task.to_dataset(s.train, train=True), task.to_dataset(s.val), device="cpu", **trainer_args)
    engine = RoundEngine(PlaintextAggregation(aggregation, controller.get("server_optimizer")), "scale-study", task.key_metric, rounds, 2)
    weights = state_to_numpy(build_network(network, seed=settings["network_seed"]))
    for r in range(rounds):
        replies = {}
        for name, trainer in trainers.items():
            val = trainer.evaluate(network, weights)
            result = trainer.train(network, weights, r, num_rounds=rounds)
            replies[name] = SiteReply(WEIGHT_DIFF, weight_difference(result.weights, weights),
                                      {"num_samples": result.num_samples, "metrics": {**val, **result.metrics}})
        weights = engine.run_round(r, weights, replies).model
    final_val = {name: t.evaluate(network, weights) for name, t in trainers.items()}
    threshold = (choose_threshold(final_val) or {}).get("threshold")
    model = next(iter(trainers.values())).model(network, weights)
    return {"aggregation": aggregation["name"], "trainer": trainer_args, "network": network, "model": model,
            "site_val_auc_mean": round(float(np.mean([m["val_auc"] for m in final_val.values()])), 4),
            **_external(task, model, fed, threshold)}


def run_pooled(fed, settings: dict, rounds: int) -> dict:
    task = build_task(settings["task"])
    network = settings["network"]
    train = site_data.ImageSplit(np.concatenate([s.train.images for s in fed.sites]), np.concatenate([s.train.labels for s in fed.sites]))
    val = site_data.ImageSplit(np.concatenate([s.val.images for s in fed.sites]), np.concatenate([s.val.labels for s in fed.sites]))
    trainer = LocalTrainer(task, task.to_dataset(train, train=True), task.to_dataset(val), device="cpu", **settings["trainer_args"])
    weights = state_to_numpy(build_network(network, seed=settings["network_seed"]))
    for r in range(rounds):
        weights = trainer.train(network, weights, r, num_rounds=rounds).weights
    metrics = trainer.evaluate(network, weights)
    threshold = (choose_threshold({"pooled": metrics}) or {}).get("threshold")
    model = trainer.model(network, weights)
    return {"site_val_auc_mean": round(metrics["val_auc"], 4), "model": model, **_external(task, model, fed, threshold)}


def run_stock(fed, rounds: int) -> dict:
    """FLARE's stock FedAvgRecipe + the hello-pt-style Client API script, in process."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stock_flare_peer_net import PeerCNN

    torch.manual_seed(0)
    global_model = PeerCNN(1, 2, fed.sites[0].train.images.shape[-1])
    clients = []
    for index, s in enumerate(fed.sites):
        torch.manual_seed(index)
        model = PeerCNN(1, 2, s.train.images.shape[-1])
        loader = DataLoader(TensorDataset(torch.from_numpy(s.train.images), torch.from_numpy(s.train.labels)), batch_size=32, shuffle=True)
        clients.append((model, loader, torch.optim.Adam(model.parameters(), lr=1e-3)))
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(rounds):
        state = {k: v.clone() for k, v in global_model.state_dict().items()}
        total, steps_sum = None, 0
        for model, loader, optimizer in clients:
            model.load_state_dict(state)
            model.train()
            steps = 0
            for images, labels in loader:
                optimizer.zero_grad()
                loss_fn(model(images), labels).backward()
                optimizer.step()
                steps += 1
            local = model.state_dict()
            total = {k: local[k] * steps for k in local} if total is None else {k: total[k] + local[k] * steps for k in local}
            steps_sum += steps
        global_model.load_state_dict({k: v / steps_sum for k, v in total.items()})
    task = build_task({"name": "classification", "args": {"num_classes": 2}})
    return {"model": global_model, **_external(task, global_model, fed, None)}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("npz")
    parser.add_argument("--job", default="jobs/cxr_pneumonia_fedavg")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=None, help="default: the job's num_rounds")
    parser.add_argument("--recipes", nargs="+", default=["job", "fedavg", "stock", "pooled"])
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--save-models", default=None, help="folder for the final models (state dicts)")
    parser.add_argument("--partition-seeds", type=int, nargs="+", default=[0],
                        help="partition seeds (simulate's --seed): other seeds give other site files, to see the spread")
    args = parser.parse_args()
    settings = job_settings(args.job)
    controller = JobFolder(Path(args.job)).controller_args()
    rounds = args.rounds or settings["num_rounds"]
    pool = site_data.load_npz(args.npz)
    for num_sites, seed in ((n, s) for n in args.sites for s in args.partition_seeds):
        fed = site_data.partition_sites(pool, num_sites, alpha=0.5, seed=seed)
        sizes = [len(s.train) for s in fed.sites]
        for text in args.recipes:
            name, overrides = parse_recipe(text)
            started = time.perf_counter()
            if name == "stock":
                result = run_stock(fed, rounds)
            elif name == "pooled":
                result = run_pooled(fed, settings, rounds)
            else:
                if name == "fedavg":
                    overrides = {"aggregation": "fedavg", **overrides}
                result = run_job(fed, settings, controller, rounds, overrides)
            model = result.pop("model")
            if args.save_models:
                Path(args.save_models).mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), Path(args.save_models) / f"{num_sites}-{seed}-{name}.pt")
            line = {"sites": num_sites, "partition_seed": seed, "recipe": text, "rounds": rounds, "train_sizes": sizes, **result,
                    "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
