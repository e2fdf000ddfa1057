"""FLARE filters for the privacy operating modes (declared in a site's ``local/privacy.json``).

Site side (task results leaving the site, in this order in every scope):

- :class:`ModelSignatureRecorder` (task data in): remembers the names and shapes of the model the
  server sent, so the release policy can check what leaves against it.
- :class:`ReleasePolicyFilter` (``standard`` policy, first in every scope): only model tensors
  shaped exactly like the received model, aggregate metrics and small meta data leave.
- :class:`DPTrainingPolicy` (``dp``, task data in): hands the site's DP settings (training and
  validation budgets, delta, clip norm, accountant, ledger file) to the executor, which trains with
  Opacus and charges the site's record-level ledger; refuses the task while logs could stream.
- :class:`DPReleaseFilter` (``dp``): only DP-SGD-trained weight differences leave, with the public
  training size and DP-noised validation histograms; no exact count, metric or training loss.
- :class:`Float16CompressFilter` (``compressed``) / :class:`CompressFilter` with ``codec`` ``int8``
  (``compressed_int8``): float16 or 8-bit transfer of model tensors.
- :class:`TransferMeter` (last in every scope): measures the serialized bytes of what leaves.

Server side: :class:`DecompressFilter` / :class:`Float16DecompressFilter` (``compressed``,
``compressed_int8``: restore float32 before the controller aggregates). The ``he`` mode's filters
(secure aggregation) are in :mod:`fedmed.flare.he`.

A filter that blocks a result replaces it by an error reply whose ``fedmed_error`` header says
why (the controller records it in ``metrics.json``); a filter with a bad configuration raises in
its constructor, so the site refuses to start the job. The math lives in :mod:`fedmed.privacy`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedmed.flare.replies import error_reply
from fedmed.privacy.compression import (
    CODEC,
    CODECS,
    COMPRESSION_META_KEY,
    INT8_CODEC,
    CompressionError,
    array_bytes,
    compress_float16,
    decompress_float16,
    dequantize_int8,
    quantize_int8,
)
from fedmed.privacy.dp import DP_PUBLIC_METRICS, LEDGER_UNIT, DPSettings, PrivacyConfigError, dp_release_metrics
from fedmed.privacy.release import SECAGG_KIND, SECAGG_META_KEY, ReleaseRefused, check_release, model_signature
from fedmed.privacy.site_account import DP_MECHANISM, EPSILON_METRIC

RELEASE_REFUSED = "FEDMED_RELEASE_REFUSED"  # return code of a result the site's privacy policy blocked
BUDGET_SPENT = "FEDMED_PRIVACY_BUDGET_SPENT"  # return code once the site's epsilon budget is spent
PRIVACY_META_KEY = "privacy"  # DXO meta: {"scope", "mechanism", "epsilon", "delta", ...}
TRANSFER_META_KEY = "transfer"  # DXO meta: {"bytes": serialized size, "array_bytes": raw tensor bytes}
UPLOAD_BYTES_METRIC = "upload_bytes"  # also copied into meta["metrics"] so metrics.json records it
DP_POLICY_PROP = "fedmed.dp_training_policy"  # FLContext property: the site's DPSettings (dp scope)

# model signatures the site received, per job (task-data filter -> task-result filter)
_SIGNATURES: dict[str, dict[str, tuple[int, ...]]] = {}
_SIGNATURES_LOCK = threading.Lock()


def _site(fl_ctx: FLContext) -> str:
    return fl_ctx.get_identity_name(default="?")


def _scope(fl_ctx: FLContext) -> str:
    return fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "") or fl_ctx.get_prop(FLContextKey.JOB_SCOPE_NAME, "") or ""


def _task(fl_ctx: FLContext) -> str:
    return fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")


def _dxo_or_none(shareable: Shareable):
    try:
        return from_shareable(shareable)
    except Exception:  # noqa: BLE001 - the caller decides what a non-DXO result means
        return None


class ModelSignatureRecorder(Filter):
    """Task-data filter: remember the names and shapes of the model the server sent in this job."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = _dxo_or_none(shareable)
        if dxo is None or dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return shareable
        not_arrays = [key for key, value in dxo.data.items() if not isinstance(value, np.ndarray)]
        if not_arrays:
            raise ValueError(
                f"site {_site(fl_ctx)}: the model received for task '{_task(fl_ctx)}' holds non-array tensor(s) "
                f"({', '.join(not_arrays[:3])}); in the he scope HEModelDecryptor must come before ModelSignatureRecorder"
            )
        with _SIGNATURES_LOCK:
            _SIGNATURES[str(fl_ctx.get_job_id())] = model_signature(dxo.data)
        return shareable


def recorded_signature(job_id: str):
    with _SIGNATURES_LOCK:
        return _SIGNATURES.get(str(job_id))


class ReleasePolicyFilter(Filter):
    """Task-result filter (the ``standard`` policy, first in every scope).

    Lets a result leave only if it is a DXO of kind WEIGHTS / WEIGHT_DIFF whose tensors are named
    and shaped exactly like the model received in this job, or METRICS of single numbers; meta
    data may hold only numbers, short strings and short lists. Anything else is replaced by an
    error reply (return code ``FEDMED_RELEASE_REFUSED``) naming the reason, and logged.
    """

    def __init__(self):
        super().__init__()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        site, task = _site(fl_ctx), _task(fl_ctx)
        dxo = _dxo_or_none(shareable)
        try:
            if dxo is None:
                raise ReleaseRefused("the result is not a DXO")
            check_release(dxo.data_kind, dxo.data, dxo.meta, recorded_signature(fl_ctx.get_job_id()))
        except ReleaseRefused as exc:
            message = f"site {site}: privacy policy (scope '{_scope(fl_ctx)}') blocked the result of task '{task}': {exc}"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        return shareable


class DPTrainingPolicy(Filter):
    def __init__(
        self,
        epsilon: float = 8.0,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: str = "rdp",
        ledger_file: str = "privacy_ledger.json",
        validation_epsilon: float = 12.0,
        validation_queries: int = 12,
    ):
        """Task-data filter of the ``dp`` scope: this site trains with record-level DP-SGD and
        answers validation only with DP-noised histograms.

        It hands the site's own DP settings to the executor (an FLContext property set on every
        task arriving under this scope; the server cannot set or change it). The executor's
        :class:`fedmed.privacy.site_account.DPSiteAccount` derives the noise multiplier from them,
        trains with Opacus and charges the ledger's training account; every validation query is
        charged to its validation account. :class:`DPReleaseFilter` refuses anything else.

        It refuses every task (the job fails at this site, naming why) while the job carries a
        log streamer (FLARE's ``JobLogStreamer``, injected by a site's ``SiteLogStreamer``) or
        the site's ``resources.json`` allows log streaming: a site log is not covered by DP.

        Args:
            epsilon: the site's total record-level training budget (across every job sharing the ledger).
            delta: the delta epsilon is accounted at; must be below 1 / (training-set size).
            max_grad_norm: C, every record's gradient is clipped to this L2 norm.
            accountant: Opacus accountant, ``rdp`` (default) or ``prv``.
            ledger_file: the site's privacy ledger; a relative path is relative to the site's
                workspace root (the kit folder), so restarts and later jobs continue it.
            validation_epsilon: the validation account's total budget (pure epsilon-DP).
            validation_queries: the most validation queries it pays for (each spends
                ``validation_epsilon / validation_queries``); later queries are answered empty.
        """
        super().__init__()
        self.settings = DPSettings(epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm, accountant=accountant,
                                   ledger_file=ledger_file, validation_epsilon=validation_epsilon,
                                   validation_queries=validation_queries)  # raises PrivacyConfigError naming the key

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        streamers = log_streaming(fl_ctx)
        if streamers:
            raise PrivacyConfigError(
                f"site {_site(fl_ctx)}: dp scope: site logs would leave this site ({streamers}); logs are not covered by "
                "differential privacy: set \"allow_log_streaming\": false in local/resources.json, remove SiteLogStreamer "
                "there and any JobLogStreamer from the job, then restart the client"
            )
        fl_ctx.set_prop(DP_POLICY_PROP, self.settings, private=True, sticky=False)
        return shareable


LOG_STREAMER_NAMES = ("JobLogStreamer", "SiteLogStreamer", "LogStreamer")


def log_streamer_components(components: dict) -> list[str]:
    """Ids of components that stream logs off the site (FLARE's log streamers or anything named like one)."""
    return sorted(str(cid) for cid, obj in (components or {}).items()
                  if any(name in type(obj).__name__ for name in LOG_STREAMER_NAMES))


def resources_allow_log_streaming(resources: dict) -> bool:
    """Whether a site's ``resources.json`` makes FLARE stream its logs: a ``SiteLogStreamer``
    component (it injects a ``JobLogStreamer`` into every job and uploads ``error_log.txt``
    afterwards) while ``allow_log_streaming`` is not false (FLARE's default is true)."""
    streamer = any("LogStreamer" in str(c.get("path", "")) for c in resources.get("components", []) if isinstance(c, dict))
    return streamer and resources.get("allow_log_streaming", True) is not False


def log_streaming(fl_ctx: FLContext) -> str:
    """Why logs could leave this site in this job ("" when they cannot)."""
    import json

    found = log_streamer_components(fl_ctx.get_engine().get_all_components() if hasattr(fl_ctx.get_engine(), "get_all_components") else {})
    if found:
        return f"the job's component(s) {', '.join(found)}"
    workspace = fl_ctx.get_engine().get_workspace() if hasattr(fl_ctx.get_engine(), "get_workspace") else None
    found_file = workspace.get_resources_file_path() if workspace is not None else None
    if found_file and Path(found_file).is_file():  # a deployed site (the simulator's sites have none and stream nowhere)
        try:
            resources = json.loads(Path(found_file).read_text())
        except ValueError as exc:
            return f"{found_file} cannot be read ({exc})"
        if resources_allow_log_streaming(resources):
            return f"{found_file} allows log streaming"
    return ""


def dp_policy(fl_ctx: FLContext) -> DPSettings | None:
    """The site's DP-SGD settings when this task runs under a scope with :class:`DPTrainingPolicy`."""
    value = fl_ctx.get_prop(DP_POLICY_PROP)
    return value if isinstance(value, DPSettings) else None


def dp_ledger_path(fl_ctx: FLContext, settings: DPSettings) -> Path:
    path = Path(settings.ledger_file)
    if not path.is_absolute():
        path = Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / path
    return path


class DPReleaseFilter(Filter):
    """Task-result filter of the ``dp`` scope: only what the site's two DP accounts cover leaves,
    plus public numbers.

    - a weight difference leaves only if the executor trained it with record-level DP-SGD (meta
      ``privacy`` with ``unit`` ``record``); any integer tensor is refused;
    - its sample count is the public training size the ledger declares (``public_train_size``:
      ceil(n / batch size) x batch size, the same every round), never the exact count;
    - metrics: only a DP-noised validation histogram with the epsilon it spent
      (``val_score_histogram`` + ``val_dp_epsilon``), the learning rate and the ledger's epsilon;
      exact AUC / accuracy / loss, counts, the training loss and timings are dropped;
    - a full local model (``submit_model``) is refused.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site, task = _site(fl_ctx), _task(fl_ctx)
        dxo = _dxo_or_none(shareable)

        def refuse(reason: str) -> Shareable:
            message = f"site {site}: dp scope: {reason} (task '{task}'); nothing released"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)

        if dxo is None:
            return refuse("the result is not a DXO")
        if dxo.data_kind == SECAGG_KIND and isinstance(dxo.get_meta_prop(SECAGG_META_KEY), str):
            return shareable  # dp_he: secure-aggregation keys and shares (data-independent; checked by the release policy)
        if dxo.data_kind == DataKind.METRICS:
            kept, dropped = dp_release_metrics(dxo.data, keep_extra=())
            meta = {k: v for k, v in dxo.meta.items() if k in ("site", "model_name")}
            return DXO(data_kind=DataKind.METRICS, data=kept, meta=meta).update_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return refuse(f"only weight differences trained with DP-SGD may leave, not {dxo.data_kind}")
        privacy = dxo.get_meta_prop(PRIVACY_META_KEY)
        if not isinstance(privacy, dict) or privacy.get("unit") != LEDGER_UNIT or privacy.get("mechanism") != DP_MECHANISM:
            return refuse("the update was not trained with record-level DP-SGD (no DP-SGD ledger entry in its meta); "
                          "the scope needs fedmed.flare.filters.DPTrainingPolicy in task_data_filters and the job's "
                          "executor fedmed.flare.executor.FedMedExecutor")
        public_size = privacy.get("public_train_size")
        if not isinstance(public_size, int) or isinstance(public_size, bool) or public_size < 1:
            return refuse("the DP-SGD ledger entry declares no public training size")
        integers = [key for key, value in dxo.data.items() if not np.issubdtype(np.asarray(value).dtype, np.floating)]
        if integers:
            return refuse(f"integer tensor(s) {', '.join(integers[:3])} are not covered by DP-SGD")
        meta = {k: v for k, v in dxo.meta.items() if k in DP_UPDATE_META}
        meta["num_samples"] = meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = public_size
        kept, dropped = dp_release_metrics(meta.get("metrics") or {}, keep_extra=DP_PUBLIC_METRICS)
        meta["metrics"] = kept
        self.log_info(fl_ctx, f"site {site}: dp scope: released the DP-SGD update of task '{task}' (epsilon "
                              f"{privacy.get('epsilon'):.4g}); not sent: {', '.join(dropped) or 'nothing'}")
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data=dxo.data, meta=meta).update_shareable(shareable)


# the meta keys a dp update may carry (the public count replaces num_samples; everything else is dropped)
DP_UPDATE_META = ("num_samples", MetaKey.NUM_STEPS_CURRENT_ROUND, "site", "round", "privacy_scope", "metrics", PRIVACY_META_KEY)


class CompressFilter(Filter):
    def __init__(self, codec: str = CODEC):
        """Task-result filter (``compressed`` / ``compressed_int8``): model tensors travel compressed,
        integer tensors as they are.

        Args:
            codec: ``float16`` (half the bytes of float32) or ``int8`` (8-bit affine quantization per
                tensor, about a quarter; offset and scale travel in the meta).
        """
        super().__init__()
        if codec not in CODECS:
            raise CompressionError(f"compression codec must be one of {', '.join(CODECS)}, got {codec!r} (local/privacy.json)")
        self.codec = codec

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site, task = _site(fl_ctx), _task(fl_ctx)
        dxo = _dxo_or_none(shareable)
        if dxo is None:
            return error_reply(f"site {site}: compressed scope: the result of task '{task}' is not a DXO", RELEASE_REFUSED)
        if dxo.data_kind == DataKind.METRICS:
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return error_reply(f"site {site}: compressed scope cannot send {dxo.data_kind} (task '{task}')", RELEASE_REFUSED)
        if COMPRESSION_META_KEY in dxo.meta:
            raise CompressionError(f"site {site}: the result of task '{task}' is already compressed; a compression filter is listed twice")
        try:
            if self.codec == INT8_CODEC:
                compressed, tensors = quantize_int8(dxo.data)
                record = {"codec": INT8_CODEC, "tensors": tensors}
            else:
                compressed, dtypes = compress_float16(dxo.data)
                record = {"codec": CODEC, "dtypes": dtypes}
        except CompressionError as exc:
            message = f"site {site}: task '{task}': {exc}"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        meta = dict(dxo.meta)
        meta[COMPRESSION_META_KEY] = record
        self.log_info(
            fl_ctx, f"site {site}: task '{task}': tensors as {self.codec}, {array_bytes(dxo.data)} -> {array_bytes(compressed)} bytes"
        )
        return DXO(data_kind=dxo.data_kind, data=compressed, meta=meta).update_shareable(shareable)


class Float16CompressFilter(CompressFilter):
    """Task-result filter (``compressed``): model tensors travel as float16, integer tensors as they are."""

    def __init__(self):
        super().__init__(codec=CODEC)


class DecompressFilter(Filter):
    """Server-side task-result filter (``compressed``, ``compressed_int8``): restore compressed
    tensors (float16 or 8-bit) to their original dtype before the controller aggregates."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = _dxo_or_none(shareable)
        if dxo is None or dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        record = dxo.meta.get(COMPRESSION_META_KEY)
        if record is None:
            if any(isinstance(v, np.ndarray) and v.dtype in (np.float16, np.uint8) for v in dxo.data.values()):
                raise ValueError(f"site {site} sent float16 / uint8 tensors without a compression record")
            return shareable
        if isinstance(record, dict) and record.get("codec") == CODEC and isinstance(record.get("dtypes"), dict):
            restored = decompress_float16(dxo.data, record["dtypes"])
        elif isinstance(record, dict) and record.get("codec") == INT8_CODEC and isinstance(record.get("tensors"), dict):
            restored = dequantize_int8(dxo.data, record["tensors"])
        else:
            raise CompressionError(f"site {site} sent an unknown compression record {record!r}")
        meta = {k: v for k, v in dxo.meta.items() if k != COMPRESSION_META_KEY}
        meta["decompressed_from"] = record["codec"]
        return DXO(data_kind=dxo.data_kind, data=restored, meta=meta).update_shareable(shareable)


class Float16DecompressFilter(DecompressFilter):
    """Server-side task-result filter (``compressed``): the same as :class:`DecompressFilter`."""


def payload_bytes(data) -> int:
    """Bytes of a DXO's tensors as they travel: numpy ``nbytes``; ciphertext serialized length."""
    total = 0
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif hasattr(value, "serialize"):  # tenseal CKKSVector
            total += len(value.serialize())
        else:
            raise TypeError(f"tensor '{key}' is a {type(value).__name__}; cannot count its bytes")
    return total


class TransferMeter(Filter):
    """Task-result filter, last in every site scope: records the serialized size of what leaves.

    Adds meta ``transfer`` = {"bytes": model payload bytes, "tensors": count} and
    ``metrics.upload_bytes`` (so the controller's metrics.json has bytes per site per round).
    Payload bytes are what FLARE streams for the tensors: ``nbytes`` of each numpy array, the
    serialized length of each CKKS ciphertext; FLARE's message framing (a few hundred bytes) is
    not counted.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = _dxo_or_none(shareable)
        if dxo is None or dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        size = payload_bytes(dxo.data)
        meta = dxo.meta
        meta[TRANSFER_META_KEY] = {"bytes": size, "tensors": len(dxo.data)}
        metrics = dict(meta.get("metrics") or {})
        metrics[UPLOAD_BYTES_METRIC] = size
        meta["metrics"] = metrics
        self.log_info(fl_ctx, f"site {_site(fl_ctx)}: task '{_task(fl_ctx)}' result is {size} bytes serialized")
        return dxo.update_shareable(shareable)


def _describe(value, depth: int = 0):
    """A JSON-able description of what a message carries: arrays by dtype and shape, the rest as is."""
    if isinstance(value, np.ndarray):
        return {"array": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": len(value)}
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in value.items()} if depth < 8 else "..."
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value] if depth < 8 else "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "get_all_public_props"):  # a peer's FLContext travels with its public properties
        return {"fl_context": _describe(value.get_all_public_props(), depth + 1)}
    return {"object": type(value).__name__}


class ReceivedResultLog(Filter):
    def __init__(self, log_file: str = "received_results.jsonl"):
        """Server-side task-result filter (an audit aid): appends, per task result arriving from a
        site, everything it carries — return code, every header, the DXO kind, the tensors' dtypes
        and shapes, the whole meta — as one JSON line in the job's ``app_server/fedmed/`` folder.
        It changes nothing; the dp deployment test enumerates what leaves a dp site with it.

        Args:
            log_file: plain file name of the JSON-lines log.
        """
        super().__init__()
        if not isinstance(log_file, str) or not log_file or os.sep in log_file:
            raise ValueError(f"log_file must be a plain file name, got {log_file!r}")
        self.log_file = log_file
        self._lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        import json

        from fedmed.results import SERVER_OUTPUT_DIR

        peer = fl_ctx.get_peer_context()
        dxo = _dxo_or_none(shareable)
        record = {
            "site": peer.get_identity_name(default="?") if peer else "?",
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME, "?"),
            "return_code": shareable.get_return_code(ReturnCode.OK),
            "headers": _describe({k: v for k, v in (shareable.get("__headers__") or {}).items()}),
            "body_keys": sorted(str(k) for k in shareable.keys() if k != "__headers__"),
            "kind": dxo.data_kind if dxo is not None else None,
            "data": _describe(dxo.data) if dxo is not None else None,
            "meta": _describe(dxo.meta) if dxo is not None else None,
        }
        out = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR
        with self._lock:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / self.log_file, "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        return shareable


__all__ = [
    "ReceivedResultLog",
    "ModelSignatureRecorder",
    "ReleasePolicyFilter",
    "DPTrainingPolicy",
    "DPReleaseFilter",
    "CompressFilter",
    "Float16CompressFilter",
    "DecompressFilter",
    "Float16DecompressFilter",
    "TransferMeter",
]
