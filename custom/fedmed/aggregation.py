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
        ref_dtype = np.asarray(reference[key]).dtype
        if np.issubdtype(ref_dtype, np.integer) and value.size:
            check_integer_buffer(value, ref_dtype, key, site)


def check_integer_buffer(value: np.ndarray, dtype, key: str, site: str = "?") -> None:
    """An update of an integer buffer (BatchNorm's ``num_batches_tracked``, a counter) must hold whole
    numbers whose magnitude fits half the buffer's dtype, so global + update cannot overflow it."""
    value = np.asarray(value, dtype=np.float64)
    if not np.all(value == np.rint(value)):
        raise UpdateError(f"site {site}: key '{key}' is an integer buffer ({np.dtype(dtype).name}); its update holds fractions")
    limit = float(np.iinfo(dtype).max) / 2
    if np.max(np.abs(value)) > limit:
        raise UpdateError(f"site {site}: key '{key}' is an integer buffer ({np.dtype(dtype).name}); its update "
                          f"{np.max(np.abs(value)):.3g} exceeds {limit:.3g}")


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
        if np.issubdtype(value.dtype, np.integer):  # rounded and kept inside the dtype (no wrap-around)
            info = np.iinfo(value.dtype)
            new[key] = np.clip(np.rint(summed), info.min, info.max).astype(value.dtype)
        else:
            new[key] = summed.astype(value.dtype)
    return new


def weight_difference(local: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """local - global for every key, as float32 (the update a site sends)."""
    return {key: (np.asarray(local[key], dtype=np.float64) - np.asarray(global_weights[key], dtype=np.float64)).astype(np.float32) for key in local}


# ---- robust aggregation ------------------------------------------------------------------------
#
# A round's contributions are ``(site, update, num_samples)`` triples. Every robust aggregator runs
# the same two bounding steps first, then combines the bounded updates:
#
# 1. sample counts capped, for the count-weighted ``clipped_fedavg`` only: at ``max_samples[site]``
#    when configured, and at ``sample_cap_factor`` x the round's (lower) median count, so no site can
#    claim the round's weight (the size-blind rules give a claimed count no weight, so nothing is
#    capped there and a large honest hospital is never flagged for its size);
# 2. update norms bounded: a site whose update's L2 norm exceeds ``norm_multiplier`` x the round's
#    (lower) median norm is scaled down to that bound (the direction is kept).
#
# The "lower median" (the middle value, or the smaller of the two middle values) keeps the bound
# an honest site's value whenever honest sites are a majority, also with 2 sites.
#
# The norm bound limits the blast of one reply; it is NOT what tolerates hostile sites (a colluder
# just inside a 2x bound still subtracts two honest steps under a mean). Tolerance comes from the
# rule and its ``f``, the number of colluding hostile sites the job states it tolerates
# (:func:`resolve_tolerance`): ``trimmed_mean`` drops the f largest and f smallest values per
# coordinate, ``median`` / ``geometric_median`` hold while hostile sites are a minority, and
# ``multi_krum`` averages the n - f updates closest to their neighbours. Each needs
# :func:`sites_needed` sites for its f; a job with fewer refuses to start.

AGGREGATORS = ("fedavg", "clipped_fedavg", "trimmed_mean", "median", "geometric_median", "multi_krum")
ROBUST_RULES = ("trimmed_mean", "median", "geometric_median", "multi_krum")  # tolerate f > 0 hostile sites
DEFAULT_AGGREGATION = {"name": "geometric_median", "args": {}}  # the main jobs' robust default (f: the most the sites allow)
DEFAULT_NORM_MULTIPLIER = 2.0
DEFAULT_SAMPLE_CAP_FACTOR = 3.0
OUTLIER_FACTOR = 2.0  # a site farther than this x the median site's distance from the aggregate is flagged
_BOUNDS = {"norm_multiplier", "f"}
_COUNT_CAPS = {"sample_cap_factor", "max_samples"}  # only where claimed counts weigh (fedavg, clipped_fedavg)
_ARGS = {
    "fedavg": {"max_samples", "f"},
    "clipped_fedavg": _BOUNDS | _COUNT_CAPS,
    "trimmed_mean": _BOUNDS,
    "median": _BOUNDS,
    "geometric_median": _BOUNDS,
    "multi_krum": _BOUNDS,
}
COUNT_WEIGHTED = ("fedavg", "clipped_fedavg")  # the rules that weight sites by their claimed sample counts


class ToleranceError(ValueError):
    """The job states a tolerance ``f`` its sites cannot support; the message names f and the site count."""


def max_tolerance(name: str, num_sites: int) -> int:
    """The most hostile sites rule ``name`` tolerates among ``num_sites`` sites (0 for fedavg / clipped_fedavg)."""
    if name in ("trimmed_mean", "median", "geometric_median"):
        return max(0, (num_sites - 1) // 2)  # hostile sites a strict minority: n >= 2f + 1
    if name == "multi_krum":
        return max(0, (num_sites - 3) // 2)  # every honest update needs f + 1 honest neighbours: n >= 2f + 3
    return 0


def sites_needed(name: str, f: int) -> int | None:
    """Fewest sites rule ``name`` needs to tolerate ``f`` hostile sites; None when it tolerates none."""
    if f <= 0:
        return 1
    if name in ("trimmed_mean", "median", "geometric_median"):
        return 2 * f + 1
    if name == "multi_krum":
        return 2 * f + 3
    return None


def stated_tolerance(spec) -> int | None:
    """The ``f`` a spec states, or None for "the most the sites present allow" (the default, ``"auto"``)."""
    f = check_aggregation_spec(spec)["args"].get("f", "auto")
    return None if f == "auto" else int(f)


def resolve_tolerance(spec, num_sites: int) -> int:
    """The job's tolerance ``f`` with ``num_sites`` sites: the spec's ``f``, or by default the most its
    rule supports there. Raises :class:`ToleranceError` naming f and the site count when there are too few sites."""
    spec = check_aggregation_spec(spec)
    name, stated = spec["name"], stated_tolerance(spec)
    if stated is None:
        return max_tolerance(name, num_sites)
    need = sites_needed(name, stated)
    if need is None:
        raise ToleranceError(f"aggregation {name} tolerates no hostile site, but the job states f={stated}; "
                             f"choose one of {', '.join(ROBUST_RULES)} (--set aggregation.name=median) or f=0")
    if num_sites < need:
        best = max_tolerance(name, num_sites)
        raise ToleranceError(f"aggregation {name} with f={stated} (hostile sites tolerated) needs at least {need} sites, "
                             f"this job has {num_sites}: add sites, or state f={best} (--set aggregation.args.f={best}), "
                             f"the most {name} tolerates with {num_sites} sites")
    return stated


def check_aggregation_spec(spec, where: str = "aggregation") -> dict:
    """Return ``spec`` as ``{"name": ..., "args": {...}}`` or raise ``ValueError`` naming the key.

    Names and their args (defaults in brackets). Every rule takes ``f`` ["auto"]: the number of
    colluding hostile sites the job tolerates; "auto" is the most the rule supports with the sites
    present (:func:`max_tolerance`); a stated f the sites cannot support stops the job at start
    (:func:`resolve_tolerance`).

    - ``fedavg``: FedAvg weighted by sample counts; ``max_samples`` [none] ({site: cap}). Tolerates f = 0.
    - ``clipped_fedavg``: counts capped, norms bounded, then FedAvg weighted by the capped counts;
      ``norm_multiplier`` [2.0], ``sample_cap_factor`` [3.0], ``max_samples`` [none]. Tolerates f = 0:
      a sign-flipped update still subtracts up to ``norm_multiplier`` honest steps.
    - ``trimmed_mean``: norms bounded, then per coordinate the mean of the values left after
      dropping the f largest and f smallest of the sites' values (unweighted, so claimed counts do
      not matter). Needs 2f + 1 sites.
    - ``median``: norms bounded, then the per-coordinate median (unweighted). Needs 2f + 1 sites.
    - ``geometric_median`` (the main jobs' default): norms bounded, then the point with the least
      summed distance to the sites' updates (Weiszfeld; unweighted): a minority cannot move it
      farther than the honest updates' spread, and in high dimension it stays close to the honest
      mean. Needs 2f + 1 sites.
    - ``multi_krum``: norms bounded, then the mean of the n - f updates whose n - f - 2 nearest
      neighbours are closest. Needs 2f + 3 sites.

    ``norm_multiplier`` / ``sample_cap_factor`` of ``null`` switch that bound off.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"{where}: expected {{\"name\": one of {', '.join(AGGREGATORS)}, \"args\": {{...}}}}, got {spec!r}")
    name, args = spec["name"], dict(spec.get("args") or {})
    if name not in AGGREGATORS:
        raise ValueError(f"{where}.name: unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    if "trim_fraction" in args:
        raise ValueError(f"{where}.args.trim_fraction: replaced by f, the number of hostile sites tolerated "
                         f"(trimmed_mean drops the f largest and f smallest values per coordinate); remove trim_fraction "
                         f"and state f, or leave it out for the most the sites allow")
    unknown = sorted(set(args) - _ARGS[name])
    if name not in COUNT_WEIGHTED and set(unknown) & _COUNT_CAPS:
        raise ValueError(f"{where}.args: {name} is size-blind (a site's claimed sample count carries no weight), so "
                         f"{', '.join(sorted(set(unknown) & _COUNT_CAPS))} would have no effect; remove it, or use "
                         f"clipped_fedavg, which weights by capped counts")
    if unknown:
        raise ValueError(f"{where}.args: {name} takes {', '.join(sorted(_ARGS[name]))}; unknown key(s) {', '.join(unknown)}")
    for key in ("norm_multiplier", "sample_cap_factor"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0):
            raise ValueError(f"{where}.args.{key}: must be a number >= 1 (or null to switch it off), got {value!r}")
    f = args.get("f", "auto")
    if f != "auto" and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
        raise ValueError(f"{where}.args.f: the number of hostile sites tolerated must be a whole number >= 0 or \"auto\", got {f!r}")
    if name in ("fedavg", "clipped_fedavg") and f not in ("auto", 0):
        raise ValueError(f"{where}.args.f: {name} tolerates no hostile site (f=0), got f={f}; choose one of {', '.join(ROBUST_RULES)}")
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


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], f: int) -> dict[str, np.ndarray]:
    """Per coordinate: drop the ``f`` largest and ``f`` smallest of the n sites' values, average the
    rest (unweighted). Keys are combined over the sites that sent them; a key sent by fewer than
    2f + 1 sites gets the median of what was sent."""
    out = {}
    for key, stacked in _stacked(updates).items():
        n = stacked.shape[0]
        k = min(int(f), (n - 1) // 2)
        ordered = np.sort(stacked, axis=0)
        out[key] = ordered[k:n - k].mean(axis=0)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-coordinate median of the sites' values (unweighted)."""
    return {key: np.median(stacked, axis=0) for key, stacked in _stacked(updates).items()}


def lower_coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-coordinate lower median (always one site's value; for integer buffers such as counters)."""
    out = {}
    for key, stacked in _stacked(updates).items():
        out[key] = np.sort(stacked, axis=0)[(stacked.shape[0] - 1) // 2]
    return out


def _flatten(updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> np.ndarray:
    return np.stack([np.concatenate([np.asarray(u[k], dtype=np.float64).ravel() for k in keys]) if keys else np.zeros(0)
                     for u in updates])


def _unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for key in keys:
        shape = np.shape(like[key])
        size = int(np.prod(shape))
        out[key] = vector[offset:offset + size].reshape(shape)
        offset += size
    return out


def weiszfeld(points: np.ndarray, max_iter: int = 200, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Geometric median of the rows of ``points`` (n, d) by Weiszfeld's iteration, started at the
    coordinate-wise median. Returns (the median, each row's final weight, summing to 1)."""
    z = np.median(points, axis=0)
    scale = max(float(np.max(np.linalg.norm(points - z, axis=1))), 1e-30)
    weights = np.full(len(points), 1.0 / len(points))
    for _ in range(max_iter):
        dist = np.maximum(np.linalg.norm(points - z, axis=1), 1e-9 * scale)
        weights = (1.0 / dist) / np.sum(1.0 / dist)
        new = weights @ points
        moved = float(np.linalg.norm(new - z))
        z = new
        if moved <= tol * scale:
            break
    return z, weights


def geometric_median(updates: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The geometric median of the updates over the keys every site sent (one vector per site);
    keys only some sites sent get their coordinate median. Returns (update, per-site weights)."""
    common = [k for k in updates[0] if all(k in u for u in updates)]
    point, weights = weiszfeld(_flatten(updates, common))
    out = _unflatten(point, updates[0], common)
    partial = [{k: v for k, v in u.items() if k not in out} for u in updates]
    out.update(coordinate_median([p for p in partial if p]) if any(partial) else {})
    return out, weights


def multi_krum(updates: Sequence[Mapping[str, np.ndarray]], f: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Multi-Krum: score each update by the summed squared distance to its n - f - 2 nearest others,
    average the n - f best-scored (unweighted). Returns (update, indices of the selected updates)."""
    n = len(updates)
    common = [k for k in updates[0] if all(k in u for u in updates)]
    points = _flatten(updates, common)
    if n - f - 2 < 1:
        selected = list(range(n))
    else:
        sq = np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1) if points.shape[1] else np.zeros((n, n))
        scores = [float(np.sum(np.sort(np.delete(sq[i], i))[:n - f - 2])) for i in range(n)]
        selected = sorted(np.argsort(scores, kind="stable")[:n - f].tolist())
    chosen = [updates[i] for i in selected]
    return {key: stacked.mean(axis=0) for key, stacked in _stacked(chosen).items()}, selected


def distance_outliers(updates: Mapping[str, Mapping[str, np.ndarray]], combined: Mapping[str, np.ndarray],
                      keys: Sequence[str] | None = None, factor: float = OUTLIER_FACTOR) -> dict[str, dict]:
    """Sites whose (bounded) update lies farther than ``factor`` x the lower median site's distance
    from the aggregate: the ones a robust rule trimmed or down-weighted. {site: {"distance", "median_distance"}}."""
    if len(updates) < 3:
        return {}
    keys = [k for k in (keys if keys is not None else combined) if k in combined]
    dist = {site: update_norm({k: np.asarray(u[k], dtype=np.float64) - combined[k] for k in keys if k in u})
            for site, u in updates.items()}
    median = lower_median(list(dist.values()))
    return {site: {"distance": d, "median_distance": median} for site, d in dist.items() if d > factor * median and d > 0}


def aggregate_updates(contributions: Sequence[tuple[str, Mapping[str, np.ndarray], float]], spec=DEFAULT_AGGREGATION,
                      norm_keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Combine ``(site, update, num_samples)`` contributions with the aggregator ``spec``
    (see :func:`check_aggregation_spec`). ``norm_keys``: the floating-point keys the norm bound and
    distances use; other keys (integer buffers such as BatchNorm's counter) get the lower median of
    the sites' values under every robust rule, so no site sets them alone at any number of sites.

    Returns (the aggregated update, a report ``{"aggregator", "f", "weights", "capped", "clipped",
    "outliers", "excluded"?}``: the sample counts per site (used only by fedavg / clipped_fedavg, capped
    there), the sites whose count was capped /
    norm was bounded, the sites far from the aggregate (trimmed / down-weighted as outliers) and,
    for multi_krum, the sites left out of the mean).
    """
    spec = check_aggregation_spec(spec)
    name, args = spec["name"], spec["args"]
    if not contributions:
        return {}, {"aggregator": name, "weights": {}, "capped": {}, "clipped": {}, "outliers": {}}
    sites = [site for site, _, _ in contributions]
    if len(set(sites)) != len(sites):
        raise UpdateError(f"more than one update from the same site in a round: {sorted(sites)}")
    stated = args.get("f", "auto")
    f = max_tolerance(name, len(sites)) if stated == "auto" else min(int(stated), max_tolerance(name, len(sites)))
    counts = {site: num_samples for site, _, num_samples in contributions}
    updates = {site: update for site, update, _ in contributions}
    robust = name != "fedavg"
    capped = {}
    if name in COUNT_WEIGHTED:  # the size-blind rules never use a count: nothing to cap, nobody flagged for size
        counts, capped = cap_sample_counts(counts, args.get("sample_cap_factor", DEFAULT_SAMPLE_CAP_FACTOR) if robust else None,
                                           args.get("max_samples"))
    clipped, report_extra = {}, {}
    if robust:
        updates, clipped = clip_update_norms(updates, args.get("norm_multiplier", DEFAULT_NORM_MULTIPLIER), norm_keys)
    float_keys = None if norm_keys is None else set(norm_keys)
    main = {s: ({k: v for k, v in u.items() if k in float_keys} if float_keys is not None else dict(u)) for s, u in updates.items()}
    rest = {s: {k: v for k, v in u.items() if k not in main[s]} for s, u in updates.items()}
    ordered = [main[site] for site in sites]
    if name == "fedavg":
        combined, rest = weighted_mean([(updates[site], counts[site]) for site in sites]), {}
    elif name == "clipped_fedavg":
        combined = weighted_mean([(main[site], counts[site]) for site in sites])
    elif name == "trimmed_mean":
        combined = trimmed_mean(ordered, f)
    elif name == "median":
        combined = coordinate_median(ordered)
    elif name == "geometric_median":
        combined, weights = geometric_median(ordered)
        report_extra["gm_weights"] = {site: float(w) for site, w in zip(sites, weights)}
    else:
        combined, selected = multi_krum(ordered, f)
        report_extra["excluded"] = sorted(sites[i] for i in range(len(sites)) if i not in selected)
    if any(rest.values()):
        combined.update(lower_coordinate_median([r for r in rest.values() if r]))
    outliers = distance_outliers(updates, combined, norm_keys) if robust else {}
    return combined, {"aggregator": name, "f": f, "weights": counts, "capped": capped, "clipped": clipped,
                      "outliers": outliers, **report_extra}


def nonfinite_keys(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Keys whose tensor holds NaN or an infinite value."""
    return sorted(k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.number) and not np.all(np.isfinite(v)))


def validate_sample_count(num_samples, site: str = "?") -> None:
    """Raise :class:`UpdateError` unless ``num_samples`` is a finite positive number (not a bool)
    that fits a float (a Python integer of 400 digits is refused by name, not with a TypeError)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float, np.integer, np.floating)):
        raise UpdateError(f"site {site}: sample count {num_samples!r} is not a number")
    try:
        value = float(num_samples)
    except OverflowError:
        raise UpdateError(f"site {site}: sample count is an integer of {len(str(abs(int(num_samples))))} digits, "
                          f"too large for a number of images") from None
    if not np.isfinite(value) or value <= 0:
        raise UpdateError(f"site {site}: sample count must be positive, got {num_samples}")
