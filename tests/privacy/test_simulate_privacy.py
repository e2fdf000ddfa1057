"""``simulate --privacy MODE`` runs the scope's site filters in the real FLARE simulator."""

import json

import pytest

from fedmed.privacy.scopes import ScopeError, template_privacy_file
from fedmed.privacy.simulation import apply_privacy_mode
from fedmed.simulate import DEFAULT_JOB, resolve_job, simulate


def _copy_job(tmp_path):
    import shutil

    dest = tmp_path / "job"
    shutil.copytree(resolve_job(DEFAULT_JOB), dest)
    return dest


def test_he_job_copy_runs_secure_aggregation_with_the_sites_masking_filters(tmp_path):
    job = _copy_job(tmp_path)
    summary = apply_privacy_mode(job, "he")
    assert summary["client_filters"] == ["ReleasePolicyFilter", "SecAggMasker", "TransferMeter"]
    assert summary["server_filters"] == ["MaskedOnlyCheck"]
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert server["workflows"][0]["args"]["aggregation_step_id"] == "he_step"
    assert {c["id"]: c["path"] for c in server["components"]}["he_step"] == "fedmed.flare.he.SecureAggregation"
    protocol = [e for e in client["executors"] if "secagg_keys" in e["tasks"]]
    assert protocol and protocol[0]["executor"]["path"] == "fedmed.flare.he.SecAggSiteExecutor"
    # the protocol tasks' results pass the same site filters as train (the release policy checks them)
    covered = {t for entry in client["task_result_filters"] for t in entry["tasks"]}
    assert {"train", "secagg_keys", "secagg_shares", "secagg_unmask"} <= covered
    assert json.loads((job / "meta.json").read_text())["scope"] == "he"


def test_a_mode_the_hospitals_policy_does_not_allow_is_refused_naming_the_file(tmp_path):
    policy = json.loads(template_privacy_file("client").read_text())
    policy["scopes"] = [s for s in policy["scopes"] if s["name"] == "dp"]
    policy["default_scope"] = "dp"
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(policy))
    with pytest.raises(ScopeError, match=f"'compressed' is not allowed by {path}"):
        apply_privacy_mode(_copy_job(tmp_path), "compressed", path)


def test_job_copy_gets_the_scope_filters_and_names_the_scope(tmp_path):
    job = _copy_job(tmp_path)
    summary = apply_privacy_mode(job, "compressed")
    assert summary["client_filters"] == ["ReleasePolicyFilter", "Float16CompressFilter", "TransferMeter"]
    assert summary["server_filters"] == ["Float16DecompressFilter"]
    assert json.loads((job / "meta.json").read_text())["scope"] == "compressed"
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    chains = {tuple(c["tasks"]): c["filters"] for c in server["task_result_filters"]}
    assert any("train" in tasks for tasks in chains)


@pytest.mark.slow
def test_simulated_dp_hospitals_train_with_dp_sgd_keep_ledgers_and_send_no_training_loss(tmp_path):
    from opacus.accountants import RDPAccountant

    from fedmed.privacy.dp import recompute_validation_accounts

    policy = json.loads(template_privacy_file("client").read_text())
    for scope in policy["scopes"]:
        for f in scope.get("task_data_filters", []):
            if f["path"].endswith("DPTrainingPolicy"):
                f["args"].update({"epsilon": 3.0, "max_grad_norm": 0.8})
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(policy))
    # two DP rounds at epsilon 3 on the small synthetic sites need not beat the initial model; this test is about
    # the DP plumbing, so a collapse releases the initial model instead of failing the run
    out = simulate(num_sites=2, rounds=2, out=str(tmp_path / "dp"), privacy="dp", privacy_file=str(path),
                   settings={"release_on_collapse": "initial"})
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["contributors"] for r in rounds] == [["site-1", "site-2"], ["site-1", "site-2"]]
    for r in rounds:
        for site_metrics in r["sites"].values():
            assert "train_loss" not in site_metrics and "samples_per_second" not in site_metrics
            assert site_metrics["num_samples"] % 32 == 0  # the public size: ceil(n / batch) x batch (batch 32)
    for evaluation in metrics["evaluations"]:
        for site_metrics in evaluation["sites"].values():
            # the server derived AUC from the site's DP-noised histogram (32 log-odds bins), the only validation it got
            assert site_metrics["val_dp_epsilon"] == 1.0 and len(site_metrics["val_logit_histogram"][0]) == 32
            assert "val_score_histogram" not in site_metrics and "val_loss" not in site_metrics
            assert 0 <= site_metrics["val_auc"] <= 1
    eps = [r["sites"]["site-1"]["privacy_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= 3.0
    assert eps[1] == pytest.approx(3.0, abs=0.05)  # the noise was planned to spend the budget over the job's rounds

    # DIR/privacy_ledger.json: feeding each site's history to the named Opacus accountant gives its epsilon
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["unit"] == "record" and sorted(ledger["sites"]) == ["site-1", "site-2"]
    for site, entry in ledger["sites"].items():
        assert entry["accountant"] == "rdp" and entry["budget"] == 3.0 and entry["delta"] == 1e-5
        accountant = RDPAccountant()
        accountant.history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in entry["history"]]
        assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(delta=entry["delta"]), rel=1e-9)
        site_file = json.loads((out / "workspace" / site / "privacy_ledger.json").read_text())
        assert site_file["history"] == entry["history"] and len(site_file["entries"]) == 2
        # the validation account: one query per round's entering model (+ the final validation), recomputable
        validation = site_file["validation"]
        assert validation["mechanism"] == "discrete-laplace-histogram" and validation["delta"] == 0.0
        assert validation["epsilon"] == pytest.approx(sum(q["epsilon"] * q["count"] for q in validation["queries"]))
        assert validation["epsilon"] >= 2.0 and validation["epsilon"] <= validation["budget"] == 12.0
        assert recompute_validation_accounts(ledger)[site] == pytest.approx(entry["validation"]["epsilon"])
    threshold = metrics["decision_threshold"]
    assert threshold["method"] == "youden_j_on_dp_site_validation" and 0 <= threshold["threshold"] <= 1
    bundle_meta = json.loads(next(out.glob("**/configs/metadata.json")).read_text())
    assert bundle_meta["decision_threshold"]["method"] == "youden_j_on_dp_site_validation"
    assert ledger["sites"]["site-1"]["epsilon"] == pytest.approx(eps[1])
    card = json.loads((out / "provenance.json").read_text())
    card_sites = {s["site"]: s for s in card["summary"]["sites"]}
    assert card_sites["site-1"]["privacy"]["history"] == ledger["sites"]["site-1"]["history"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["privacy_ledger"]["site-1"]["epsilon"] == pytest.approx(eps[1])
    assert "epsilon (record level)" in (out / "report" / "report.md").read_text()

    # TensorBoard events reach the server: the ledger's epsilon does, the training loss does not
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb_events" / "site-1"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("privacy_epsilon")] == [(0, pytest.approx(eps[0])), (1, pytest.approx(eps[1]))]
    assert "train_loss" not in events.Tags()["scalars"]
