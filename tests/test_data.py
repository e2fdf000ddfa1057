import json

import numpy as np
import pytest

from fedmed import data
from fedmed.data import DataError

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _pool(n_train=600, n_val=200, seed=0):
    return data.synthetic_site_data(n_train, n_val, image_size=28, seed=seed)


def test_partition_is_seeded_and_covers_every_sample_once():
    labels = np.random.default_rng(1).integers(0, 2, 500)
    a = data.dirichlet_partition(labels, 5, alpha=0.5, seed=3)
    b = data.dirichlet_partition(labels, 5, alpha=0.5, seed=3)
    c = data.dirichlet_partition(labels, 5, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    merged = np.sort(np.concatenate(a))
    np.testing.assert_array_equal(merged, np.arange(500))


def test_partition_gives_every_site_every_class():
    labels = np.random.default_rng(2).integers(0, 2, 400)
    for part in data.dirichlet_partition(labels, 6, alpha=0.1, seed=0, min_per_class=3):
        counts = np.bincount(labels[part], minlength=2)
        assert counts.min() >= 3


def test_small_alpha_gives_more_label_skew_and_unequal_sizes():
    labels = np.random.default_rng(3).integers(0, 2, 4000)

    def skew(alpha):
        parts = data.dirichlet_partition(labels, 5, alpha=alpha, seed=0)
        fractions = [labels[p].mean() for p in parts]
        sizes = [len(p) for p in parts]
        return np.std(fractions), max(sizes) / min(sizes)

    low_alpha_skew, low_alpha_sizes = skew(0.3)
    high_alpha_skew, _ = skew(100.0)
    assert low_alpha_skew > 3 * high_alpha_skew
    assert low_alpha_sizes > 1.5


def test_partition_refuses_more_sites_than_the_data_can_fill():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match="class 1 has only 3 samples"):
        data.dirichlet_partition(labels, 5, min_per_class=1)


def test_partition_sites_carves_each_sites_validation_from_its_own_train_share():
    fed = data.partition_sites(_pool(2000, 1000), 4, alpha=0.3, seed=0)
    train_frac = [s.train.labels.mean() for s in fed.sites]
    val_frac = [s.val.labels.mean() for s in fed.sites]
    assert np.corrcoef(train_frac, val_frac)[0, 1] > 0.9  # a site validates on its own label mix
    assert sum(len(s.train) + len(s.val) for s in fed.sites) == 2000  # only the pool's train rows reach sites
    for site in fed.sites:
        assert 0.1 < len(site.val) / (len(site.train) + len(site.val)) < 0.3
        assert set(np.unique(site.val.labels)) == {0, 1}


def _row_keys(images):
    return {row.tobytes() for row in np.rint(images * 255).astype(np.uint8)}


def test_no_image_of_an_external_set_reaches_any_site():
    pool = _pool(600, 200)
    rng = np.random.default_rng(3)
    pool.test = data.ImageSplit(rng.random((50, 1, 28, 28)).astype(np.float32), rng.integers(0, 2, 50))
    fed = data.partition_sites(pool, 3, alpha=0.5, seed=1)
    assert sorted(fed.external) == ["external-test", "external-val", "external-val-acq"]
    # by provenance: site rows come from the pool's train split only, each row at most once
    rows = np.concatenate([np.concatenate([r["train"], r["val"]]) for r in fed.provenance["sites"].values()])
    assert len(rows) == len(np.unique(rows)) == 600 and rows.max() < 600
    # by content: no external image equals any site image, before or after the scanner shifts
    site_images = set()
    for site in fed.sites:
        site_images |= _row_keys(site.train.images) | _row_keys(site.val.images)
    raw_pool_train = _row_keys(pool.train.images)
    for name, split in fed.external.items():
        assert not (_row_keys(split.images) & site_images), name
    assert not (_row_keys(pool.val.images) & raw_pool_train)
    np.testing.assert_array_equal(fed.external["external-val"].labels, pool.val.labels)


def test_external_hospital_has_a_scanner_profile_of_its_own():
    pool = _pool(400, 100)
    fed = data.partition_sites(pool, 3, seed=0)
    external = fed.external["external-val"].images
    for index in range(3):
        assert not np.allclose(external, data.scanner_shift(pool.val.images, index, 0))
    assert not np.allclose(external, pool.val.images)


def test_a_site_too_small_to_carve_validation_names_the_site_and_minimum():
    with pytest.raises(DataError, match=r"site site-2 holds only 3 image\(s\) of class 1.*at least 4"):
        data.carve_validation(np.array([0] * 10 + [1] * 3), 0.2, 0, "site-2", source="pool.npz")


def test_a_pool_too_small_for_the_sites_names_the_file_and_minimum():
    pool = _pool(60, 20)
    with pytest.raises(DataError, match=r"pool.npz: train split: .*4 images per class"):
        data.partition_sites(pool, 10, source="pool.npz")


def test_a_pool_without_a_usable_validation_split_is_refused():
    pool = _pool(400, 50)
    pool.val.labels[:] = 1
    with pytest.raises(DataError, match="pool.npz: the val split holds only class 1"):
        data.partition_sites(pool, 2, source="pool.npz")


def test_external_split_round_trip(tmp_path):
    split = _pool(20, 2).train
    data.save_split(tmp_path / "ext.npz", split)
    loaded = data.load_split(tmp_path / "ext.npz")
    np.testing.assert_array_equal(loaded.labels, split.labels)
    np.testing.assert_allclose(loaded.images, split.images, atol=1 / 255)


def test_scanner_shift_differs_per_site_and_stays_in_range():
    images = _pool(20, 2).train.images
    a, b = data.scanner_shift(images, 0), data.scanner_shift(images, 1)
    assert not np.allclose(a, b)
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, data.scanner_shift(images, 0))


def test_npz_round_trip(tmp_path):
    pool = _pool(30, 10)
    data.save_npz(tmp_path / "site.npz", pool)
    loaded = data.load_npz(tmp_path / "site.npz")
    assert loaded.train.images.shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(loaded.val.labels, pool.val.labels)
    np.testing.assert_allclose(loaded.train.images, pool.train.images, atol=1 / 255)
    assert not list(tmp_path.glob("*.partial"))


def test_npz_accepts_medmnist_layout_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_{k}": (rng.integers(0, 255, (8, 28, 28), dtype=np.uint8) if k == "images" else rng.integers(0, 2, (8, 1)))
        for s in ("train", "val", "test") for k in ("images", "labels")
    }
    np.savez(tmp_path / "m.npz", **arrays)
    loaded = data.load_npz(tmp_path / "m.npz")
    assert loaded.test is not None and loaded.test.images.shape == (8, 1, 28, 28)
    assert loaded.train.images.max() <= 1.0


def test_npz_without_expected_keys_names_the_file_and_the_keys(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match=r"bad\.npz lacks key\(s\) train_images, train_labels, val_images, val_labels"):
        data.load_npz(tmp_path / "bad.npz")


def test_npz_with_labels_out_of_range_says_which_label(tmp_path):
    np.savez(tmp_path / "l.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([0, 1, 5]),
             val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.array([0, 1]))
    with pytest.raises(DataError, match="label 5 is out of range for 2 classes"):
        data.load_npz(tmp_path / "l.npz")


def test_corrupt_npz_is_reported(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_npz(tmp_path / "c.npz")


def test_missing_npz_is_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_npz(tmp_path / "nope.npz")


def _png(path, value):
    from PIL import Image

    Image.fromarray(np.full((40, 40), value, dtype=np.uint8)).save(path)


def test_datalist_of_png_files_loads_resized_and_scaled(tmp_path):
    entries = []
    for i in range(4):
        _png(tmp_path / f"img{i}.png", 40 * i + 10)
        entries.append({"image": f"img{i}.png", "label": i % 2})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries, "validation": entries[:2]}))
    loaded = data.load_datalist(tmp_path / "datalist.json", image_size=28)
    assert loaded.train.images.shape == (4, 1, 28, 28)
    assert loaded.train.images.min() >= 0 and loaded.train.images.max() <= 1
    assert loaded.val.labels.tolist() == [0, 1]


def test_datalist_pointing_at_nothing_names_the_missing_image(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "ghost.png", "label": 0}], "validation": [{"image": "ghost.png", "label": 0}]}))
    with pytest.raises(DataError, match=r"training\[0\] image .*ghost\.png does not exist"):
        data.load_datalist(tmp_path / "d.json")


def test_datalist_with_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "broken.png", "label": 0}], "validation": [{"image": "broken.png", "label": 0}]}))
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        data.load_datalist(tmp_path / "d.json")


def test_datalist_without_validation_list_is_rejected(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="'training' must be a non-empty list"):
        data.load_datalist(tmp_path / "d.json")


def test_datalist_label_out_of_range(tmp_path):
    _png(tmp_path / "a.png", 100)
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.png", "label": 2}], "validation": [{"image": "a.png", "label": 0}]}))
    with pytest.raises(DataError, match="label 2 is out of range"):
        data.load_datalist(tmp_path / "d.json")


def test_synthetic_xrays_are_seeded_and_balanced():
    a, b = data.synthetic_xrays(200, seed=5), data.synthetic_xrays(200, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert 0.35 < a.labels.mean() < 0.65
    # the class signal: pneumonia images are brighter inside the lungs on average
    assert a.images[a.labels == 1].mean() > a.images[a.labels == 0].mean()
