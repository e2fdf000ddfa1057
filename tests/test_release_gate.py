"""The release gate's rule (fedmed.release): pure, milliseconds."""

import pytest

from fedmed.release import (
    COLLAPSE,
    DEFAULT_RELEASE_TOLERANCE,
    FINAL,
    ROLLBACK,
    UNCHECKED,
    ReleaseError,
    decide_release,
    released_evaluation,
    version_scores,
)

pytestmark = pytest.mark.unit


def _evaluations(*medians, key="val_auc"):
    """One evaluation per model version 0, 1, ... with the given median (None: no median)."""
    return [{"model_version": v, "after_round": v - 1, "sites": {}, f"median_{key}": m} for v, m in enumerate(medians)]


def test_final_model_within_the_tolerance_of_the_best_is_released():
    decision = decide_release(_evaluations(0.5, 0.90, 0.95, 0.94), "val_auc", 3, tolerance=0.02)
    assert (decision.action, decision.version, decision.best_version) == (FINAL, 3, 2)
    assert decision.initial == 0.5 and decision.best == 0.95 and decision.final == 0.94
    assert "within 0.02 of the best version 2" in decision.reason


def test_final_model_exactly_at_the_tolerance_is_released_and_one_step_past_it_is_rolled_back():
    at = decide_release(_evaluations(0.5, 0.90, 0.88), "val_auc", 2, tolerance=0.02)  # 0.90 - 0.88 == 0.02 (in floats: a hair more)
    assert (at.action, at.version) == (FINAL, 2)
    past = decide_release(_evaluations(0.5, 0.90, 0.8799), "val_auc", 2, tolerance=0.02)
    assert (past.action, past.version) == (ROLLBACK, 1)
    assert "more than the tolerance 0.02" in past.reason and "rolled back to version 1" in past.reason


def test_tolerance_zero_releases_only_the_best():
    assert decide_release(_evaluations(0.5, 0.9, 0.9), "val_auc", 2, tolerance=0.0).version == 2  # ties count as the best
    assert decide_release(_evaluations(0.5, 0.9, 0.8999), "val_auc", 2, tolerance=0.0).version == 1


def test_final_model_below_the_initial_model_is_rolled_back_whatever_the_tolerance():
    decision = decide_release(_evaluations(0.60, 0.70, 0.55), "val_auc", 2, tolerance=0.5)
    assert (decision.action, decision.version) == (ROLLBACK, 1)
    assert "below the initial model" in decision.reason


def test_no_trained_version_better_than_the_initial_model_is_a_collapse():
    decision = decide_release(_evaluations(0.60, 0.55, 0.50, 0.60), "val_auc", 3)
    assert decision.action == COLLAPSE and decision.version is None and not decision.released
    assert decision.best_version == 0
    assert "collapse: no trained version beats the initial model" in decision.reason
    assert "version 0" in decision.reason and "NOT RELEASED" in decision.status_line()


def test_a_tie_with_the_initial_model_is_a_collapse_except_at_a_perfect_score():
    assert decide_release(_evaluations(0.5, 0.5, 0.5), "val_auc", 2).action == COLLAPSE  # constant calls: AUC 0.5
    perfect = decide_release(_evaluations(1.0, 0.9, 1.0), "val_auc", 2)
    assert (perfect.action, perfect.version) == (FINAL, 2)
    assert decide_release(_evaluations(1.0, 0.9, 0.95), "val_auc", 2).action == COLLAPSE


def test_a_trained_version_one_step_above_the_initial_model_is_no_collapse():
    decision = decide_release(_evaluations(0.60, 0.6001, 0.50), "val_auc", 2)
    assert (decision.action, decision.version) == (ROLLBACK, 1)


def test_final_model_not_validated_rolls_back_to_the_best_validated_version():
    decision = decide_release(_evaluations(0.5, 0.8, 0.9), "val_auc", 3)  # version 3 has no evaluation
    assert (decision.action, decision.version) == (ROLLBACK, 2)
    assert "was not validated" in decision.reason


def test_no_scores_at_all_release_the_final_model_unchecked():
    decision = decide_release(_evaluations(None, None), "val_dice", 1)
    assert (decision.action, decision.version) == (UNCHECKED, 1)
    assert "could not check" in decision.reason


def test_initial_model_not_validated_compares_with_the_best_only():
    evaluations = _evaluations(None, 0.7, 0.9)
    assert decide_release(evaluations, "val_auc", 2).action == FINAL
    assert decide_release(_evaluations(None, 0.9, 0.7), "val_auc", 2).version == 1


def test_a_later_evaluation_of_a_version_wins_and_junk_is_ignored():
    evaluations = _evaluations(0.5, 0.6) + [{"model_version": 1, "median_val_auc": 0.8}, {"model_version": "x"}, "junk",
                                            {"model_version": 2, "median_val_auc": float("nan")}]
    assert version_scores(evaluations, "val_auc") == {0: 0.5, 1: 0.8, 2: None}
    assert released_evaluation(evaluations, 1) == {"model_version": 1, "median_val_auc": 0.8}


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"), "0.02", True, None])
def test_a_bad_tolerance_is_refused_naming_the_setting(bad):
    with pytest.raises(ReleaseError, match="release_tolerance must be a finite number >= 0"):
        decide_release(_evaluations(0.5, 0.9), "val_auc", 1, tolerance=bad)


def test_decision_is_json_ready_and_names_the_statistic():
    import json

    block = decide_release(_evaluations(0.5, 0.9), "val_auc", 1).as_dict()
    assert json.loads(json.dumps(block)) == block
    assert block["statistic"] == "median over sites of validation val_auc"
    assert block["tolerance"] == DEFAULT_RELEASE_TOLERANCE


def test_on_collapse_initial_releases_version_0_saying_so_and_a_bad_value_is_refused():
    from fedmed.release import ROLLBACK, check_on_collapse

    evaluations = [{"model_version": 0, "median_val_auc": 0.59}, {"model_version": 1, "median_val_auc": 0.43}]
    assert decide_release(evaluations, "val_auc", 1).action == "collapse"
    decision = decide_release(evaluations, "val_auc", 1, on_collapse="initial")
    assert decision.action == ROLLBACK and decision.version == 0 and decision.released
    assert "collapse" in decision.reason and "INITIAL (untrained) model" in decision.reason
    with pytest.raises(ReleaseError, match="release_on_collapse must be one of 'fail', 'initial'"):
        check_on_collapse("ignore")
