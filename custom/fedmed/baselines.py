"""Baselines with the federation's partition and budget: each site's local-only model and a pooled model.

"Does federating pay off?" needs two reference points trained exactly like the federation:

- **local-only** (one per site): the site trains alone on its own training data;
- **pooled** (centralized): one model trained on every site's training data put together, the
  upper bound a federation tries to reach without moving data.

Same partition: the sites' own data configs (``local/fedmed_site.json`` entries that ``simulate``
wrote). Same budget: the federation's initial model (network spec and seed of the FedAvg
controller), the executor's trainer settings (local epochs, learning rate, batch size, seed), and
``num_rounds`` calls of :meth:`fedmed.training.LocalTrainer.train`, each a fresh optimizer, exactly
as a site does in the federation: ``num_rounds x local_epochs`` epochs over the model's training
data. FedProx is a federated regulariser and is off for the baselines.

Every model is then evaluated on every site's validation data, giving the same models x sites
matrix as cross-site evaluation (``baselines.json``, read by :mod:`fedmed.report`).

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from torch.utils.data import ConcatDataset

from fedmed.atomic import write_json
from fedmed.networks import build_network, state_to_numpy
from fedmed.provenance import weights_sha256
from fedmed.tasks import build_task
from fedmed.training import LocalTrainer, TrainerSettings

BASELINES_FILE = "baselines.json"
BASELINES_FORMAT = "fedmed-baselines/1"
LOCAL_ONLY_PREFIX = "local-only:"
POOLED = "pooled"
FEDERATED = "global_model"
CONTROLLER_PATH = "fedmed.flare.controller.FedAvgController"
EXECUTOR_PATH = "fedmed.flare.executor.FedMedExecutor"


class BaselineError(ValueError):
    """The job or the site configs cannot define the baselines; the message names the file and key."""


def _trainer_parameters() -> set[str]:
    return set(TrainerSettings.keys())


def job_settings(job_dir: str | os.PathLike) -> dict[str, Any]:
    """The federation's budget from a job folder: network, task, seed, rounds and trainer settings."""
    from fedmed.jobfolder import JobFolder, JobFolderError

    try:
        job = JobFolder(job_dir)
        server_path = job.config_dir / "config_fed_server.json"
        controller = job.controller_args()
        executor_entry = job.executor()
    except JobFolderError as exc:
        raise BaselineError(f"{exc}; the baselines copy the job's network, rounds and trainer settings") from exc
    if executor_entry["path"] != EXECUTOR_PATH:
        raise BaselineError(f"{job.config_dir / 'config_fed_client.json'}: no executor with path {EXECUTOR_PATH}; "
                            "the baselines copy its trainer settings")
    executor = executor_entry["args"]
    for key in ("network", "task"):
        if key not in controller:
            raise BaselineError(f"{server_path}: the FedAvgController args lack '{key}'")
    allowed = _trainer_parameters()
    trainer_args = {key: value for key, value in executor.items() if key in allowed}
    trainer_args["fedprox_mu"] = 0.0
    return {
        "network": controller["network"],
        "task": controller["task"],
        "num_rounds": int(controller.get("num_rounds", 5)),
        "network_seed": int(controller.get("seed", 0)),
        "trainer_args": trainer_args,
    }


def _train_rounds(trainer: LocalTrainer, network: dict, weights: dict, num_rounds: int, label: str, log: Callable) -> tuple[dict, float]:
    started = time.perf_counter()
    for round_num in range(num_rounds):
        weights = trainer.train(network, weights, round_num, num_rounds=num_rounds).weights
        if round_num + 1 == num_rounds or (round_num + 1) % max(1, num_rounds // 4) == 0:
            log(f"  [baselines] {label}: round-equivalent {round_num + 1}/{num_rounds}")
    return weights, time.perf_counter() - started


def run_baselines(
    task,
    network: dict,
    site_datasets: Mapping[str, tuple[Any, Any]],
    num_rounds: int,
    trainer_args: Mapping[str, Any] | None = None,
    network_seed: int = 0,
    pooled: bool = True,
    federated_weights: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    external: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train each site's local-only model and a pooled model with the federation's budget and
    evaluate every one on every site's validation data, and on all sites' validation data pooled.

    ``external`` maps an external set's name to its dataset (images no site holds): every baseline
    model is also evaluated there (``doc["external"][set][model]``), with accuracy at the decision
    threshold chosen on that model's own validation data (a local model: its site's; pooled: all
    sites'), as the federation's threshold is chosen on the sites' validation data.

    ``site_datasets`` maps site -> (train_dataset, val_dataset). ``federated_weights`` (the
    federation's final global model), when given, is evaluated on the pooled validation data too,
    so federated, local-only and pooled models are compared on the same images.
    Returns the ``baselines.json`` document.
    """
    if not site_datasets:
        raise BaselineError("no sites given")
    if num_rounds < 1:
        raise BaselineError(f"num_rounds must be >= 1, got {num_rounds}")
    trainer_args = dict(trainer_args or {})
    unknown = set(trainer_args) - _trainer_parameters()
    if unknown:
        raise BaselineError(f"unknown trainer settings {sorted(unknown)}; LocalTrainer takes {sorted(_trainer_parameters())}")
    for site, (train_ds, val_ds) in site_datasets.items():
        if len(train_ds) == 0 or len(val_ds) == 0:
            raise BaselineError(f"site {site}: empty training or validation data")
    initial = state_to_numpy(build_network(network, seed=network_seed))
    sites = sorted(site_datasets)
    trainers = {site: LocalTrainer(task, *site_datasets[site], **trainer_args) for site in sites}
    local_epochs = next(iter(trainers.values())).local_epochs

    models: dict[str, dict[str, Any]] = {}
    weights_by_model: dict[str, dict] = {}
    total = len(sites) + (1 if pooled else 0)
    for index, site in enumerate(sites, 1):
        label = f"model {index}/{total} local-only {site} ({trainers[site].num_train_samples} samples)"
        weights, seconds = _train_rounds(trainers[site], network, initial, num_rounds, label, log)
        name = LOCAL_ONLY_PREFIX + site
        weights_by_model[name] = weights
        models[name] = {
            "kind": "local_only",
            "site": site,
            "num_train_samples": trainers[site].num_train_samples,
            "train_seconds": round(seconds, 3),
            "model_sha256": weights_sha256(weights),
        }
    if pooled:
        pooled_train = ConcatDataset([site_datasets[s][0] for s in sites])
        pooled_val = ConcatDataset([site_datasets[s][1] for s in sites])
        trainer = LocalTrainer(task, pooled_train, pooled_val, **trainer_args)
        label = f"model {total}/{total} pooled ({trainer.num_train_samples} samples from {len(sites)} sites)"
        weights, seconds = _train_rounds(trainer, network, initial, num_rounds, label, log)
        weights_by_model[POOLED] = weights
        models[POOLED] = {
            "kind": "pooled",
            "sites": sites,
            "num_train_samples": trainer.num_train_samples,
            "train_seconds": round(seconds, 3),
            "model_sha256": weights_sha256(weights),
        }

    log(f"  [baselines] evaluating {len(weights_by_model)} models on {len(sites)} sites' validation data")
    results: dict[str, dict[str, dict]] = {}
    for name, weights in weights_by_model.items():
        results[name] = {}
        for site in sites:
            trainer = trainers[site]
            metrics = trainer.evaluate(network, weights, dataset=site_datasets[site][1])
            results[name][site] = _scalars(metrics)
    all_val = ConcatDataset([site_datasets[s][1] for s in sites])
    on_all_val = {}
    candidates = dict(weights_by_model)
    if federated_weights is not None:
        candidates = {FEDERATED: {k: v for k, v in federated_weights.items()}, **candidates}
    evaluator = trainers[sites[0]]
    all_val_metrics = {}
    for name, weights in candidates.items():
        all_val_metrics[name] = evaluator.evaluate(network, weights, dataset=all_val)
        on_all_val[name] = _scalars(all_val_metrics[name])
    external_results = {}
    if external:
        from fedmed.threshold import choose_threshold

        for name, weights in weights_by_model.items():
            own_val = {name: all_val_metrics[name]} if models[name]["kind"] == "pooled" else {
                models[name]["site"]: evaluator.evaluate(network, weights, dataset=site_datasets[models[name]["site"]][1])}
            chosen = choose_threshold(own_val)
            models[name]["decision_threshold"] = chosen
            model = evaluator.model(network, weights)
            for set_name, dataset in external.items():
                external_results.setdefault(set_name, {})[name] = task.external_metrics(
                    model, dataset, evaluator.device, chosen["threshold"] if chosen else None)
    return {
        "format": BASELINES_FORMAT,
        "sites": sites,
        "budget": {
            "rounds": num_rounds,
            "local_epochs": local_epochs,
            "epochs": num_rounds * local_epochs,
            "optimizer": "Adam, fresh every round (as at a federated site)",
            "initial_model_seed": network_seed,
            **{key: value for key, value in trainer_args.items() if key in ("lr", "lr_schedule", "batch_size", "seed")},
        },
        "models": models,
        "results": results,
        # every model on all sites' validation images together (one AUC over len(all_val) images)
        "pooled_validation": {"num_val_samples": len(all_val), "sites": sites, "results": on_all_val},
        **({"external": external_results} if external_results else {}),
    }


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics (drops per-class score histograms and other lists)."""
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def write_baselines(doc: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``baselines.json`` atomically (temp file, then rename)."""
    return write_json(path, doc)


def run_for_job(
    job_dir: str | os.PathLike,
    site_configs: Mapping[str, Mapping[str, Any]],
    out_path: str | os.PathLike,
    num_rounds: int | None = None,
    federated_model: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    external: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Baselines for a job run on ``site_configs`` (``{site: {"data": {...}}}``, as in
    ``local/fedmed_site.json``), written to ``out_path``. ``num_rounds`` overrides the job's;
    ``federated_model`` (a state_dict .pt, e.g. ``OUT/models/global_model.pt``) is evaluated
    beside the baselines on all sites' validation data; ``external`` ({name: path} of external
    sets written by ``simulate``) adds every baseline model's external-data figures."""
    settings = job_settings(job_dir)
    task = build_task(settings["task"])
    datasets = {}
    for site, config in site_configs.items():
        if not isinstance(config, Mapping) or "data" not in config:
            raise BaselineError(f"site {site}: its config needs a 'data' object (see docs/architecture.md)")
        datasets[site] = task.load_site_data(config["data"], site)
    rounds = num_rounds or settings["num_rounds"]
    log(
        f"  [baselines] {len(datasets)} local-only models + 1 pooled model, {rounds} rounds x "
        f"{settings['trainer_args'].get('local_epochs', 1)} local epochs each (the federation's budget)"
    )
    federated_weights = None
    if federated_model is not None:
        from fedmed.provenance import ProvenanceError, load_model_weights

        try:
            federated_weights = state_to_numpy(load_model_weights(federated_model))
        except ProvenanceError as exc:
            raise BaselineError(str(exc)) from exc
    doc = run_baselines(
        task, settings["network"], datasets, rounds, settings["trainer_args"], settings["network_seed"],
        federated_weights=federated_weights, log=log,
        external={name: task.load_external(path) for name, path in (external or {}).items()},
    )
    write_baselines(doc, out_path)
    return doc
