"""FLARE Controller: cross-site evaluation after federated training (a models x sites matrix).

Runs as the second workflow of a job, after :class:`fedmed.flare.controller.FedAvgController`:

1. asks every live site for its latest local model (task ``submit_model``, ``submit_timeout``
   seconds, default 60). A site that dropped out during training is skipped: FLARE keeps a killed
   client "connected" until its heartbeat times out (600 s), so liveness comes from the training
   workflow's ``metrics.json`` (see :func:`sites_to_evaluate`); skipped sites are named in the log
   and in ``cross_site.json`` (``skipped_sites``);
2. sends the final global model and every submitted local model to every live site (task ``validate``);
   all validation tasks are queued at once and each site works through them;
3. writes ``app_server/fedmed/cross_site.json``: for every (model, site) cell the site's metrics
   (``val_auc``, ``val_accuracy``, ``val_loss``, ``num_val_samples``), plus the SHA-256 of every
   evaluated model's weights and every failed cell with the site's reason.

It is FLARE's cross-site validation idea with this project's executor and MONAI metrics. The network
and task come from the FedAvg controller's ``run_config.json`` and the global model from its
``global_model.pt`` (or ``model_file``), so there is no second copy of that configuration.

Privacy: a site's local model leaves the site (through that site's own privacy-scope result
filters, like every other result) and is evaluated by the other sites; only metrics come back.
A deployment that must not share local models leaves this workflow out of the job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from fedmed.atomic import write_json
from fedmed.flare.replies import collect_replies
from fedmed.networks import state_to_numpy
from fedmed.provenance import weights_sha256
from fedmed.results import GLOBAL_MODEL_FILE, METRICS_FILE, RUN_CONFIG_FILE, SERVER_OUTPUT_DIR
from fedmed.tasks import build_task

CROSS_SITE_FILE = "cross_site.json"
CROSS_SITE_FORMAT = "fedmed-cross-site/1"
GLOBAL_MODEL_NAME = "global_model"


def sites_to_evaluate(connected: list[str], metrics: dict | None) -> tuple[list[str], dict[str, str]]:
    """Split the connected sites into (sites to evaluate, {skipped site: reason}).

    ``metrics`` is the training workflow's ``metrics.json`` (``rounds``: per round the
    ``contributors``; ``evaluations``: per model version the validating ``sites``). The latest record
    of who answered wins: the final validation (when it came after the last round), else the last
    round's contributors. A connected site missing from it dropped out (killed, crashed, failed) and
    would only make this workflow wait out its timeouts. Without training records every connected
    site is evaluated. Never returns an empty list while sites are connected: when no connected site
    answered the last record, all are evaluated (better a slow matrix than none).
    """
    connected = sorted(connected)
    if not metrics or not metrics.get("rounds"):
        return connected, {}
    last_round = metrics["rounds"][-1]
    answered = set(last_round.get("contributors") or [])
    source = f"the last training round (round {int(last_round.get('round', len(metrics['rounds']) - 1)) + 1})"
    evaluations = metrics.get("evaluations") or []
    if evaluations:
        final = evaluations[-1]
        if final.get("sites") and final.get("after_round", -1) >= last_round.get("round", len(metrics["rounds"]) - 1):
            answered = set(final["sites"])
            source = "the final validation of the global model"
    live = [site for site in connected if site in answered]
    if not live:
        return connected, {}
    return live, {site: f"did not answer {source}; it dropped out of training" for site in connected if site not in answered}


class CrossSiteEvaluation(Controller):
    def __init__(
        self,
        model_file: str = GLOBAL_MODEL_FILE,
        submit_model_task_name: str = "submit_model",
        validate_task_name: str = "validate",
        submit_timeout: int = 60,
        validation_timeout: int = 3600,
        evaluate_local_models: bool = True,
    ):
        """Args (the server config's ``args``):
        model_file: the global model to evaluate, in the server's ``app_server/fedmed/`` folder
            (``global_model.pt``, the final model; ``best_global_model.pt`` for the best round's).
        submit_model_task_name / validate_task_name: task names the sites' executor answers.
        submit_timeout: seconds to wait for the sites' local models (default 60: a site's local model
            is in memory; a site that does not send it within a minute is most likely gone).
        validation_timeout: seconds each validation task may take.
        evaluate_local_models: False evaluates only the global model on every site (a deployment
            whose sites must not share their local models).
        """
        super().__init__()
        if submit_timeout < 1 or validation_timeout < 1:
            raise ValueError("submit_timeout and validation_timeout must be >= 1 second")
        if not model_file or os.path.basename(model_file) != model_file:
            raise ValueError(f"model_file must be a file name inside app_server/{SERVER_OUTPUT_DIR}/, got {model_file!r}")
        self.model_file = model_file
        self.submit_model_task_name = submit_model_task_name
        self.validate_task_name = validate_task_name
        self.submit_timeout = submit_timeout
        self.validation_timeout = validation_timeout
        self.evaluate_local_models = evaluate_local_models
        self.out_dir: Path | None = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        workspace = fl_ctx.get_engine().get_workspace()
        self.out_dir = Path(workspace.get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"[fedmed] cross-site: ignored a late result for task '{task_name}' from {client.name}")

    # ---- helpers ----------------------------------------------------------------------------

    def _training_metrics(self, fl_ctx: FLContext) -> dict | None:
        path = self.out_dir / METRICS_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            self.log_warning(fl_ctx, f"[fedmed] cross-site: cannot read {path} ({exc}); evaluating every connected site")
            return None

    def _fail(self, fl_ctx: FLContext, message: str) -> None:
        self.log_error(fl_ctx, f"[fedmed] cross-site evaluation: {message}")
        self.system_panic(f"cross-site evaluation: {message}", fl_ctx)

    def _wait(self, tasks: list[Task], abort_signal: Signal) -> bool:
        while any(task.completion_status is None for task in tasks):
            if abort_signal.triggered:
                return False
            time.sleep(0.2)
        return True

    # ---- the workflow -----------------------------------------------------------------------

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        started = time.time()
        run_config_path = self.out_dir / RUN_CONFIG_FILE
        model_path = self.out_dir / self.model_file
        if not run_config_path.is_file() or not model_path.is_file():
            missing = run_config_path if not run_config_path.is_file() else model_path
            self._fail(
                fl_ctx,
                f"{missing} is missing; list this workflow after fedmed.flare.controller.FedAvgController "
                "in config_fed_server.json, and check that training finished",
            )
            return
        run_config = json.loads(run_config_path.read_text())
        network, task_spec = run_config["network"], run_config["task"]
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        global_weights = state_to_numpy(state)

        connected = fl_ctx.get_engine().get_clients()
        if not connected:
            self._fail(fl_ctx, "no site is connected")
            return
        sites, skipped = sites_to_evaluate([c.name for c in connected], self._training_metrics(fl_ctx))
        for site, reason in sorted(skipped.items()):
            self.log_warning(fl_ctx, f"[fedmed] cross-site: skipping {site}: {reason}")
        clients = [c for c in connected if c.name in sites]
        if GLOBAL_MODEL_NAME in sites:
            self._fail(fl_ctx, f"a site is named '{GLOBAL_MODEL_NAME}', which is the global model's name in the matrix")
            return

        models: dict[str, dict] = {
            GLOBAL_MODEL_NAME: {"kind": "global", "file": self.model_file, "model_sha256": weights_sha256(global_weights)}
        }
        weights_by_model = {GLOBAL_MODEL_NAME: global_weights}
        errors: dict[str, dict[str, str]] = {"submit_model": {}, "validate": {}}

        if self.evaluate_local_models:
            self.log_info(fl_ctx, f"[fedmed] cross-site: asking {len(sites)} sites for their local models")
            submit = Task(name=self.submit_model_task_name, data=Shareable(), timeout=self.submit_timeout)
            self.broadcast_and_wait(
                task=submit, targets=clients, min_responses=len(clients), wait_time_after_min_received=0,
                fl_ctx=fl_ctx, abort_signal=abort_signal,
            )
            if abort_signal.triggered:
                return
            answers, submit_errors = collect_replies(submit, submit.targets or [])
            errors["submit_model"].update(submit_errors)
            for site, dxo in sorted(answers.items()):
                if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
                    errors["submit_model"][site] = f"sent {dxo.data_kind} without weights, expected WEIGHTS"
                    continue
                local = {key: np.asarray(value) for key, value in dxo.data.items()}
                if set(local) != set(global_weights):
                    errors["submit_model"][site] = "sent a local model whose parameter names differ from the global model's"
                    continue
                weights_by_model[site] = local
                models[site] = {
                    "kind": "local",
                    "site": site,
                    "num_samples": dxo.get_meta_prop("num_samples"),
                    "model_sha256": weights_sha256(local),
                }
            for site, message in sorted(errors["submit_model"].items()):
                self.log_warning(fl_ctx, f"[fedmed] cross-site: no local model from {site}: {message}")

        self.log_info(
            fl_ctx,
            f"[fedmed] cross-site: evaluating {len(weights_by_model)} models on {len(sites)} sites "
            f"({len(weights_by_model) * len(sites)} cells)",
        )
        tasks: dict[str, Task] = {}
        for model_name, weights in weights_by_model.items():
            meta = {"network": network, "task": task_spec, "model_name": model_name}
            dxo = DXO(data_kind=DataKind.WEIGHTS, data=weights, meta=meta)
            tasks[model_name] = Task(name=self.validate_task_name, data=dxo.to_shareable(), timeout=self.validation_timeout)
            self.broadcast(
                task=tasks[model_name], fl_ctx=fl_ctx, targets=clients, min_responses=len(clients),
                wait_time_after_min_received=0,
            )
        if not self._wait(list(tasks.values()), abort_signal):
            return

        results: dict[str, dict[str, dict]] = {}
        for model_name, task in tasks.items():
            answers, validate_errors = collect_replies(task, task.targets or [])
            row = {}
            for site, dxo in answers.items():
                if dxo.data_kind != DataKind.METRICS:
                    validate_errors[site] = f"sent {dxo.data_kind}, expected METRICS"
                    continue
                row[site] = {key: float(value) for key, value in dxo.data.items() if isinstance(value, (int, float))}
            results[model_name] = dict(sorted(row.items()))
            if validate_errors:
                errors["validate"][model_name] = dict(sorted(validate_errors.items()))
                for site, message in sorted(validate_errors.items()):
                    self.log_warning(fl_ctx, f"[fedmed] cross-site: {model_name} on {site} failed: {message}")

        metric_names = sorted({key for row in results.values() for cell in row.values() for key in cell})
        filled = sum(len(row) for row in results.values())
        write_json(
            self.out_dir / CROSS_SITE_FILE,
            {
                "format": CROSS_SITE_FORMAT,
                "job_name": run_config.get("job_name"),
                "sites": sites,
                "metric_names": metric_names,
                "models": models,
                "results": results,
                "errors": {kind: value for kind, value in errors.items() if value},
                "skipped_sites": skipped,
            },
        )
        key = build_task(task_spec).key_metric  # val_auc, val_dice, ...
        key = key if key in metric_names else None
        if key is not None:
            for model_name, row in results.items():
                values = [cell[key] for cell in row.values() if key in cell]
                if values:
                    self.log_info(
                        fl_ctx,
                        f"[fedmed] cross-site: {model_name}: mean {key} {float(np.mean(values)):.4f} over {len(values)} sites",
                    )
        self.log_info(
            fl_ctx,
            f"[fedmed] cross-site evaluation: {filled}/{len(weights_by_model) * len(sites)} cells in "
            f"{time.time() - started:.1f} s -> {self.out_dir / CROSS_SITE_FILE}",
        )
        if filled == 0:
            self._fail(fl_ctx, "no site returned any validation result; see the sites' logs")
