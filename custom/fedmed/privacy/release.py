"""What may leave a site: the ``standard`` release policy. Pure module (numpy only).

A task result may carry
- model tensors (weights or weight difference) whose names and shapes are exactly those of the
  model the server sent in this job (the *model signature*), so no tensor shaped like data
  (images, per-sample predictions, embeddings) can ride along;
- metrics that are single finite numbers (aggregate values, never per-sample lists), or a
  ``*_histogram`` metric: per class, a list of non-negative bin counts over a fixed score grid
  (aggregate counts, e.g. ``val_score_histogram``);
- meta data made of numbers, short strings and short lists/dicts of those;
- under the ``he`` mode, the secure-aggregation protocol messages (public keys, encrypted key
  shares, key shares; :func:`fedmed.privacy.secagg.check_protocol_message`).
Anything else raises :class:`ReleaseRefused` with the reason; the caller blocks the release.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

MAX_META_LIST = 16  # a list longer than this in meta could be per-sample values
MAX_META_STRING = 1024
MAX_META_DEPTH = 4
HISTOGRAM_SUFFIX = "_histogram"  # a metric of per-class bin counts (fedmed.threshold)
MAX_HISTOGRAM_CLASSES = 16
MAX_HISTOGRAM_BINS = 1000
UPDATE_KINDS = ("WEIGHTS", "WEIGHT_DIFF")
METRICS_KIND = "METRICS"
SECAGG_KIND, SECAGG_META_KEY = "COLLECTION", "secagg_step"  # fedmed.privacy.secagg protocol messages (he mode)


class ReleaseRefused(ValueError):
    """A task result that the site's release policy does not let leave; the message says why."""


def model_signature(weights: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a model's weights."""
    signature = {}
    for key, value in weights.items():
        shape = getattr(value, "shape", None)
        if shape is None:
            shape = np.shape(value)
        signature[str(key)] = tuple(int(n) for n in shape)
    return signature


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_meta(meta: Mapping[str, Any], where: str = "meta", depth: int = 0) -> None:
    """Numbers, booleans, None, short strings, and short lists / dicts of those."""
    if depth > MAX_META_DEPTH:
        raise ReleaseRefused(f"{where} is nested deeper than {MAX_META_DEPTH} levels")
    items = meta.items() if isinstance(meta, Mapping) else enumerate(meta)
    for key, value in items:
        name = f"{where}.{key}"
        if value is None or isinstance(value, bool) or _is_number(value):
            if _is_number(value) and not math.isfinite(float(value)):
                raise ReleaseRefused(f"{name} is not finite ({value})")
            continue
        if isinstance(value, str):
            if len(value) > MAX_META_STRING:
                raise ReleaseRefused(f"{name} is a string of {len(value)} characters (limit {MAX_META_STRING})")
            continue
        if isinstance(value, np.ndarray):
            raise ReleaseRefused(f"{name} is an array of shape {value.shape}; arrays may only travel as model tensors")
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_META_LIST:
                raise ReleaseRefused(
                    f"{name} is a list of {len(value)} values (limit {MAX_META_LIST}); per-sample values may not leave the site"
                )
            check_meta(value, name, depth + 1)
            continue
        if isinstance(value, Mapping):
            check_meta(value, name, depth + 1)
            continue
        raise ReleaseRefused(f"{name} is a {type(value).__name__}; only numbers, strings and short lists/dicts may leave the site")


def check_metrics(metrics: Mapping[str, Any], where: str = "metrics") -> None:
    """Every metric is one finite number (or None for 'not computed')."""
    if not isinstance(metrics, Mapping):
        raise ReleaseRefused(f"{where} is a {type(metrics).__name__}, expected a mapping of name -> number")
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(key, str) and key.endswith(HISTOGRAM_SUFFIX):
            check_histogram(value, f"{where}.{key}")
            continue
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if not _is_number(value):
            raise ReleaseRefused(f"{where}.{key} is a {type(value).__name__}; metrics must be single aggregate numbers")
        if not math.isfinite(float(value)):
            raise ReleaseRefused(f"{where}.{key} is not finite ({value})")


def check_histogram(value: Any, where: str) -> None:
    """Per class, a list of non-negative integer bin counts (aggregate counts, not per-sample values)."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_HISTOGRAM_CLASSES:
        raise ReleaseRefused(f"{where} must be a list of per-class bin counts (at most {MAX_HISTOGRAM_CLASSES} classes)")
    for row in value:
        if not isinstance(row, (list, tuple)) or not 1 <= len(row) <= MAX_HISTOGRAM_BINS:
            raise ReleaseRefused(f"{where} must hold per-class lists of at most {MAX_HISTOGRAM_BINS} bin counts")
        for count in row:
            if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
                raise ReleaseRefused(f"{where} holds {count!r}; bin counts must be non-negative integers")


def check_model_release(data: Mapping[str, Any], signature: Mapping[str, tuple[int, ...]] | None, kind: str) -> None:
    """Model tensors must be numeric arrays named and shaped like the model the server sent."""
    if signature is None:
        raise ReleaseRefused(
            f"a {kind} result is leaving but no model was received in this job to check it against; "
            "add fedmed.flare.filters.ModelSignatureRecorder to this scope's task_data_filters"
        )
    if not isinstance(data, Mapping) or not data:
        raise ReleaseRefused(f"{kind} result holds no tensors")
    unknown = sorted(set(data) - set(signature))
    if unknown:
        raise ReleaseRefused(f"{kind} result has tensor(s) that are not part of the model: {', '.join(unknown[:5])}")
    for key, value in data.items():
        if not isinstance(value, np.ndarray):
            raise ReleaseRefused(f"{kind} tensor '{key}' is a {type(value).__name__}, expected a numpy array")
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise ReleaseRefused(f"{kind} tensor '{key}' has dtype {value.dtype}; only numeric tensors may leave")
        if tuple(value.shape) != tuple(signature[key]):
            raise ReleaseRefused(
                f"{kind} tensor '{key}' has shape {tuple(value.shape)} but the model's is {tuple(signature[key])}"
            )


def check_release(kind: str, data: Any, meta: Mapping[str, Any], signature: Mapping[str, tuple[int, ...]] | None) -> None:
    """Raise :class:`ReleaseRefused` unless a result of this DXO kind may leave the site."""
    if kind in UPDATE_KINDS:
        check_model_release(data, signature, kind)
    elif kind == METRICS_KIND:
        check_metrics(data, "metrics")
    elif kind == SECAGG_KIND and isinstance(meta, Mapping) and isinstance(meta.get(SECAGG_META_KEY), str):
        from fedmed.privacy.secagg import check_protocol_message  # noqa: PLC0415 - the he mode only

        try:  # public keys and encrypted key shares of secure aggregation (the he mode)
            check_protocol_message(meta[SECAGG_META_KEY], data)
        except ValueError as exc:
            raise ReleaseRefused(str(exc)) from exc
    else:
        raise ReleaseRefused(f"results of kind {kind} may not leave the site (allowed: {', '.join(UPDATE_KINDS + (METRICS_KIND,))})")
    meta = meta or {}
    check_meta({key: value for key, value in meta.items() if key != "metrics"}, "meta")
    if "metrics" in meta:
        check_metrics(meta["metrics"], "meta.metrics")
