import numpy as np
import pytest

from fedmed.aggregation import UpdateError, apply_update, validate_update, weight_difference, weighted_mean

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


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


# ---- robust aggregation --------------------------------------------------------------------------

from fedmed.aggregation import (  # noqa: E402
    aggregate_updates,
    cap_sample_counts,
    check_aggregation_spec,
    clip_update_norms,
    coordinate_median,
    lower_median,
    nonfinite_keys,
    trimmed_mean,
    update_norm,
)


def _honest(n=4, seed=0):
    rng = np.random.default_rng(seed)
    direction = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    return [(f"site-{i + 1}", {k: v * (1 + 0.1 * i) for k, v in direction.items()}, 100 + 10 * i) for i in range(n)], direction


def test_lower_median_takes_the_smaller_middle_value():
    assert lower_median([5, 1, 3]) == 3 and lower_median([1, 1000]) == 1


def test_sample_counts_are_capped_at_factor_times_the_median_and_per_site_maximum():
    capped, report = cap_sample_counts({"a": 100, "b": 120, "c": 1e9}, 3.0, {"b": 50})
    assert capped == {"a": 100.0, "b": 50.0, "c": 360.0}
    assert set(report) == {"b", "c"} and report["c"]["claimed"] == 1e9


def test_update_norms_are_bounded_relative_to_the_median_norm_keeping_direction():
    updates = {"a": {"w": np.ones(4)}, "b": {"w": np.ones(4) * 1.2}, "c": {"w": -np.ones(4) * 1000}}
    clipped, report = clip_update_norms(updates, 3.0)
    assert list(report) == ["c"]
    assert update_norm(clipped["c"]) == pytest.approx(3 * 2.4)  # 3 x the median norm (|b| = 2.4)
    assert np.all(clipped["c"]["w"] < 0)  # direction kept


def test_norm_is_computed_on_the_named_keys_only_and_other_keys_are_kept():
    updates = {"a": {"w": np.ones(4), "count": np.array(50.0)}, "b": {"w": np.ones(4), "count": np.array(50.0)},
               "c": {"w": np.ones(4) * 100, "count": np.array(50.0)}}
    clipped, report = clip_update_norms(updates, 3.0, norm_keys=["w"])
    assert list(report) == ["c"] and float(clipped["c"]["count"]) == 50.0


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    ups = [{"x": np.array([v])} for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    assert trimmed_mean(ups, 1)["x"][0] == pytest.approx(3.0)  # f=1: the largest and smallest dropped
    assert coordinate_median(ups)["x"][0] == pytest.approx(3.0)


@pytest.mark.parametrize("spec", ["clipped_fedavg", "trimmed_mean", "median", "geometric_median", "multi_krum"])
def test_each_attack_kind_is_bounded_by_the_robust_aggregators(spec):
    contributions, direction = _honest(4)
    clean, _ = aggregate_updates(contributions, spec)
    # scale x1000, sign flip x10 and 1e9 claimed samples from a fifth site
    for attacked in ((lambda u: {k: v * 1000 for k, v in u.items()}), (lambda u: {k: -10 * v for k, v in u.items()})):
        combined, _ = aggregate_updates(contributions + [("site-5", attacked(direction), 100)], spec)
        assert update_norm(combined) < 2.0 * update_norm(clean)
        cos = sum(float(np.sum(combined[k] * clean[k])) for k in clean) / (update_norm(combined) * update_norm(clean))
        assert cos > 0.5  # the step still points where the honest sites point
    combined, report = aggregate_updates(contributions + [("site-5", {k: -v for k, v in direction.items()}, 1e9)], spec)
    cos = sum(float(np.sum(combined[k] * clean[k])) for k in clean) / (update_norm(combined) * update_norm(clean))
    assert cos > 0.2
    if spec == "clipped_fedavg":  # the one count-weighted robust rule caps the claim
        assert report["weights"]["site-5"] <= 3 * 120 and "site-5" in report["capped"]
    else:  # size-blind: the claim weighs nothing, so nothing is capped and the step is the same as with an honest count
        same, _ = aggregate_updates(contributions + [("site-5", {k: -v for k, v in direction.items()}, 100)], spec)
        assert report["capped"] == {} and all(np.allclose(combined[k], same[k]) for k in same)


def test_size_blind_rules_never_flag_a_large_honest_hospital_for_its_size():
    """At 20 hospitals the largest honest one (667 images against a median of 150) was flagged
    'capped' in every round although geometric_median gives counts no weight."""
    contributions, _ = _honest(4)
    contributions = [(site, update, 100.0 if i else 5000.0) for i, (site, update, _) in enumerate(contributions)]
    for spec in ("trimmed_mean", "median", "geometric_median", "multi_krum"):
        _, report = aggregate_updates(contributions, spec)
        assert report["capped"] == {}, spec
    _, report = aggregate_updates(contributions, "clipped_fedavg")
    assert list(report["capped"]) == [contributions[0][0]]


@pytest.mark.parametrize("key", ["sample_cap_factor", "max_samples"])
def test_count_caps_on_a_size_blind_rule_are_refused_as_having_no_effect(key):
    value = 3.0 if key == "sample_cap_factor" else {"site-1": 10}
    with pytest.raises(ValueError, match=rf"geometric_median is size-blind .* {key} would have no effect"):
        check_aggregation_spec({"name": "geometric_median", "args": {key: value}})
    check_aggregation_spec({"name": "clipped_fedavg", "args": {key: value}})


def test_plain_fedavg_is_not_robust_which_is_why_it_is_not_the_default():
    contributions, direction = _honest(4)
    combined, _ = aggregate_updates(contributions + [("site-5", {k: -v for k, v in direction.items()}, 1e9)], "fedavg")
    clean, _ = aggregate_updates(contributions, "fedavg")
    assert sum(float(np.sum(combined[k] * clean[k])) for k in clean) < 0  # the attacker reversed the step


def test_aggregation_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown aggregator 'krum'"):
        check_aggregation_spec({"name": "krum"})
    with pytest.raises(ValueError, match="trim_fraction: replaced by f"):
        check_aggregation_spec({"name": "trimmed_mean", "args": {"trim_fraction": 0.2}})
    with pytest.raises(ValueError, match=r"args.f: .*whole number"):
        check_aggregation_spec({"name": "median", "args": {"f": 1.5}})
    with pytest.raises(ValueError, match="fedavg tolerates no hostile site"):
        check_aggregation_spec({"name": "fedavg", "args": {"f": 1}})
    with pytest.raises(ValueError, match="norm_multiplier"):
        check_aggregation_spec({"name": "clipped_fedavg", "args": {"norm_multiplier": 0.5}})
    with pytest.raises(ValueError, match="unknown key"):
        check_aggregation_spec({"name": "fedavg", "args": {"norm_multiplier": 2.0}})
    with pytest.raises(ValueError, match="max_samples.site-1"):
        check_aggregation_spec({"name": "fedavg", "args": {"max_samples": {"site-1": -1}}})


def test_nonfinite_keys_names_the_tensors():
    assert nonfinite_keys({"a": np.array([1.0, np.inf]), "b": np.zeros(2), "c": np.array([np.nan])}) == ["a", "c"]
