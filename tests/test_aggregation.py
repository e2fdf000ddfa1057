import numpy as np
import pytest

from fedmed.aggregation import UpdateError, apply_update, validate_update, weight_difference, weighted_mean


def _w(value, shape=(2, 2)):
    return {"conv.weight": np.full(shape, value, dtype=np.float32), "fc.bias": np.full((3,), value, dtype=np.float32)}


def test_weighted_mean_weights_by_sample_counts():
    mean = weighted_mean([(_w(1.0), 10), (_w(4.0), 30)])
    np.testing.assert_allclose(mean["conv.weight"], np.full((2, 2), (1 * 10 + 4 * 30) / 40))
    np.testing.assert_allclose(mean["fc.bias"], np.full(3, 3.25))


def test_weighted_mean_is_not_a_plain_mean():
    mean = weighted_mean([(_w(0.0), 1), (_w(1.0), 99)])
    assert mean["fc.bias"][0] == pytest.approx(0.99)


def test_weighted_mean_averages_partial_keys_over_the_sites_that_sent_them():
    full, partial = _w(2.0), {"conv.weight": np.full((2, 2), 4.0, dtype=np.float32)}
    mean = weighted_mean([(full, 1), (partial, 1)])
    assert mean["conv.weight"][0, 0] == pytest.approx(3.0)
    assert mean["fc.bias"][0] == pytest.approx(2.0)


def test_weighted_mean_of_nothing_is_empty():
    assert weighted_mean([]) == {}


def test_weighted_mean_rejects_non_positive_counts():
    with pytest.raises(UpdateError):
        weighted_mean([(_w(1.0), 0)])


@pytest.mark.parametrize(
    "update, count, fragment",
    [
        ({**_w(1.0), "extra": np.zeros(1)}, 5, "not in the global model"),
        ({"conv.weight": np.zeros((2, 2))}, 5, "lacks key"),
        ({"conv.weight": np.zeros((3, 2)), "fc.bias": np.zeros(3)}, 5, "shape"),
        ({"conv.weight": np.array([[np.nan, 0], [0, 0]]), "fc.bias": np.zeros(3)}, 5, "NaN"),
        ({"conv.weight": np.array([[np.inf, 0], [0, 0]]), "fc.bias": np.zeros(3)}, 5, "NaN or infinite"),
        (_w(1.0), 0, "positive"),
        (_w(1.0), -3, "positive"),
        (_w(1.0), "12", "not a number"),
        (_w(1.0), True, "not a number"),
        ({}, 5, "no weights"),
    ],
)
def test_validate_update_rejects_bad_updates_naming_the_site(update, count, fragment):
    with pytest.raises(UpdateError, match=fragment) as info:
        validate_update(update, _w(0.0), count, site="hospital-7")
    assert "hospital-7" in str(info.value)


def test_validate_update_accepts_partial_updates_only_when_allowed():
    partial = {"conv.weight": np.zeros((2, 2))}
    validate_update(partial, _w(0.0), 3, "s", allow_partial=True)
    with pytest.raises(UpdateError):
        validate_update(partial, _w(0.0), 3, "s", allow_partial=False)


def test_apply_update_adds_the_mean_difference_and_keeps_int_buffers_int():
    global_weights = {"w": np.ones(3, dtype=np.float32), "num_batches_tracked": np.array(4, dtype=np.int64)}
    new = apply_update(global_weights, {"w": np.full(3, 0.5), "num_batches_tracked": np.array(2.4)})
    np.testing.assert_allclose(new["w"], 1.5)
    assert new["w"].dtype == np.float32
    assert new["num_batches_tracked"].dtype == np.int64 and int(new["num_batches_tracked"]) == 6


def test_weight_difference_round_trips_with_apply_update():
    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal((4, 3)).astype(np.float32)}
    local = {"a": g["a"] + rng.standard_normal((4, 3)).astype(np.float32)}
    diff = weight_difference(local, g)
    np.testing.assert_allclose(apply_update(g, diff)["a"], local["a"], atol=1e-6)
