"""Baselines with the federation's partition and budget: each site's local-only model and a pooled model.

"Does federating pay off?" needs two reference points trained exactly like the federation:

- **local-only** (one per site): the site trains alone on its own training data;
- **pooled** (centralized): one model trained on every site's training data put together, the
  upper bound a federation tries to reach without moving data.

Same partition: the sites' own data configs (``local/fedmed_site.json`` entries that ``simulate``
wrote). Same budget: the federation's initial model (network spec and seed of the FedAvg
controller), the executor's trainer settings (local epochs, learning rate, batch size, seed), and
up to ``num_rounds`` calls of :meth:`fedmed.training.LocalTrainer.train`, each a fresh optimizer,
exactly as a site does in the federation: at most ``num_rounds x local_epochs`` epochs over the
model's training data. FedProx is a federated regulariser and is off for the baselines.

Time (issue 17): the models train in parallel worker processes, one per model as the FLARE
simulator runs one process per site, with one torch thread each (on a loaded 2-core machine,
torch's 2 threads in one process ran 5-8x slower than one thread), and each stops
early after ``patience`` round-equivalents without a better score on its own validation data,
keeping its best weights. Early stopping can only flatter a baseline on its own validation data,
so "the federation beats local-only" stays a conservative claim; progress lines carry an ETA.

Every model is then evaluated on every site's validation data, giving the same models x sites
matrix as cross-site evaluation (``baselines.json``, read by :mod:`fedmed.report`).

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
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


DEFAULT_PATIENCE = 5  # round-equivalents without a better validation score before a baseline stops


@dataclass
class _Context:
    """What every baseline model needs (pickled once into each worker process)."""

    task: Any
    network: dict
    initial: dict
    trainer_args: dict
    site_datasets: Mapping[str, tuple[Any, Any]]
    external: Mapping[str, Any]
    num_rounds: int
    patience: int


def stop_early(history: Sequence[float | None], patience: int) -> bool:
    """True when the last ``patience`` scores brought no improvement over the best before them.

    ``history``: the validation key metric after each round-equivalent (None: not computable, e.g.
    AUC on one class, counts as no improvement). ``patience`` 0 never stops."""
    if patience <= 0 or len(history) <= patience:
        return False
    before = [h for h in history[:-patience] if h is not None]
    recent = [h for h in history[-patience:] if h is not None]
    if not before:
        return False
    return not recent or max(recent) <= max(before)


def _train_model(ctx: _Context, name: str, train_sites: Sequence[str], selection_site: str | None,
                 report: Callable[[dict], None]) -> dict:
    """Train one baseline model (up to ``num_rounds`` trainer calls, early stopping on its own
    validation data), then evaluate it on every site's validation data, all of it together and the
    external sets. Runs in a worker process or in-process."""
    sites = sorted(ctx.site_datasets)
    train = ctx.site_datasets[train_sites[0]][0] if len(train_sites) == 1 else ConcatDataset(
        [ctx.site_datasets[s][0] for s in train_sites])
    own_val = ctx.site_datasets[selection_site][1] if selection_site else ConcatDataset(
        [ctx.site_datasets[s][1] for s in train_sites])
    trainer = LocalTrainer(ctx.task, train, own_val, **ctx.trainer_args)
    key = ctx.task.key_metric
    weights, best, history = ctx.initial, None, []
    started, cpu = time.perf_counter(), time.process_time()
    for round_num in range(ctx.num_rounds):
        weights = trainer.train(ctx.network, weights, round_num, num_rounds=ctx.num_rounds).weights
        score = trainer.evaluate(ctx.network, weights).get(key)
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
        history.append(score)
        if best is None or (score is not None and (best[1] is None or score > best[1])):
            best = (round_num + 1, score, weights)
        stopped = round_num + 1 < ctx.num_rounds and stop_early(history, ctx.patience)
        report({"model": name, "done": round_num + 1, "rounds": ctx.num_rounds, "samples": len(train),
                "stopped": stopped, "score": score})
        if stopped:
            break
    seconds = time.perf_counter() - started
    kept_round, _, weights = best
    out = {"name": name, "weights": weights, "train_seconds": round(seconds, 3), "num_train_samples": len(train),
           "train_cpu_seconds": round(time.process_time() - cpu, 3),
           "round_equivalents": len(history), "kept_round_equivalent": kept_round, f"validation_{key}": history}
    # the model on every site's validation data, all of it together, and the external sets
    out["results"] = {site: _scalars(trainer.evaluate(ctx.network, weights, dataset=ctx.site_datasets[site][1]), keep_lists=True)
                      for site in sites}
    all_val = ConcatDataset([ctx.site_datasets[s][1] for s in sites])
    all_val_metrics = trainer.evaluate(ctx.network, weights, dataset=all_val)
    out["all_val"] = _scalars(all_val_metrics)
    if ctx.external:
        from fedmed.threshold import choose_threshold

        own = {name: all_val_metrics} if selection_site is None else {selection_site: out["results"][selection_site]}
        chosen = choose_threshold(own)
        out["decision_threshold"] = chosen
        model = trainer.model(ctx.network, weights)
        out["external"] = {set_name: ctx.task.external_metrics(model, dataset, trainer.device, chosen["threshold"] if chosen else None)
                           for set_name, dataset in ctx.external.items()}
    return out


def _evaluate_federated(ctx: _Context, weights: Mapping[str, Any]) -> dict:
    sites = sorted(ctx.site_datasets)
    trainer = LocalTrainer(ctx.task, *ctx.site_datasets[sites[0]], **ctx.trainer_args)
    return _scalars(trainer.evaluate(ctx.network, dict(weights), dataset=ConcatDataset([ctx.site_datasets[s][1] for s in sites])))


# -- worker processes -------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_init(ctx_bytes: bytes, queue) -> None:
    import pickle

    import torch

    torch.set_num_threads(1)  # one thread per process: 2 threads on a shared 2-core machine ran 5-8x slower
    _WORKER["ctx"], _WORKER["queue"] = pickle.loads(ctx_bytes), queue


def _worker_train(name: str, train_sites: Sequence[str], selection_site: str | None) -> dict:
    return _train_model(_WORKER["ctx"], name, train_sites, selection_site, _WORKER["queue"].put)


def _worker_federated(weights) -> dict:
    return _evaluate_federated(_WORKER["ctx"], weights)


class _ProgressLog:
    """Progress lines with an ETA over all baseline models (work = training images x round-equivalents).

    The rate is measured from the first finished round-equivalent on, so worker start-up does not
    inflate the estimate; early stopping removes the rest of a model's budget from the work left."""

    def __init__(self, plan: Mapping[str, tuple[int, int]], log: Callable[[str], None], patience: int = 0):
        self.plan = dict(plan)  # model -> (training samples, rounds)
        self.patience = patience
        self.total = sum(n * r for n, r in plan.values())
        self.done: dict[str, int] = {}
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, work done) at the first message
        self.log = log
        self.last_line = 0.0

    def eta(self, now: float, done: int) -> str:
        if self.first is None or now <= self.first[0] or done <= self.first[1]:
            return "estimating the time left"
        rate = (done - self.first[1]) / (now - self.first[0])
        return f"about {max(self.total - done, 0) / rate:.0f} s left (less if models stop early)"

    def __call__(self, message: Mapping[str, Any]) -> None:
        name, samples, rounds = message["model"], message["samples"], message["rounds"]
        self.done[name] = message["done"] * samples
        if message["stopped"]:
            self.total -= (rounds - message["done"]) * samples  # early stopping frees the rest of its budget
        done = sum(self.done.values())
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        finished = message["done"] == rounds or message["stopped"]
        if finished or now - self.last_line >= 10 or message["done"] == 1:
            self.last_line = now
            state = (f"stopped early after round-equivalent {message['done']}/{rounds} (no better validation score "
                     f"in {self.patience})" if message["stopped"] else f"round-equivalent {message['done']}/{rounds}")
            self.log(f"  [baselines] {name}: {state}; all baselines {100 * done / max(self.total, 1):.0f}% done, "
                     f"{now - self.started:.0f} s elapsed, {self.eta(now, done)}")


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
    workers: int = 1,
    patience: int = DEFAULT_PATIENCE,
) -> dict[str, Any]:
    """Train each site's local-only model and a pooled model with the federation's budget and
    evaluate every one on every site's validation data, and on all sites' validation data pooled.

    Budget: up to ``num_rounds`` calls of :meth:`LocalTrainer.train` from the federation's initial
    model (each a fresh optimizer and the round's learning rate, as at a federated site). After each
    call the model is validated on its own validation data (a local-only model: its site's; pooled:
    all sites'); training stops after ``patience`` calls without a better score and the best-scoring
    weights are kept (``patience`` 0: the whole budget, the last weights). Early stopping can only
    make a baseline better on its own validation data, so the federation is compared with baselines
    at least as strong as the full-budget ones there.

    ``workers`` > 1 trains the models in that many worker processes (spawned, one torch thread each;
    the pooled model, the largest, goes first); 1 trains them here, with one torch thread.

    ``external`` maps an external set's name to its dataset (images no site holds): every baseline
    model is also evaluated there (``doc["external"][set][model]``), with accuracy at the decision
    threshold chosen on that model's own validation data (a local model: its site's; pooled: all
    sites'), as the federation's threshold is chosen on the sites' validation data.

    ``site_datasets`` maps site -> (train_dataset, val_dataset). ``federated_weights`` (the
    federation's released model), when given, is evaluated on the pooled validation data too,
    so federated, local-only and pooled models are compared on the same images.
    Returns the ``baselines.json`` document.
    """
    if not site_datasets:
        raise BaselineError("no sites given")
    if num_rounds < 1:
        raise BaselineError(f"num_rounds must be >= 1, got {num_rounds}")
    if patience < 0:
        raise BaselineError(f"patience must be >= 0 (0: no early stopping), got {patience}")
    trainer_args = dict(trainer_args or {})
    unknown = set(trainer_args) - _trainer_parameters()
    if unknown:
        raise BaselineError(f"unknown trainer settings {sorted(unknown)}; LocalTrainer takes {sorted(_trainer_parameters())}")
    for site, (train_ds, val_ds) in site_datasets.items():
        if len(train_ds) == 0 or len(val_ds) == 0:
            raise BaselineError(f"site {site}: empty training or validation data")
    sites = sorted(site_datasets)
    local_epochs = int(trainer_args.get("local_epochs", 1))
    ctx = _Context(task, network, state_to_numpy(build_network(network, seed=network_seed)), trainer_args,
                   dict(site_datasets), dict(external or {}), num_rounds, patience)
    jobs = ([(POOLED, tuple(sites), None)] if pooled else []) + [(LOCAL_ONLY_PREFIX + s, (s,), s) for s in sites]
    plan = {name: (sum(len(site_datasets[s][0]) for s in train_sites), num_rounds) for name, train_sites, _ in jobs}
    progress = _ProgressLog(plan, log, patience)
    workers = max(1, min(int(workers), len(jobs)))
    log(f"  [baselines] training {len(jobs)} models ({', '.join(name for name, _, _ in jobs)}) "
        + (f"in {workers} worker processes" if workers > 1 else "in this process") + " with one torch thread each")
    if workers > 1:
        trained, federated_all_val = _run_in_workers(ctx, jobs, federated_weights, workers, progress)
    else:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            trained = {name: _train_model(ctx, name, train_sites, selection, progress) for name, train_sites, selection in jobs}
            federated_all_val = _evaluate_federated(ctx, federated_weights) if federated_weights is not None else None
        finally:
            torch.set_num_threads(threads)

    models: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, dict]] = {}
    on_all_val: dict[str, dict] = {} if federated_all_val is None else {FEDERATED: federated_all_val}
    external_results: dict[str, dict] = {}
    key = task.key_metric
    for name, train_sites, selection in sorted(jobs, key=lambda j: (j[0] == POOLED, j[0])):
        out = trained[name]
        entry = {"kind": "pooled", "sites": list(train_sites)} if selection is None else {"kind": "local_only", "site": selection}
        entry.update(num_train_samples=out["num_train_samples"], train_seconds=out["train_seconds"],
                     train_cpu_seconds=out["train_cpu_seconds"],
                     model_sha256=weights_sha256(out["weights"]), round_equivalents=out["round_equivalents"],
                     kept_round_equivalent=out["kept_round_equivalent"])
        entry[f"validation_{key}"] = out[f"validation_{key}"]
        if "decision_threshold" in out:
            entry["decision_threshold"] = out["decision_threshold"]
        models[name] = entry
        results[name] = out["results"]
        on_all_val[name] = out["all_val"]
        for set_name, figures in (out.get("external") or {}).items():
            external_results.setdefault(set_name, {})[name] = figures
    return {
        "format": BASELINES_FORMAT,
        "sites": sites,
        "budget": {
            "rounds": num_rounds,
            "local_epochs": local_epochs,
            "epochs": num_rounds * local_epochs,
            "optimizer": "Adam, fresh every round (as at a federated site)",
            "initial_model_seed": network_seed,
            "early_stopping": (f"after {patience} round-equivalents without a better {key} on the model's own validation "
                               "data; the best weights kept" if patience else "none (the whole budget, last weights)"),
            **{k: v for k, v in trainer_args.items() if k in ("lr", "lr_schedule", "batch_size", "seed", "min_local_steps")},
        },
        "models": models,
        "results": results,
        # every model on all sites' validation images together (one AUC over len(all_val) images)
        "pooled_validation": {"num_val_samples": sum(len(site_datasets[s][1]) for s in sites), "sites": sites, "results": on_all_val},
        **({"external": external_results} if external_results else {}),
    }


def _run_in_workers(ctx: _Context, jobs, federated_weights, workers: int, progress: Callable[[dict], None]):
    """Train the models in spawned worker processes; relay their progress here until all are done."""
    import multiprocessing
    import pickle
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor

    mp = multiprocessing.get_context("spawn")  # never fork a process that already runs torch threads
    messages = mp.Queue()
    # plain pickle: torch's multiprocessing pickler would pass tensors as file descriptors
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp, initializer=_worker_init,
                               initargs=(pickle.dumps(ctx), messages))
    try:
        futures = {pool.submit(_worker_train, name, train_sites, selection): name for name, train_sites, selection in jobs}
        fed_future = pool.submit(_worker_federated, {k: np.asarray(v) for k, v in federated_weights.items()}) \
            if federated_weights is not None else None
        pending = set(futures) | ({fed_future} if fed_future else set())
        while pending:
            try:
                progress(messages.get(timeout=0.5))
            except queue_module.Empty:
                pass
            pending = {f for f in pending if not f.done()}
        while True:  # the last messages
            try:
                progress(messages.get_nowait())
            except queue_module.Empty:
                break
        trained = {futures[f]: f.result() for f in futures}
        federated = fed_future.result() if fed_future else None
    except BaseException:  # Ctrl-C or a failed model: end the workers now, not after their current model
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return trained, federated


def _scalars(metrics: Mapping[str, Any], keep_lists: bool = False) -> dict[str, Any]:
    """The scalar metrics; lists (the per-class score histogram, used by the report to compute
    accuracy at a threshold) only with ``keep_lists``."""
    out: dict[str, Any] = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if keep_lists:
        out.update({key: value for key, value in metrics.items() if isinstance(value, list)})
    return out


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes (the workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    workers: int | None = None,
    patience: int = DEFAULT_PATIENCE,
) -> dict[str, Any]:
    """Baselines for a job run on ``site_configs`` (``{site: {"data": {...}}}``, as in
    ``local/fedmed_site.json``), written to ``out_path``. ``num_rounds`` overrides the job's;
    ``federated_model`` (a state_dict .pt, e.g. ``OUT/models/global_model.pt``) is evaluated
    beside the baselines on all sites' validation data; ``external`` ({name: path} of external
    sets written by ``simulate``) adds every baseline model's external-data figures. ``workers``
    worker processes train the models in parallel (default: one per model, as the simulator runs
    one process per site)."""
    settings = job_settings(job_dir)
    task = build_task(settings["task"])
    datasets = {}
    for site, config in site_configs.items():
        if not isinstance(config, Mapping) or "data" not in config:
            raise BaselineError(f"site {site}: its config needs a 'data' object (see docs/architecture.md)")
        datasets[site] = task.load_site_data(config["data"], site)
    rounds = num_rounds or settings["num_rounds"]
    log(
        f"  [baselines] {len(datasets)} local-only models + 1 pooled model, up to {rounds} rounds x "
        f"{settings['trainer_args'].get('local_epochs', 1)} local epochs each (the federation's budget"
        + (f"; early stopping after {patience} round-equivalents without a better validation score)" if patience else ")")
    )
    federated_weights = None
    if federated_model is not None:
        from fedmed.provenance import ProvenanceError, load_model_weights

        try:
            federated_weights = state_to_numpy(load_model_weights(federated_model))
        except ProvenanceError as exc:
            raise BaselineError(str(exc)) from exc
    started, cpu = time.perf_counter(), _cpu_seconds()
    doc = run_baselines(
        task, settings["network"], datasets, rounds, settings["trainer_args"], settings["network_seed"],
        federated_weights=federated_weights, log=log,
        external={name: task.load_external(path) for name, path in (external or {}).items()},
        workers=workers if workers is not None else len(datasets) + 1, patience=patience,
    )
    write_baselines(doc, out_path)
    log(f"  [baselines] done in {time.perf_counter() - started:.0f} s wall, {_cpu_seconds() - cpu:.0f} s CPU "
        f"(training and evaluating {len(doc['models'])} models); wrote {out_path}")
    return doc
