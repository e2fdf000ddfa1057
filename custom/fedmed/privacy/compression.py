"""float16 transfer of model updates, and byte counting. Pure module (numpy only).

Floating-point tensors travel as float16 (half the bytes of float32); integer tensors (counters
such as ``num_batches_tracked``) travel unchanged. The receiver restores every compressed tensor to
the dtype it had before compression, so aggregation always runs on float32.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
COMPRESSION_META_KEY = "fedmed_compression"  # DXO meta: {"codec": "float16", "dtypes": {key: original dtype}}
CODEC = "float16"


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
