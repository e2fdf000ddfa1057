"""FLARE filters for the privacy operating modes (declared in a site's ``local/privacy.json``).

Site side (task results leaving the site, in this order in every scope):

- :class:`ModelSignatureRecorder` (task data in): remembers the names and shapes of the model the
  server sent, so the release policy can check what leaves against it.
- :class:`ReleasePolicyFilter` (``standard`` policy, first in every scope): only model tensors
  shaped exactly like the received model, aggregate metrics and small meta data leave.
- :class:`DPUpdateFilter` (``dp``): clip the weight difference to norm C, add Gaussian noise
  (multiplier z), account the release in the site's privacy ledger; stop contributing once the
  epsilon budget would be exceeded.
- :class:`Float16CompressFilter` (``compressed``): float16 transfer of model tensors.
- :class:`TransferMeter` (last in every scope): measures the serialized bytes of what leaves.

Server side: :class:`Float16DecompressFilter` (``compressed``: restore float32 before the
controller aggregates) and :class:`CiphertextOnlyCheck` (``he``: refuse any plaintext update).

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

from fedmed.atomic import write_json
from fedmed.flare.replies import error_reply
from fedmed.privacy.compression import (
    CODEC,
    COMPRESSION_META_KEY,
    CompressionError,
    array_bytes,
    compress_float16,
    decompress_float16,
)
from fedmed.privacy.dp import (
    LedgerLock,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    PrivacyLedger,
    check_dp_settings,
    privatize_update,
    split_integer_tensors,
)
from fedmed.privacy.release import ReleaseRefused, check_release, model_signature

RELEASE_REFUSED = "FEDMED_RELEASE_REFUSED"  # return code of a result the site's privacy policy blocked
BUDGET_SPENT = "FEDMED_PRIVACY_BUDGET_SPENT"  # return code once the site's epsilon budget is spent
PRIVACY_META_KEY = "privacy"  # DXO meta: {"scope", "mechanism", "epsilon", "delta", ...}
TRANSFER_META_KEY = "transfer"  # DXO meta: {"bytes": serialized size, "array_bytes": raw tensor bytes}
UPLOAD_BYTES_METRIC = "upload_bytes"  # also copied into meta["metrics"] so metrics.json records it
EPSILON_METRIC = "privacy_epsilon"
COUNTER_SUFFIX = "num_batches_tracked"  # BatchNorm step counters: follow from the public sample count

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


class DPUpdateFilter(Filter):
    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        epsilon_budget: float = 30.0,
        accountant: str = "rdp",
        ledger_file: str = "privacy_ledger.json",
        seed: int | None = None,
        tb_writer_id: str = "tb_writer",
    ):
        """Differential privacy for the weight difference a site sends (the ``dp`` scope).

        Args:
            clip_norm: C, the L2 norm the whole update is clipped to (site-level sensitivity).
            noise_multiplier: z; Gaussian noise N(0, (z*C)^2) is added to every coordinate.
            delta: the delta at which the ledger reports epsilon.
            epsilon_budget: the site's total epsilon budget (across jobs sharing the ledger file);
                a release that would exceed it is refused and the site stops contributing.
            accountant: Opacus accountant: ``rdp`` (default), ``prv`` or ``gdp``.
            ledger_file: the site's privacy ledger; a relative path is relative to the site's
                workspace root, so privacy spent accumulates across jobs. Required.
            seed: seeds the noise (tests only; leave None so noise cannot be predicted).
            tb_writer_id: id of the job's TBWriter component; epsilon is logged there per round.
        """
        super().__init__()
        check_dp_settings(clip_norm, noise_multiplier, delta=delta, epsilon_budget=epsilon_budget, accountant=accountant)
        if not isinstance(ledger_file, str) or not ledger_file.strip():
            raise PrivacyConfigError("DP setting 'ledger_file' must name the site's privacy ledger file")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise PrivacyConfigError(f"DP setting 'seed' must be an integer or null, got {seed!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self.accountant = accountant
        self.ledger_file = ledger_file
        self.seed = seed
        self.tb_writer_id = tb_writer_id
        self._rng = np.random.default_rng(seed)
        self._warned_no_tb = False
        self._stopped_message: str | None = None

    def ledger_path(self, fl_ctx: FLContext) -> Path:
        path = Path(self.ledger_file)
        if not path.is_absolute():
            path = Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / path
        return path

    def _log_epsilon(self, fl_ctx: FLContext, epsilon: float, round_num: int) -> None:
        writer = fl_ctx.get_engine().get_component(self.tb_writer_id) if self.tb_writer_id else None
        if writer is None:
            if not self._warned_no_tb:
                self.log_warning(fl_ctx, f"no component '{self.tb_writer_id}' in the job: epsilon is not sent to TensorBoard (the ledger file still has it)")
                self._warned_no_tb = True
            return
        writer.add_scalar(EPSILON_METRIC, float(epsilon), global_step=int(round_num))

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site, task = _site(fl_ctx), _task(fl_ctx)
        dxo = _dxo_or_none(shareable)
        if dxo is None:
            return error_reply(f"site {site}: dp scope: the result of task '{task}' is not a DXO; nothing released", RELEASE_REFUSED)
        if dxo.data_kind == DataKind.METRICS:
            return shareable  # aggregate metrics leave as under standard (see docs/privacy.md)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            message = (
                f"site {site}: dp scope releases only noised weight differences; refusing to release {dxo.data_kind} "
                f"for task '{task}'"
            )
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        if self._stopped_message:
            self.log_error(fl_ctx, self._stopped_message)
            return error_reply(self._stopped_message, BUDGET_SPENT)

        floats, integers = split_integer_tensors(dxo.data)
        bad = [key for key in integers if not key.endswith(COUNTER_SUFFIX)]
        if bad:
            message = f"site {site}: dp scope cannot release integer tensor(s) {', '.join(bad[:3])}; nothing released"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        round_num = int(dxo.get_meta_prop("round", -1))
        path = self.ledger_path(fl_ctx)
        try:
            with LedgerLock(path):
                ledger = PrivacyLedger(site, self.delta, self.epsilon_budget, self.accountant, path)
                entry = ledger.record_release(fl_ctx.get_job_id(), round_num, self.noise_multiplier, self.clip_norm)
        except PrivacyBudgetExceeded as exc:
            self._stopped_message = f"{exc} (ledger {path})"
            self.log_error(fl_ctx, self._stopped_message)
            return error_reply(self._stopped_message, BUDGET_SPENT)
        released, info = privatize_update(floats, self.clip_norm, self.noise_multiplier, self._rng)
        released.update({key: dxo.data[key] for key in integers})

        privacy = {
            "scope": _scope(fl_ctx) or "dp",
            "mechanism": "gaussian",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": info["noise_std"],
            "epsilon": entry.epsilon,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "accountant": self.accountant,
            "rounds_accounted": ledger.rounds,
            "clipped": info["clipped"],
        }
        meta = dict(dxo.meta)
        meta[PRIVACY_META_KEY] = privacy
        metrics = dict(meta.get("metrics") or {})
        metrics[EPSILON_METRIC] = entry.epsilon
        meta["metrics"] = metrics
        self.log_info(
            fl_ctx,
            f"site {site} round {round_num}: released update clipped to {self.clip_norm:g} (norm was "
            f"{info['norm_before_clipping']:.4g}) with noise std {info['noise_std']:.4g}; epsilon now "
            f"{entry.epsilon:.4g} at delta {self.delta:g} (budget {self.epsilon_budget:g}, ledger {path})",
        )
        self._log_epsilon(fl_ctx, entry.epsilon, round_num)
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data=released, meta=meta).update_shareable(shareable)


class Float16CompressFilter(Filter):
    """Task-result filter (``compressed``): model tensors travel as float16, integer tensors as they are."""

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
            raise CompressionError(f"site {site}: the result of task '{task}' is already compressed; Float16CompressFilter is listed twice")
        try:
            compressed, dtypes = compress_float16(dxo.data)
        except CompressionError as exc:
            message = f"site {site}: task '{task}': {exc}"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        meta = dict(dxo.meta)
        meta[COMPRESSION_META_KEY] = {"codec": CODEC, "dtypes": dtypes}
        self.log_info(
            fl_ctx, f"site {site}: task '{task}': {len(dtypes)} tensors as float16, {array_bytes(dxo.data)} -> {array_bytes(compressed)} bytes"
        )
        return DXO(data_kind=dxo.data_kind, data=compressed, meta=meta).update_shareable(shareable)


class Float16DecompressFilter(Filter):
    """Server-side task-result filter (``compressed``): restore float16 tensors to their original dtype."""

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
            if any(isinstance(v, np.ndarray) and v.dtype == np.float16 for v in dxo.data.values()):
                raise CompressionError(f"site {site} sent float16 tensors without a compression record; cannot restore them")
            return shareable  # this site sent full precision
        if not isinstance(record, dict) or record.get("codec") != CODEC or not isinstance(record.get("dtypes"), dict):
            raise CompressionError(f"site {site} sent an unknown compression record {record!r}")
        restored = decompress_float16(dxo.data, record["dtypes"])
        meta = {k: v for k, v in dxo.meta.items() if k != COMPRESSION_META_KEY}
        meta["decompressed_from"] = CODEC
        return DXO(data_kind=dxo.data_kind, data=restored, meta=meta).update_shareable(shareable)


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


class CiphertextOnlyCheck(Filter):
    def __init__(self, audit_file: str = "he_audit.json"):
        """Server-side task-result filter (``he``): every model tensor a site sends must be CKKS
        ciphertext; a result holding any plaintext tensor is dropped with an error naming the site.

        Args:
            audit_file: file name, in the job's ``app_server/fedmed/`` folder, recording per round
                and site how many tensors arrived and that all were ciphertext.
        """
        super().__init__()
        if not isinstance(audit_file, str) or not audit_file or os.sep in audit_file:
            raise ValueError(f"audit_file must be a plain file name, got {audit_file!r}")
        self.audit_file = audit_file
        self._records: list[dict] = []

    @staticmethod
    def _is_ciphertext(value) -> bool:
        if isinstance(value, (bytes, bytearray)):
            return True  # serialized CKKSVector (FLARE sends ciphertext as its serialized bytes)
        try:
            import tenseal as ts
        except ImportError:  # pragma: no cover - tenseal is a requirement
            return False
        return isinstance(value, ts.CKKSVector)

    @staticmethod
    def _context_is_private(value) -> bool:
        context = getattr(value, "context", None)
        return bool(context is not None and callable(context) and context().is_private())

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        dxo = _dxo_or_none(shareable)
        if dxo is None or dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        plain = sorted(key for key, value in dxo.data.items() if not self._is_ciphertext(value))
        algorithm = dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)
        if plain or algorithm != "CKKS":
            message = (
                f"he scope: site {site} sent {len(plain)} plaintext tensor(s) ({', '.join(plain[:3])}) "
                f"with encryption '{algorithm}'; the update was dropped — check the site's privacy.json he scope"
            )
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        with_secret_key = sorted(key for key, value in dxo.data.items() if self._context_is_private(value))
        if with_secret_key:
            message = (
                f"he scope: site {site} sent ciphertext together with its secret key ({', '.join(with_secret_key[:3])}); "
                "the server could decrypt it, so the update was dropped — the site's TenSEAL context must not be serialized with its secret key"
            )
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        record = {
            "round": dxo.get_meta_prop("round"),
            "site": site,
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME, "?"),
            "tensors": len(dxo.data),
            "ciphertext_tensors": len(dxo.data),
            "server_can_decrypt": False,  # checked above: no tensor came with a secret key
            "ciphertext_bytes": int(sum(len(v) if isinstance(v, (bytes, bytearray)) else len(v.serialize()) for v in dxo.data.values())),
        }
        self._records.append(record)
        self._write_audit(fl_ctx)
        self.log_info(fl_ctx, f"he scope: site {site} sent {record['tensors']} tensors, all CKKS ciphertext ({record['ciphertext_bytes']} bytes)")
        return shareable

    def _write_audit(self, fl_ctx: FLContext) -> None:
        from fedmed.results import SERVER_OUTPUT_DIR

        workspace = fl_ctx.get_engine().get_workspace()
        out = Path(workspace.get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR
        write_json(out / self.audit_file, {"records": self._records})


__all__ = [
    "ModelSignatureRecorder",
    "ReleasePolicyFilter",
    "DPUpdateFilter",
    "Float16CompressFilter",
    "Float16DecompressFilter",
    "TransferMeter",
    "CiphertextOnlyCheck",
]
