"""FLARE Executor: a thin adapter around :class:`fedmed.training.LocalTrainer`.

Tasks (names configurable):
- ``train``: DXO WEIGHTS in (meta ``round``, ``network``, ``task``); evaluates the received global
  model on local validation data, trains, answers DXO WEIGHT_DIFF with the sample count.
- ``validate``: DXO WEIGHTS in; answers DXO METRICS on local validation data.
- ``submit_model``: answers DXO WEIGHTS of this site's latest local model.

The trainer's settings are the executor's args, declared once in
:class:`fedmed.training.TrainerSettings`.

Under a privacy scope with :class:`fedmed.flare.filters.DPTrainingPolicy` (``dp``) the privacy work
is :class:`fedmed.privacy.site_account.DPSiteAccount`'s (pure): record-level DP-SGD planned from the
site's budget and charged to its ledger, and every validation answered only as a DP-noised score
histogram charged to the site's validation account. Logs at INFO then carry no counts and no
metrics; error replies carry no counts.

The site reads where its data is from its own ``local/fedmed_site.json``; a bad or unfilled config
makes every task fail with a message naming the site and the file, which the server reports.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmed.aggregation import weight_difference
from fedmed.data import DataError
from fedmed.flare.filters import BUDGET_SPENT, PRIVACY_META_KEY, dp_ledger_path, dp_policy
from fedmed.flare.replies import error_reply
from fedmed.privacy.dp import DPSettings, PrivacyBudgetExceeded, PrivacyConfigError, dp_release_metrics
from fedmed.privacy.site_account import DPSiteAccount
from fedmed.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config
from fedmed.tasks import build_task
from fedmed.training import DPNetworkError, LocalTrainer, TrainerSettings, TrainingAborted

class FedMedExecutor(Executor):
    def __init__(
        self,
        site_config_file: str = SITE_CONFIG_FILE,
        tb_writer_id: str = "tb_writer",
        train_task_name: str = "train",
        validate_task_name: str = "validate",
        submit_model_task_name: str = "submit_model",
        **trainer_settings,
    ):
        """Args (the client config's ``args``):
        site_config_file: file name in the site's ``local/`` folder saying where its data is.
        tb_writer_id: id of a FLARE TBWriter component; metrics stream to the server's TensorBoard.
        *_task_name: the task names this executor answers.
        **trainer_settings: :class:`fedmed.training.TrainerSettings` (``local_epochs``, ``lr``,
            ``batch_size``, ...; the cosine schedule follows the round number and ``num_rounds``
            the server sends); an unknown key raises naming the valid ones.
        """
        super().__init__()
        self.trainer_settings = TrainerSettings.from_mapping(trainer_settings, "FedMedExecutor args (config_fed_client.json)")
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
        self._dp: DPSiteAccount | None = None

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
        self._trainer = LocalTrainer(task, train_ds, val_ds, self.trainer_settings)
        self._task_spec = task_spec
        counts = f"{len(train_ds)} training and {len(val_ds)} validation samples"
        if dp_policy(fl_ctx) is not None:  # a dp site's INFO log carries no counts
            self.log_debug(fl_ctx, f"site {site}: {counts}")
            counts = "training and validation data"
        self.log_info(fl_ctx, f"site {site}: {counts} from {config_path}; device {self._trainer.device}")
        self._tb_writer = fl_ctx.get_engine().get_component(self.tb_writer_id) if self.tb_writer_id else None
        return self._trainer

    def _dp_account(self, settings: DPSettings, fl_ctx: FLContext) -> DPSiteAccount:
        path = dp_ledger_path(fl_ctx, settings)
        if self._dp is None or self._dp.settings != settings or self._dp.ledger_path != path:
            self._dp = DPSiteAccount(fl_ctx.get_identity_name(), settings, path)
        return self._dp

    def _track(self, metrics: dict, round_num: int, prefix: str = "", dp: bool = False) -> None:
        if self._tb_writer is None:
            return
        if dp:  # TensorBoard events reach the server: only the public numbers a dp update carries
            metrics, _ = dp_release_metrics(metrics)
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
        except PrivacyBudgetExceeded as exc:  # public numbers only: the ledger's epsilons and the budget
            self.log_error(fl_ctx, str(exc))
            return error_reply(str(exc), BUDGET_SPENT)
        except (SiteConfigError, DataError, PrivacyConfigError, DPNetworkError) as exc:
            return self._error(fl_ctx, task_name, f"site {site}: {exc}", exc)
        except Exception as exc:  # report, never hide: the server decides whether the round survives
            return self._error(fl_ctx, task_name, f"site {site}: task '{task_name}' failed: {type(exc).__name__}: {exc}", exc,
                               traceback=True)

    def _error(self, fl_ctx: FLContext, task_name: str, message: str, exc: Exception, traceback: bool = False) -> Shareable:
        """Log the full message here; the reply carries it too, except at a dp site, where a message may
        hold counts (e.g. the training-set size): the reply then names only the task and the error type."""
        (self.log_exception if traceback else self.log_error)(fl_ctx, message)
        if dp_policy(fl_ctx) is not None:
            message = (f"site {fl_ctx.get_identity_name()}: task '{task_name}' failed under the dp scope "
                       f"({type(exc).__name__}); the reason is in the site's own log")
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

    def _evaluate(self, trainer: LocalTrainer, network: dict, weights: dict, what: str, fl_ctx: FLContext) -> dict:
        """Validation metrics of ``weights``; at a dp site only the DP release (noised histogram),
        charged to the site's validation account."""
        settings = dp_policy(fl_ctx)
        if settings is None:
            return trainer.evaluate(network, weights)
        scored = trainer.positive_scores(network, weights)
        return self._dp_account(settings, fl_ctx).release_validation(fl_ctx.get_job_id(), what, scored)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        dxo = self._incoming(shareable, site)
        round_num = int(dxo.meta.get("round", 0))
        network = dxo.meta["network"]
        trainer = self._site_trainer(dxo.meta["task"], fl_ctx)
        global_weights = {key: np.asarray(value) for key, value in dxo.data.items()}
        num_rounds = dxo.meta.get("num_rounds")
        num_rounds = int(num_rounds) if num_rounds else None
        should_abort = lambda: abort_signal.triggered  # noqa: E731
        settings = dp_policy(fl_ctx)
        privacy = None
        if settings is None:
            val_metrics = trainer.evaluate(network, global_weights)
            result = trainer.train(network, global_weights, round_num, should_abort=should_abort, num_rounds=num_rounds)
        else:
            account = self._dp_account(settings, fl_ctx)
            if account.stopped:
                raise PrivacyBudgetExceeded(account.stopped)
            # the entering global model, validated first: the update's ledger then includes this query
            val_metrics = self._evaluate(trainer, network, global_weights, f"round {round_num} global model", fl_ctx)
            result, privacy = account.train_round(fl_ctx.get_job_id(), trainer, network, global_weights, round_num,
                                                  num_rounds, should_abort)
            privacy["scope"] = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "dp"
        return self._update(trainer, result, global_weights, val_metrics, network, round_num, fl_ctx, privacy)

    def _update(self, trainer: LocalTrainer, result, global_weights: dict, val_metrics: dict, network: dict,
                round_num: int, fl_ctx: FLContext, privacy: dict | None = None) -> Shareable:
        site = fl_ctx.get_identity_name()
        self._local_weights, self._local_network = result.weights, network
        metrics = {**val_metrics, **result.metrics}
        self._track(metrics, round_num, dp=privacy is not None)
        if privacy is None:
            self.log_info(
                fl_ctx,
                f"site {site} round {round_num}: train_loss {result.metrics['train_loss']:.4f}, global model "
                f"{trainer.task.key_metric} {val_metrics.get(trainer.task.key_metric, float('nan')):.4f} "
                f"({result.num_samples} samples, {result.metrics.get('local_steps', '?')} steps, "
                f"{result.metrics['train_seconds']:.1f} s)",
            )
        else:  # no counts, no metrics at INFO: only the public ledger
            self.log_info(fl_ctx, f"site {site} round {round_num}: trained with {self._dp.describe_plan()}; "
                                  f"ledger epsilon {privacy['epsilon']:.4g} of {privacy['budget']:g}")
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
        model_name = dxo.meta.get("model_name", "global")
        weights = {k: np.asarray(v) for k, v in dxo.data.items()}
        dp = dp_policy(fl_ctx) is not None
        metrics = self._evaluate(trainer, dxo.meta["network"], weights, f"validate model '{model_name}'", fl_ctx)
        if "round" in dxo.meta:
            self._track(metrics, int(dxo.meta["round"]), dp=dp)
        if dp:
            self.log_info(fl_ctx, f"site {site}: validated model '{model_name}' "
                                  + ("(DP histogram released)" if metrics else "(validation budget spent: nothing released)"))
        else:
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


# the settable args, declared once: the executor's own plus TrainerSettings' (what job folders and recipes may set)
_signature = inspect.signature(FedMedExecutor.__init__)
FedMedExecutor.__init__.__signature__ = _signature.replace(parameters=[
    *(p for p in _signature.parameters.values() if p.kind != p.VAR_KEYWORD),
    *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in dataclasses.fields(TrainerSettings)),
])
