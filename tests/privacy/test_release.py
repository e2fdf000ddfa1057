import numpy as np
import pytest

from fedmed.privacy.release import ReleaseRefused, check_release, model_signature

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier

SIGNATURE = model_signature({"conv.weight": np.zeros((4, 1, 3, 3)), "fc.bias": np.zeros(2)})


def _diff():
    return {"conv.weight": np.ones((4, 1, 3, 3), np.float32), "fc.bias": np.ones(2, np.float32)}


def test_weight_difference_with_aggregate_metrics_may_leave():
    check_release("WEIGHT_DIFF", _diff(), {"num_samples": 40, "site": "site-1", "metrics": {"train_loss": 0.3, "val_auc": 0.8}}, SIGNATURE)
    check_release("METRICS", {"val_auc": 0.8, "num_val_samples": 12}, {}, None)


def test_data_shaped_tensor_is_refused():
    data = _diff()
    data["images"] = np.zeros((16, 1, 28, 28), np.float32)
    with pytest.raises(ReleaseRefused, match="images"):
        check_release("WEIGHT_DIFF", data, {}, SIGNATURE)


def test_tensor_with_another_shape_is_refused():
    data = _diff()
    data["fc.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ReleaseRefused, match="fc.bias.*shape"):
        check_release("WEIGHT_DIFF", data, {}, SIGNATURE)


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"predictions": list(range(100))}, "per-sample"),
        ({"embedding": np.zeros(8)}, "array"),
        ({"metrics": {"per_sample_loss": [0.1] * 3}}, "single aggregate"),
    ],
)
def test_per_sample_values_in_meta_are_refused(meta, match):
    with pytest.raises(ReleaseRefused, match=match):
        check_release("WEIGHT_DIFF", _diff(), meta, SIGNATURE)


def test_metrics_must_be_single_numbers():
    with pytest.raises(ReleaseRefused, match="scores"):
        check_release("METRICS", {"scores": [0.1, 0.9]}, {}, None)


def test_other_kinds_and_missing_signature_are_refused():
    with pytest.raises(ReleaseRefused, match="STATISTICS"):
        check_release("STATISTICS", {"count": 3}, {}, SIGNATURE)
    with pytest.raises(ReleaseRefused, match="ModelSignatureRecorder"):
        check_release("WEIGHT_DIFF", _diff(), {}, None)


def test_a_score_histogram_of_counts_may_leave_but_not_scores():
    histogram = [[5, 0, 2] + [0] * 97, [0, 1, 9] + [0] * 97]
    check_release("METRICS", {"val_auc": 0.8, "val_score_histogram": histogram}, {}, None)
    check_release("WEIGHT_DIFF", _diff(), {"metrics": {"val_score_histogram": histogram}}, SIGNATURE)
    with pytest.raises(ReleaseRefused, match="non-negative integers"):
        check_release("METRICS", {"val_score_histogram": [[0.93, 0.12], [0.4, 0.7]]}, {}, None)
    with pytest.raises(ReleaseRefused, match="bin counts"):
        check_release("METRICS", {"val_score_histogram": [list(range(2000))]}, {}, None)
