"""The report's first screen names hospitals flagged or left out in most rounds (metrics.json participation, issue 18)."""

import json

import pytest

from fedmed import report
from fedmed.report.participation import participation_lines
from test_report import _section, _write_run


def test_the_report_names_flagged_and_absent_hospitals_right_after_the_verdict(tmp_path):
    run = _write_run(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["participation"] = {
        "site-1": {"rounds_contributed": 3, "rounds_flagged": 0, "rounds_left_out": 0, "flagged_as": {}},
        "site-2": {"rounds_contributed": 3, "rounds_flagged": 3, "rounds_left_out": 0, "flagged_as": {"bounded": 3, "outlier": 2}},
        "site-3": {"rounds_contributed": 1, "rounds_flagged": 0, "rounds_left_out": 2, "flagged_as": {}},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    summary = report.build_report(run, log=lambda *_: None)
    md = (run / "report" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Who took part") < md.index("## External hospitals")
    text = _section(md, "Who took part")
    assert "**site-2** was flagged in 3 of 3 rounds: update scaled down to the norm bound (3), far from the other" in text
    assert "**site-3** was left out of 2 of 3 rounds" in text and "contributed to 1" in text
    assert "site-1" not in text
    assert summary["participation"]["rounds"] == 3


@pytest.mark.unit
def test_a_clean_run_says_so_in_one_line_and_a_run_without_participation_shows_nothing():
    assert participation_lines({}, 3) == []  # an older metrics.json: no section
    clean = {s: {"rounds_contributed": 3, "rounds_flagged": 1, "rounds_left_out": 1, "flagged_as": {"outlier": 1}}
             for s in ("site-1", "site-2", "site-3")}
    assert participation_lines(clean, 3) == ["Every hospital took part in most of the 3 rounds and none was flagged in most of them."]
