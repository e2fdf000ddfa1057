"""Integration: the real FLARE simulator runs the cxr job end to end (no mocks)."""

import json
import subprocess
import sys

import pytest

from fedmed.simulate import SimulationError, prepare_job, resolve_job, run_simulator, simulate
from fedmed.site_config import SITE_CONFIG_FILE
from fedmed.flare.allow_list import class_allow_list

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    simulate(num_sites=3, rounds=2, out=str(out), seed=0)
    return out


def test_simulation_writes_metrics_and_final_model_beats_initial(sim_run):
    metrics = json.loads((sim_run / "metrics.json").read_text())
    assert metrics["finished"] is True
    assert metrics["sites"] == ["site-1", "site-2", "site-3"]
    assert [r["contributors"] for r in metrics["rounds"]] == [["site-1", "site-2", "site-3"]] * 2
    initial, final = metrics["evaluations"][0], metrics["evaluations"][-1]
    assert final["model_version"] == 2 and set(final["sites"]) == {"site-1", "site-2", "site-3"}
    assert final["mean_val_auc"] > initial["mean_val_auc"] + 0.1
    for round_entry in metrics["rounds"]:
        for site_metrics in round_entry["sites"].values():
            assert site_metrics["num_samples"] > 0 and site_metrics["train_loss"] > 0


def test_bundle_loads_with_monai_bundle_tooling_in_a_fresh_process(sim_run):
    bundle = sim_run / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / name).is_file()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [28, 28]
    assert fmt["inputs"]["image"]["num_channels"] == 1 and fmt["inputs"]["image"]["value_range"] == [0, 1]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "normal", "1": "pneumonia"}
    script = f"""
import sys, torch
from monai.bundle import load, verify_net_in_out
net = load(name="bundle", bundle_dir=r"{sim_run}", workflow_type="inference", device="cpu")
state = torch.load(r"{bundle / 'models' / 'model.pt'}", weights_only=True)
assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
out = torch.softmax(net(torch.rand(4, 1, 28, 28)), dim=1)
assert out.shape == (4, 2) and torch.allclose(out.sum(1), torch.ones(4))
verify_net_in_out(net_id="network_def", meta_file=r"{bundle}/configs/metadata.json", config_file=r"{bundle}/configs/inference.json")
assert "nvflare" not in sys.modules, "the bundle must not need FLARE"
print("BUNDLE_OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "BUNDLE_OK" in result.stdout, result.stderr[-3000:]


def test_tensorboard_holds_every_sites_loss_and_auc_per_round(sim_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for site in ("site-1", "site-2", "site-3"):
        acc = EventAccumulator(str(sim_run / "tb_events" / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train_loss", "val_auc"} <= tags, tags
        assert sorted(e.step for e in acc.Scalars("train_loss")) == [0, 1]


def test_existing_output_folder_is_not_overwritten(sim_run):
    assert not (sim_run / "INCOMPLETE").exists(), "a finished run must not stay marked incomplete"
    with pytest.raises(SimulationError, match="not empty"):
        simulate(num_sites=2, rounds=1, out=str(sim_run))


def _run_with_site_configs(tmp_path, site_configs, rounds=1):
    job = prepare_job(resolve_job("jobs/cxr_pneumonia_fedavg"), tmp_path / "job", len(site_configs), rounds)
    ws = tmp_path / "ws"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"sites": site_configs}))
    (ws / "local" / "resources.json").write_text(json.dumps({"class_allow_list": class_allow_list()}))
    run_simulator(tmp_path / "job", ws, list(site_configs), len(site_configs), tmp_path / "sim.log")
    return json.loads((ws / "server" / "simulate_job" / "app_server" / "fedmed" / "metrics.json").read_text())


def _synthetic(seed):
    return {"data": {"format": "synthetic", "num_train": 64, "num_val": 32, "seed": seed}}


def test_a_failing_site_is_left_out_while_min_clients_answered(tmp_path):
    missing = tmp_path / "missing.npz"
    metrics = _run_with_site_configs(
        tmp_path, {"site-1": _synthetic(1), "site-2": _synthetic(2), "site-3": {"data": {"format": "npz", "path": str(missing)}}}
    )
    assert metrics["finished"] is True
    round0 = metrics["rounds"][0]
    assert round0["contributors"] == ["site-1", "site-2"]
    assert "site-3" in round0["failed"] and str(missing) in round0["failed"]["site-3"]


def test_too_few_sites_stops_the_job_naming_the_site_and_file(tmp_path):
    metrics = _run_with_site_configs(
        tmp_path, {"site-1": _synthetic(1), "site-2": {"data": {"format": "npz", "path": "FILL_IN"}}}
    )
    assert metrics["finished"] is False
    assert "min_clients is 2" in metrics["error"]
    assert "site-2" in metrics["error"] and "fedmed_site.json" in metrics["error"] and "placeholder" in metrics["error"]


def test_external_hospital_is_held_out_and_evaluated(sim_run):
    """The external set is written for evaluation only: no site config or job file names it, the
    server's outputs (best model, threshold) never saw it, and metrics.json reports it."""
    external = sim_run / "external" / "external-val.npz"
    assert external.is_file()
    site_config = (sim_run / "workspace" / "local" / SITE_CONFIG_FILE).read_text()
    assert "external" not in site_config
    for path in (sim_run / "job").rglob("*.json"):
        assert "external" not in path.read_text(), path
    # every site config points into OUT/sites/, each holding train and val only
    import numpy as np

    for site, config in json.loads(site_config)["sites"].items():
        with np.load(config["data"]["path"]) as site_npz:
            assert sorted(site_npz.files) == ["train_images", "train_labels", "val_images", "val_labels"], site
    metrics = json.loads((sim_run / "metrics.json").read_text())
    figures = metrics["external"]["results"]["external-val"]["global_model"]
    assert 0.0 <= figures["auc"] <= 1.0 and 0.0 <= figures["accuracy"] <= 1.0
    assert figures["threshold"] == metrics["decision_threshold"]["threshold"]
    assert figures["num_images"] == metrics["external"]["sets"]["external-val"]["num_images"] > 0
    # the acquisition-gap proxy is reported beside it, on the same images with their labels (issue 17)
    acq = metrics["external"]["results"]["external-val-acq"]["global_model"]
    assert acq["num_images"] == figures["num_images"] and acq["images_per_class"] == figures["images_per_class"]
    assert 0.0 <= acq["auc"] <= 1.0 and "resolution" in metrics["external"]["sets"]["external-val-acq"]["what"]
    with np.load(sim_run / "external" / "external-val-acq.npz") as acq_npz, np.load(external) as val_npz:
        assert not np.array_equal(acq_npz["images"], val_npz["images"])
    report = (sim_run / "report" / "report.md").read_text()
    assert "External hospitals" in report and f"{figures['auc']:.4f}" in report


def test_bundle_threshold_is_the_one_chosen_on_site_validation(sim_run):
    from fedmed.release import released_evaluation
    from fedmed.threshold import choose_threshold

    metrics = json.loads((sim_run / "metrics.json").read_text())
    release = metrics["release"]  # the gate's decision: the threshold is chosen on the released version's validation
    assert release["action"] in ("final", "rollback") and release["model_file"] == "global_model.pt"
    final = released_evaluation(metrics["evaluations"], release["version"])["sites"]
    assert set(final) == {"site-1", "site-2", "site-3"} and all("val_score_histogram" in m for m in final.values())
    expected = choose_threshold(final)
    meta = json.loads((sim_run / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["decision_threshold"]["threshold"] == expected["threshold"]
    assert meta["decision_threshold"]["class"] == "pneumonia"
    assert meta["decision_threshold"]["sites"] == ["site-1", "site-2", "site-3"]
