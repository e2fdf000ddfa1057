"""The round engine (fedmed.rounds) without FLARE: checks, bookkeeping, robust selection, rejection, resume."""

import json
import re

import numpy as np
import pytest

from fedmed.aggregation import update_norm
from fedmed.attacks import apply_attack, parse_attack
from fedmed.rounds import (
    PlaintextAggregation,
    RoundEngine,
    RoundFailed,
    SiteReply,
    check_site_metrics,
    join_arrays,
    split_arrays,
)

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier

SITES = ["site-1", "site-2", "site-3", "site-4", "site-5"]


def _global():
    return {"w": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32), "steps": np.array(0, dtype=np.int64)}


def _reply(site_index, auc=0.7, num_samples=100, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    base = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    update = {k: (v * (1 + 0.05 * site_index) * scale).astype(np.float32) for k, v in base.items()}
    update["steps"] = np.array(10.0, dtype=np.float32)
    metrics = {"val_auc": auc, "val_loss": 0.5, "num_val_samples": 20, "train_loss": 0.4, "learning_rate": 1e-3}
    return SiteReply("WEIGHT_DIFF", update, {"num_samples": num_samples, "metrics": metrics})


def _engine(aggregation="trimmed_mean", min_clients=2, num_rounds=3):
    return RoundEngine(PlaintextAggregation({"name": aggregation}), "job", "val_auc", num_rounds, min_clients)


def _replies(**overrides):
    replies = {site: _reply(i) for i, site in enumerate(SITES)}
    replies.update(overrides)
    return replies


def test_a_clean_round_records_contributors_metrics_and_moves_the_model():
    engine = _engine()
    outcome = engine.run_round(0, _global(), _replies(), {"site-5": "no answer within the round timeout"})
    assert outcome.accepted and outcome.record["contributors"] == SITES
    assert outcome.record["failed"] == {"site-5": "no answer within the round timeout"}
    assert outcome.record["sites"]["site-1"] == {"num_samples": 100, "train_loss": 0.4, "learning_rate": 1e-3}
    assert outcome.evaluation["sites"]["site-2"] == {"val_auc": 0.7, "val_loss": 0.5, "num_val_samples": 20}
    assert outcome.evaluation["median_val_auc"] == pytest.approx(0.7) and outcome.entering_model_is_best
    assert update_norm(outcome.model, ["w", "b"]) > 0 and outcome.model["steps"].dtype == np.int64
    assert engine.next_round == 1 and engine.metrics["sites"] == SITES


@pytest.mark.parametrize(
    "reply, fragment",
    [
        (SiteReply("WEIGHTS", _reply(0).update, _reply(0).meta), "expected WEIGHT_DIFF"),
        (SiteReply("WEIGHT_DIFF", {**_reply(0).update, "w": np.full((4, 3), np.nan, np.float32)}, _reply(0).meta), "NaN"),
        (_reply(0, num_samples=0), "sample count must be positive"),
        (_reply(0, num_samples="many"), "not a number"),
        (_reply(0, auc=1e9), "val_auc' = 1000000000.0 is outside \\[0, 1\\]"),
        (SiteReply("WEIGHT_DIFF", _reply(0).update, {"num_samples": 5, "metrics": {"val_loss": -1.0}}), "negative"),
        (SiteReply("WEIGHT_DIFF", _reply(0).update, {"num_samples": 5, "metrics": {"val_score_histogram": [[1, -2]]}}), "non-negative"),
    ],
)
def test_a_bad_reply_is_left_out_and_its_site_named(reply, fragment):
    engine = _engine()
    outcome = engine.run_round(0, _global(), _replies(**{"site-3": reply}))
    assert outcome.record["contributors"] == ["site-1", "site-2", "site-4", "site-5"]
    assert "site-3" in outcome.record["failed"]["site-3"]
    assert re.search(fragment, outcome.record["failed"]["site-3"]), outcome.record["failed"]


def test_list_metrics_pass_through_and_unavailable_auc_is_dropped_with_a_note():
    histogram = [[3, 1, 0], [0, 2, 5]]
    clean, notes = check_site_metrics("site-1", {"val_score_histogram": histogram, "val_auc": float("nan"), "val_accuracy": 0.5})
    assert clean == {"val_score_histogram": histogram, "val_accuracy": 0.5}
    assert notes and "val_auc" in notes[0]


def test_too_few_valid_updates_stop_the_job_naming_every_failed_site():
    engine = _engine(min_clients=3)
    bad = _reply(0, auc=2.0)
    with pytest.raises(RoundFailed, match="min_clients is 3") as info:
        engine.run_round(0, _global(), {"site-1": _reply(0), "site-2": bad}, {"site-3": "crashed"})
    assert "site-2" in str(info.value) and "site-3: crashed" in str(info.value)
    assert engine.metrics["error"] == str(info.value) and engine.metrics["rounds"][0]["failed"]["site-2"]


def test_a_step_with_a_site_minimum_refuses_the_round_naming_the_reason():
    step = PlaintextAggregation()
    step.min_sites, step.min_sites_reason = 3, "with 2 sites each hospital can decrypt the other's update"
    engine = RoundEngine(step, "job", "val_auc", 2, 1)
    with pytest.raises(RoundFailed, match="each hospital can decrypt the other's update"):
        engine.run_round(0, _global(), {"site-1": _reply(0), "site-2": _reply(1)})


def test_a_round_that_would_produce_nan_is_rejected_the_model_kept_and_the_site_named():
    engine = _engine(aggregation="fedavg")
    start = _global()
    huge = SiteReply("WEIGHT_DIFF", {k: (v * 1e30 if k != "steps" else v) for k, v in _reply(2).update.items()},
                     {**_reply(2).meta, "num_samples": 1e300})
    outcome = engine.run_round(0, start, _replies(**{"site-3": huge}))
    assert not outcome.accepted and outcome.model is start
    assert outcome.record["rejected"]["sites"] == ["site-3"] and "NaN/Inf" in outcome.record["rejected"]["reason"]
    assert engine.metrics["rounds"][0]["rejected"]["sites"] == ["site-3"]


def test_the_best_model_is_chosen_on_the_median_so_one_site_cannot_pick_it():
    engine = _engine()
    # version 0: the honest sites see 0.6; one site claims a perfect 1.0 (in range, so it is filed)
    engine.record_evaluation(0, {"site-1": {"val_auc": 0.6}, "site-2": {"val_auc": 0.6}, "site-3": {"val_auc": 1.0}})
    _, improved = engine.record_evaluation(1, {"site-1": {"val_auc": 0.8}, "site-2": {"val_auc": 0.8}, "site-3": {"val_auc": 0.0}})
    assert improved and engine.metrics["best"]["model_version"] == 1
    assert engine.metrics["best"]["median_val_auc"] == pytest.approx(0.8)


@pytest.mark.parametrize("aggregation", ["trimmed_mean", "clipped_fedavg", "median"])
@pytest.mark.parametrize("attack", ["site-4:scale=1000", "site-4:scale=-10", "site-4:samples=1e9", "site-4:nan", "site-4:metric=1e9"])
def test_each_attack_kind_is_rejected_or_bounded_by_the_robust_aggregators(attack, aggregation):
    """1 attacker of 5 sites, as in the issue's benchmark; trimmed_mean is the main jobs' default."""
    clean = _engine(aggregation).run_round(0, _global(), _replies()).model
    replies = _replies()
    update, meta = apply_attack(parse_attack(attack), replies["site-4"].update, replies["site-4"].meta)
    replies["site-4"] = SiteReply("WEIGHT_DIFF", update, meta)
    engine = _engine(aggregation)
    outcome = engine.run_round(0, _global(), replies)
    assert outcome.accepted and all(np.all(np.isfinite(v)) for v in outcome.model.values())
    keys = ["w", "b"]
    delta = {k: outcome.model[k] - clean[k] for k in keys}
    limit = 0.65 if (aggregation, attack) == ("clipped_fedavg", "site-4:scale=-10") else 0.35  # a flip subtracts 2 steps there
    assert update_norm(delta) <= limit * update_norm(clean, keys), attack  # the attacker moves the model little
    if attack.endswith(("nan", "metric=1e9")):  # rejected outright, and the attack is named
        assert "site-4" in outcome.record["failed"] and "simulated attack" in outcome.record["failed"]["site-4"]
    else:  # bounded; the attack is named in the round's site record
        assert outcome.record["sites"]["site-4"]["simulated_attack"] == parse_attack(attack).label
        bounded = {**outcome.record["aggregation"].get("clipped", {}), **outcome.record["aggregation"].get("capped", {})}
        assert "site-4" in bounded or aggregation != "clipped_fedavg"  # trimmed_mean / median ignore claimed counts


def test_engine_state_round_trips_through_json_and_npz_and_resumes_identically():
    uninterrupted, resumed = _engine(aggregation="trimmed_mean"), _engine(aggregation="trimmed_mean")
    model = _global()
    for r in range(3):
        model = uninterrupted.run_round(r, model, _replies()).model
    m = _global()
    m = resumed.run_round(0, m, _replies()).model
    doc, arrays = split_arrays({"engine": resumed.state_dict(), "model": m})
    restored = join_arrays(json.loads(json.dumps(doc)), arrays)
    fresh = _engine(aggregation="trimmed_mean")
    fresh.load_state_dict(restored["engine"])
    assert fresh.next_round == 1
    m = restored["model"]
    for r in range(fresh.next_round, 3):
        m = fresh.run_round(r, m, _replies()).model
    for k in model:
        np.testing.assert_allclose(m[k], model[k])
    assert fresh.metrics["rounds"] == uninterrupted.metrics["rounds"]
    assert [e["model_version"] for e in fresh.metrics["evaluations"]] == [0, 1, 2]


def test_state_of_another_job_is_refused():
    engine = _engine(num_rounds=3)
    state = _engine(num_rounds=5).state_dict()
    with pytest.raises(ValueError, match="5 rounds"):
        engine.load_state_dict(state)


def test_a_server_optimizer_runs_after_aggregation_and_its_state_resumes():
    spec = {"name": "fedadam", "args": {"lr": 0.05}}
    uninterrupted = RoundEngine(PlaintextAggregation({"name": "fedavg"}, spec), "job", "val_auc", 3, 2)
    plain = RoundEngine(PlaintextAggregation({"name": "fedavg"}), "job", "val_auc", 3, 2)
    model = uninterrupted.run_round(0, _global(), _replies()).model
    assert not np.allclose(model["w"], plain.run_round(0, _global(), _replies()).model["w"])  # fedadam is not fedavg
    doc, arrays = split_arrays(uninterrupted.state_dict())
    resumed = RoundEngine(PlaintextAggregation({"name": "fedavg"}, spec), "job", "val_auc", 3, 2)
    resumed.load_state_dict(join_arrays(json.loads(json.dumps(doc)), arrays))
    a = uninterrupted.run_round(1, model, _replies()).model
    b = resumed.run_round(1, model, _replies()).model
    np.testing.assert_allclose(a["w"], b["w"])  # the moments came back


def test_a_rejected_round_leaves_no_trace_in_the_server_optimizer():
    engine = RoundEngine(PlaintextAggregation({"name": "fedavg"}, {"name": "fedavgm"}), "job", "val_auc", 3, 2)
    huge = SiteReply("WEIGHT_DIFF", {k: (v * 1e30 if k != "steps" else v) for k, v in _reply(2).update.items()},
                     {**_reply(2).meta, "num_samples": 1e300})
    before = engine.step.state_dict()
    outcome = engine.run_round(0, _global(), _replies(**{"site-3": huge}))
    assert not outcome.accepted and engine.step.state_dict()["server_optimizer"]["steps"] == before["server_optimizer"]["steps"]


# ---- participation (issue 18) ---------------------------------------------------------------------

@pytest.mark.unit
def test_participation_counts_contributed_flagged_and_left_out_rounds_per_site():
    engine = _engine(aggregation="median", num_rounds=3)
    engine.step = PlaintextAggregation({"name": "median"}, num_sites=5)
    hostile = parse_attack("site-2:scale=-10")
    for r in range(3):
        replies = _replies()
        replies["site-2"] = SiteReply("WEIGHT_DIFF", *apply_attack(hostile, replies["site-2"].update, replies["site-2"].meta))
        errors = {}
        if r < 2:  # site-4 too slow in rounds 0 and 1
            del replies["site-4"]
            errors["site-4"] = "no answer before the task closed (timed out or disconnected)"
        if r == 2:  # site-5 reports an impossible AUC: refused
            replies["site-5"] = _reply(4, auc=7.0)
        engine.run_round(r, _global(), replies, errors)
    part = engine.metrics["participation"]
    assert part["site-2"]["rounds_contributed"] == 3 and part["site-2"]["rounds_flagged"] == 3
    assert part["site-2"]["flagged_as"]["bounded"] == 3 and part["site-2"]["flagged_as"]["outlier"] == 3
    assert part["site-4"] == {"rounds_contributed": 1, "rounds_flagged": 0, "rounds_left_out": 2, "flagged_as": {}}
    assert part["site-5"]["rounds_contributed"] == 2 and part["site-5"]["flagged_as"]["refused"] == 1
    assert part["site-1"]["rounds_flagged"] == 0 and part["site-1"]["rounds_contributed"] == 3
    line = engine.participation_line()
    assert line.startswith("flagged in most rounds: site-2 (3/3: bounded, outlier)") and "left out of most rounds: site-4 (2/3)" in line
    assert "site-1" not in line
    assert engine.metrics["rounds"][0]["left_out"] == ["site-4"]


@pytest.mark.unit
def test_a_step_with_a_stated_tolerance_stops_a_round_with_too_few_sites_for_it():
    engine = RoundEngine(PlaintextAggregation({"name": "median", "args": {"f": 2}}, num_sites=5), "job", "val_auc", 3, 2)
    assert engine.step.min_sites == 5 and engine.step.tolerance == 2
    replies = _replies()
    del replies["site-5"]
    with pytest.raises(RoundFailed, match=r"tolerates f=2 hostile site\(s\) and needs 5 contributing sites"):
        engine.run_round(0, _global(), replies, {"site-5": "no answer"})
    assert engine.metrics["participation"]["site-5"]["rounds_left_out"] == 1


@pytest.mark.unit
def test_the_plaintext_step_owns_create_send_save_and_restore_of_the_model(tmp_path):
    import torch

    from fedmed.rounds import WEIGHTS, PlaintextAggregation, StepContext

    reference = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.long)}
    context = StepContext(tmp_path, {}, {}, num_rounds=1, min_clients=1, reference_state=reference)
    step = PlaintextAggregation({"name": "fedavg"})
    model = step.create({"w": np.ones((2, 3), np.float32), "n": np.asarray(4)}, context)
    assert step.open_round(0, context) == {}
    kind, data, meta = step.send(model, {"round": 0})
    assert kind == WEIGHTS and data is model and meta == {"round": 0}
    assert step.save(model, tmp_path / "m.pt", context)
    saved = torch.load(tmp_path / "m.pt")
    assert saved["n"].dtype == torch.long and torch.equal(saved["w"], torch.ones(2, 3))  # int buffers stay int
    restored = step.restore(step.plaintext(model), context)
    assert np.array_equal(restored["w"], model["w"]) and step.settings()["aggregation"]["name"] == "fedavg"

