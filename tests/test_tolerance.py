"""Each aggregation rule at its stated tolerance f, and one hostile site past it (issue 18).

The honest sites send noisy copies of one step ``h``; the hostile sites collude (all send the same
update, as a coordinated attack would): ``scale=-10`` (the issue's attack) or a flipped step that
stays just inside the 2x median norm bound (never bounded, so only the rule can stop it).
At f hostile sites of ``sites_needed(rule, f)`` the aggregated step still points where the honest
sites point; with f + 1 of them the same rule is reversed: the tests show where each bound ends.
"""

import numpy as np
import pytest

from fedmed.aggregation import (
    ToleranceError,
    UpdateError,
    aggregate_updates,
    check_integer_buffer,
    max_tolerance,
    resolve_tolerance,
    sites_needed,
    update_norm,
    validate_sample_count,
    validate_update,
)

pytestmark = pytest.mark.unit

ROBUST = ["trimmed_mean", "median", "geometric_median", "multi_krum"]
DIM = 400


def _step(seed=0):
    return np.random.default_rng(seed).standard_normal(DIM)


def _round(n_honest, n_hostile, attack, seed=1):
    h = _step()
    rng = np.random.default_rng(seed)
    honest = [(f"honest-{i}", {"w": h * (1 + 0.2 * rng.standard_normal()) + 0.3 * rng.standard_normal(DIM)}, 100 + 7 * i)
              for i in range(n_honest)]
    if attack == "scale=-10":
        bad = {"w": -10.0 * h}
    else:  # flipped, just inside the 2x median-norm bound: never bounded
        bad = {"w": -h / np.linalg.norm(h) * 1.95 * np.median([np.linalg.norm(u["w"]) for _, u, _ in honest])}
    hostile = [(f"hostile-{i}", dict(bad), 1e6) for i in range(n_hostile)]
    return honest + hostile, h


def _cos(update, h):
    return float(update["w"] @ h / (np.linalg.norm(update["w"]) * np.linalg.norm(h) + 1e-30))


@pytest.mark.parametrize("attack", ["scale=-10", "inside-the-bound"])
@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("rule", ROBUST)
def test_a_rule_holds_at_its_tolerance_and_breaks_one_past_it(rule, f, attack):
    n = sites_needed(rule, f)
    spec = {"name": rule, "args": {"f": f}}
    contributions, h = _round(n - f, f, attack)
    held, report = aggregate_updates(contributions, spec)
    assert _cos(held, h) > 0.8, f"{rule} f={f}: {f} hostile of {n} moved the step away from the honest sites"
    assert 0.5 < update_norm(held) / np.linalg.norm(h) < 1.5
    assert report["f"] == f
    assert {f"hostile-{i}" for i in range(f)} <= set(report["outliers"])  # the hostile sites are flagged ...
    assert not any(site.startswith("honest") for site in report["outliers"])  # ... and no honest one
    # one past: f + 1 hostile sites of the same n
    past, h = _round(n - f - 1, f + 1, attack)
    broken, report = aggregate_updates(past, spec)
    if rule != "multi_krum":  # a hostile majority: the rule takes their point, the step is reversed
        assert _cos(broken, h) < 0, f"{rule} f={f}: expected f+1 colluders to break it (the bound is f)"
    else:  # Krum keeps only f out: a hostile update enters the mean and, bounded, drags the step below half
        assert set(report["excluded"]) != {f"hostile-{i}" for i in range(f + 1)}
        assert float(broken["w"] @ h) / float(h @ h) < 0.5


@pytest.mark.parametrize("rule", ["fedavg", "clipped_fedavg"])
def test_the_mean_rules_tolerate_no_hostile_site(rule):
    """f = 0: one colluder of three inside the norm bound already cancels or reverses the step."""
    assert max_tolerance(rule, 20) == 0 and sites_needed(rule, 1) is None
    clean, h = _round(3, 0, "scale=-10")
    assert _cos(aggregate_updates(clean, rule)[0], h) > 0.9  # at its tolerance (no hostile site)
    past, h = _round(2, 1, "inside-the-bound")
    one_past, _ = aggregate_updates(past, rule)
    assert update_norm(one_past) < 0.25 * np.linalg.norm(h) or _cos(one_past, h) < 0


def test_the_stated_tolerance_needs_enough_sites_and_the_refusal_names_f_and_the_count():
    assert [resolve_tolerance("geometric_median", n) for n in (1, 2, 3, 4, 5, 20)] == [0, 0, 1, 1, 2, 9]
    assert resolve_tolerance("multi_krum", 5) == 1 and resolve_tolerance("median", 3) == 1  # at least 1 from 3 sites
    assert resolve_tolerance({"name": "trimmed_mean", "args": {"f": 1}}, 20) == 1  # a stated f is kept
    with pytest.raises(ToleranceError, match=r"median with f=2 .* needs at least 5 sites, this job has 4.*f=1"):
        resolve_tolerance({"name": "median", "args": {"f": 2}}, 4)
    with pytest.raises(ToleranceError, match=r"multi_krum with f=1 .* needs at least 5 sites, this job has 3"):
        resolve_tolerance({"name": "multi_krum", "args": {"f": 1}}, 3)


def test_integer_buffers_take_the_lower_median_so_one_site_of_three_cannot_set_them():
    """Below 5 sites nothing bounded an integer buffer's update (issue 18): now every robust rule
    gives it the lower median of the sites' values, and validation refuses fractions or overflow."""
    honest = [(f"s{i}", {"w": np.ones(3) * (1 + 0.1 * i), "num_batches_tracked": np.array(4.0)}, 10) for i in range(2)]
    hostile = ("bad", {"w": np.ones(3), "num_batches_tracked": np.array(4.0e12)}, 10)
    for rule in ("clipped_fedavg", "trimmed_mean", "median", "geometric_median"):
        combined, _ = aggregate_updates(honest + [hostile], rule, norm_keys=["w"])
        assert float(combined["num_batches_tracked"]) == 4.0, rule
    reference = {"num_batches_tracked": np.array(7, dtype=np.int64)}
    with pytest.raises(UpdateError, match="site bad: key 'num_batches_tracked' is an integer buffer .* fractions"):
        validate_update({"num_batches_tracked": np.array(0.5)}, reference, 10, "bad")
    with pytest.raises(UpdateError, match="integer buffer"):
        check_integer_buffer(np.array(6e18), np.int64, "num_batches_tracked", "bad")


def test_a_huge_python_integer_sample_count_is_refused_by_name_not_a_type_error():
    with pytest.raises(UpdateError, match=r"site site-2: sample count is an integer of 401 digits"):
        validate_sample_count(10 ** 400, "site-2")
    with pytest.raises(UpdateError, match=r"site site-2: sample count must be positive"):
        validate_sample_count(-(10 ** 400) // 10 ** 390, "site-2")
    validate_sample_count(10 ** 300, "site-2")  # fits a float: left to the robust rules' count cap
