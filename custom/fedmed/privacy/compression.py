"""Compressed transfer of model updates (float16 or 8-bit), and byte counting. Pure module (numpy only).

- ``float16``: floating-point tensors travel as float16 (half the bytes of float32).
- ``int8``: each floating-point tensor is quantized to 8 bits with its own affine grid
  (``x ~ offset + scale * q``, q in 0..255, round to nearest), about a quarter of the bytes; the
  per-tensor ``offset`` and ``scale`` travel in the DXO meta. The error per value is at most
  ``scale / 2`` = (max - min) / 510 of that tensor.

Integer tensors (counters such as ``num_batches_tracked``) travel unchanged in both. The receiver
restores every compressed tensor to the dtype it had before compression, so aggregation always runs
on float32.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
COMPRESSION_META_KEY = "fedmed_compression"  # DXO meta: {"codec": "float16", "dtypes": {key: original dtype}}
CODEC = "float16"
INT8_CODEC = "int8"
CODECS = (CODEC, INT8_CODEC)
INT8_LEVELS = 255


class CompressionError(ValueError):
    """An update that cannot be compressed or restored; the message names the tensor."""


def array_bytes(update: Mapping[str, object]) -> int:
    """Raw bytes of the numpy tensors in an update (``nbytes`` summed; other values count 0)."""
    return int(sum(value.nbytes for value in update.values() if isinstance(value, np.ndarray)))


def compress_float16(update: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Cast every floating-point tensor wider than float16 to float16.

    Returns ``(compressed, dtypes)``: ``dtypes`` maps each compressed key to its original dtype
    name. Raises :class:`CompressionError` if a value is not finite or does not fit in float16
    (|x| > 65504), instead of sending infinities.
    """
    compressed, dtypes = {}, {}
    for key, value in update.items():
        if not isinstance(value, np.ndarray):
            raise CompressionError(f"tensor '{key}' is a {type(value).__name__}, not a numpy array; cannot compress it")
        if np.issubdtype(value.dtype, np.floating) and value.dtype.itemsize > 2:
            if not np.all(np.isfinite(value)):
                raise CompressionError(f"tensor '{key}' holds NaN or infinite values; refusing to send it")
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            if peak > FLOAT16_MAX:
                raise CompressionError(
                    f"tensor '{key}' has a value of magnitude {peak:.4g}, beyond float16's range ({FLOAT16_MAX:g}); "
                    "send weight differences (not raw weights) or use the standard scope"
                )
            compressed[key] = value.astype(np.float16)
            dtypes[key] = value.dtype.name
        else:
            compressed[key] = value
    return compressed, dtypes


def decompress_float16(update: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Restore the tensors named in ``dtypes`` to their original dtype."""
    unknown = sorted(set(dtypes) - set(update))
    if unknown:
        raise CompressionError(f"compression record names tensor(s) missing from the update: {', '.join(unknown[:5])}")
    restored = dict(update)
    for key, dtype in dtypes.items():
        value = np.asarray(update[key])
        if value.dtype != np.float16:
            raise CompressionError(f"tensor '{key}' is recorded as float16-compressed but arrived as {value.dtype}")
        try:
            target = np.dtype(dtype)
        except TypeError as exc:
            raise CompressionError(f"tensor '{key}': unknown original dtype {dtype!r}") from exc
        if not np.issubdtype(target, np.floating):
            raise CompressionError(f"tensor '{key}': original dtype {dtype!r} is not floating point")
        restored[key] = value.astype(target)
    return restored


def quantize_int8(update: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Quantize every floating-point tensor to uint8 on its own affine grid.

    Returns ``(quantized, record)``; ``record`` maps each quantized key to ``{"dtype", "offset",
    "scale"}`` (plain floats, for the DXO meta). Integer tensors are left out of the record and
    travel unchanged. Raises :class:`CompressionError` for NaN / infinite values.
    """
    quantized, record = {}, {}
    for key, value in update.items():
        if not isinstance(value, np.ndarray):
            raise CompressionError(f"tensor '{key}' is a {type(value).__name__}, not a numpy array; cannot compress it")
        if not np.issubdtype(value.dtype, np.floating):
            quantized[key] = value
            continue
        if not np.all(np.isfinite(value)):
            raise CompressionError(f"tensor '{key}' holds NaN or infinite values; refusing to send it")
        wide = value.astype(np.float64)
        low = float(wide.min()) if wide.size else 0.0
        high = float(wide.max()) if wide.size else 0.0
        scale = (high - low) / INT8_LEVELS if high > low else 1.0
        quantized[key] = np.clip(np.rint((wide - low) / scale), 0, INT8_LEVELS).astype(np.uint8)
        record[key] = {"dtype": value.dtype.name, "offset": low, "scale": scale}
    return quantized, record


def dequantize_int8(update: Mapping[str, np.ndarray], record: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """Restore the tensors named in ``record`` (see :func:`quantize_int8`) to their original dtype."""
    unknown = sorted(set(record) - set(update))
    if unknown:
        raise CompressionError(f"compression record names tensor(s) missing from the update: {', '.join(unknown[:5])}")
    restored = dict(update)
    for key, grid in record.items():
        value = np.asarray(update[key])
        if value.dtype != np.uint8:
            raise CompressionError(f"tensor '{key}' is recorded as int8-quantized but arrived as {value.dtype}")
        try:
            target, offset, scale = np.dtype(grid["dtype"]), float(grid["offset"]), float(grid["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressionError(f"tensor '{key}': bad quantization record {grid!r}") from exc
        if not np.issubdtype(target, np.floating) or not (np.isfinite(offset) and np.isfinite(scale) and scale > 0):
            raise CompressionError(f"tensor '{key}': bad quantization record {grid!r}")
        restored[key] = (offset + scale * value.astype(np.float64)).astype(target)
    return restored


def relative_error(original: Mapping[str, np.ndarray], restored: Mapping[str, np.ndarray]) -> float:
    """||restored - original|| / ||original|| over every floating-point tensor (0 for a zero update)."""
    num = den = 0.0
    for key, value in original.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            diff = np.asarray(restored[key], dtype=np.float64) - np.asarray(value, dtype=np.float64)
            num += float(np.sum(diff * diff))
            den += float(np.sum(np.asarray(value, dtype=np.float64) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0
