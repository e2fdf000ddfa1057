"""The job progress the controller reports to `python -m fedmed watch` (fedmed.progress), from round records."""

import pytest

from fedmed.progress import eta_seconds, final_summary, job_progress, progress_line

pytestmark = pytest.mark.unit


def _metrics():
    sites = ["h-1", "h-2", "h-3"]
    rounds = [
        {"round": 0, "contributors": sites, "failed": {}, "aggregation": {"clipped": {"h-2": {"scale": 0.1}}}},
        {"round": 1, "contributors": ["h-1", "h-2"], "failed": {"h-3": "no answer"}, "left_out": ["h-3"],
         "aggregation": {"clipped": {"h-2": {"scale": 0.2}}}},
        {"round": 2, "contributors": ["h-1", "h-2"], "failed": {"h-3": "no answer"}, "left_out": ["h-3"],
         "aggregation": {}},
    ]
    evaluations = [{"median_val_auc": 0.5}, {"median_val_auc": 0.71}, {"median_val_auc": 0.8}, {"median_val_auc": 0.845}]
    return {"key_metric": "val_auc", "num_rounds": 6, "sites": sites, "rounds": rounds, "evaluations": evaluations}


def test_progress_counts_contributed_flagged_and_left_out_rounds_per_site():
    progress = job_progress(_metrics(), elapsed_s=90)
    assert progress["rounds_completed"] == 3 and progress["num_rounds"] == 6
    h2, h3 = progress["participation"]["h-2"], progress["participation"]["h-3"]
    assert (h2["rounds_contributed"], h2["rounds_flagged"], h2["rounds_left_out"]) == (3, 2, 0)
    assert (h3["rounds_contributed"], h3["rounds_flagged"], h3["rounds_left_out"]) == (1, 0, 2)
    assert progress["median_val_auc"] == 0.845
    assert progress["last_round"]["answered"] == ["h-1", "h-2"]


def test_progress_prefers_the_engines_own_participation_record():
    metrics = _metrics()
    metrics["participation"] = {"h-1": {"rounds_contributed": 3, "rounds_flagged": 0, "rounds_left_out": 0}}
    assert job_progress(metrics, 1)["participation"] == metrics["participation"]


def test_a_site_left_out_of_every_round_still_counts_among_the_sites():
    metrics = {"num_rounds": 3, "sites": ["a", "b"], "rounds": [
        {"round": 0, "contributors": ["a", "b"], "failed": {"c": "no answer"}, "left_out": ["c"]}]}
    line = progress_line(job_progress(metrics, 5))
    assert "2 of 3 site(s) answered (left out: c)" in line


def test_eta_follows_the_pace_of_completed_rounds_and_is_unknown_before_the_first():
    assert eta_seconds(job_progress(_metrics(), elapsed_s=90)) == pytest.approx(90)
    empty = job_progress({"num_rounds": 5, "rounds": []}, elapsed_s=10)
    assert eta_seconds(empty) is None and "ETA ?" in progress_line(empty)


def test_progress_line_names_left_out_and_flagged_sites_and_the_median_metric():
    metrics = _metrics()
    metrics["rounds"][-1]["aggregation"] = {"clipped": {"h-2": {}}}
    line = progress_line(job_progress(metrics, elapsed_s=90))
    assert line.startswith("round 3/6: 2 of 3 site(s) answered (left out: h-3)")
    assert "flagged: h-2" in line and "median val_auc 0.845" in line and "1m30s elapsed, ETA 1m30s" in line


def test_final_summary_names_sites_flagged_or_left_out_in_most_rounds_only():
    summary = final_summary(job_progress(_metrics(), elapsed_s=90))
    assert "flagged in most rounds: h-2 (2/3: bounded)" in summary and "left out of most rounds: h-3 (2/3)" in summary
    assert "h-1" not in summary
    clean = {"num_rounds": 2, "sites": ["a"], "rounds": [{"round": 0, "contributors": ["a"]}]}
    assert final_summary(job_progress(clean, 1)) == ""
