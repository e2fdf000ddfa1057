"""The classification task's augmentation: on in training, off in validation and external data."""

import numpy as np
import pytest
import torch

from fedmed.data import ImageSplit, synthetic_xrays
from fedmed.networks import build_network
from fedmed.tasks.classification import AugmentedImages, ClassificationTask

AUG = {"prob": 1.0, "rotate_degrees": 10, "scale": 0.1, "translate": 0.08, "gamma": [0.7, 1.5],
       "intensity_scale": 0.1, "intensity_shift": 0.05, "noise_std": 0.02}


@pytest.fixture(scope="module")
def npz_site(tmp_path_factory):
    from fedmed.data import SiteData, save_npz

    path = tmp_path_factory.mktemp("site") / "site.npz"
    save_npz(path, SiteData(train=synthetic_xrays(64, seed=1), val=synthetic_xrays(32, seed=2)))
    return {"format": "npz", "path": str(path)}


def _batch(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), shuffle=False)
    return next(iter(loader))


def test_training_data_is_augmented_and_validation_data_is_not(npz_site):
    task = ClassificationTask(augmentation=AUG)
    train, val = task.load_site_data(npz_site, "site-a")
    assert isinstance(train, AugmentedImages)
    raw = task.load_arrays(npz_site)
    images, labels = _batch(train)
    np.testing.assert_array_equal(labels.numpy(), raw.train.labels)  # labels travel with their image
    assert float((images - torch.from_numpy(raw.train.images)).abs().mean()) > 0.01
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    again, _ = _batch(train)
    assert not torch.allclose(images, again)  # a fresh draw every epoch
    val_images, _ = _batch(val)
    np.testing.assert_array_equal(val_images.numpy(), raw.val.images)


def test_without_augmentation_training_data_is_the_images_as_they_are(npz_site):
    task = ClassificationTask()
    train, _ = task.load_site_data(npz_site, "site-a")
    np.testing.assert_array_equal(_batch(train)[0].numpy(), task.load_arrays(npz_site).train.images)


def test_external_evaluation_never_augments_and_uses_the_threshold(tmp_path):
    from fedmed.data import save_split

    task = ClassificationTask(augmentation=AUG)
    split = synthetic_xrays(40, seed=3)
    save_split(tmp_path / "ext.npz", split)
    dataset = task.load_external(tmp_path / "ext.npz")
    np.testing.assert_allclose(_batch(dataset)[0].numpy(), split.images, atol=1 / 255)
    net = build_network({"name": "small_cnn", "args": {"width": 8}}, seed=0)
    low = task.external_metrics(net, dataset, torch.device("cpu"), threshold=0.0)
    high = task.external_metrics(net, dataset, torch.device("cpu"), threshold=1.01)
    assert low["sensitivity"] == 1.0 and low["specificity"] == 0.0
    assert high["sensitivity"] == 0.0 and high["specificity"] == 1.0
    assert low["auc"] == high["auc"]  # AUC does not depend on the threshold
    assert low["num_images"] == 40


def test_bad_augmentation_keys_fail_when_the_task_is_built():
    with pytest.raises(ValueError, match="unknown key\\(s\\) rotation; known: prob, rotate_degrees"):
        ClassificationTask(augmentation={"rotation": 5})
    with pytest.raises(ValueError, match="gamma must be"):
        ClassificationTask(augmentation={"gamma": [1.5, 0.5]})
