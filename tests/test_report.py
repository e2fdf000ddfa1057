"""Report: EXAM-style arithmetic on a hand-built matrix, files written, HTML self-contained and link-safe."""

import json
import re

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


# per site: (normal, pneumonia) validation images; site-2 holds 2 normal images
CLASS_COUNTS = {"site-1": (100, 100), "site-2": (2, 60), "site-3": (50, 50)}


def _histogram(site, wrong=0.0):
    """A score histogram (100 bins): normals at 0.1, pneumonia at 0.9, a fraction ``wrong`` of each class on the
    wrong side of 0.5."""
    neg, pos = CLASS_COUNTS[site]
    hist = [[0] * 100, [0] * 100]
    hist[0][10], hist[0][90] = neg - round(neg * wrong), round(neg * wrong)
    hist[1][90], hist[1][10] = pos - round(pos * wrong), round(pos * wrong)
    return hist


# the fraction of wrong calls at the 0.5 threshold: site-3's local model is more accurate there than the federation
WRONG = {"global_model": {"site-1": 0.05, "site-2": 0.0, "site-3": 0.2},
         "local-only": {"site-1": 0.15, "site-2": 0.0, "site-3": 0.0}}


def _hist_cell(auc, model, site):
    return {**_cell(auc), "num_val_samples": sum(CLASS_COUNTS[site]), "val_score_histogram": _histogram(site, WRONG[model][site])}


# hand-built AUCs on the external hospital no site held: federated, local-only per site, pooled
EXTERNAL = {"global_model": 0.88, "best_global_model": 0.87, "pooled": 0.90,
            "local-only:site-1": 0.70, "local-only:site-2": 0.90, "local-only:site-3": 0.86}


def _external_figures(auc):
    return {"auc": auc, "accuracy": auc - 0.05, "threshold": 0.5, "num_images": 40, "images_per_class": [20, 20]}


def _write_run(folder, with_baselines=True, with_card=True, with_external=True):
    folder.mkdir(parents=True, exist_ok=True)
    cross = {
        "format": "fedmed-cross-site/1",
        "sites": SITES,
        "models": {"global_model": {"kind": "global"}, **{s: {"kind": "local", "site": s} for s in SITES}},
        "results": {
            "global_model": {s: _hist_cell(v, "global_model", s) for s, v in GLOBAL.items()},
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
                **{f"local-only:{s}": {"kind": "local_only", "site": s, "decision_threshold": {"threshold": 0.5}} for s in SITES},
                "pooled": {"kind": "pooled"},
            },
            "results": {
                **{f"local-only:{s}": {t: _hist_cell(v, "local-only", t) if t == s else _cell(v) for t, v in row.items()}
                   for s, row in LOCAL_ONLY.items()},
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
    if with_external:
        shown = {m: v for m, v in EXTERNAL.items() if with_baselines or not (m == "pooled" or m.startswith("local-only:"))}
        metrics["decision_threshold"] = {"class": "pneumonia", "threshold": 0.5, "method": "youden_j_on_site_validation"}
        metrics["external"] = {
            "what": "models evaluated on hospitals no site trained on, validated on or selected with",
            "decision_threshold": 0.5,
            "sets": {"external-val": {"file": "external/external-val.npz", "num_images": 40}},
            "results": {"external-val": {m: _external_figures(v) for m, v in shown.items()}},
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
        return {("val_dice" if k == "val_auc" else k): _as_segmentation(v) for k, v in value.items()
                if k not in ("val_accuracy", "val_score_histogram")}
    if isinstance(value, list):
        return [_as_segmentation(v) for v in value]
    return value


def test_dice_report_names_the_cross_site_heatmap_after_its_metric(tmp_path):
    run = _write_run(tmp_path / "run", with_card=False, with_external=False)
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
    verdict_text = _section(md, "Verdict")
    assert "Dice (0 = no overlap with the reference outline, 1 = perfect)" in verdict_text
    assert "no external hospital data" in verdict_text and "site-2 **gains on its own images" not in verdict_text
    assert ("site-1 is **better off in the federation**: Dice 0.900 vs 0.800 alone (no interval: the run kept no class "
            "counts) on its own images.") in verdict_text
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
    assert "empty is not a job result" in capsys.readouterr().err  # the CLI resolves the folder first
    with pytest.raises(report.ReportError, match="holds none of metrics.json"):
        report.build_report(tmp_path / "empty", log=lambda *_: None)
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


def _section(md, title):
    """The text of one ``## title`` section of report.md."""
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 3)
    return md[start:end if end >= 0 else None]


def test_verdict_opens_the_report_and_names_each_hospital(tmp_path):
    run = _write_run(tmp_path / "run")
    summary = report.build_report(run, log=lambda *_: None)
    md = (run / "report" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## External hospitals") < md.index("## Gains in detail")
    text = _section(md, "Verdict")
    # external data: the released model against the hospitals alone and the pooled model
    assert "AUC (0.5 = chance, 1 = perfect)" in text and text.count("0.5 = chance") == 1
    assert "external-val, 40 images" in text and "AUC 0.880 and accuracy 0.830" in text
    assert "AUC 0.700 (site-1) to 0.900 (site-2)" in text and "beats 2 of 3" in text
    assert "pooled in one place" in text and "AUC 0.900" in text
    # every hospital by name, with its outcome: AUC and accuracy at the threshold, intervals and sample sizes
    assert ("site-1 is **better off in the federation**: AUC 0.900 [0.856-0.944] vs 0.800 [0.739-0.861] alone on its "
            "own images (n=200: 100 positive, 100 negative); accuracy 0.950 [0.910-0.973] at the federation's threshold "
            "(0.500) vs 0.850 [0.794-0.893] alone at its own (0.500); AUC 0.880 [0.770-0.990] vs 0.700 [0.537-0.863] "
            "alone on external-val (n=40: 20 positive, 20 negative).") in text
    # 2 normal images: +0.05 AUC on its own data is not called a gain
    assert "site-2 shows **no difference these images can establish**" in text and "60 positive, 2 negative" in text
    assert "Only 2 images of one class" in text
    # same AUC, but its local model is more accurate at its threshold (1.000 vs 0.800 on 100 images)
    assert "site-3 is **better off alone**" in text and "0.800 [0.711-0.867] at the federation's threshold" in text
    assert ("**In short**: 1 of 3 hospitals are better off in the federation (site-1); 1 shows no difference its images "
            "can establish; 1 is better off alone.") in text
    # plain words: no field names, no hashes
    assert "val_auc" not in text and "generalizability" not in text.lower()
    assert not re.search(r"[0-9a-f]{16}", text)
    outcomes = {h["site"]: h["outcome"] for h in summary["verdict"]["hospitals"]}
    assert outcomes == {"site-1": "better", "site-2": "unclear", "site-3": "worse"}
    site3 = next(h for h in summary["verdict"]["hospitals"] if h["site"] == "site-3")
    assert site3["alone_accuracy"]["value"] == 1.0 and site3["federated_accuracy"]["n"] == 100
    assert site3["comparisons"] == {"its own images (AUC)": 0, "its own images (accuracy)": -1, "external-val (AUC)": 0}
    html_text = (run / "report" / "report.html").read_text()
    assert "<li>site-1 is <strong>better off in the federation</strong>" in html_text


@pytest.mark.unit
def test_verdict_outcome_rules():
    v = report.compute._compare
    assert v([1, 1]) == "better" and v([-1, 0]) == "worse" and v([1, -1]) == "mixed"
    assert v([0, 0, None]) == "unclear" and v([0, 1]) == "better" and v([None, None]) == "unknown"


def test_without_baselines_no_pooled_column_and_local_is_not_called_local_only(tmp_path):
    run = _write_run(tmp_path / "run", with_baselines=False, with_card=False)
    summary = report.build_report(run, log=lambda *_: None)
    md = (run / "report" / "report.md").read_text()
    text = _section(md, "Verdict")
    for site in SITES:
        assert f"{site}: the federated model has AUC" in text
    assert "cannot be said from this run" in text and "--baselines" in text
    assert "There is no model trained by one hospital alone, nor one on pooled data" in text
    assert {h["outcome"] for h in summary["verdict"]["hospitals"]} == {"unknown"}
    # no pooled model: no pooled column, no pooled in the section title, the legend or the rows
    assert "## Federated vs federated + 1 round at each site\n" in md and "vs pooled" not in md
    comparison = _section(md, "Federated vs federated + 1 round at each site")
    assert "| site | federated | federated + 1 round at site (not local-only) |" in comparison
    assert "pooled (all data in one place)" not in md
    assert all("pooled" not in row for row in summary["comparison"])
    data = report.load_run(run)
    fig = report.plot_comparison(data, "val_auc", tmp_path / "c.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["federated", "federated + 1 round at site (not local-only)"]
    # the cross-site local models are labelled for what they are, never as local-only
    assert "| site-1: federated + 1 round at site |" in md
    assert "local only" not in md and "(last local)" not in md


def test_pooled_column_present_with_baselines(tmp_path):
    run = _write_run(tmp_path / "run", with_card=False)
    report.build_report(run, log=lambda *_: None)
    md = (run / "report" / "report.md").read_text()
    comparison = _section(md, "Federated vs local-only vs pooled")
    assert "| site | federated | local only | pooled (all data in one place) |" in comparison
    assert "| mean over sites (each counts once) | 0.8500 | 0.8000 |" in comparison


def test_heatmap_scale_is_fixed_for_auc_and_dice(tmp_path):
    assert report.heatmap_scale("val_auc") == (0.5, 1.0) == report.heatmap_scale("val_dice", [0.998, 0.999, 1.0])
    assert report.heatmap_scale("val_accuracy", [0.2, 0.6]) == (0.2, 0.6)
    run = _write_run(tmp_path / "run", with_card=False)
    data = report.load_run(run)
    for model in data.matrix.values():  # values as close as the quick start's used to be: 0.998-1.000
        for i, cell in enumerate(model.values()):
            cell["val_auc"] = 0.998 + 0.001 * i
    fig = report.plot_heatmap(data, "val_auc", tmp_path / "h.png")
    (image,) = fig.axes[0].images
    assert image.get_clim() == report.heatmap_scale("val_auc") == (0.5, 1.0)


def test_long_runs_give_a_narrow_learning_curve_table_and_labelled_means(tmp_path):
    run = _write_run(tmp_path / "run", with_card=False)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["evaluations"] = [{"model_version": v, "sites": {s: _cell(0.5 + 0.02 * v) for s in SITES}} for v in range(21)]
    (run / "metrics.json").write_text(json.dumps(metrics))
    report.build_report(run, log=lambda *_: None)
    curves = _section((run / "report" / "report.md").read_text(), "Learning curves")
    header = next(line for line in curves.splitlines() if line.startswith("| site"))
    assert header == "| site | before training | final | after round | best | after round |"
    assert "| site-1 | 0.5000 | 0.9000 | 20 | 0.9000 | 20 |" in curves
    fig = report.plot_learning_curves(report.load_run(run), "val_auc", tmp_path / "l.png")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels.count("mean over sites (each site counts once)") == 1 and "mean" not in labels
