"""FLARE Client API route: a site runs a plain PyTorch training script under this project's controller.

:class:`FedMedClientAPIExecutor` is FLARE's own ``ClientAPIExecutor`` (in-process: the script runs
in the site's job process through ``nvflare.client``: ``flare.init / receive / send``, ``FLModel``)
with a thin bridge to the model-exchange contract of :class:`fedmed.flare.controller.FedAvgController`
(docs/architecture.md, "Model exchange"):

- in: the controller's DXO ``WEIGHTS`` (meta ``network``, ``task``, ``round``, ``num_rounds``) reach
  the script as an ``FLModel`` whose ``meta`` holds the same keys; the bridge also sets FLARE's round
  headers, so ``model.current_round`` / ``model.total_rounds`` work, and names the ``submit_model``
  request (cross-site evaluation sends an empty task) so ``flare.receive()`` accepts it;
- out (``train``): FLARE turns the script's full weights into a ``WEIGHT_DIFF`` (``params_transfer_type``
  DIFF); the bridge maps the script's ``metrics`` (FLARE puts them in meta ``initial_metrics``) to meta
  ``metrics`` and ``NUM_STEPS_CURRENT_ROUND`` (the script's training-sample count) to ``num_samples``,
  adds ``site``, ``round``, ``privacy_scope``, and casts float64 to float32. A reply without a sample
  count is refused with a message naming the site, as our executor's errors are.

So metrics.json, the provenance card, the bundle and the report come out as with ``FedMedExecutor``.
The script's own settings (``lr``, ``local_epochs``, ``batch_size``, ``seed``) are this executor's
arguments, passed to the script as ``--lr 0.003 --local_epochs 1 ...``; ``simulate --set`` changes them.
"""

from __future__ import annotations

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.client.config import ExchangeFormat, TransferType

from fedmed.flare.replies import error_reply

SUBMIT_MODEL_NAME = "local_model"


class FedMedClientAPIExecutor(ClientAPIExecutor):
    def __init__(
        self,
        task_script_path: str = "train.py",
        task_script_args: str = "",
        lr: float = 1e-3,
        local_epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        train_task_name: str = "train",
        validate_task_name: str = "validate",
        submit_model_task_name: str = "submit_model",
    ):
        """Args (the client config's ``args``):
        task_script_path: the training script (in the job's ``app/custom/``, or an absolute path pre-deployed at the site).
        task_script_args: further arguments for the script.
        lr, local_epochs, batch_size, seed: the script's training settings, passed as ``--lr`` etc.
        *_task_name: the task names the controller and cross-site evaluation send.
        """
        settings = f"--lr {lr} --local_epochs {local_epochs} --batch_size {batch_size} --seed {seed}"
        super().__init__(
            execution_mode=ExecutionMode.IN_PROCESS,
            task_script_path=task_script_path,
            task_script_args=f"{settings} {task_script_args}".strip(),
            train_task_name=train_task_name,
            evaluate_task_name=validate_task_name,
            submit_model_task_name=submit_model_task_name,
            params_exchange_format=ExchangeFormat.PYTORCH,
            server_expected_format=ExchangeFormat.NUMPY,
            params_transfer_type=TransferType.DIFF,
        )
        self.fedmed_tasks = {"train": train_task_name, "validate": validate_task_name, "submit_model": submit_model_task_name}

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        round_num = None
        if task_name == self.fedmed_tasks["submit_model"]:
            if not shareable.get_header(AppConstants.SUBMIT_MODEL_NAME):
                shareable.set_header(AppConstants.SUBMIT_MODEL_NAME, SUBMIT_MODEL_NAME)
        else:
            try:
                meta = from_shareable(shareable).meta
            except Exception as exc:  # not a DXO: let FLARE's executor report it
                meta = {}
                self.log_warning(fl_ctx, f"site {site}: task '{task_name}' carries no DXO ({exc})")
            round_num = meta.get("round")
            if round_num is not None:
                shareable.set_header(AppConstants.CURRENT_ROUND, int(round_num))
            if meta.get("num_rounds") is not None:
                shareable.set_header(AppConstants.NUM_ROUNDS, int(meta["num_rounds"]))
        result = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result
        try:
            if task_name == self.fedmed_tasks["train"]:
                return self._train_reply(result, site, round_num, fl_ctx)
            dxo = from_shareable(result)
            dxo.meta.setdefault("site", site)
            return dxo.to_shareable()
        except ValueError as exc:
            message = f"site {site}: the training script's reply to '{task_name}': {exc}"
            self.log_error(fl_ctx, message)
            return error_reply(message)

    @staticmethod
    def _train_reply(result: Shareable, site: str, round_num, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(result)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(f"sent {dxo.data_kind}; send the trained weights (FLModel params), FLARE turns them into WEIGHT_DIFF")
        meta = dict(dxo.meta)
        num_samples = meta.get("num_samples", meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND))
        if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ValueError(
                f"no training-sample count: send FLModel(meta={{'NUM_STEPS_CURRENT_ROUND': <number of training samples>}}), got {num_samples!r}"
            )
        metrics = {**(meta.pop(MetaKey.INITIAL_METRICS, None) or {}), **(meta.get("metrics") or {})}
        meta.update(
            num_samples=int(num_samples),
            site=site,
            round=int(round_num) if round_num is not None else meta.get("round", 0),
            privacy_scope=fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "",
            metrics={k: float(v) if isinstance(v, np.number) else v for k, v in metrics.items()},
        )
        meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = int(num_samples)
        data = {k: (np.asarray(v, dtype=np.float32) if np.asarray(v).dtype == np.float64 else np.asarray(v)) for k, v in dxo.data.items()}
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data=data, meta=meta).to_shareable()
