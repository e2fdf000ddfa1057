"""Aggregation math: pure functions over numpy arrays and real sample counts.

No FLARE import. The controller calls :func:`validate_update` on every site's answer and
:func:`weighted_mean` / :func:`apply_update` to form the next global model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class UpdateError(ValueError):
    """An update that must not enter the aggregate; the message names the site and the key."""


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    num_samples,
    site: str = "?",
    allow_partial: bool = False,
) -> None:
    """Raise :class:`UpdateError` on unknown or missing keys, shape mismatch, non-finite values
    or a sample count that is not a positive number."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float, np.integer, np.floating)):
        raise UpdateError(f"site {site}: sample count {num_samples!r} is not a number")
    if not np.isfinite(num_samples) or num_samples <= 0:
        raise UpdateError(f"site {site}: sample count must be positive, got {num_samples}")
    if not update:
        raise UpdateError(f"site {site}: the update holds no weights")
    unknown = sorted(set(update) - set(reference))
    if unknown:
        raise UpdateError(f"site {site}: update has key(s) not in the global model: {', '.join(unknown[:5])}")
    missing = sorted(set(reference) - set(update))
    if missing and not allow_partial:
        raise UpdateError(f"site {site}: update lacks key(s) of the global model: {', '.join(missing[:5])}")
    for key, value in update.items():
        value = np.asarray(value)
        if value.shape != np.shape(reference[key]):
            raise UpdateError(
                f"site {site}: key '{key}' has shape {value.shape}, the global model has {np.shape(reference[key])}"
            )
        if not np.all(np.isfinite(value)):
            raise UpdateError(f"site {site}: key '{key}' holds NaN or infinite values")


def weighted_mean(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Per-key mean of the updates weighted by sample counts.

    A key is averaged over the sites that sent it (sites may send partial updates when a privacy
    filter removed some keys). Returns an empty dict for no updates.
    """
    totals: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for update, num_samples in updates:
        if num_samples <= 0:
            raise UpdateError(f"sample count must be positive, got {num_samples}")
        for key, value in update.items():
            value = np.asarray(value, dtype=np.float64)
            totals[key] = totals.get(key, 0.0) + value * float(num_samples)
            weights[key] = weights.get(key, 0.0) + float(num_samples)
    return {key: totals[key] / weights[key] for key in totals}


def apply_update(global_weights: Mapping[str, np.ndarray], mean_diff: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """global + mean weight difference, keeping each tensor's dtype (int buffers are rounded)."""
    new = {}
    for key, value in global_weights.items():
        value = np.asarray(value)
        if key not in mean_diff:
            new[key] = value.copy()
            continue
        summed = value.astype(np.float64) + mean_diff[key]
        new[key] = np.rint(summed).astype(value.dtype) if np.issubdtype(value.dtype, np.integer) else summed.astype(value.dtype)
    return new


def weight_difference(local: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """local - global for every key, as float32 (the update a site sends)."""
    return {key: (np.asarray(local[key], dtype=np.float64) - np.asarray(global_weights[key], dtype=np.float64)).astype(np.float32) for key in local}
