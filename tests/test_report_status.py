"""The report never looks better than the run: status first, the released version, external data, intervals."""

import json
import math

import pytest

from fedmed import report
from fedmed.report import stats
from test_report import _write_run


def _first_lines(run, n=3):
    return (run / "report" / "report.md").read_text().splitlines()[:n * 2]


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def _save_metrics(run, metrics):
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_an_interrupted_run_says_so_in_its_first_line(tmp_path):
    """simulate's INCOMPLETE marker and a metrics.json that never finished (3 of 20 rounds)."""
    run = _write_run(tmp_path / "run")
    metrics = _metrics(run)
    metrics.update(num_rounds=20, finished=False)
    _save_metrics(run, metrics)
    (run / "INCOMPLETE").write_text("this run has not finished\n")
    summary = report.build_report(run, log=lambda *_: None)
    lines = _first_lines(run)
    assert lines[0].startswith("# INCOMPLETE RUN: Federated training report")
    assert "this run did not finish" in lines[2] and "3 of 20 rounds" in lines[2] and "INCOMPLETE" in lines[2]
    assert "Released model" not in lines[3]  # an unfinished run released nothing
    assert summary["status"]["state"] == "incomplete"
    html = (run / "report" / "report.html").read_text()
    assert "<title>INCOMPLETE RUN: Federated training report" in html


def test_a_collapsed_run_says_failed_and_names_the_collapse(tmp_path):
    run = _write_run(tmp_path / "run")
    metrics = _metrics(run)
    reason = "collapse: no trained version beats the initial model (version 0, median over sites of validation val_auc 0.6100)"
    metrics.update(finished=False, error=f"release gate: {reason}; no model is released",
                   release={"action": "collapse", "version": None, "reason": reason})
    _save_metrics(run, metrics)
    summary = report.build_report(run, log=lambda *_: None)
    lines = _first_lines(run)
    assert lines[0].startswith("# FAILED RUN:")
    assert "this run failed" in lines[2] and "release gate: collapse" in lines[2]
    assert lines[3] == f"- Released model: **none**: {reason}."
    assert summary["status"]["state"] == "failed" and summary["release"]["action"] == "collapse"


def test_a_rolled_back_release_is_named_with_its_reason(tmp_path):
    run = _write_run(tmp_path / "run")
    metrics = _metrics(run)
    metrics.update(finished=True, release={
        "action": "rollback", "version": 2, "final_version": 3, "statistic": "median over sites of validation val_auc",
        "reason": "the final model (0.7000) scores 0.2000 below the best version 2 (0.9000), more than the tolerance 0.02"})
    _save_metrics(run, metrics)
    report.build_report(run, log=lambda *_: None)
    lines = _first_lines(run)
    assert lines[0].startswith("# Federated training report")
    assert lines[2] == "- Run status: finished."
    assert lines[3].startswith("- Released model: **version 2** of 3 (**rolled back** from the final model): the final model")


def test_a_download_whose_job_did_not_complete_is_a_failed_run(tmp_path):
    job = tmp_path / "download" / "abc123"
    run = _write_run(job / "workspace" / "app_server" / "fedmed")
    (job / "meta.json").write_text(json.dumps({"job_id": "abc123", "status": "FINISHED:EXECUTION_EXCEPTION"}))
    report.build_report(run, log=lambda *_: None)
    lines = _first_lines(run)
    assert lines[0].startswith("# FAILED RUN:") and "FINISHED:EXECUTION_EXCEPTION" in lines[2]


def test_external_data_present_but_not_evaluated_is_not_called_absent(tmp_path):
    run = _write_run(tmp_path / "run", with_external=False)
    (run / "external").mkdir()
    (run / "external" / "external-val.npz").write_bytes(b"")
    report.build_report(run, log=lambda *_: None)
    md = (run / "report" / "report.md").read_text()
    assert "no external hospital data" not in md
    assert "external hospital data is present (external-val) but was not evaluated in this run" in md
    (run / "external" / "external-val.npz").unlink()
    report.build_report(run, log=lambda *_: None)
    assert "this run has no external hospital data" in (run / "report" / "report.md").read_text()


@pytest.mark.unit
def test_wilson_interval_matches_the_textbook_values():
    low, high = stats.wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and round(high, 3) == 0.278
    assert stats.wilson_interval(2, 2)[0] < 0.35  # 2 of 2 is no proof of a perfect model
    with pytest.raises(ValueError, match="n > 0"):
        stats.wilson_interval(0, 0)


@pytest.mark.unit
def test_hanley_mcneil_se_and_the_fragility_of_few_images():
    assert stats.hanley_mcneil_se(0.9, 100, 100) == pytest.approx(0.02263, abs=1e-5)
    assert math.isinf(stats.hanley_mcneil_se(0.9, 0, 50))
    perfect_on_two = stats.auc_estimate(1.0, 60, 2)  # "AUC 1.000" resting on 2 normal images
    assert perfect_on_two.low < 0.75 and perfect_on_two.high == 1.0
    assert stats.auc_estimate(1.0, 500, 500).low > 0.99


@pytest.mark.unit
def test_accuracy_at_threshold_counts_calls_from_the_histogram():
    hist = [[0] * 10, [0] * 10]
    hist[0][2], hist[0][6] = 8, 2  # 10 normals, 2 scored 0.6-0.7
    hist[1][8], hist[1][4] = 15, 5  # 20 positives, 5 scored 0.4-0.5
    assert stats.accuracy_at_threshold(hist, 0.5) == (8 + 15, 30, 20, 10)
    assert stats.accuracy_at_threshold(hist, 0.4) == (8 + 20, 30, 20, 10)
    assert stats.accuracy_at_threshold(hist, 0.7) == (10 + 15, 30, 20, 10)
    with pytest.raises(ValueError, match="two equal-length lists"):
        stats.accuracy_at_threshold([[1, 2]], 0.5)


@pytest.mark.unit
def test_a_difference_inside_the_intervals_is_not_supported():
    big_a, big_b = stats.auc_estimate(0.95, 200, 200), stats.auc_estimate(0.90, 200, 200)
    assert stats.supported_difference(big_a, big_b) == 1 and stats.supported_difference(big_b, big_a) == -1
    small_a, small_b = stats.auc_estimate(0.95, 10, 3), stats.auc_estimate(0.90, 10, 3)
    assert stats.supported_difference(small_a, small_b) == 0


@pytest.mark.unit
def test_the_report_modules_do_not_import_each_other_in_a_cycle():
    import ast
    from pathlib import Path

    folder = Path(report.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedmed.report."):
                names.add(node.module.rsplit(".", 1)[1])
        imports[path.stem] = names

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in imports.get(start, ()))

    assert not [m for m in imports if m != "__init__" and reaches(m, m)]
