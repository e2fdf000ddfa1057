"""The decision threshold of a binary classifier, chosen on the sites' validation data.

Pure module. Under the ``dp`` privacy scope a site sends only a DP-noised histogram
(``val_logit_histogram``: 32 bins equally spaced in log-odds, ``val_dp_epsilon`` beside it); the server derives AUC and accuracy from it
(:func:`histogram_metrics`) and chooses the threshold the same way. A site never sends its validation predictions: it sends, per class, a histogram of
the model's probability for the positive class (``val_score_histogram``, ``SCORE_BINS`` equal bins
on [0, 1]). Summing the sites' histograms gives the federation's ROC curve at the bin edges; the
threshold maximising Youden's J (sensitivity + specificity - 1) is chosen. J does not depend on
class prevalence, so the threshold carries over to a hospital whose mix of normal and pneumonia
images differs from the training sites'.

No external data is read here: the threshold is a model-selection choice and uses the sites' own
validation only.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

SCORE_BINS = 100
HISTOGRAM_KEY = "val_score_histogram"
DP_EPSILON_KEY = "val_dp_epsilon"  # a site's histogram was DP-noised with this epsilon (fedmed.privacy.dp)
# under dp: a histogram over bins equally spaced in log-odds (a DP-SGD model's probabilities pile up near 0
# or 1, where equal probability bins cannot rank them); edges are probabilities, 0.5 among them
DP_HISTOGRAM_KEY = "val_logit_histogram"
DP_BINS = 32
DP_LOGIT_SPAN = 8.0


def logit_edges(bins: int = DP_BINS, span: float = DP_LOGIT_SPAN) -> np.ndarray:
    """Probability edges of ``bins`` bins: 0, sigmoid of ``bins - 1`` log-odds equally spaced on
    [-span, span], 1."""
    inner = 1.0 / (1.0 + np.exp(-np.linspace(-span, span, bins - 1)))
    return np.concatenate([[0.0], inner, [1.0]])


def logit_histogram(positive_scores: np.ndarray, labels: np.ndarray, bins: int = DP_BINS) -> list[list[int]]:
    """Per class (0, 1), the count of positive-class probabilities in the :func:`logit_edges` bins
    (bin k holds edges[k] <= p < edges[k + 1])."""
    scores = np.asarray(positive_scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    index = np.searchsorted(logit_edges(bins)[1:-1], scores, side="right")
    return [np.bincount(index[labels == cls], minlength=bins).astype(int).tolist() for cls in (0, 1)]


def histogram_edges(key: str, bins: int) -> np.ndarray:
    """The probability edges of a histogram sent under ``key`` with ``bins`` bins."""
    return logit_edges(bins) if key == DP_HISTOGRAM_KEY else np.arange(bins + 1) / bins


def score_histogram(positive_scores: np.ndarray, labels: np.ndarray, bins: int = SCORE_BINS) -> list[list[int]]:
    """Per class (0, 1), the count of positive-class probabilities in ``bins`` equal bins on [0, 1]."""
    scores = np.clip(np.asarray(positive_scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    labels = np.asarray(labels).reshape(-1)
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    return [np.bincount(index[labels == cls], minlength=bins).astype(int).tolist() for cls in (0, 1)]


def _check_histogram(histogram, source: str) -> np.ndarray:
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != 2 or counts.shape[1] < 2:
        raise ValueError(f"{source}: {HISTOGRAM_KEY} must be two lists (normal, positive) of bin counts, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"{source}: {HISTOGRAM_KEY} holds negative or non-finite counts")
    return counts


def histogram_metrics(histogram, edges=None) -> dict:
    """What the server derives from one site's (possibly DP-noised) score histogram: ``val_auc``
    (the ROC area at the bin edges, ties within a bin counted half), ``val_accuracy`` at 0.5 (the
    argmax rule; when 0.5 is an edge) and ``num_val_samples`` (the histogram's total). Post-processing
    only: under dp these are as private as the histogram. Values not computable (one class empty)
    are left out. ``edges``: the bins' probability edges (default equal bins on [0, 1])."""
    counts = _check_histogram(histogram, "histogram")
    edges = np.arange(counts.shape[1] + 1) / counts.shape[1] if edges is None else np.asarray(edges)
    negatives, positives = counts[0].sum(), counts[1].sum()
    out = {"num_val_samples": int(round(negatives + positives))} if negatives + positives > 0 else {}
    if negatives > 0 and positives > 0:
        below = np.concatenate([[0.0], np.cumsum(counts[0])[:-1]])  # negatives in lower bins
        out["val_auc"] = float(np.sum(counts[1] * (below + 0.5 * counts[0])) / (negatives * positives))
        half = np.flatnonzero(np.isclose(edges, 0.5))
        if len(half):
            k = int(half[0])
            out["val_accuracy"] = float((counts[0][:k].sum() + counts[1][k:].sum()) / (negatives + positives))
    return out


def derive_histogram_metrics(metrics: Mapping) -> dict:
    """A site's metrics with ``val_auc`` / ``val_accuracy`` / ``num_val_samples`` derived from its
    histogram where the site sent only a DP histogram (``val_dp_epsilon`` present); else unchanged."""
    if DP_EPSILON_KEY not in metrics or DP_HISTOGRAM_KEY not in metrics:
        return dict(metrics)
    histogram = metrics[DP_HISTOGRAM_KEY]
    bins = len(histogram[0]) if histogram and isinstance(histogram[0], (list, tuple)) else 0
    return {**histogram_metrics(histogram, histogram_edges(DP_HISTOGRAM_KEY, bins) if bins else None), **metrics}


def choose_threshold(site_metrics: Mapping[str, Mapping]) -> dict | None:
    """Youden-optimal threshold from the sites' ``val_score_histogram`` entries.

    ``site_metrics`` maps site -> its validation metrics. Returns None when no site sent a
    histogram (multi-class or segmentation tasks), else ``{"threshold", "method", "sensitivity",
    "specificity", "num_val_samples", "sites"}``; the threshold is a bin edge, applied as
    ``probability >= threshold`` -> positive class.
    """
    key = DP_HISTOGRAM_KEY if any(DP_HISTOGRAM_KEY in (m or {}) for m in site_metrics.values()) else HISTOGRAM_KEY
    sites = sorted(site for site, metrics in site_metrics.items() if key in (metrics or {}))
    if not sites:
        return None
    counts = sum(_check_histogram(site_metrics[site][key], f"site {site}") for site in sites)
    edges = histogram_edges(key, counts.shape[1])
    negatives, positives = counts[0].sum(), counts[1].sum()
    if negatives == 0 or positives == 0:
        return None
    # threshold at edge k: everything in bins >= k is called positive
    tp = np.cumsum(counts[1][::-1])[::-1]  # positives with score >= edge k
    fp = np.cumsum(counts[0][::-1])[::-1]
    sensitivity = tp / positives
    specificity = 1.0 - fp / negatives
    youden = sensitivity + specificity - 1.0
    # among ties take the middle of the flat stretch (robust to a shift of the score distribution)
    ties = np.flatnonzero(youden >= youden.max() - 1e-12)
    best = int(ties[len(ties) // 2])
    out = {
        "threshold": float(edges[best]),
        "method": "youden_j_on_site_validation",
        "sensitivity": float(sensitivity[best]),
        "specificity": float(specificity[best]),
        "num_val_samples": int(round(negatives + positives)),
        "sites": sites,
    }
    dp = {site: site_metrics[site][DP_EPSILON_KEY] for site in sites if DP_EPSILON_KEY in site_metrics[site]}
    if key == DP_HISTOGRAM_KEY and dp:  # chosen from DP-noised histograms: the threshold is post-processing of each site's validation release
        out["method"] = "youden_j_on_dp_site_validation"
        out["dp"] = {"mechanism": "discrete-laplace-histogram", "epsilon_per_site": dp, "bins": f"{len(edges) - 1} bins equally "
                     f"spaced in log-odds on [-{DP_LOGIT_SPAN:g}, {DP_LOGIT_SPAN:g}]",
                     "note": "each site's histogram was released under its validation account (privacy_ledger.json)"}
    return out


def binary_metrics(positive_scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """Accuracy, sensitivity and specificity when ``score >= threshold`` means positive."""
    scores = np.asarray(positive_scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    predicted = scores >= threshold
    positives, negatives = labels == 1, labels == 0
    return {
        "accuracy": float(np.mean(predicted == positives)),
        "sensitivity": float(np.mean(predicted[positives])) if positives.any() else float("nan"),
        "specificity": float(np.mean(~predicted[negatives])) if negatives.any() else float("nan"),
        "threshold": float(threshold),
    }


def final_site_metrics(evaluations: Iterable[Mapping]) -> dict:
    """The last evaluation's per-site metrics from metrics.json's ``evaluations`` list ({} if none)."""
    evaluations = list(evaluations or [])
    return dict(evaluations[-1].get("sites", {})) if evaluations else {}
