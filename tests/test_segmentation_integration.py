"""Integration: the real FLARE simulator runs the prostate segmentation job end to end (no mocks)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fedmed.simulate import simulate

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    simulate(job="jobs/prostate_seg_fedavg", num_sites=2, rounds=2, out=str(out), seed=0)
    return out


def test_dice_after_the_last_round_beats_round_zero(seg_run):
    metrics = json.loads((seg_run / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["key_metric"] == "val_dice"
    assert metrics["sites"] == SITES
    assert [r["contributors"] for r in metrics["rounds"]] == [SITES, SITES]
    initial, final = metrics["evaluations"][0], metrics["evaluations"][-1]
    assert final["model_version"] == 2 and set(final["sites"]) == set(SITES)
    assert final["mean_val_dice"] > initial["mean_val_dice"] + 0.2, (initial["mean_val_dice"], final["mean_val_dice"])
    for site_metrics in final["sites"].values():
        assert site_metrics["num_val_samples"] == 4 and "val_dice_prostate" in site_metrics
    for round_entry in metrics["rounds"]:
        for site_metrics in round_entry["sites"].values():
            assert site_metrics["num_samples"] == 6  # training volumes, not patches
    assert json.loads((seg_run / "run_config.json").read_text())["task"]["name"] == "segmentation"


def test_bundle_loads_with_monai_bundle_tooling_and_segments_a_volume(seg_run):
    """In a fresh process without FLARE: monai.bundle.load, then the bundle's own preprocessing,
    sliding-window inferer and postprocessing on a site's NIfTI validation volume."""
    bundle = seg_run / "bundle"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["outputs"]["pred"]["format"] == "segmentation"
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "prostate"}
    case = json.loads((seg_run / "sites" / "site-2" / "datalist.json").read_text())["validation"][0]
    image_path, label_path = (seg_run / "sites" / "site-2" / case[k] for k in ("image", "label"))
    script = f"""
import sys, torch
from monai.bundle import ConfigParser, verify_net_in_out
from fedmed.bundle import load_bundle_network
from fedmed.tasks.segmentation import SegmentationTask
net = load_bundle_network(r"{bundle}")
state = torch.load(r"{bundle / 'models' / 'model.pt'}", weights_only=True)
assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
parser = ConfigParser()
parser.read_config(r"{bundle / 'configs' / 'inference.json'}")
image = parser.get_parsed_content("preprocessing")({{"image": r"{image_path}"}})["image"]
with torch.no_grad():
    logits = parser.get_parsed_content("inferer")(image[None], net.eval())
seg = parser.get_parsed_content("postprocessing")(logits[0])
label = SegmentationTask().preprocessing()({{"image": r"{image_path}", "label": r"{label_path}"}})["label"]
assert logits.shape[1] == 2 and seg.shape == (1, *image.shape[1:]), (logits.shape, seg.shape, image.shape)
assert set(torch.unique(seg).tolist()) <= {{0.0, 1.0}}
pred, truth = seg[0] > 0, label[0][tuple(slice(0, s) for s in seg.shape[1:])] > 0
dice = float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
verify_net_in_out(net_id="network_def", meta_file=r"{bundle}/configs/metadata.json", config_file=r"{bundle}/configs/inference.json")
assert "nvflare" not in sys.modules, "the bundle must not need FLARE"
print("DICE", dice)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DICE" in result.stdout, result.stderr[-3000:]
    dice = float(result.stdout.split("DICE")[1].split()[0])
    assert dice > 0.5, dice


def test_tensorboard_holds_every_sites_dice_and_loss_per_round(seg_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for site in SITES:
        acc = EventAccumulator(str(seg_run / "tb_events" / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train_loss", "val_dice", "val_loss"} <= tags, tags
        assert sorted(e.step for e in acc.Scalars("train_loss")) == [0, 1]


def test_cross_site_matrix_holds_dice_for_every_model_and_site(seg_run):
    cross = json.loads((seg_run / "cross_site.json").read_text())
    assert "val_dice" in cross["metric_names"]
    for model, row in cross["results"].items():
        assert set(row) == set(SITES), model
        assert all(0.0 <= cell["val_dice"] <= 1.0 and np.isfinite(cell["val_dice"]) for cell in row.values())
