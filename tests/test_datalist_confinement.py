"""Datalist image paths stay inside the datalist's folder (or base_dir) unless the site config allows more."""

import json

import numpy as np
import pytest

from fedmed import data
from fedmed.data import DataError
from fedmed.site_config import SiteConfigError, load_site_config

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((12, 12)) * 255).astype(np.uint8)).save(path)


def _datalist(folder, image_paths):
    entries = [{"image": p, "label": i % 2} for i, p in enumerate(image_paths)]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": entries}))
    return path


@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink"])
def test_a_datalist_entry_outside_its_folder_is_refused_naming_datalist_entry_path_and_key(tmp_path, kind):
    site = tmp_path / "site"
    outside = tmp_path / "elsewhere" / "secret.png"
    _png(outside)
    _png(site / "img" / "ok.png")
    if kind == "absolute":
        entry = str(outside)
    elif kind == "parent":
        entry = "../elsewhere/secret.png"
    else:
        (site / "link").symlink_to(outside.parent)
        entry = "link/secret.png"
    path = _datalist(site, ["img/ok.png", entry])
    with pytest.raises(DataError) as info:
        data.load_datalist(path, image_size=8)
    message = str(info.value)
    assert str(path) in message and "training[1]" in message and entry in message
    assert "allow_absolute_paths" in message and "fedmed_site.json" in message
    # the site's explicit choice lets it through
    loaded = data.load_datalist(path, image_size=8, allow_absolute_paths=True)
    assert loaded.train.images.shape == (2, 1, 8, 8)


def test_paths_inside_the_folder_or_base_dir_load(tmp_path):
    site = tmp_path / "site"
    _png(site / "img" / "a.png")
    _png(site / "img" / "b.png")
    loaded = data.load_datalist(_datalist(site, ["img/a.png", "./img/../img/b.png"]), image_size=8)
    assert loaded.train.images.shape == (2, 1, 8, 8)
    images = tmp_path / "images"
    _png(images / "c.png")
    (tmp_path / "lists").mkdir()
    loaded = data.load_datalist(_datalist(tmp_path / "lists", ["c.png"]), image_size=8, base_dir=str(images))
    assert loaded.val.images.shape == (1, 1, 8, 8)


def test_the_site_config_key_must_be_a_boolean(tmp_path):
    datalist = _datalist(tmp_path, ["a.png"])
    config = tmp_path / "fedmed_site.json"
    config.write_text(json.dumps({"data": {"format": "datalist", "path": str(datalist), "allow_absolute_paths": "yes"}}))
    with pytest.raises(SiteConfigError, match="data.allow_absolute_paths' must be true or false"):
        load_site_config(config, "hospital-01")
    config.write_text(json.dumps({"data": {"format": "datalist", "path": str(datalist), "allow_absolute_paths": True}}))
    assert load_site_config(config, "hospital-01")["data"]["allow_absolute_paths"] is True
