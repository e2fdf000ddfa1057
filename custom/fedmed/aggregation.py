"""Aggregation math: pure functions over numpy arrays and real sample counts.

No FLARE import. The round engine (:mod:`fedmed.rounds`) calls :func:`validate_update` on every
site's answer and :func:`aggregate_updates` (plain FedAvg or a robust aggregator, chosen by a
``{"name", "args"}`` spec, see :func:`check_aggregation_spec`) to combine the updates.
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
    validate_sample_count(num_samples, site)
    validate_keys(update, reference, site, allow_partial)
    for key, value in update.items():
        value = np.asarray(value)
        if value.shape != np.shape(reference[key]):
            raise UpdateError(
                f"site {site}: key '{key}' has shape {value.shape}, the global model has {np.shape(reference[key])}"
            )
        if not np.all(np.isfinite(value)):
            raise UpdateError(f"site {site}: key '{key}' holds NaN or infinite values")


def validate_keys(update: Mapping, reference_keys, site: str = "?", allow_partial: bool = False) -> None:
    """Raise :class:`UpdateError` on an empty update, keys not in ``reference_keys`` or (unless
    ``allow_partial``) keys missing from the update. Shared by plaintext and ciphertext updates."""
    if not update:
        raise UpdateError(f"site {site}: the update holds no weights")
    unknown = sorted(set(update) - set(reference_keys))
    if unknown:
        raise UpdateError(f"site {site}: update has key(s) not in the global model: {', '.join(unknown[:5])}")
    missing = sorted(set(reference_keys) - set(update))
    if missing and not allow_partial:
        raise UpdateError(f"site {site}: update lacks key(s) of the global model: {', '.join(missing[:5])}")


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


# ---- robust aggregation ------------------------------------------------------------------------
#
# A round's contributions are ``(site, update, num_samples)`` triples. Every robust aggregator runs
# the same two bounding steps first, then combines the bounded updates:
#
# 1. sample counts capped: at ``max_samples[site]`` when configured, and at ``sample_cap_factor`` x
#    the round's (lower) median count, so no site can claim the round's weight;
# 2. update norms bounded: a site whose update's L2 norm exceeds ``norm_multiplier`` x the round's
#    (lower) median norm is scaled down to that bound (the direction is kept).
#
# The "lower median" (the middle value, or the smaller of the two middle values) keeps the bound
# an honest site's value whenever honest sites are a majority, also with 2 sites.

AGGREGATORS = ("fedavg", "clipped_fedavg", "trimmed_mean", "median")
DEFAULT_AGGREGATION = {"name": "trimmed_mean", "args": {}}  # the main jobs' robust default
DEFAULT_NORM_MULTIPLIER = 2.0
DEFAULT_SAMPLE_CAP_FACTOR = 3.0
DEFAULT_TRIM_FRACTION = 0.2
_ARGS = {
    "fedavg": {"max_samples"},
    "clipped_fedavg": {"norm_multiplier", "sample_cap_factor", "max_samples"},
    "trimmed_mean": {"norm_multiplier", "sample_cap_factor", "max_samples", "trim_fraction"},
    "median": {"norm_multiplier", "sample_cap_factor", "max_samples"},
}


def check_aggregation_spec(spec, where: str = "aggregation") -> dict:
    """Return ``spec`` as ``{"name": ..., "args": {...}}`` or raise ``ValueError`` naming the key.

    Names and their args (defaults in brackets):

    - ``fedavg``: FedAvg weighted by sample counts; ``max_samples`` [none] ({site: cap}).
    - ``clipped_fedavg``: counts capped, norms bounded, then FedAvg weighted by the capped counts;
      ``norm_multiplier`` [2.0], ``sample_cap_factor`` [3.0], ``max_samples`` [none]. A sign-flipped
      update still subtracts up to ``norm_multiplier`` honest steps.
    - ``trimmed_mean`` (the main jobs' default): norms bounded, then per coordinate the mean of the
      values left after dropping the ``floor(trim_fraction * n)`` largest and smallest of the n
      sites' values (unweighted, so claimed counts do not matter); ``trim_fraction`` [0.2],
      ``norm_multiplier`` [2.0]. With fewer than 5 sites nothing is trimmed (only the norm bound acts).
    - ``median``: counts capped, norms bounded, then the per-coordinate median (unweighted).

    ``norm_multiplier`` / ``sample_cap_factor`` of ``null`` switch that bound off.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"{where}: expected {{\"name\": one of {', '.join(AGGREGATORS)}, \"args\": {{...}}}}, got {spec!r}")
    name, args = spec["name"], dict(spec.get("args") or {})
    if name not in AGGREGATORS:
        raise ValueError(f"{where}.name: unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    unknown = sorted(set(args) - _ARGS[name])
    if unknown:
        raise ValueError(f"{where}.args: {name} takes {', '.join(sorted(_ARGS[name]))}; unknown key(s) {', '.join(unknown)}")
    for key in ("norm_multiplier", "sample_cap_factor"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0):
            raise ValueError(f"{where}.args.{key}: must be a number >= 1 (or null to switch it off), got {value!r}")
    trim = args.get("trim_fraction", DEFAULT_TRIM_FRACTION)
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 0.5:
        raise ValueError(f"{where}.args.trim_fraction: must be in [0, 0.5), got {trim!r}")
    max_samples = args.get("max_samples")
    if max_samples is not None:
        if not isinstance(max_samples, Mapping):
            raise ValueError(f"{where}.args.max_samples: must map site name -> largest sample count credited, got {max_samples!r}")
        for site, cap in max_samples.items():
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ValueError(f"{where}.args.max_samples.{site}: must be a positive number, got {cap!r}")
    return {"name": name, "args": args}


def lower_median(values: Sequence[float]) -> float:
    """The middle value; of an even count, the smaller middle one."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("lower_median of no values")
    return ordered[(len(ordered) - 1) // 2]


def update_norm(update: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> float:
    """L2 norm over ``keys`` of the update (default: every key)."""
    keys = update.keys() if keys is None else [k for k in keys if k in update]
    total = 0.0
    for key in keys:
        value = np.asarray(update[key], dtype=np.float64)
        total += float(np.sum(value * value))
    return float(np.sqrt(total))


def cap_sample_counts(counts: Mapping[str, float], sample_cap_factor: float | None = DEFAULT_SAMPLE_CAP_FACTOR,
                      max_samples: Mapping[str, float] | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """Cap each site's count at ``max_samples[site]`` and at ``sample_cap_factor`` x the lower median count.

    Returns (capped counts, {site: {"claimed", "used", "cap"}} for the sites that were capped).
    """
    bound = sample_cap_factor * lower_median(list(counts.values())) if sample_cap_factor and counts else None
    capped, report = {}, {}
    for site, count in counts.items():
        caps = [c for c in (bound, (max_samples or {}).get(site)) if c is not None]
        cap = min(caps) if caps else None
        capped[site] = float(min(count, cap)) if cap is not None else float(count)
        if cap is not None and count > cap:
            report[site] = {"claimed": float(count), "used": float(cap), "cap": float(cap)}
    return capped, report


def clip_update_norms(updates: Mapping[str, Mapping[str, np.ndarray]], norm_multiplier: float | None = DEFAULT_NORM_MULTIPLIER,
                      norm_keys: Sequence[str] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Scale down every update whose norm (over ``norm_keys``) exceeds ``norm_multiplier`` x the lower median norm.

    Only ``norm_keys`` are scaled (other keys, e.g. integer buffers' counters, are kept).
    Returns (updates, {site: {"norm", "bound", "scale"}} for the sites that were scaled).
    """
    if not norm_multiplier or not updates:
        return dict(updates), {}
    norms = {site: update_norm(update, norm_keys) for site, update in updates.items()}
    bound = norm_multiplier * lower_median(list(norms.values()))
    out, report = {}, {}
    for site, update in updates.items():
        if norms[site] > bound:
            scale = bound / norms[site]
            scaled_keys = set(update) if norm_keys is None else set(norm_keys)
            out[site] = {k: (np.asarray(v, dtype=np.float64) * scale if k in scaled_keys else v) for k, v in update.items()}
            report[site] = {"norm": norms[site], "bound": bound, "scale": scale}
        else:
            out[site] = update
    return out, report


def _stacked(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """key -> array (sites that sent the key, *shape)."""
    keys: dict[str, list] = {}
    for update in updates:
        for key, value in update.items():
            keys.setdefault(key, []).append(np.asarray(value, dtype=np.float64))
    return {key: np.stack(values) for key, values in keys.items()}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float = DEFAULT_TRIM_FRACTION) -> dict[str, np.ndarray]:
    """Per coordinate: drop the ``floor(trim_fraction * n)`` largest and smallest of the n sites'
    values, average the rest (unweighted). Keys are combined over the sites that sent them."""
    out = {}
    for key, stacked in _stacked(updates).items():
        n = stacked.shape[0]
        k = min(int(np.floor(trim_fraction * n)), (n - 1) // 2)
        ordered = np.sort(stacked, axis=0)
        out[key] = ordered[k:n - k].mean(axis=0)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-coordinate median of the sites' values (unweighted)."""
    return {key: np.median(stacked, axis=0) for key, stacked in _stacked(updates).items()}


def aggregate_updates(contributions: Sequence[tuple[str, Mapping[str, np.ndarray], float]], spec=DEFAULT_AGGREGATION,
                      norm_keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Combine ``(site, update, num_samples)`` contributions with the aggregator ``spec``
    (see :func:`check_aggregation_spec`).

    Returns (the aggregated update, a report ``{"aggregator", "weights", "capped", "clipped"}``:
    the sample counts used per site, and the sites whose count was capped / norm was bounded).
    """
    spec = check_aggregation_spec(spec)
    name, args = spec["name"], spec["args"]
    if not contributions:
        return {}, {"aggregator": name, "weights": {}, "capped": {}, "clipped": {}}
    sites = [site for site, _, _ in contributions]
    if len(set(sites)) != len(sites):
        raise UpdateError(f"more than one update from the same site in a round: {sorted(sites)}")
    counts = {site: num_samples for site, _, num_samples in contributions}
    updates = {site: update for site, update, _ in contributions}
    robust = name != "fedavg"
    counts, capped = cap_sample_counts(counts, args.get("sample_cap_factor", DEFAULT_SAMPLE_CAP_FACTOR) if robust else None,
                                       args.get("max_samples"))
    clipped = {}
    if robust:
        updates, clipped = clip_update_norms(updates, args.get("norm_multiplier", DEFAULT_NORM_MULTIPLIER), norm_keys)
    if name in ("fedavg", "clipped_fedavg"):
        combined = weighted_mean([(updates[site], counts[site]) for site in sites])
    elif name == "trimmed_mean":
        combined = trimmed_mean([updates[site] for site in sites], args.get("trim_fraction", DEFAULT_TRIM_FRACTION))
    else:
        combined = coordinate_median([updates[site] for site in sites])
    return combined, {"aggregator": name, "weights": counts, "capped": capped, "clipped": clipped}


def nonfinite_keys(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Keys whose tensor holds NaN or an infinite value."""
    return sorted(k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.number) and not np.all(np.isfinite(v)))


def validate_sample_count(num_samples, site: str = "?") -> None:
    """Raise :class:`UpdateError` unless ``num_samples`` is a finite positive number (not a bool)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float, np.integer, np.floating)):
        raise UpdateError(f"site {site}: sample count {num_samples!r} is not a number")
    if not np.isfinite(num_samples) or num_samples <= 0:
        raise UpdateError(f"site {site}: sample count must be positive, got {num_samples}")
