"""Acceptance on a small real FLARE simulator run (2 synthetic sites x 2 rounds, with baselines):
cross-site matrix, report files, provenance chain and tamper detection, bundle pointing at the card."""

import json
import shutil

import pytest
import torch

from fedmed import provenance
from fedmed.cli import main as cli_main
from fedmed.flare.cross_site import CrossSiteEvaluation, sites_to_evaluate
from fedmed.simulate import simulate
from report_checks import check_report_links

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cse") / "run"
    simulate(num_sites=2, rounds=2, out=str(out), seed=1, baselines=True)
    return out


def test_constructor_checks_its_configuration():
    with pytest.raises(ValueError, match="file name inside app_server"):
        CrossSiteEvaluation(model_file="../elsewhere/model.pt")
    with pytest.raises(ValueError, match="timeout"):
        CrossSiteEvaluation(validation_timeout=0)


def test_default_submit_timeout_is_short_and_the_jobs_use_it():
    assert CrossSiteEvaluation().submit_timeout == 60
    from pathlib import Path

    for config in Path(__file__).resolve().parents[1].glob("jobs/*/app/config/config_fed_server.json"):
        workflows = json.loads(config.read_text())["workflows"]
        for workflow in workflows:
            if workflow["path"].endswith("CrossSiteEvaluation"):
                assert workflow["args"]["submit_timeout"] <= 60, config


def _metrics(rounds, final_sites=None):
    records = [{"round": r, "contributors": sites} for r, sites in enumerate(rounds)]
    evaluations = [{"model_version": r, "after_round": r - 1, "sites": {s: {} for s in sites}} for r, sites in enumerate(rounds)]
    if final_sites is not None:
        evaluations.append({"model_version": len(rounds), "after_round": len(rounds) - 1,
                            "sites": {s: {} for s in final_sites}})
    return {"rounds": records, "evaluations": evaluations}


def test_a_site_that_dropped_out_during_training_is_skipped_and_named():
    connected = ["hospital-03", "hospital-01", "hospital-02"]  # a SIGKILLed client stays "connected" for 600 s
    metrics = _metrics([["hospital-01", "hospital-02", "hospital-03"], ["hospital-01", "hospital-02"]])
    sites, skipped = sites_to_evaluate(connected, metrics)
    assert sites == ["hospital-01", "hospital-02"]
    assert list(skipped) == ["hospital-03"] and "round 2" in skipped["hospital-03"]


def test_the_final_validation_is_the_latest_sign_of_life():
    connected = ["a", "b", "c"]
    metrics = _metrics([["a", "b", "c"]], final_sites=["a", "c"])
    sites, skipped = sites_to_evaluate(connected, metrics)
    assert sites == ["a", "c"] and list(skipped) == ["b"] and "final validation" in skipped["b"]


def test_without_training_records_or_live_sites_every_connected_site_is_evaluated():
    assert sites_to_evaluate(["b", "a"], None) == (["a", "b"], {})
    assert sites_to_evaluate(["b", "a"], {"rounds": []}) == (["a", "b"], {})
    # nobody connected answered the last round (e.g. every site reconnected under a new name): evaluate all
    assert sites_to_evaluate(["a", "b"], _metrics([["x", "y"]])) == (["a", "b"], {})
    # a site that answered but is no longer connected is simply absent
    assert sites_to_evaluate(["a"], _metrics([["a", "b"]])) == (["a"], {})


@pytest.mark.slow
def test_cross_site_matrix_has_every_model_on_every_site(run):
    doc = json.loads((run / "cross_site.json").read_text())
    assert doc["sites"] == SITES
    assert set(doc["results"]) == {"global_model", *SITES}
    for model, row in doc["results"].items():
        assert set(row) == set(SITES), f"{model} lacks a site"
        for site, cell in row.items():
            assert 0.0 <= cell["val_auc"] <= 1.0 and 0.0 <= cell["val_accuracy"] <= 1.0, (model, site)
            assert cell["num_val_samples"] > 0
    assert not doc.get("errors") and doc["skipped_sites"] == {}
    assert doc["models"]["site-1"]["kind"] == "local" and doc["models"]["site-1"]["num_samples"] > 0
    # the evaluated global model is the released one
    final = provenance.weights_sha256(torch.load(run / "models" / "global_model.pt", weights_only=True))
    assert doc["models"]["global_model"]["model_sha256"] == final
    # the same validation data gives the same metrics as the controller's final validation
    final_eval = json.loads((run / "metrics.json").read_text())["evaluations"][-1]["sites"]
    for site in SITES:
        assert doc["results"]["global_model"][site]["val_auc"] == pytest.approx(final_eval[site]["val_auc"], abs=1e-6)

    base = json.loads((run / "baselines.json").read_text())
    assert set(base["results"]) == {"local-only:site-1", "local-only:site-2", "pooled"}
    assert all(set(row) == set(SITES) for row in base["results"].values())
    assert base["budget"]["rounds"] == 2


@pytest.mark.slow
def test_report_files_exist_and_html_references_only_existing_files(run):
    out = run / "report"
    for name in ("report.md", "report.html", "report.json", "cross_site_auc.png", "learning_curves.png",
                 "fed_vs_local_vs_pooled.png", "exam.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    images, _ = check_report_links(out)
    assert images == 4
    summary = json.loads((out / "report.json").read_text())
    assert summary["exam"]["metric"] == "val_auc" and len(summary["exam"]["per_site"]) == 2
    assert summary["provenance"]["status"].startswith("intact")
    md = (out / "report.md").read_text()
    assert "local-only baselines" in md and "Generalizability" in md


@pytest.mark.slow
def test_provenance_chain_matches_the_run_and_the_bundle_points_to_it(run):
    card = json.loads((run / "provenance.json").read_text())
    assert [r["kind"] for r in card["chain"]] == ["initial", "round", "round", "release"]
    metrics = json.loads((run / "metrics.json").read_text())
    for record, round_metrics in zip(card["chain"][1:3], metrics["rounds"]):
        assert {c["site"]: c["num_samples"] for c in record["contributors"]} == {
            s: m["num_samples"] for s, m in round_metrics["sites"].items()
        }
    assert card["chain"][2]["model_sha256"] == card["chain"][3]["model_sha256"]
    sites = {s["site"]: s for s in card["summary"]["sites"]}
    assert set(sites) == set(SITES) and all(s["num_val_samples"] > 0 and "privacy_scope" in s for s in sites.values())
    assert card["summary"]["software"]["nvflare"] == "2.9.0"
    bundle_meta = json.loads((run / "bundle" / "configs" / "metadata.json").read_text())
    assert bundle_meta["provenance"]["card"] == "../provenance.json"
    assert bundle_meta["provenance"]["head_sha256"] == card["head_sha256"]
    assert (run / "bundle" / bundle_meta["provenance"]["card"]).resolve() == (run / "provenance.json").resolve()


@pytest.mark.slow
def test_verify_provenance_passes_intact_and_fails_on_any_altered_record_or_model(run, tmp_path, capsys):
    assert cli_main(["verify-provenance", str(run)]) == 0
    out = capsys.readouterr().out
    assert "bundle/models/model.pt matches" in out and "pinned in" in out

    card = json.loads((run / "provenance.json").read_text())
    for index in range(len(card["chain"])):
        for field, value in (("model_sha256", "0" * 64), ("timestamp_utc", "1999-01-01T00:00:00Z")):
            tampered = json.loads(json.dumps(card))
            tampered["chain"][index][field] = value
            path = tmp_path / f"card-{index}-{field}.json"
            path.write_text(json.dumps(tampered))
            assert cli_main(["verify-provenance", str(path)]) == 1, (index, field)
            assert f"record {index} " in capsys.readouterr().err

    # a released model swapped after the fact
    copy = tmp_path / "copy"
    shutil.copytree(run / "bundle", copy / "bundle")
    shutil.copy2(run / "provenance.json", copy / "provenance.json")
    state = torch.load(copy / "bundle" / "models" / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1e-3
    torch.save(state, copy / "bundle" / "models" / "model.pt")
    assert cli_main(["verify-provenance", str(copy)]) == 1
    assert "do not match the released model_sha256" in capsys.readouterr().err
