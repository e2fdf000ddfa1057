"""FLARE Executor: a thin adapter around :class:`fedmed.training.LocalTrainer`.

Tasks (names configurable):
- ``train``: DXO WEIGHTS in (meta ``round``, ``network``, ``task``); evaluates the received global
  model on local validation data, trains, answers DXO WEIGHT_DIFF with the real sample count.
- ``validate``: DXO WEIGHTS in; answers DXO METRICS on local validation data.
- ``submit_model``: answers DXO WEIGHTS of this site's latest local model.

Under a privacy scope with :class:`fedmed.flare.filters.DPTrainingPolicy` (``dp``) the ``train``
task uses record-level DP-SGD: the noise multiplier is derived from the site's budget before its
first round in the job, every round is charged to the site's ledger (a file in its workspace),
the site refuses to train once the budget is spent, and the update's meta carries the ledger
(``privacy``) for the server's ``privacy_ledger.json``. Metrics streamed to TensorBoard are then
coarsened as the release filter coarsens them.

The site reads where its data is from its own ``local/fedmed_site.json``; a bad or unfilled config
makes every task fail with a message naming the site and the file, which the server reports.
"""

from __future__ import annotations

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmed.aggregation import weight_difference
from fedmed.data import DataError
from fedmed.flare.filters import BUDGET_SPENT, DP_MECHANISM, EPSILON_METRIC, PRIVACY_META_KEY, dp_ledger_path, dp_policy
from fedmed.flare.replies import error_reply
from fedmed.privacy.dp import (
    LEDGER_UNIT,
    DPSettings,
    LedgerLock,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    PrivacyLedger,
    check_delta_for_dataset,
    coarsen_metrics,
    noise_multiplier_for_budget,
    poisson_sampling,
)
from fedmed.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config
from fedmed.tasks import build_task
from fedmed.training import DPSGD, DPNetworkError, LocalTrainer, TrainingAborted, check_dp_network

class FedMedExecutor(Executor):
    def __init__(
        self,
        local_epochs: int = 1,
        lr: float = 1e-3,
        batch_size: int = 32,
        fedprox_mu: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        amp: bool = True,
        num_workers: int = 0,
        lr_schedule: str = "cosine",
        site_config_file: str = SITE_CONFIG_FILE,
        tb_writer_id: str = "tb_writer",
        train_task_name: str = "train",
        validate_task_name: str = "validate",
        submit_model_task_name: str = "submit_model",
    ):
        """Args (the client config's ``args``):
        local_epochs, lr, batch_size, fedprox_mu, seed, device, amp, num_workers, lr_schedule: see LocalTrainer
            (the cosine schedule follows the round number and ``num_rounds`` the server sends).
        site_config_file: file name in the site's ``local/`` folder saying where its data is.
        tb_writer_id: id of a FLARE TBWriter component; metrics stream to the server's TensorBoard.
        *_task_name: the task names this executor answers.
        """
        super().__init__()
        self.trainer_args = dict(
            local_epochs=local_epochs, lr=lr, batch_size=batch_size, fedprox_mu=fedprox_mu, seed=seed,
            device=device, amp=amp, num_workers=num_workers, lr_schedule=lr_schedule,
        )
        self.site_config_file = site_config_file
        self.tb_writer_id = tb_writer_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self._trainer: LocalTrainer | None = None
        self._task_spec = None
        self._local_weights: dict[str, np.ndarray] | None = None
        self._local_network = None
        self._tb_writer = None
        self._dp_plan: dict | None = None  # {"key": (job, settings, network), "noise_multiplier", ...}
        self._dp_stopped: str | None = None  # why this site stopped contributing under dp (this job)

    # ---- setup ------------------------------------------------------------------------------

    def _site_trainer(self, task_spec: dict, fl_ctx: FLContext) -> LocalTrainer:
        if self._trainer is not None and self._task_spec == task_spec:
            return self._trainer
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        config_path = f"{workspace.get_site_config_dir()}/{self.site_config_file}"
        config = load_site_config(config_path, site)
        task = build_task(task_spec)
        train_ds, val_ds = task.load_site_data(config["data"], site)
        self._trainer = LocalTrainer(task, train_ds, val_ds, **self.trainer_args)
        self._task_spec = task_spec
        self.log_info(
            fl_ctx,
            f"site {site}: {len(train_ds)} training and {len(val_ds)} validation samples from {config_path}; "
            f"device {self._trainer.device}",
        )
        self._tb_writer = fl_ctx.get_engine().get_component(self.tb_writer_id) if self.tb_writer_id else None
        return self._trainer

    def _track(self, metrics: dict, round_num: int, prefix: str = "", dp: bool = False) -> None:
        if self._tb_writer is None:
            return
        if dp:  # TensorBoard events reach the server: send only what the dp release filter lets leave
            metrics, _ = coarsen_metrics(metrics, keep_extra=("learning_rate", EPSILON_METRIC))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and np.isfinite(value) and key != "num_val_samples":
                self._tb_writer.add_scalar(prefix + key, float(value), global_step=round_num)

    # ---- tasks ------------------------------------------------------------------------------

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx)
            if task_name == self.submit_model_task_name:
                return self._submit_model(fl_ctx)
            self.log_error(fl_ctx, f"site {site}: unknown task '{task_name}'")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except TrainingAborted:
            return make_reply(ReturnCode.TASK_ABORTED)
        except (SiteConfigError, DataError, PrivacyConfigError, DPNetworkError) as exc:
            message = f"site {site}: {exc}"
            self.log_error(fl_ctx, message)
            return error_reply(message)
        except Exception as exc:  # report, never hide: the server decides whether the round survives
            message = f"site {site}: task '{task_name}' failed: {type(exc).__name__}: {exc}"
            self.log_exception(fl_ctx, message)
            return error_reply(message)

    @staticmethod
    def _incoming(shareable: Shareable, site: str) -> DXO:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected model WEIGHTS from the server, got {dxo.data_kind}")
        for key in ("network", "task"):
            if key not in dxo.meta:
                raise ValueError(f"the server's task lacks meta '{key}'")
        return dxo

    def _dp_noise_multiplier(self, settings: DPSettings, trainer: LocalTrainer, network: dict, ledger: PrivacyLedger,
                             round_num: int, num_rounds: int | None, fl_ctx: FLContext) -> dict:
        """The job's DP-SGD plan, derived once (at the site's first round in the job, or after a
        restart) from the budget left in the ledger and the rounds still to come."""
        key = (fl_ctx.get_job_id(), settings, repr(network))
        if self._dp_plan is not None and self._dp_plan["key"] == key:
            return self._dp_plan
        site = fl_ctx.get_identity_name()
        check_delta_for_dataset(settings.delta, trainer.num_train_samples)
        check_dp_network(network)
        sample_rate, steps_per_epoch = poisson_sampling(trainer.num_train_samples, trainer.batch_size)
        round_steps = trainer.local_epochs * steps_per_epoch
        rounds_left = max(1, int(num_rounds) - round_num) if num_rounds else 1
        try:
            noise = noise_multiplier_for_budget(settings.epsilon, settings.delta, sample_rate, rounds_left * round_steps,
                                                settings.accountant, prior_history=ledger.history)
        except PrivacyBudgetExceeded as exc:
            raise PrivacyBudgetExceeded(
                f"site {site}: no DP-SGD noise level fits {rounds_left} more round(s) of {round_steps} steps in the budget "
                f"({exc}; ledger {ledger.path}); this site stops contributing under the dp scope"
            ) from exc
        self._dp_plan = {"key": key, "noise_multiplier": noise, "sample_rate": sample_rate, "round_steps": round_steps}
        self.log_info(
            fl_ctx,
            f"site {site}: DP-SGD plan: noise multiplier {noise:.4g} for {rounds_left} round(s) x {round_steps} steps at "
            f"sample rate {sample_rate:.4g} ({trainer.num_train_samples} records, batch {trainer.batch_size}), clip "
            f"{settings.max_grad_norm:g}; budget epsilon {settings.epsilon:g} at delta {settings.delta:g} ({settings.accountant}), "
            f"{ledger.epsilon:.4g} already spent",
        )
        return self._dp_plan

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        dxo = self._incoming(shareable, site)
        round_num = int(dxo.meta.get("round", 0))
        network = dxo.meta["network"]
        trainer = self._site_trainer(dxo.meta["task"], fl_ctx)
        global_weights = {key: np.asarray(value) for key, value in dxo.data.items()}
        num_rounds = dxo.meta.get("num_rounds")
        num_rounds = int(num_rounds) if num_rounds else None
        settings = dp_policy(fl_ctx)
        if settings is not None:
            return self._train_dp(settings, trainer, network, global_weights, round_num, num_rounds, fl_ctx, abort_signal)

        val_metrics = trainer.evaluate(network, global_weights)
        result = trainer.train(
            network, global_weights, round_num, should_abort=lambda: abort_signal.triggered, num_rounds=num_rounds,
        )
        return self._update(trainer, result, global_weights, val_metrics, network, round_num, fl_ctx)

    def _train_dp(self, settings: DPSettings, trainer: LocalTrainer, network: dict, global_weights: dict, round_num: int,
                  num_rounds: int | None, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """One round of record-level DP-SGD, charged to the site's ledger before the update leaves."""
        site = fl_ctx.get_identity_name()
        if self._dp_stopped:
            self.log_error(fl_ctx, self._dp_stopped)
            return error_reply(self._dp_stopped, BUDGET_SPENT)
        path = dp_ledger_path(fl_ctx, settings)
        try:
            with LedgerLock(path):  # one charge at a time at this site, across jobs
                ledger = PrivacyLedger(site, settings.delta, settings.epsilon, settings.accountant, path)
                plan = self._dp_noise_multiplier(settings, trainer, network, ledger, round_num, num_rounds, fl_ctx)
                planned = [(plan["noise_multiplier"], plan["sample_rate"], plan["round_steps"])]
                ledger.check_affordable(planned, f"training round {round_num}")
                val_metrics = trainer.evaluate(network, global_weights)
                result = trainer.train(
                    network, global_weights, round_num, should_abort=lambda: abort_signal.triggered, num_rounds=num_rounds,
                    dp=DPSGD(plan["noise_multiplier"], settings.max_grad_norm, settings.accountant),
                )
                entry = ledger.charge(fl_ctx.get_job_id(), round_num, result.privacy_steps)
        except PrivacyBudgetExceeded as exc:
            self._dp_stopped = str(exc)
            self.log_error(fl_ctx, self._dp_stopped)
            return error_reply(self._dp_stopped, BUDGET_SPENT)
        record = ledger.record()
        privacy = {
            "scope": fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "dp",
            "unit": LEDGER_UNIT,
            "mechanism": DP_MECHANISM,
            "noise_multiplier": plan["noise_multiplier"],
            "sample_rate": plan["sample_rate"],
            "max_grad_norm": settings.max_grad_norm,
            "steps": sum(int(step["steps"]) for step in entry["steps"]),
            **record,  # accountant, delta, epsilon, budget, history: the site's whole ledger, recomputable
        }
        result.metrics[EPSILON_METRIC] = record["epsilon"]
        return self._update(trainer, result, global_weights, val_metrics, network, round_num, fl_ctx, privacy)

    def _update(self, trainer: LocalTrainer, result, global_weights: dict, val_metrics: dict, network: dict,
                round_num: int, fl_ctx: FLContext, privacy: dict | None = None) -> Shareable:
        site = fl_ctx.get_identity_name()
        self._local_weights, self._local_network = result.weights, network
        metrics = {**val_metrics, **result.metrics}
        self._track(metrics, round_num, dp=privacy is not None)
        self.log_info(  # under dp the training loss is not even logged (FLARE can stream site logs)
            fl_ctx,
            f"site {site} round {round_num}: "
            + ("" if privacy else f"train_loss {result.metrics['train_loss']:.4f}, ")
            + f"global model {trainer.task.key_metric} {val_metrics[trainer.task.key_metric]:.4f} "
            f"({result.num_samples} samples, {result.metrics['train_seconds']:.1f} s)"
            + (f"; DP-SGD epsilon {privacy['epsilon']:.4g} of {privacy['budget']:g}" if privacy else ""),
        )
        meta = {
            "num_samples": result.num_samples,
            MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_samples,
            "site": site,
            "round": round_num,
            # the privacy scope this site applied (its local/privacy.json; "" when none, e.g. in the simulator)
            "privacy_scope": fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "",
            "metrics": metrics,
        }
        if privacy is not None:
            meta[PRIVACY_META_KEY] = privacy
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=weight_difference(result.weights, global_weights), meta=meta)
        return out.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        dxo = self._incoming(shareable, site)
        trainer = self._site_trainer(dxo.meta["task"], fl_ctx)
        metrics = trainer.evaluate(dxo.meta["network"], {k: np.asarray(v) for k, v in dxo.data.items()})
        model_name = dxo.meta.get("model_name", "global")
        if "round" in dxo.meta:
            self._track(metrics, int(dxo.meta["round"]), dp=dp_policy(fl_ctx) is not None)
        self.log_info(fl_ctx, f"site {site}: validated model '{model_name}': {metrics}")
        return DXO(data_kind=DataKind.METRICS, data=metrics, meta={"site": site, "model_name": model_name}).to_shareable()

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        if self._local_weights is None:
            return error_reply(f"site {site}: no local model to submit (this site has not trained in this job)")
        return DXO(
            data_kind=DataKind.WEIGHTS,
            data=self._local_weights,
            meta={"site": site, "network": self._local_network, "num_samples": self._trainer.num_train_samples},
        ).to_shareable()
