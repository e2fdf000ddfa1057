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


def test_he_is_refused_in_the_simulator_with_the_way_to_try_it(tmp_path):
    with pytest.raises(ScopeError, match="rehearse --privacy he"):
        apply_privacy_mode(_copy_job(tmp_path), "he")


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
def test_simulated_dp_hospitals_apply_the_policy_file_and_keep_ledgers(tmp_path):
    policy = json.loads(template_privacy_file("client").read_text())
    for scope in policy["scopes"]:
        for f in scope.get("task_result_filters", []):
            if f["path"].endswith("DPUpdateFilter"):
                f["args"].update({"noise_multiplier": 1.5, "clip_norm": 0.5})
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(policy))
    out = simulate(num_sites=2, rounds=2, out=str(tmp_path / "dp"), privacy="dp", privacy_file=str(path))
    metrics = json.loads((out / "metrics.json").read_text())
    eps = [r["sites"]["site-1"]["privacy_epsilon"] for r in metrics["rounds"]]
    assert len(eps) == 2 and eps[1] > eps[0] > 0
    ledger = json.loads((out / "workspace" / "site-1" / "privacy_ledger.json").read_text())
    assert ledger["entries"][-1]["epsilon"] == pytest.approx(eps[1]) and ledger["entries"][-1]["noise_multiplier"] == 1.5

    # the ledger's epsilon reaches TensorBoard, per site and round
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb_events" / "site-1"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("privacy_epsilon")] == [(0, pytest.approx(eps[0])), (1, pytest.approx(eps[1]))]
