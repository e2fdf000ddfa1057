"""Confidence intervals for the verdict: how many images a figure rests on, and how far it could move.

Pure arithmetic (math only; never imports ``nvflare``):

- :func:`wilson_interval`: the Wilson score interval of a proportion (accuracy), sound for small
  ``n`` and for proportions near 0 or 1;
- :func:`hanley_mcneil_se`: the standard error of an AUC from its value and the numbers of
  positive and negative images (Hanley & McNeil, Radiology 1982);
- :func:`accuracy_at_threshold`: correct calls at a decision threshold from a site's per-class
  score histogram (``val_score_histogram``, :mod:`fedmed.threshold`): a site never sends its
  predictions, and the threshold is a bin edge, so the count is exact;
- :func:`supported_difference`: whether a difference between two models is larger than their
  intervals allow. The two figures are treated as independent; both models are scored on the same
  images, whose errors are positively correlated, so this overstates the uncertainty of the
  difference: a difference called supported is conservative, one called unsupported may be real
  but is not shown by these images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054  # two-sided 95 %


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95 % interval and what it rests on."""

    value: float
    low: float
    high: float
    se: float  # standard error (for comparing two estimates)
    n: int  # images
    n_positive: int | None = None
    n_negative: int | None = None

    def interval(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"

    def sizes(self) -> str:
        if self.n_positive is not None and self.n_negative is not None:
            return f"n={self.n}: {self.n_positive} positive, {self.n_negative} negative"
        return f"n={self.n}"


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct / n``."""
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0, got n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_estimate(correct: int, n: int, n_positive: int | None = None, n_negative: int | None = None) -> Estimate:
    low, high = wilson_interval(correct, n)
    p = correct / n
    # the Wilson half-width as the standard error: never 0, even at 0 or n correct
    return Estimate(p, low, high, max((high - low) / (2 * Z95), math.sqrt(p * (1 - p) / n)), n, n_positive, n_negative)


def hanley_mcneil_se(auc: float, n_positive: int, n_negative: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982); inf when a class has no image."""
    if n_positive <= 0 or n_negative <= 0:
        return math.inf
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc)) / (n_positive * n_negative)
    # at AUC 0 or 1 the formula gives 0: use the uncertainty of one misranked pair instead
    floor = 1.0 / (n_positive * n_negative)
    return max(math.sqrt(max(var, 0.0)), floor, _perfect_floor(n_positive, n_negative) if auc in (0.0, 1.0) else 0.0)


def _perfect_floor(n_positive: int, n_negative: int) -> float:
    """An AUC of exactly 1 on few images: the SE of an AUC just short of perfect (one fewer correct
    ranking per smaller class), so that "1.000 on 2 normal images" is not treated as certain."""
    smaller = min(n_positive, n_negative)
    near = 1 - 1 / (2 * smaller)
    q1, q2 = near / (2 - near), 2 * near * near / (1 + near)
    var = (near * (1 - near) + (n_positive - 1) * (q1 - near * near) + (n_negative - 1) * (q2 - near * near)) / (n_positive * n_negative)
    return math.sqrt(max(var, 0.0))


def auc_estimate(auc: float, n_positive: int, n_negative: int) -> Estimate:
    se = hanley_mcneil_se(auc, n_positive, n_negative)
    low = max(0.0, auc - Z95 * se) if math.isfinite(se) else 0.0
    high = min(1.0, auc + Z95 * se) if math.isfinite(se) else 1.0
    return Estimate(auc, low, high, se, n_positive + n_negative, n_positive, n_negative)


def accuracy_at_threshold(histogram: Sequence[Sequence[float]], threshold: float) -> tuple[int, int, int, int]:
    """(correct, n, n_positive, n_negative) when ``score >= threshold`` means positive, from the
    per-class histogram (class 0 counts, class 1 counts) of the positive-class probability in
    equal bins on [0, 1]. ``threshold`` is rounded to the nearest bin edge."""
    if len(histogram) != 2 or len(histogram[0]) != len(histogram[1]) or len(histogram[0]) < 2:
        raise ValueError("a score histogram is two equal-length lists of bin counts (normal, positive)")
    negatives, positives = [int(c) for c in histogram[0]], [int(c) for c in histogram[1]]
    bins = len(negatives)
    edge = min(max(int(round(threshold * bins)), 0), bins)
    true_positive = sum(positives[edge:])
    true_negative = sum(negatives[:edge])
    n_pos, n_neg = sum(positives), sum(negatives)
    return true_positive + true_negative, n_pos + n_neg, n_pos, n_neg


def class_counts(histogram: Sequence[Sequence[float]]) -> tuple[int, int]:
    """(n_positive, n_negative) of a score histogram."""
    return int(sum(histogram[1])), int(sum(histogram[0]))


def supported_difference(a: Estimate, b: Estimate, z: float = Z95) -> int:
    """+1 when ``a`` is above ``b`` by more than ``z`` standard errors of the difference, -1 when
    below, 0 when the images cannot tell them apart (see the module docstring)."""
    se = math.sqrt(a.se ** 2 + b.se ** 2)
    if not math.isfinite(se):
        return 0
    diff = a.value - b.value
    if abs(diff) <= z * se:
        return 0
    return 1 if diff > 0 else -1
