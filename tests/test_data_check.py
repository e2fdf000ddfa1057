"""Preflight's data check reads a hospital's data with the job's own loaders; every problem names the
file and the entry (issue 14 item 2). Real PNG files, real NIfTI volumes, the real task loaders."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmed.data import SiteData, save_npz, synthetic_xrays
from fedmed.deploy.data_check import DataCheckError, check_site_data, choose_task, task_spec_from_job

REPO = Path(__file__).resolve().parents[1]
CXR = {"name": "classification", "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"]}}


def png_datalist(root: Path, train_labels=(0, 1, 1, 0), val_labels=(1, 0)) -> Path:
    rng = np.random.default_rng(0)
    lists = {}
    for split, labels in (("training", train_labels), ("validation", val_labels)):
        items = []
        for i, label in enumerate(labels):
            name = f"img/{split}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(root / name)
            items.append({"image": name, "label": label})
        lists[split] = items
    path = root / "datalist.json"
    path.write_text(json.dumps(lists))
    return path


def datalist_config(path: Path) -> dict:
    return {"format": "datalist", "path": str(path)}


def test_a_good_png_datalist_passes_with_counts_per_split_and_class(tmp_path):
    check = check_site_data(datalist_config(png_datalist(tmp_path)), "hospital-07", CXR)
    assert check.problems == []
    assert check.summary == ["training: 4 entries, 4 opened; per class normal 2, pneumonia 2",
                             "validation: 2 entries, 2 opened; per class normal 1, pneumonia 1"]


def test_missing_image_out_of_range_label_and_unreadable_image_are_each_named_by_file_and_entry(tmp_path):
    path = png_datalist(tmp_path)
    lists = json.loads(path.read_text())
    lists["training"][1]["image"] = "img/gone.png"           # missing image
    lists["training"][2]["label"] = 5                        # a 2-class job
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    lists["validation"][0]["image"] = "img/broken.png"       # unreadable
    lists["validation"].append({"img": "img/training_0.png", "label": 0})  # wrong keys in an entry
    path.write_text(json.dumps(lists))
    check = check_site_data(datalist_config(path), "hospital-07", CXR)
    assert len(check.problems) == 4, check.problems
    missing, label, unreadable, keys = check.problems
    assert f"datalist {path}: training[1]" in missing and str(tmp_path / "img" / "gone.png") in missing and "does not exist" in missing
    assert f"datalist {path}: training[2]" in label and "label 5" in label and "normal, pneumonia" in label
    assert f"datalist {path}: validation[0]" in unreadable and "broken.png" in unreadable
    assert "cannot read" in unreadable  # the job's own loader's message (fedmed.data.load_datalist)
    assert f"datalist {path}: validation[2]" in keys and "'image' and 'label'" in keys and "found: img, label" in keys
    assert check.summary[0].endswith("2 problem(s)") and check.summary[1].endswith("2 problem(s)")


def test_wrong_top_level_keys_name_the_file_and_the_keys_found(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"train": [{"image": "a.png", "label": 0}], "val": []}))
    check = check_site_data(datalist_config(path), "hospital-07", CXR)
    assert len(check.problems) == 2
    assert all(f"datalist {path}: top-level key" in p and "top-level keys found: train, val" in p for p in check.problems)
    assert "'training'" in check.problems[0] and "'validation'" in check.problems[1]


def test_sample_opens_only_n_images_per_split_but_checks_every_entry(tmp_path):
    path = png_datalist(tmp_path, train_labels=(0, 1) * 5, val_labels=(0, 1, 0, 1))
    lists = json.loads(path.read_text())
    lists["training"][9]["label"] = 2
    path.write_text(json.dumps(lists))
    check = check_site_data(datalist_config(path), "hospital-07", CXR, sample=2)
    assert len(check.problems) == 1 and "training[9]" in check.problems[0]
    assert check.summary[0].startswith("training: 10 entries, 2 opened (--sample 2)")


def test_npz_with_wrong_keys_names_the_file_and_the_keys(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.uint8))
    check = check_site_data({"format": "npz", "path": str(path)}, "hospital-07", CXR)
    assert len(check.problems) == 1
    assert str(path) in check.problems[0] and "train_images" in check.problems[0] and "images, labels" in check.problems[0]


def test_npz_with_a_label_out_of_range_and_counts_for_a_good_one(tmp_path):
    good = tmp_path / "good.npz"
    save_npz(good, SiteData(synthetic_xrays(12, 28, seed=1), synthetic_xrays(6, 28, seed=2)))
    check = check_site_data({"format": "npz", "path": str(good)}, "hospital-07", CXR)
    assert check.problems == [] and check.summary[0].startswith("train: 12 images; per class normal ")
    bad = tmp_path / "bad.npz"
    arrays = dict(np.load(good))
    arrays["val_labels"] = arrays["val_labels"].copy()
    arrays["val_labels"][3] = 4
    np.savez(bad, **arrays)
    check = check_site_data({"format": "npz", "path": str(bad)}, "hospital-07", CXR)
    assert len(check.problems) == 1 and f"{bad}:val_labels" in check.problems[0] and "label 4" in check.problems[0]


def test_msd_volumes_are_read_with_the_segmentation_task_and_a_bad_mask_is_named(tmp_path):
    import nibabel as nib

    spec = task_spec_from_job(REPO / "jobs" / "prostate_seg_fedavg")
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        image = rng.random((36, 36, 36)).astype(np.float32)
        mask = np.zeros((36, 36, 36), np.uint8)
        mask[10:20, 10:20, 10:20] = 1 if i != 2 else 3  # entry 2: a label value the 2-class job lacks
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": items[:2], "validation": items[2:], "test": ["imagesTs/x.nii.gz"]}))
    check = check_site_data({"format": "msd", "path": str(path)}, "hospital-07", spec)
    assert len(check.problems) == 1, check.problems
    assert f"datalist {path}: validation[0]" in check.problems[0] and "lab2.nii.gz" in check.problems[0]
    assert "[3.0]" in check.problems[0]
    assert check.summary[0] == "training: 2 entries, 2 opened; opened volumes containing background 2, prostate 2"


def test_the_task_comes_from_job_or_the_main_job(tmp_path):
    spec, source = choose_task(None, "datalist")
    assert spec["args"]["class_names"] == ["normal", "pneumonia"] and "cxr_pneumonia_fedavg" in source
    spec, source = choose_task(str(REPO / "jobs" / "prostate_seg_fedavg"), "msd")
    assert spec["name"] == "segmentation"
    with pytest.raises(DataCheckError, match="config_fed_server.json"):
        choose_task(str(tmp_path), "npz")


def test_the_main_tasks_shipped_for_kits_equal_the_committed_jobs():
    from fedmed.deploy.data_check import MAIN_TASKS, data_spec

    assert MAIN_TASKS["classification"] == data_spec(task_spec_from_job(REPO / "jobs" / "cxr_pneumonia_fedavg"))
    assert MAIN_TASKS["segmentation"] == data_spec(task_spec_from_job(REPO / "jobs" / "prostate_seg_fedavg"))
