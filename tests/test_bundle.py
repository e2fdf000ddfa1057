"""The bundle is a runnable MONAI bundle (issue 13 item 4): `python -m monai.bundle run` on a folder of
images writes predictions (classification) or NIfTI masks (segmentation); it passes MONAI's
verify_metadata (offline, against configs/metadata_schema.json) and verify_net_in_out, carries
docs/README.md and the decision threshold. Tiny freshly initialised networks, real MONAI tooling."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedmed.bundle import write_bundle
from fedmed.data import load_datalist
from fedmed.networks import build_network
from fedmed.tasks import build_task

REPO = Path(__file__).resolve().parents[1]
CXR_NET = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}
CXR_TASK = {"name": "classification", "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"]}}
SEG_NET = {"name": "unet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                    "strides": [2], "num_res_units": 0}}
SEG_TASK = {"name": "segmentation", "args": {"roi_size": [16, 16, 16], "pixdim": [1.5, 1.5, 1.5],
                                             "class_names": ["background", "prostate"]}}
THRESHOLD = {"class": "pneumonia", "threshold": 0.42, "chosen_by": "test"}


def make_bundle(root: Path, net_spec: dict, task_spec: dict, threshold=None) -> Path:
    task = build_task(task_spec)
    return write_bundle(root / "bundle", net_spec, build_network(net_spec, seed=0).state_dict(),
                        task.network_data_format(net_spec), name="test model", postprocessing=task.inference_postprocessing(),
                        inference_config=task.inference_config() if hasattr(task, "inference_config") else None,
                        decision_threshold=threshold)


def bundle_run(bundle: Path, dataset: Path, out: Path, cwd: Path):
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
                           "--dataset_dir", str(dataset), "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_monai_bundle_run_writes_class_probabilities_for_a_folder_of_pngs_as_the_training_loader_sees_them(tmp_path):
    bundle = make_bundle(tmp_path, CXR_NET, CXR_TASK, THRESHOLD)
    images = tmp_path / "pngs"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8)).save(images / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / "small.png")
    (images / "notes.txt").write_text("not an image")
    run = bundle_run(bundle, images, tmp_path / "out", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.reader((tmp_path / "out" / "predictions.csv").open()))
    assert rows[0] == ["image", "normal", "pneumonia"]
    assert [Path(r[0]).name for r in rows[1:]] == ["gray.png", "rgb.png", "small.png"]
    probs = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-4)
    # the bundle's preprocessing is the one hospitals' datalists go through in training (fedmed.data.load_datalist)
    datalist = tmp_path / "datalist.json"
    items = [{"image": f"pngs/{n}", "label": 0} for n in ("gray.png", "rgb.png", "small.png")]
    datalist.write_text(json.dumps({"training": items, "validation": items}))
    loaded = load_datalist(datalist, image_size=28, num_classes=2)
    net = build_network(CXR_NET, seed=0).eval()
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(loaded.train.images)), dim=1)
    assert torch.allclose(probs, expected, atol=1e-4), (probs, expected)


def test_the_bundle_passes_monais_checks_and_carries_readme_and_threshold(tmp_path):
    from monai.bundle import load, verify_metadata, verify_net_in_out

    bundle = make_bundle(tmp_path, CXR_NET, CXR_TASK, THRESHOLD)
    meta = bundle / "configs" / "metadata.json"
    schema = bundle / "configs" / "metadata_schema.json"
    verify_metadata(meta_file=str(meta), filepath=str(schema))  # offline: the schema file exists, nothing is downloaded
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(bundle / "configs" / "inference.json"))
    metadata = json.loads(meta.read_text())
    assert metadata["decision_threshold"] == THRESHOLD and "fedmed" in metadata["required_packages_version"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert '"threshold": 0.42' in readme and "monai.bundle run" in readme and "normal" in readme
    bad = dict(metadata)
    del bad["network_data_format"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(schema))
    net = load(name="bundle", bundle_dir=str(tmp_path), workflow_type="inference", device="cpu")  # README usage
    reference = build_network(CXR_NET, seed=0).state_dict()
    assert all(torch.equal(net.state_dict()[k], reference[k]) for k in reference)
    no_threshold = make_bundle(tmp_path / "b", CXR_NET, CXR_TASK, None)
    assert "decision_threshold" not in json.loads((no_threshold / "configs" / "metadata.json").read_text())


@pytest.mark.slow
def test_monai_bundle_run_writes_a_nifti_mask_per_volume_on_the_inputs_grid(tmp_path):
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle = make_bundle(tmp_path, SEG_NET, SEG_TASK)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(bundle / "configs" / "metadata_schema.json"))
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"))
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    rng = np.random.default_rng(0)
    inputs = {"case1.nii.gz": ((30, 26, 12), np.diag([1.2, 1.0, 2.0, 1.0])), "case2.nii.gz": ((20, 20, 20), np.eye(4))}
    for name, (shape, affine) in inputs.items():
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), volumes / name)
    run = bundle_run(bundle, volumes, tmp_path / "masks", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert written == ["case1_seg.nii.gz", "case2_seg.nii.gz"]
    for name, (shape, affine) in inputs.items():
        mask = nib.load(tmp_path / "masks" / name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == shape and np.allclose(mask.affine, affine)  # resampled back onto the input's grid
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}


@pytest.mark.slow
def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    bundle = make_bundle(tmp_path, CXR_NET, CXR_TASK)
    (tmp_path / "empty").mkdir()
    run = bundle_run(bundle, tmp_path / "empty", tmp_path / "out", tmp_path)
    assert run.returncode != 0 and f"--dataset_dir {tmp_path / 'empty'} holds no images" in run.stderr
