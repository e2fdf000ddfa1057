"""FLARE Controller: scatter-gather FedAvg weighted by real sample counts.

A thin orchestration layer: the math lives in :mod:`fedmed.aggregation`. Every round the global
model goes to every connected site; the round closes when all answered, or ``min_clients`` answered
and ``wait_after_min_clients`` seconds passed, or ``round_timeout`` expired. Sites that error or drop
out are left out of that round (and named in the log and metrics) as long as ``min_clients``
answered; otherwise the job stops with a message naming every failed site.

Outputs in the server's app folder, ``fedmed/``: ``run_config.json``, ``global_model.pt`` (every
round), ``best_global_model.pt`` (best mean validation metric), ``metrics.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal

from fedmed.aggregation import UpdateError, apply_update, validate_update, weighted_mean
from fedmed.atomic import atomic_path, write_json
from fedmed.flare.replies import collect_replies
from fedmed.networks import build_network, numpy_to_state, state_to_numpy
from fedmed.provenance import CARD_FILENAME, ProvenanceRecorder
from fedmed.results import (
    BEST_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SERVER_OUTPUT_DIR,
)
from fedmed.tasks import build_task

DEFAULT_NETWORK = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2}}
DEFAULT_TASK = {"name": "classification", "args": {}}


def mean_metric(site_metrics: dict, key: str) -> float | None:
    """Mean of ``key`` over sites, weighted by each site's validation sample count."""
    pairs = [(m[key], m.get("num_val_samples", 1)) for m in site_metrics.values() if key in m]
    pairs = [(v, w) for v, w in pairs if v is not None and np.isfinite(v)]
    if not pairs:
        return None
    values, weights = zip(*pairs)
    return float(np.average(values, weights=weights))


class FedAvgController(Controller):
    def __init__(
        self,
        num_rounds: int = 5,
        min_clients: int = 2,
        round_timeout: int = 3600,
        wait_after_min_clients: int = 10,
        network: dict | None = None,
        task: dict | None = None,
        seed: int = 0,
        train_task_name: str = "train",
        validate_task_name: str = "validate",
        final_validation: bool = True,
        allow_partial_updates: bool = False,
        job_name: str = "fedmed",
        he_aggregator_id: str = "",
        he_shareable_generator_id: str = "",
    ):
        """Args (the server config's ``args``):
        num_rounds: federated rounds.
        min_clients: fewest sites whose valid update a round needs; fewer stops the job.
        round_timeout: seconds a round may take before it closes with whoever answered.
        wait_after_min_clients: seconds to wait for late sites once ``min_clients`` answered.
        network: network spec ``{"name": ..., "args": {...}}`` (see fedmed.networks); sent to sites.
        task: task spec ``{"name": "classification"|"segmentation", "args": {...}}``; sent to sites.
        seed: seeds the initial global model.
        train_task_name / validate_task_name: task names the sites' executor answers.
        final_validation: after the last round, validate the final global model at every site.
        allow_partial_updates: accept updates lacking some keys (a privacy filter removed them).
        job_name: name written into the outputs and the bundle.
        he_aggregator_id / he_shareable_generator_id: ids of FLARE's HE aggregator and shareable
            generator components; when set, rounds run under homomorphic encryption (privacy mode
            ``he``, see fedmed.flare.he): the server aggregates ciphertext only.
        """
        super().__init__()
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if bool(he_aggregator_id) != bool(he_shareable_generator_id):
            raise ValueError("he_aggregator_id and he_shareable_generator_id must be given together (privacy mode he)")
        self.he_ids = (he_aggregator_id, he_shareable_generator_id)
        self.he_rounds = None
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.wait_after_min_clients = wait_after_min_clients
        self.network = network or DEFAULT_NETWORK
        self.task_spec = task or DEFAULT_TASK
        self.seed = seed
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.final_validation = final_validation
        self.allow_partial_updates = allow_partial_updates
        self.job_name = job_name
        self.key_metric = None
        self.out_dir: Path | None = None
        self.global_weights: dict[str, np.ndarray] = {}
        self.reference_state = None
        self.metrics: dict = {}

    # ---- lifecycle --------------------------------------------------------------------------

    def start_controller(self, fl_ctx: FLContext) -> None:
        task = build_task(self.task_spec)  # fails fast on a bad task spec
        self.key_metric = task.key_metric
        model = build_network(self.network, seed=self.seed)
        self.reference_state = model.state_dict()
        self.global_weights = state_to_numpy(model)
        # provenance card (fedmed.provenance): hash chain over the initial and every round's global model
        self.provenance = ProvenanceRecorder(self.job_name, self.network, {"method": "fedavg", "weighting": "num_samples", "min_clients": self.min_clients})
        self.provenance.record_initial_model(self.global_weights)
        self.requested_scope = (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("scope", "")
        workspace = fl_ctx.get_engine().get_workspace()
        self.out_dir = Path(workspace.get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.out_dir / RUN_CONFIG_FILE,
            {
                "job_name": self.job_name,
                "job_id": fl_ctx.get_job_id(),
                "network": self.network,
                "task": self.task_spec,
                "num_rounds": self.num_rounds,
                "min_clients": self.min_clients,
                "aggregation": "FedAvg weighted by training sample counts",
                "seed": self.seed,
            },
            default=float,
        )
        self.metrics = {
            "job_name": self.job_name,
            "key_metric": self.key_metric,
            "num_rounds": self.num_rounds,
            "sites": [],
            "rounds": [],
            "evaluations": [],
            "best": None,
            "finished": False,
        }
        n_params = sum(int(np.prod(v.shape)) for v in self.global_weights.values())
        self.log_info(fl_ctx, f"[fedmed] {self.network['name']} with {n_params} parameters; outputs in {self.out_dir}")
        if self.he_ids[0]:  # privacy mode he (issue 5): FLARE's HE components aggregate ciphertext
            from fedmed.flare.he import HEFedAvgRounds

            self.he_rounds = HEFedAvgRounds(self, *self.he_ids)
            self.he_rounds.start(fl_ctx)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored a late result for task '{task_name}' from {client.name}")

    # ---- the federation ---------------------------------------------------------------------

    def _broadcast(self, task_name: str, dxo: DXO, fl_ctx: FLContext, abort_signal: Signal):
        """Send to every connected site; return ({site: DXO}, {site: error message})."""
        clients = fl_ctx.get_engine().get_clients()
        if len(clients) < self.min_clients:
            return {}, {"(federation)": f"only {len(clients)} site(s) connected, min_clients is {self.min_clients}"}
        task = Task(name=task_name, data=dxo.to_shareable(), timeout=self.round_timeout)
        self.broadcast_and_wait(
            task=task,
            targets=clients,
            min_responses=self.min_clients,
            wait_time_after_min_received=self.wait_after_min_clients,
            fl_ctx=fl_ctx,
            abort_signal=abort_signal,
        )
        return collect_replies(task, clients)

    def _file_site_metrics(self, site: str, num_samples, dxo: DXO, train_metrics: dict, val_metrics: dict) -> None:
        """File a contributing site's reported metrics: training ones for the round record, validation
        ones (of the global model it received) for the evaluation."""
        reported = dict(dxo.get_meta_prop("metrics", {}))
        is_validation = {k: k.startswith("val_") or k == "num_val_samples" for k in reported}
        train_metrics[site] = {"num_samples": num_samples, **{k: v for k, v in reported.items() if not is_validation[k]}}
        val_metrics[site] = {k: v for k, v in reported.items() if is_validation[k]}
        if site not in self.metrics["sites"]:
            self.metrics["sites"].append(site)

    def _close_round(self, round_num: int, train_metrics: dict, errors: dict, fl_ctx: FLContext) -> bool:
        """Log the sites left out and record the round; fail the job (return False) below min_clients."""
        for site, message in errors.items():
            self.log_warning(fl_ctx, f"[fedmed] round {round_num}: left out {site}: {message}")
        self.metrics["rounds"].append(
            {"round": round_num, "contributors": sorted(train_metrics), "sites": train_metrics, "failed": errors}
        )
        if len(train_metrics) < self.min_clients:
            self._fail(
                fl_ctx,
                f"round {round_num}: only {len(train_metrics)} valid update(s), min_clients is {self.min_clients}. "
                + "; ".join(f"{site}: {msg}" for site, msg in sorted(errors.items())),
            )
            return False
        return True

    def _validate_final(self, model_dxo: DXO, record, what: str, fl_ctx: FLContext, abort_signal: Signal) -> None:
        """Every site validates the final model; ``record(site_metrics)`` files the evaluation."""
        answers, errors = self._broadcast(self.validate_task_name, model_dxo, fl_ctx, abort_signal)
        site_metrics = {site: dict(dxo.data) for site, dxo in answers.items() if dxo.data_kind == DataKind.METRICS}
        for site, message in errors.items():
            self.log_warning(fl_ctx, f"[fedmed] final validation: left out {site}: {message}")
        if site_metrics:
            evaluation = record(site_metrics)
            self.log_info(
                fl_ctx,
                f"[fedmed] {what}: mean validation {self.key_metric} "
                f"{evaluation[f'mean_{self.key_metric}']:.4f} over {len(site_metrics)} sites",
            )

    def _model_dxo(self, round_num: int | None, model_name: str) -> DXO:
        meta = {"network": self.network, "task": self.task_spec, "model_name": model_name, "num_rounds": self.num_rounds}
        if round_num is not None:
            meta["round"] = round_num
        return DXO(data_kind=DataKind.WEIGHTS, data=self.global_weights, meta=meta)

    def _fail(self, fl_ctx: FLContext, message: str) -> None:
        self.metrics["error"] = message
        self._save_metrics()
        self.log_error(fl_ctx, f"[fedmed] {message}")
        self.system_panic(message, fl_ctx)

    def _record_evaluation(self, version: int, site_metrics: dict, fl_ctx: FLContext) -> dict:
        evaluation = {
            "model_version": version,
            "after_round": version - 1,
            "sites": site_metrics,
            f"mean_{self.key_metric}": mean_metric(site_metrics, self.key_metric),
        }
        for key in ("val_accuracy", "val_loss"):
            value = mean_metric(site_metrics, key)
            if value is not None:
                evaluation[f"mean_{key}"] = value
        self.metrics["evaluations"].append(evaluation)
        score = evaluation[f"mean_{self.key_metric}"]
        best = self.metrics["best"]
        if score is not None and (best is None or score > best[f"mean_{self.key_metric}"]):
            self.metrics["best"] = {"model_version": version, f"mean_{self.key_metric}": score}
            self._save_model(BEST_MODEL_FILE)
        return evaluation

    def _save_metrics(self) -> None:
        write_json(self.out_dir / METRICS_FILE, self.metrics, default=float)

    def _save_model(self, name: str) -> None:
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(numpy_to_state(self.global_weights, self.reference_state), tmp)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        if self.he_rounds is not None:
            return self.he_rounds.control_flow(abort_signal, fl_ctx)
        self._save_model(GLOBAL_MODEL_FILE)
        for round_num in range(self.num_rounds):
            if abort_signal.triggered:
                return
            started = time.time()
            answers, errors = self._broadcast(self.train_task_name, self._model_dxo(round_num, "global"), fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            updates, train_metrics, val_metrics = [], {}, {}
            for site, dxo in sorted(answers.items()):
                try:
                    if dxo.data_kind != DataKind.WEIGHT_DIFF:
                        raise UpdateError(f"site {site}: sent {dxo.data_kind}, expected WEIGHT_DIFF")
                    num_samples = dxo.get_meta_prop("num_samples")
                    validate_update(dxo.data, self.global_weights, num_samples, site, self.allow_partial_updates)
                except UpdateError as exc:
                    errors[site] = str(exc)
                    continue
                updates.append((dxo.data, num_samples))
                self._file_site_metrics(site, num_samples, dxo, train_metrics, val_metrics)
            if not self._close_round(round_num, train_metrics, errors, fl_ctx):
                return
            evaluation = self._record_evaluation(round_num, val_metrics, fl_ctx)
            self.global_weights = apply_update(self.global_weights, weighted_mean(updates))
            self._save_model(GLOBAL_MODEL_FILE)
            self.provenance.record_federated_round(round_num, self.global_weights, {s: answers[s].meta for s in train_metrics}, val_metrics, self.requested_scope)
            self.provenance.write(self.out_dir / CARD_FILENAME, released_model_file=GLOBAL_MODEL_FILE)
            self._save_metrics()
            score = evaluation[f"mean_{self.key_metric}"]
            self.log_info(
                fl_ctx,
                f"[fedmed] round {round_num + 1}/{self.num_rounds}: {len(updates)}/{len(set(answers) | set(errors))} "
                f"sites answered ({', '.join(sorted(train_metrics))}); mean validation {self.key_metric} "
                f"of the global model entering the round: {score if score is None else round(score, 4)}; "
                f"{time.time() - started:.1f} s",
            )

        if self.final_validation:
            self._validate_final(self._model_dxo(self.num_rounds, "global"), lambda m: self._record_evaluation(self.num_rounds, m, fl_ctx),
                                 "final global model", fl_ctx, abort_signal)
        self.metrics["finished"] = True
        self._save_metrics()
        self.log_info(fl_ctx, f"[fedmed] finished {self.num_rounds} rounds; best model version {self.metrics['best']}")
