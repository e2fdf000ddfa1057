"""Decision threshold chosen on the sites' validation score histograms (fedmed.threshold)."""

import numpy as np
import pytest

from fedmed.threshold import binary_metrics, choose_threshold, score_histogram

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _site(rng, n_neg, n_pos, shift=0.0):
    scores = np.concatenate([rng.beta(2, 5, n_neg), np.clip(rng.beta(5, 2, n_pos) + shift, 0, 1)])
    labels = np.array([0] * n_neg + [1] * n_pos)
    return scores, labels


def test_threshold_is_the_youden_optimum_over_all_sites_pooled():
    rng = np.random.default_rng(0)
    sites = {f"site-{i}": _site(rng, 30 + 20 * i, 90 - 10 * i, shift=0.05 * i) for i in range(3)}
    chosen = choose_threshold({s: {"val_score_histogram": score_histogram(*v)} for s, v in sites.items()})
    scores = np.concatenate([v[0] for v in sites.values()])
    labels = np.concatenate([v[1] for v in sites.values()])

    def youden(t):
        m = binary_metrics(scores, labels, t)
        return m["sensitivity"] + m["specificity"] - 1

    best = max(youden(k / 100) for k in range(101))
    assert youden(chosen["threshold"]) == pytest.approx(best, abs=1e-9)
    assert chosen["num_val_samples"] == len(labels)
    assert chosen["sites"] == sorted(sites)
    # the histogram alone reproduces the sensitivity / specificity at the chosen edge
    m = binary_metrics(scores, labels, chosen["threshold"])
    assert chosen["sensitivity"] == pytest.approx(m["sensitivity"])
    assert chosen["specificity"] == pytest.approx(m["specificity"])


def test_threshold_moves_with_the_scores_not_with_prevalence():
    rng = np.random.default_rng(1)
    low = choose_threshold({"a": {"val_score_histogram": score_histogram(*_site(rng, 400, 400))}})["threshold"]
    skewed = choose_threshold({"a": {"val_score_histogram": score_histogram(*_site(rng, 100, 700))}})["threshold"]
    assert abs(low - skewed) < 0.15  # Youden's J is prevalence-free
    scores, labels = _site(rng, 400, 400)
    shifted = choose_threshold({"a": {"val_score_histogram": score_histogram(np.clip(scores * 0.5, 0, 1), labels)}})
    assert shifted["threshold"] < low


def test_no_histogram_or_one_class_gives_no_threshold_and_bad_histograms_name_the_site():
    assert choose_threshold({"a": {"val_auc": 0.9}}) is None
    assert choose_threshold({"a": {"val_score_histogram": [[0] * 100, [5] * 100]}}) is None
    with pytest.raises(ValueError, match="site b: val_score_histogram holds negative"):
        choose_threshold({"b": {"val_score_histogram": [[-1] * 100, [1] * 100]}})
    with pytest.raises(ValueError, match="site c: val_score_histogram must be two lists"):
        choose_threshold({"c": {"val_score_histogram": [1, 2, 3]}})
