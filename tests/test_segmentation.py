"""Segmentation task: synthetic volumes, MSD datalist loading and its errors, Dice evaluation, training."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.data import DataError
from fedmed.tasks import build_task
from fedmed.tasks.segmentation import SegmentationTask
from fedmed.training import LocalTrainer
from fedmed.volumes import (
    ScannerProfile,
    read_datalist,
    scanner_profile,
    synthetic_case,
    write_nifti,
    write_synthetic_site,
)

REPO = Path(__file__).resolve().parents[1]
UNET_3D = {"name": "unet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                                    "strides": [2, 2], "num_res_units": 0}}


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_task(**overrides):
    args = dict(roi_size=16, synthetic_size=24, synthetic_train_per_site=2, synthetic_val_per_site=2, crop_samples=2)
    args.update(overrides)
    return SegmentationTask(**args)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.fixture
def site_dir(tmp_path):
    """One synthetic site (3 training, 2 validation cases) written as NIfTI plus its datalist."""
    profile = scanner_profile(1, seed=0)
    return write_synthetic_site(tmp_path / "site", profile, num_train=3, num_val=2, size=24, seed=3).parent


# ---- synthetic generator -------------------------------------------------------------------


def test_synthetic_case_is_seeded_labelled_and_stored_as_the_scanner_would():
    profile = ScannerProfile(spacing=(1.0, 1.0, 1.5), axcodes="LPS", intensity_scale=800.0, intensity_offset=50.0)
    image, label, affine = synthetic_case(30, profile, seed=4)
    again, label_again, _ = synthetic_case(30, profile, seed=4)
    other, _, _ = synthetic_case(30, profile, seed=5)
    assert image.shape == label.shape == (30, 30, 20)  # 30 mm at 1.5 mm slices
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert 0.005 < label.mean() < 0.5
    assert np.array_equal(image, again) and np.array_equal(label, label_again)
    assert not np.array_equal(image, other)
    assert np.allclose(np.abs(np.diag(affine)[:3]), [1.0, 1.0, 1.5])
    assert np.diag(affine)[0] < 0 and np.diag(affine)[1] < 0 and np.diag(affine)[2] > 0  # stored L, P, S
    # the object is brighter than the background in raw scanner units
    assert image[label == 1].mean() > image[label == 0].mean() + 100


def test_sites_get_different_scanners_and_strength_zero_makes_them_identical():
    profiles = [scanner_profile(i, seed=0) for i in range(4)]
    assert len({p.spacing for p in profiles}) == 4 and len({p.axcodes for p in profiles}) == 4
    assert len({round(p.intensity_scale) for p in profiles}) == 4
    assert scanner_profile(0, seed=0) == scanner_profile(0, seed=0)
    assert scanner_profile(0, 0, strength=0) == scanner_profile(3, 0, strength=0)
    assert scanner_profile(2, 0, spatial_dims=2).spacing.__len__() == 2


def test_task_preprocessing_undoes_each_scanners_geometry(tmp_path):
    """The same anatomy stored by two scanners (different spacing, orientation, intensity) comes back aligned."""
    task = small_task()
    loaded = []
    for index, profile in enumerate([ScannerProfile(), ScannerProfile(spacing=(1.25, 1.25, 2.0), axcodes="LPI",
                                                                       intensity_scale=300.0, intensity_offset=-80.0)]):
        image, label, affine = synthetic_case(24, profile, seed=11)
        write_nifti(tmp_path / f"img{index}.nii.gz", image, affine)
        write_nifti(tmp_path / f"lab{index}.nii.gz", label, affine)
        loaded.append(task.preprocessing()({"image": str(tmp_path / f"img{index}.nii.gz"), "label": str(tmp_path / f"lab{index}.nii.gz")}))
    (a, b) = loaded
    assert a["image"].shape[1:] == (24, 24, 24)
    assert abs(b["image"].shape[1] - 24) <= 1 and abs(b["image"].shape[3] - 24) <= 1
    shape = [min(x, y) for x, y in zip(a["label"].shape[1:], b["label"].shape[1:])]
    crop = tuple(slice(0, s) for s in shape)
    assert dice(a["label"][0][crop].numpy(), b["label"][0][crop].numpy()) > 0.75
    for item in loaded:  # z-score normalisation removes each scanner's intensity scale
        assert abs(float(item["image"].mean())) < 0.05 and abs(float(item["image"].std()) - 1.0) < 0.05


def test_write_synthetic_site_writes_nifti_and_a_datalist(tmp_path):
    datalist = write_synthetic_site(tmp_path / "s", scanner_profile(2, 0), num_train=2, num_val=1, size=24, seed=0)
    doc = json.loads(datalist.read_text())
    assert len(doc["training"]) == 2 and len(doc["validation"]) == 1
    for item in doc["training"] + doc["validation"]:
        image = nib.load(str(datalist.parent / item["image"]))
        assert image.shape == nib.load(str(datalist.parent / item["label"])).shape
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), scanner_profile(2, 0).spacing)
    assert not list(tmp_path.rglob(".*partial*"))
    assert json.loads((tmp_path / "s" / "scanner.json").read_text())["axcodes"] == scanner_profile(2, 0).axcodes


# ---- datalist loading and errors -----------------------------------------------------------


def test_site_data_loads_through_the_monai_pipeline(site_dir):
    task = small_task()
    train, val = task.load_site_data({"format": "msd", "path": str(site_dir / "datalist.json")}, "site-a")
    assert len(train) == 3 and len(val) == 2
    patches = train[0]
    assert isinstance(patches, list) and len(patches) == task.crop_samples
    assert patches[0]["image"].shape == (1, 16, 16, 16) and patches[0]["label"].shape == (1, 16, 16, 16)
    volume = val[0]
    assert volume["image"].ndim == 4 and volume["image"].shape[1:] == volume["label"].shape[1:]
    assert set(torch.unique(volume["label"]).tolist()) <= {0.0, 1.0}


def _datalist(tmp_path, training, validation=None):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": training, "validation": validation if validation is not None else training}))
    return path


def _case(tmp_path, name, label=None, image=None, affine=None):
    case_image, case_label, case_affine = synthetic_case(20, seed=1)
    affine = case_affine if affine is None else affine
    write_nifti(tmp_path / f"{name}_img.nii.gz", case_image if image is None else image, case_affine)
    write_nifti(tmp_path / f"{name}_lab.nii.gz", case_label if label is None else label, affine)
    return {"image": f"{name}_img.nii.gz", "label": f"{name}_lab.nii.gz"}


def _load(task, path):
    return task.load_site_data({"format": "msd", "path": str(path)}, "site-x")


def test_missing_datalist_and_bad_json_are_named(tmp_path):
    with pytest.raises(DataError, match=r"datalist .*nope\.json does not exist"):
        read_datalist(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON"):
        read_datalist(bad)


def test_datalist_without_validation_or_label_is_refused(tmp_path):
    item = _case(tmp_path, "a")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [item]}))
    with pytest.raises(DataError, match=r"d\.json: key 'validation' must be a non-empty list"):
        read_datalist(path)
    path.write_text(json.dumps({"training": [item], "validation": [{"image": item["image"]}]}))
    with pytest.raises(DataError, match=r"validation\[0\] needs both 'image' and 'label'"):
        read_datalist(path)


def test_missing_file_names_the_datalist_item_and_file(tmp_path):
    item = _case(tmp_path, "a")
    path = _datalist(tmp_path, [item, {"image": "gone.nii.gz", "label": item["label"]}])
    with pytest.raises(DataError, match=r"datalist .*datalist\.json: training\[1\] 'image': file .*gone\.nii\.gz does not exist"):
        _load(small_task(), path)


def test_corrupt_nifti_names_the_file(tmp_path):
    item = _case(tmp_path, "a")
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI volume" * 10)
    path = _datalist(tmp_path, [item], [{"image": "broken.nii.gz", "label": item["label"]}])
    with pytest.raises(DataError, match=r"site 'site-x': datalist .*: validation\[0\] \(.*broken\.nii\.gz\): cannot load"):
        _load(small_task(), path)


def test_label_values_outside_the_classes_are_refused(tmp_path):
    _, label, _ = synthetic_case(20, seed=1)
    item = _case(tmp_path, "a", label=(label * 3).astype(np.uint8))
    with pytest.raises(DataError, match=r"label .*a_lab\.nii\.gz holds values \[3\.0\].*0\.\.1 \(num_classes=2\)"):
        _load(small_task(), _datalist(tmp_path, [item]))


def test_non_integer_labels_are_refused(tmp_path):
    _, label, _ = synthetic_case(20, seed=1)
    item = _case(tmp_path, "a", label=(label * 0.5).astype(np.float32))
    with pytest.raises(DataError, match=r"holds values \[0\.5\]; masks must hold integer class labels"):
        _load(small_task(), _datalist(tmp_path, [item]))


def test_label_of_another_shape_is_refused(tmp_path):
    item = _case(tmp_path, "a", label=np.zeros((20, 20, 12), np.uint8))
    with pytest.raises(DataError, match=r"a_lab\.nii\.gz has shape .* after resampling, the image .*same shape and affine"):
        _load(small_task(), _datalist(tmp_path, [item]))


def test_wrong_channel_count_and_unknown_format_are_refused(tmp_path, site_dir):
    with pytest.raises(DataError, match=r"image has 1 channel\(s\), the task expects in_channels=2"):
        _load(small_task(in_channels=2), site_dir / "datalist.json")
    with pytest.raises(DataError, match=r"site 'site-x': data format 'npz' is not supported by the segmentation task"):
        small_task().load_site_data({"format": "npz", "path": "x.npz"}, "site-x")


def test_task_arguments_are_checked():
    with pytest.raises(ValueError, match="roi_size needs 3 values"):
        SegmentationTask(roi_size=[32, 32])
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SegmentationTask(num_classes=1)
    with pytest.raises(ValueError, match="class_names has 1 names for 2 classes"):
        SegmentationTask(class_names=["prostate"])
    with pytest.raises(ValueError, match="must equal the task's in_channels 1 and num_classes 2"):
        SegmentationTask().network_data_format({"name": "unet", "args": {"in_channels": 1, "out_channels": 3}})


# ---- evaluation ----------------------------------------------------------------------------


class ThresholdNet(nn.Module):
    """A pointwise 'network': foreground where the normalised intensity exceeds ``threshold``."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        score = 10.0 * (x[:, :1] - self.threshold)
        return torch.cat([-score, score], dim=1)


def test_evaluate_reports_the_dice_of_each_whole_volume(site_dir):
    task = small_task(class_names=["background", "prostate"])
    _, val = task.load_site_data({"format": "msd", "path": str(site_dir / "datalist.json")}, "site-a")
    threshold = 1.0
    expected = np.mean([dice(item["image"][0].numpy() > threshold, item["label"][0].numpy() > 0) for item in val])
    # batch_size 4 over volumes of possibly different shapes: evaluate goes one volume at a time
    metrics = task.evaluate(ThresholdNet(threshold), DataLoader(val, batch_size=4), torch.device("cpu"))
    assert metrics["num_val_samples"] == 2
    assert metrics["val_dice"] == pytest.approx(expected, abs=1e-4)
    assert metrics["val_dice_prostate"] == metrics["val_dice"]
    assert expected > 0.3  # the bright blobs are the labelled ones
    background_only = task.evaluate(ThresholdNet(1e9), DataLoader(val, batch_size=1), torch.device("cpu"))
    assert background_only["val_dice"] == 0.0
    assert background_only["val_loss"] > metrics["val_loss"]


def test_evaluate_handles_volumes_of_different_shapes(tmp_path):
    task = small_task()
    items = [_case(tmp_path, "a"), {"image": None, "label": None}]
    image, label, affine = synthetic_case(28, seed=2)
    write_nifti(tmp_path / "b_img.nii.gz", image, affine)
    write_nifti(tmp_path / "b_lab.nii.gz", label, affine)
    items[1] = {"image": "b_img.nii.gz", "label": "b_lab.nii.gz"}
    _, val = _load(task, _datalist(tmp_path, items))
    assert val[0]["image"].shape != val[1]["image"].shape
    metrics = task.evaluate(ThresholdNet(1.0), DataLoader(val, batch_size=2), torch.device("cpu"))
    assert metrics["num_val_samples"] == 2 and 0.0 < metrics["val_dice"] <= 1.0


def test_evaluate_refuses_a_network_of_the_wrong_dimension(site_dir):
    from fedmed.networks import build_network

    task = small_task()
    _, val = task.load_site_data({"format": "msd", "path": str(site_dir / "datalist.json")}, "site-a")
    net2d = build_network({"name": "unet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                                                    "channels": [4, 8], "strides": [2]}})
    with pytest.raises(ValueError, match="the network is 2D but the task's spatial_dims is 3"):
        task.evaluate(net2d, DataLoader(val), torch.device("cpu"))


# ---- training with the shared trainer ------------------------------------------------------


def test_local_training_raises_dice_and_fedprox_keeps_the_model_nearer_the_global_one(site_dir):
    task = build_task({"name": "segmentation", "args": {"roi_size": 16, "crop_samples": 2}})
    train, val = task.load_site_data({"format": "msd", "path": str(site_dir / "datalist.json")}, "site-a")
    from fedmed.networks import build_network
    from fedmed.networks import state_to_numpy

    initial = state_to_numpy(build_network(UNET_3D, seed=0))
    distances = {}
    for mu in (0.0, 1.0):
        trainer = LocalTrainer(task, train, val, local_epochs=4, lr=0.01, batch_size=2, fedprox_mu=mu, seed=0)
        before = trainer.evaluate(UNET_3D, initial)["val_dice"]
        result = trainer.train(UNET_3D, initial, round_num=0)
        after = trainer.evaluate(UNET_3D, result.weights)["val_dice"]
        assert result.num_samples == 3  # volumes, not patches or batches
        if mu == 0.0:
            assert after > before + 0.2, (before, after)
        distances[mu] = sum(float(np.sum((result.weights[k].astype(np.float64) - initial[k]) ** 2))
                            for k in initial if initial[k].dtype.kind == "f")
    assert distances[1.0] < distances[0.0]


def test_2d_slices_train_with_a_2d_unet(tmp_path):
    task = build_task({"name": "segmentation", "args": {"spatial_dims": 2, "roi_size": [16, 16], "pixdim": [1.0, 1.0],
                                                        "synthetic_size": 32, "synthetic_train_per_site": 4,
                                                        "synthetic_val_per_site": 2}})
    configs, summary = task.prepare_simulation(2, tmp_path, None, 0.5, 0)
    assert "slices" in summary[0]
    net = {"name": "unet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2]}}
    train, val = task.load_site_data(configs["site-2"]["data"], "site-2")
    assert val[0]["image"].ndim == 3
    trainer = LocalTrainer(task, train, val, local_epochs=3, lr=0.01, batch_size=2)
    result = trainer.train(net, None)
    metrics = trainer.evaluate(net, result.weights)
    assert metrics["num_val_samples"] == 2 and np.isfinite(metrics["val_dice"]) and np.isfinite(result.metrics["train_loss"])


def test_in_memory_synthetic_format_matches_the_scanner_profiles():
    task = small_task()
    train, val = task.load_site_data({"format": "synthetic", "site_index": 1, "num_train": 2, "num_val": 1, "seed": 0}, "s")
    assert len(train) == 2 and len(val) == 1
    assert val[0]["image"].shape[1:] == val[0]["label"].shape[1:]


# ---- simulation preparation ----------------------------------------------------------------


def test_prepare_simulation_gives_each_site_its_own_scanner_and_datalist(tmp_path):
    task = small_task()
    configs, summary = task.prepare_simulation(3, tmp_path, None, 0.5, 0)
    assert list(configs) == ["site-1", "site-2", "site-3"] and len(summary) == 3
    spacings = set()
    for site, config in configs.items():
        assert config["data"]["format"] == "msd" and Path(config["data"]["path"]).is_absolute()
        resolved = read_datalist(config["data"]["path"])
        assert len(resolved["training"]) == 2 and len(resolved["validation"]) == 2
        spacings.add(tuple(np.round(np.abs(np.diag(nib.load(resolved["training"][0]["image"]).affine)[:3]), 3)))
    assert len(spacings) == 3


def test_prepare_simulation_deals_a_pool_datalist_out_to_sites(tmp_path):
    pool = write_synthetic_site(tmp_path / "pool", ScannerProfile(), num_train=8, num_val=2, size=20, seed=0)
    task = small_task()
    configs, summary = task.prepare_simulation(2, tmp_path / "sites", str(pool), 0.5, 1)
    seen = []
    for config in configs.values():
        resolved = read_datalist(config["data"]["path"])
        assert len(resolved["validation"]) >= 1
        seen += [item["image"] for item in resolved["training"] + resolved["validation"]]
    assert sorted(seen) == sorted({str(p.resolve()) for p in (tmp_path / "pool" / "imagesTr").iterdir()})
    with pytest.raises(DataError, match="10 labelled cases cannot give 6 sites"):
        task.prepare_simulation(6, tmp_path / "more", str(pool), 0.5, 1)


# ---- job folders ---------------------------------------------------------------------------


def _job(name):
    base = REPO / "jobs" / name / "app" / "config"
    return json.loads((base / "config_fed_server.json").read_text()), json.loads((base / "config_fed_client.json").read_text())


def test_classification_and_segmentation_jobs_share_executor_and_controller():
    paths = {}
    for name in ("cxr_pneumonia_fedavg", "prostate_seg_fedavg", "prostate_seg_fedprox"):
        server, client = _job(name)
        paths[name] = (
            [w["path"] for w in server["workflows"]],
            [e["executor"]["path"] for e in client["executors"]],
        )
    assert len(set(map(str, paths.values()))) == 1, paths
    assert paths["prostate_seg_fedavg"][1] == ["fedmed.flare.executor.FedMedExecutor"]
    assert "fedmed.flare.controller.FedAvgController" in paths["prostate_seg_fedavg"][0]


def test_fedprox_job_differs_from_fedavg_only_in_mu():
    fedavg_server, fedavg_client = _job("prostate_seg_fedavg")
    prox_server, prox_client = _job("prostate_seg_fedprox")
    fedavg_args = fedavg_client["executors"][0]["executor"]["args"]
    prox_args = prox_client["executors"][0]["executor"]["args"]
    assert fedavg_args["fedprox_mu"] == 0.0 and prox_args["fedprox_mu"] > 0
    assert {**prox_args, "fedprox_mu": 0.0} == fedavg_args
    prox_server["workflows"][0]["args"]["job_name"] = "prostate_seg_fedavg"
    assert prox_server == fedavg_server
    task_spec = fedavg_server["workflows"][0]["args"]["task"]
    network_spec = fedavg_server["workflows"][0]["args"]["network"]
    build_task(task_spec).network_data_format(network_spec)  # task and network agree


def test_multichannel_images_load_from_a_file_list_or_a_4d_file(tmp_path):
    image, label, affine = synthetic_case(20, seed=1)
    write_nifti(tmp_path / "t2.nii.gz", image, affine)
    write_nifti(tmp_path / "adc.nii.gz", image * 0.5, affine)
    write_nifti(tmp_path / "both.nii.gz", np.stack([image, image * 0.5], axis=-1), affine)
    write_nifti(tmp_path / "lab.nii.gz", label, affine)
    items = [{"image": ["t2.nii.gz", "adc.nii.gz"], "label": "lab.nii.gz"}, {"image": "both.nii.gz", "label": "lab.nii.gz"}]
    train, val = _load(small_task(in_channels=2), _datalist(tmp_path, items))
    assert [tuple(v["image"].shape) for v in val] == [(2, 20, 20, 20)] * 2
    assert train[0][0]["image"].shape == (2, 16, 16, 16)


def test_pool_datalist_without_validation_split_is_dealt_out(tmp_path):
    pool = write_synthetic_site(tmp_path / "pool", ScannerProfile(), num_train=4, num_val=1, size=20, seed=0)
    doc = json.loads(pool.read_text())
    (tmp_path / "pool" / "dataset.json").write_text(json.dumps({"training": doc["training"] + doc["validation"]}))
    configs, _ = small_task().prepare_simulation(2, tmp_path / "sites", str(tmp_path / "pool" / "dataset.json"), 0.5, 0)
    sizes = [sum(map(len, read_datalist(c["data"]["path"]).values())) for c in configs.values()]
    assert sorted(sizes) == [2, 3]
    doc["training"].append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/case_000.nii.gz"})
    (tmp_path / "pool" / "dataset.json").write_text(json.dumps({"training": doc["training"]}))
    with pytest.raises(DataError, match=r"dataset\.json: training\[4\] 'image': file .*missing\.nii\.gz does not exist"):
        small_task().prepare_simulation(2, tmp_path / "again", str(tmp_path / "pool" / "dataset.json"), 0.5, 0)
