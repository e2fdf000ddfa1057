"""Report: EXAM-style arithmetic on a hand-built matrix, files written, HTML self-contained and link-safe."""

import json

import numpy as np
import pytest

from fedmed import provenance, report
from fedmed.cli import main as cli_main
from report_checks import check_report_links

SITES = ["site-1", "site-2", "site-3"]
# hand-built AUCs: federated model, each site's last local model (cross-site), local-only baselines, pooled
GLOBAL = {"site-1": 0.90, "site-2": 0.80, "site-3": 0.85}
LOCAL_ONLY = {
    "site-1": {"site-1": 0.80, "site-2": 0.60, "site-3": 0.70},
    "site-2": {"site-1": 0.50, "site-2": 0.75, "site-3": 0.65},
    "site-3": {"site-1": 0.70, "site-2": 0.70, "site-3": 0.85},
}
POOLED = {"site-1": 0.91, "site-2": 0.82, "site-3": 0.86}


def _cell(auc):
    return {"val_auc": auc, "val_accuracy": auc - 0.1, "val_loss": 1 - auc, "num_val_samples": 20}


def _write_run(folder, with_baselines=True, with_card=True):
    folder.mkdir(parents=True, exist_ok=True)
    cross = {
        "format": "fedmed-cross-site/1",
        "sites": SITES,
        "models": {"global_model": {"kind": "global"}, **{s: {"kind": "local", "site": s} for s in SITES}},
        "results": {
            "global_model": {s: _cell(v) for s, v in GLOBAL.items()},
            **{s: {t: _cell(GLOBAL[t] - 0.02) for t in SITES} for s in SITES},
        },
    }
    (folder / "cross_site.json").write_text(json.dumps(cross))
    if with_baselines:
        baselines = {
            "format": "fedmed-baselines/1",
            "sites": SITES,
            "budget": {"rounds": 2, "local_epochs": 1, "epochs": 2},
            "models": {
                **{f"local-only:{s}": {"kind": "local_only", "site": s} for s in SITES},
                "pooled": {"kind": "pooled"},
            },
            "results": {
                **{f"local-only:{s}": {t: _cell(v) for t, v in row.items()} for s, row in LOCAL_ONLY.items()},
                "pooled": {s: _cell(v) for s, v in POOLED.items()},
            },
            "pooled_validation": {
                "num_val_samples": 60,
                "results": {"global_model": _cell(0.87), "pooled": _cell(0.88), **{f"local-only:{s}": _cell(0.7) for s in SITES}},
            },
        }
        (folder / "baselines.json").write_text(json.dumps(baselines))
    # the FedAvg controller's layout: training metrics per round, global-model evaluations per version
    metrics = {
        "rounds": [
            {"round": r, "contributors": SITES, "sites": {s: {"num_samples": 10, "train_loss": 0.7 - 0.1 * r} for s in SITES}}
            for r in range(3)
        ],
        "evaluations": [
            {"model_version": v, "sites": {s: _cell(0.6 + 0.1 * v + 0.01 * i) for i, s in enumerate(SITES)}}
            for v in range(4)
        ],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if with_card:
        rec = provenance.ProvenanceRecorder(job="cxr_pneumonia_fedavg", network={"name": "small_cnn", "args": {}})
        rec.record_initial_model({"w": np.zeros(3, np.float32)})
        for r in range(3):
            rec.record_round(r, {"w": np.full(3, r + 1, np.float32)}, [{"site": s, "num_samples": 10 * (i + 1)} for i, s in enumerate(SITES)])
        for s in SITES:
            rec.set_site(s, num_val_samples=20, privacy_scope="standard")
        rec.write(folder / "provenance.json")
    return folder


def test_exam_figures_match_hand_computation():
    matrix = {"global_model": {s: _cell(v) for s, v in GLOBAL.items()}}
    matrix.update({f"L{s}": {t: _cell(v) for t, v in row.items()} for s, row in LOCAL_ONLY.items()})
    figures = report.exam_figures(matrix, SITES, {s: f"L{s}" for s in SITES})
    # own data: fed (0.90, 0.80, 0.85) vs local (0.80, 0.75, 0.85)
    assert figures["federated_own_mean"] == pytest.approx(0.85)
    assert figures["local_own_mean"] == pytest.approx(0.80)
    assert figures["mean_own_gain"] == pytest.approx(0.05)
    assert figures["relative_own_gain"] == pytest.approx(0.05 / 0.80)
    assert figures["sites_where_federated_wins"] == 2
    # generalizability: local_1 on (2,3) = 0.65, local_2 on (1,3) = 0.575, local_3 on (1,2) = 0.70
    assert figures["local_generalizability"] == pytest.approx((0.65 + 0.575 + 0.70) / 3)
    # federated on the others of 1: (0.80+0.85)/2, of 2: (0.90+0.85)/2, of 3: (0.90+0.80)/2
    fed_gen = (0.825 + 0.875 + 0.85) / 3
    assert figures["federated_generalizability"] == pytest.approx(fed_gen)
    assert figures["generalizability_gain"] == pytest.approx(fed_gen - (0.65 + 0.575 + 0.70) / 3)
    site2 = figures["per_site"][1]
    assert site2["local_others"] == pytest.approx(0.575) and site2["own_gain"] == pytest.approx(0.05)


def test_exam_figures_name_the_missing_cell():
    matrix = {"global_model": {s: _cell(v) for s, v in GLOBAL.items()}, "L": {"site-1": _cell(0.5)}}
    with pytest.raises(report.ReportError, match="model 'L' on site 'site-2'"):
        report.exam_figures(matrix, ["site-1", "site-2"], {"site-1": "L", "site-2": "L"})


def test_learning_curves_read_training_rounds_and_global_model_evaluations():
    doc = {
        "rounds": [
            {"round": 1, "sites": {"a": {"train_loss": 0.3}, "b": {"train_loss": 0.4}}},
            {"round": 0, "sites": {"a": {"train_loss": 0.5}}},
        ],
        "evaluations": [
            {"model_version": 2, "sites": {"a": {"val_auc": 0.8}}},
            {"model_version": 0, "sites": {"a": {"val_auc": 0.5}, "b": {"val_auc": 0.55}}},
        ],
    }
    curves = report.learning_curves(doc)
    assert curves["a"]["train_loss"] == {"x": [0.0, 1.0], "y": [0.5, 0.3]}
    assert curves["a"]["val_auc"] == {"x": [0.0, 2.0], "y": [0.5, 0.8]}
    assert curves["b"]["val_auc"]["y"] == [0.55]
    with pytest.raises(report.ReportError, match=r"evaluations\[0\] has no 'sites'"):
        report.learning_curves({"evaluations": [{"model_version": 0}]})
    with pytest.raises(report.ReportError, match="'rounds' and/or 'evaluations'"):
        report.learning_curves({"something": 1})


def test_report_files_exist_and_html_is_self_contained(tmp_path):
    run = _write_run(tmp_path / "run")
    summary = report.build_report(run, log=lambda *_: None)
    out = run / "report"
    plots = report.plot_files("val_auc")
    assert "cross_site_auc.png" in plots
    for name in ("report.md", "report.html", "report.json", *plots):
        assert (out / name).is_file(), name
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".report.*")), "temporary report folder left behind"

    images, files = check_report_links(out)
    assert images == len(plots) and "../provenance.json" in files

    # the numbers in the report are the EXAM numbers of the local-only baselines
    exam = summary["exam"]
    assert exam["local_own_mean"] == pytest.approx(0.80) and exam["mean_own_gain"] == pytest.approx(0.05)
    md = (out / "report.md").read_text()
    assert "local-only baselines" in md and "+0.0500" in md and "+6.3%" in md
    assert "intact" in md and "site-3" in md
    assert "every model on all sites' validation images together (60 images" in md
    assert "| federated (global) | 0.8700 | 0.7700 | 0.1300 |" in md and "| site-2 (local only) | 0.7000 |" in md
    assert summary["pooled_validation"]["results"]["pooled"]["val_auc"] == 0.88
    pooled = [r for r in summary["comparison"] if r["site"] == "mean"][0]["pooled"]
    assert pooled == pytest.approx(np.mean(list(POOLED.values())))
    assert json.loads((out / "report.json").read_text())["exam"]["metric"] == "val_auc"


def test_report_without_baselines_uses_last_local_models_and_says_so(tmp_path):
    run = _write_run(tmp_path / "run", with_baselines=False, with_card=False)
    summary = report.build_report(run, log=lambda *_: None)
    assert summary["exam"]["mean_own_gain"] == pytest.approx(0.02)
    md = (run / "report" / "report.md").read_text()
    assert "last-round local model" in md and "No provenance card" in md


def _as_segmentation(value):
    """The same run as a segmentation job reports it: val_dice instead of val_auc, no accuracy."""
    if isinstance(value, dict):
        return {("val_dice" if k == "val_auc" else k): _as_segmentation(v) for k, v in value.items() if k != "val_accuracy"}
    if isinstance(value, list):
        return [_as_segmentation(v) for v in value]
    return value


def test_dice_report_names_the_cross_site_heatmap_after_its_metric(tmp_path):
    run = _write_run(tmp_path / "run", with_card=False)
    for name in ("cross_site.json", "baselines.json", "metrics.json"):
        (run / name).write_text(json.dumps(_as_segmentation(json.loads((run / name).read_text()))))
    summary = report.build_report(run, log=lambda *_: None)
    out = run / "report"
    assert summary["metric"] == "val_dice" and summary["exam"]["metric"] == "val_dice"
    assert report.cross_site_plot("val_dice") == "cross_site_dice.png"
    assert "cross_site_dice.png" in summary["plots"] and "cross_site_auc.png" not in summary["plots"]
    assert (out / "cross_site_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "cross_site_auc.png").exists()
    assert sorted(summary["plots"]) == sorted(report.plot_files("val_dice"))
    md = (out / "report.md").read_text()
    assert "](cross_site_dice.png)" in md and "cross_site_auc" not in md
    _, files = check_report_links(out)
    assert "cross_site_dice.png" in files and "cross_site_auc.png" not in files


def test_report_marks_a_tampered_card_and_rebuilding_replaces_old_report(tmp_path):
    run = _write_run(tmp_path / "run")
    report.build_report(run, log=lambda *_: None)
    (run / "report" / "stale.txt").write_text("old")
    card = json.loads((run / "provenance.json").read_text())
    card["chain"][2]["contributors"][0]["num_samples"] = 999
    (run / "provenance.json").write_text(json.dumps(card))
    report.build_report(run, log=lambda *_: None)
    assert not (run / "report" / "stale.txt").exists()
    md = (run / "report" / "report.md").read_text()
    assert "BROKEN" in md and "record 2" in md


def test_cli_builds_report_from_downloaded_job_result_layout(tmp_path, capsys):
    downloaded = tmp_path / "job-result"
    _write_run(downloaded / "4f1c" / "workspace" / "app_server" / "fedmed")
    assert cli_main(["report", str(downloaded), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "plot 1/4" in capsys.readouterr().out


def test_cli_names_folder_without_inputs_and_bad_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    assert "holds none of metrics.json" in capsys.readouterr().err
    run = tmp_path / "bad"
    run.mkdir()
    (run / "cross_site.json").write_text("{")
    assert cli_main(["report", str(run)]) == 2
    assert "cross_site.json could not be read as JSON" in capsys.readouterr().err
    (run / "cross_site.json").write_text(json.dumps({"sites": []}))
    assert cli_main(["report", str(run)]) == 2
    assert "key 'results'" in capsys.readouterr().err
    assert not (run / "report").exists()


def test_report_names_missing_local_models_when_a_site_refused_to_share(tmp_path):
    """Under a dp scope a site refuses submit_model; the report shows why cells are missing."""
    run = _write_run(tmp_path / "run", with_baselines=False, with_card=False)
    doc = json.loads((run / "cross_site.json").read_text())
    del doc["results"]["site-2"], doc["models"]["site-2"]
    doc["errors"] = {"submit_model": {"site-2": "site site-2: dp scope releases only noised weight differences"}}
    (run / "cross_site.json").write_text(json.dumps(doc))
    summary = report.build_report(run, log=lambda *_: None)
    assert "exam" not in summary
    md = (run / "report" / "report.md").read_text()
    assert "EXAM-style figures not available: site 'site-2' has no local model" in md
    assert "submit_model / site-2: site site-2: dp scope releases only noised weight differences" in md
    assert (run / "report" / "cross_site_auc.png").is_file() and not (run / "report" / "exam.png").exists()
