"""The Client API route: a plain PyTorch script at every site, under fedmed's FedAvg controller."""

import json
from pathlib import Path

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext

from fedmed.flare.client_api import FedMedClientAPIExecutor

REPO = Path(__file__).resolve().parents[1]


def test_the_bridge_maps_a_client_api_reply_to_the_controllers_contract():
    reply = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3, dtype=np.float64)},
                meta={MetaKey.INITIAL_METRICS: {"val_auc": np.float64(0.8), "train_loss": 0.5}, MetaKey.NUM_STEPS_CURRENT_ROUND: 40})
    out = from_shareable(FedMedClientAPIExecutor._train_reply(reply.to_shareable(), "site-7", 3, FLContext()))
    assert out.data_kind == DataKind.WEIGHT_DIFF and out.data["w"].dtype == np.float32
    assert out.meta["num_samples"] == 40 and out.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 40
    assert out.meta["site"] == "site-7" and out.meta["round"] == 3 and out.meta["privacy_scope"] == ""
    assert out.meta["metrics"] == {"val_auc": 0.8, "train_loss": 0.5}


def test_a_reply_without_a_sample_count_or_with_full_weights_is_refused():
    no_count = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3, dtype=np.float32)}, meta={})
    with pytest.raises(ValueError, match="NUM_STEPS_CURRENT_ROUND"):
        FedMedClientAPIExecutor._train_reply(no_count.to_shareable(), "site-1", 0, FLContext())
    full = DXO(DataKind.WEIGHTS, data={"w": np.ones(3, dtype=np.float32)}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 5})
    with pytest.raises(ValueError, match="expected|WEIGHT_DIFF"):
        FedMedClientAPIExecutor._train_reply(full.to_shareable(), "site-1", 0, FLContext())


def test_the_executor_passes_its_settings_to_the_script():
    executor = FedMedClientAPIExecutor(lr=0.05, local_epochs=2, batch_size=8, seed=3, task_script_args="--extra 1")
    assert executor._task_script_args == "--lr 0.05 --local_epochs 2 --batch_size 8 --seed 3 --extra 1"
    assert executor._task_script_path == "train.py"


@pytest.mark.slow
def test_the_client_api_job_runs_in_the_simulator_and_writes_the_usual_outputs(tmp_path):
    from fedmed.simulate import simulate

    out = tmp_path / "run"
    tiny = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}
    simulate(job="jobs/cxr_pneumonia_client_api", num_sites=2, rounds=1, out=str(out), seed=0,
             settings={"lr": 0.01, "network": tiny})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True
    (round0,) = metrics["rounds"]
    assert round0["contributors"] == ["site-1", "site-2"] and round0["failed"] == {}
    for site, site_metrics in round0["sites"].items():
        assert site_metrics["num_samples"] > 0 and site_metrics["train_loss"] > 0
        assert site_metrics["learning_rate"] == 0.01, "--set lr reaches the site's script"
    final = metrics["evaluations"][-1]
    assert set(final["sites"]) == {"site-1", "site-2"} and 0 <= final["mean_val_auc"] <= 1
    assert json.loads((out / "run_config.json").read_text())["network"] == tiny
    for name in ("bundle/models/model.pt", "bundle/configs/metadata.json", "provenance.json", "report/report.html"):
        assert (out / name).is_file(), name
    cross_site = json.loads((out / "cross_site.json").read_text())
    assert set(cross_site["models"]) == {"global_model", "site-1", "site-2"}
    assert not (out / "INCOMPLETE").exists()
    client = json.loads((out / "job" / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["lr"] == 0.01
