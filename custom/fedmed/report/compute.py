"""The report's numbers: pure arithmetic over :class:`~fedmed.report.load.RunData`, no plotting, no text.

- :func:`verdict`: for the project lead. External-data figures of the released federated model
  against local-only and pooled models (when the run has them), and for each hospital whether it is
  better off in the federation than alone: the federated model against that hospital's local-only
  model, on the hospital's own validation data (AUC, and accuracy at each model's decision
  threshold) and on the external hospitals, each with its 95 % interval and sample size
  (:mod:`fedmed.report.stats`). A gain or loss is called only when the intervals support it.
- :func:`exam_figures` (EXAM, Dayan et al., Nat Med 2021), for metric M (AUC by default):
  own-data gain, for each site s, M(federated, s) - M(local_s, s), as the mean over sites and as the
  relative change of the mean; generalizability, a model's mean M on the *other* sites' data.
- :func:`comparison_rows`: federated, local and pooled on each site's own validation data.

"Local" means the local-only baseline (trained only on that site's data with the federation's
budget) when ``baselines.json`` is present; otherwise each site's last-round local model from
cross-site evaluation (the previous global model trained one more round at that site), which is
not a model trained alone and is never called one.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fedmed.report import stats
from fedmed.report.load import FEDERATED, LOCAL_ONLY_PREFIX, POOLED, ReportError, RunData

# differences smaller than this (AUC or Dice) count as "about the same" in the verdict: validation
# sets of a few dozen images cannot tell such differences apart
SAME_WITHIN = 0.01

# how the verdict names a metric, once, with its scale
METRIC_WORDS = {
    "val_auc": ("AUC", "AUC (0.5 = chance, 1 = perfect)"),
    "val_dice": ("Dice", "Dice (0 = no overlap with the reference outline, 1 = perfect)"),
}


def metric_name(metric: str) -> str:
    """``val_auc`` -> ``AUC``; other metrics lose their ``val_`` prefix."""
    return METRIC_WORDS.get(metric, (metric.removeprefix("val_"),))[0]


def metric_explained(metric: str) -> str:
    """The metric's name with its scale, for the first mention: ``AUC (0.5 = chance, 1 = perfect)``."""
    return METRIC_WORDS.get(metric, (None, metric.removeprefix("val_")))[1]


def model_label(data: RunData, model: str) -> str:
    """A model's name for people: what it is, never a bare id."""
    kind = data.model_kinds.get(model)
    if kind == "global":
        return "federated"
    if kind == "local":
        return f"{data.model_sites.get(model, model)}: federated + 1 round at site"
    if kind == "local_only":
        return f"{data.model_sites.get(model, model)}: local only"
    if kind == "pooled":
        return "pooled (all data in one place)"
    return model


def local_label(local_kind: str) -> str:
    """The legend / column name of the sites' local models, honest about what they are."""
    return "local only" if local_kind == "local_only" else "federated + 1 round at site (not local-only)"


def ordered_models(data: RunData) -> list[str]:
    order = {"global": 0, "pooled": 1, "local_only": 2, "local": 3}
    return sorted(data.matrix, key=lambda m: (order.get(data.model_kinds.get(m, ""), 9), data.model_sites.get(m, m)))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _cell(matrix, model: str, site: str, metric: str) -> float:
    try:
        return float(matrix[model][site][metric])
    except KeyError:
        raise ReportError(f"the matrix has no {metric} for model {model!r} on site {site!r}") from None


def exam_figures(
    matrix: Mapping[str, Mapping[str, Mapping[str, float]]],
    sites: Sequence[str],
    local_models: Mapping[str, str],
    federated: str = FEDERATED,
    metric: str = "val_auc",
) -> dict[str, Any]:
    """Own-data gain and generalizability of ``federated`` over each site's local model.

    ``local_models`` maps site -> the model name of that site's local model. Raises
    :class:`ReportError` naming the first missing (model, site) cell.
    """
    if not sites:
        raise ReportError("no sites to compare")
    per_site = []
    for site in sites:
        if site not in local_models:
            raise ReportError(f"site {site!r} has no local model in the matrix")
        local = local_models[site]
        others = [t for t in sites if t != site]
        row = {
            "site": site,
            "local_model": local,
            "federated_own": _cell(matrix, federated, site, metric),
            "local_own": _cell(matrix, local, site, metric),
            "federated_others": _mean([_cell(matrix, federated, t, metric) for t in others]) if others else math.nan,
            "local_others": _mean([_cell(matrix, local, t, metric) for t in others]) if others else math.nan,
        }
        row["own_gain"] = row["federated_own"] - row["local_own"]
        row["generalizability_gain"] = row["federated_others"] - row["local_others"]
        per_site.append(row)

    def rel(new: float, old: float) -> float:
        return (new - old) / old if old else math.nan

    fed_own = _mean([r["federated_own"] for r in per_site])
    loc_own = _mean([r["local_own"] for r in per_site])
    fed_gen = _mean([r["federated_others"] for r in per_site])
    loc_gen = _mean([r["local_others"] for r in per_site])
    return {
        "metric": metric,
        "per_site": per_site,
        "federated_own_mean": fed_own,
        "local_own_mean": loc_own,
        "mean_own_gain": _mean([r["own_gain"] for r in per_site]),
        "relative_own_gain": rel(fed_own, loc_own),
        "federated_generalizability": fed_gen,
        "local_generalizability": loc_gen,
        "generalizability_gain": fed_gen - loc_gen,
        "relative_generalizability_gain": rel(fed_gen, loc_gen),
        "sites_where_federated_wins": sum(1 for r in per_site if r["own_gain"] > 0),
    }


def comparison_rows(data: RunData, metric: str) -> list[dict[str, Any]]:
    """Per site: federated, local (own data) and pooled values of ``metric``; plus a row ``site == "mean"``:
    the unweighted mean over sites (each site counts once, whatever its size)."""
    local_models, _ = data.local_models()
    pooled = data.pooled_model()
    federated = data.federated_model()
    rows = []
    for site in data.sites:
        row = {"site": site}
        if federated:
            row["federated"] = data.matrix[federated].get(site, {}).get(metric, math.nan)
        if site in local_models:
            row["local"] = data.matrix[local_models[site]].get(site, {}).get(metric, math.nan)
        if pooled:
            row["pooled"] = data.matrix[pooled].get(site, {}).get(metric, math.nan)
        rows.append(row)
    mean_row = {"site": "mean"}
    for key in ("federated", "local", "pooled"):
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if values:
            mean_row[key] = _mean(values)
    rows.append(mean_row)
    return rows


# --------------------------------------------------------------------------------------------
# the verdict
# --------------------------------------------------------------------------------------------
@dataclass
class HospitalVerdict:
    """One hospital: the federated model against the model it could train alone."""

    site: str
    federated_own: float  # federated model on this hospital's validation data
    alone_own: float | None  # its local-only model there (None: the run has no local-only models)
    federated_external: float | None  # federated model on the external hospitals (mean over sets)
    alone_external: float | None  # its local-only model there
    outcome: str  # better | worse | unclear (no difference the images can show) | mixed | unknown
    # the same comparisons with intervals and sample sizes (None: the run lacks the class counts)
    federated_auc: stats.Estimate | None = None
    alone_auc: stats.Estimate | None = None
    federated_accuracy: stats.Estimate | None = None  # at the federation's decision threshold
    alone_accuracy: stats.Estimate | None = None  # at the local model's own threshold
    federated_threshold: float | None = None
    alone_threshold: float | None = None
    external_compared: list[tuple[str, stats.Estimate, stats.Estimate]] = field(default_factory=list)  # (set, fed, alone)
    signs: dict[str, int] = field(default_factory=dict)  # comparison -> +1 supported gain, -1 supported loss, 0 not shown

    @property
    def own_gain(self) -> float | None:
        return None if self.alone_own is None else self.federated_own - self.alone_own

    @property
    def external_gain(self) -> float | None:
        if self.alone_external is None or self.federated_external is None:
            return None
        return self.federated_external - self.alone_external


@dataclass
class ExternalFigures:
    """One external set: the released federated model against the alternatives."""

    name: str
    num_images: Any
    federated_auc: float
    federated_accuracy: float | None
    threshold: float | None
    alone_auc: dict[str, float] = field(default_factory=dict)  # site -> its local-only model's AUC
    pooled_auc: float | None = None
    pooled_accuracy: float | None = None


@dataclass
class Verdict:
    metric: str
    local_kind: str  # local_only | local | ""
    hospitals: list[HospitalVerdict]
    external: list[ExternalFigures]
    pooled_own: float | None = None  # pooled model, mean over sites of its own-data metric

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.hospitals:
            out[h.outcome] = out.get(h.outcome, 0) + 1
        return out


def _compare(signs: Sequence[int | None]) -> str:
    """The outcome from the comparisons' signs (+1 supported gain, -1 supported loss, 0 not shown)."""
    known = {s for s in signs if s is not None}
    if not known:
        return "unknown"
    if known == {0}:
        return "unclear"
    if -1 not in known:
        return "better"
    if 1 not in known:
        return "worse"
    return "mixed"


def _sign(a: stats.Estimate | None, b: stats.Estimate | None, plain: tuple[Any, Any] = (None, None)) -> int | None:
    """+1 / -1 when the intervals support a difference of at least SAME_WITHIN, 0 when not, None when
    a figure is missing. Without intervals (no class counts: Dice, runs from before the counts were
    kept) the ``plain`` values are compared on SAME_WITHIN alone, and the report says so."""
    if a is None or b is None:
        x, y = plain
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
            return None
        return 0 if abs(x - y) < SAME_WITHIN else (1 if x > y else -1)
    if abs(a.value - b.value) < SAME_WITHIN:
        return 0
    return stats.supported_difference(a, b)


def site_estimates(auc: float | None, histogram: Any, threshold: float | None) -> tuple[stats.Estimate | None, stats.Estimate | None]:
    """(AUC, accuracy at ``threshold``) with intervals: the AUC from the matrix, the class counts and
    the accuracy from the site's score histogram of the same model (None without a histogram)."""
    if not isinstance(histogram, list):
        return None, None
    try:
        n_pos, n_neg = stats.class_counts(histogram)
        auc_est = stats.auc_estimate(float(auc), n_pos, n_neg) if isinstance(auc, (int, float)) and math.isfinite(auc) else None
        acc_est = None
        if threshold is not None:
            correct, n, n_pos, n_neg = stats.accuracy_at_threshold(histogram, threshold)
            acc_est = stats.accuracy_estimate(correct, n, n_pos, n_neg) if n else None
        return auc_est, acc_est
    except (ValueError, TypeError, IndexError):
        return None, None


def external_estimate(figures: Mapping[str, Any]) -> stats.Estimate | None:
    counts = figures.get("images_per_class")
    auc = figures.get("auc")
    if not (isinstance(counts, list) and len(counts) == 2 and isinstance(auc, (int, float)) and math.isfinite(auc)):
        return None
    return stats.auc_estimate(float(auc), int(counts[1]), int(counts[0]))


def external_figures(data: RunData) -> list[ExternalFigures]:
    """Per external set: the released federated model, each hospital's local-only model, pooled."""
    out = []
    for set_name, by_model in (data.external.get("results") or {}).items():
        fed = by_model.get(FEDERATED)
        if not isinstance(fed, Mapping) or "auc" not in fed:
            continue
        pooled = by_model.get(POOLED) if isinstance(by_model.get(POOLED), Mapping) else None
        out.append(ExternalFigures(
            name=set_name,
            num_images=(data.external.get("sets") or {}).get(set_name, {}).get("num_images", fed.get("num_images", "?")),
            federated_auc=float(fed["auc"]),
            federated_accuracy=_float(fed.get("accuracy")),
            threshold=_float(fed.get("threshold")),
            alone_auc={m[len(LOCAL_ONLY_PREFIX):]: float(f["auc"]) for m, f in by_model.items()
                       if m.startswith(LOCAL_ONLY_PREFIX) and isinstance(f, Mapping) and "auc" in f},
            pooled_auc=_float(pooled.get("auc")) if pooled else None,
            pooled_accuracy=_float(pooled.get("accuracy")) if pooled else None,
        ))
    return out


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def verdict(data: RunData, metric: str | None = None) -> Verdict:
    """The project lead's verdict: external-data figures, and for every hospital whether it is better off
    in the federation (federated model) than alone (its local-only model), on its own validation data and on
    the external hospitals. Without local-only models every hospital's outcome is ``unknown``."""
    metric = metric or data.primary_metric()
    federated = data.federated_model()
    local_models, local_kind = data.local_models()
    external = external_figures(data)
    hospitals = []
    fed_threshold = (data.decision_threshold or {}).get("threshold")
    fed_threshold = float(fed_threshold) if isinstance(fed_threshold, (int, float)) else None
    for site in data.sites:
        if federated:
            fed_own = data.matrix.get(federated, {}).get(site, {}).get(metric, math.nan)
        else:  # no cross-site matrix: the last global model each site evaluated during training
            series = data.curves.get(site, {}).get(metric) or {"y": [math.nan]}
            fed_own = series["y"][-1]
        alone_own = alone_ext = None
        if local_kind == "local_only" and site in local_models:
            alone_own = data.matrix[local_models[site]].get(site, {}).get(metric)
            per_set = [e.alone_auc[site] for e in external if site in e.alone_auc]
            alone_ext = _mean(per_set) if per_set else None
        fed_ext = _mean([e.federated_auc for e in external]) if external else None
        hospital = HospitalVerdict(site, fed_own, alone_own, fed_ext, alone_ext, "unknown")
        fed_metrics = data.released_site_metrics.get(site)
        fed_histogram = data.histograms.get(federated, {}).get(site) if federated else None
        if fed_histogram is None:  # the released version's validation in metrics.json
            fed_histogram = (fed_metrics or {}).get("val_score_histogram")
        if metric != "val_auc":  # intervals from class counts are for AUC and accuracy only (Dice: none)
            fed_histogram = None
        hospital.federated_auc, hospital.federated_accuracy = site_estimates(fed_own, fed_histogram, fed_threshold)
        hospital.federated_threshold = fed_threshold
        if local_kind == "local_only" and site in local_models:
            local = local_models[site]
            hospital.alone_threshold = data.model_thresholds.get(local)
            hospital.alone_auc, hospital.alone_accuracy = site_estimates(
                alone_own, data.histograms.get(local, {}).get(site) if metric == "val_auc" else None, hospital.alone_threshold)
            for set_name, by_model in (data.external.get("results") or {}).items():
                fed_e = external_estimate(by_model.get(FEDERATED) or {})
                alone_e = external_estimate(by_model.get(local) or {})
                if fed_e and alone_e:
                    hospital.external_compared.append((set_name, fed_e, alone_e))
            short = metric_name(metric)
            hospital.signs = {f"its own images ({short})": _sign(hospital.federated_auc, hospital.alone_auc, (fed_own, alone_own)),
                              "its own images (accuracy)": _sign(hospital.federated_accuracy, hospital.alone_accuracy)}
            for set_name, fed_e, alone_e in hospital.external_compared:
                hospital.signs[f"{set_name} ({short})"] = _sign(fed_e, alone_e)
            if not hospital.external_compared and alone_ext is not None:
                hospital.signs[f"the external hospitals ({short})"] = _sign(None, None, (fed_ext, alone_ext))
            hospital.outcome = _compare(list(hospital.signs.values()))
        hospitals.append(hospital)
    pooled = data.pooled_model()
    pooled_own = None
    if pooled:
        values = [v for s in data.sites if (v := data.matrix[pooled].get(s, {}).get(metric)) is not None]
        pooled_own = _mean(values) if values else None
    return Verdict(metric, local_kind if local_models else "", hospitals, external, pooled_own)
