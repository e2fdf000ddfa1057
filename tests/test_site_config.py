import json

import pytest

from fedmed.site_config import SiteConfigError, load_site_config

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _write(tmp_path, payload):
    path = tmp_path / "fedmed_site.json"
    path.write_text(json.dumps(payload))
    return path


def test_placeholder_refuses_to_run_naming_site_file_and_key(tmp_path):
    path = _write(tmp_path, {"data": {"format": "npz", "path": "FILL_IN: absolute path to this hospital's data"}})
    with pytest.raises(SiteConfigError) as info:
        load_site_config(path, "hospital-3")
    message = str(info.value)
    assert "hospital-3" in message and str(path) in message and "data.path" in message


def test_relative_data_path_resolves_against_the_config_folder(tmp_path):
    (tmp_path / "site.npz").write_bytes(b"x")
    config = load_site_config(_write(tmp_path, {"data": {"format": "npz", "path": "site.npz"}}), "s")
    assert config["data"]["path"] == str(tmp_path / "site.npz")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(SiteConfigError, match="nothing.npz, which does not exist"):
        load_site_config(_write(tmp_path, {"data": {"format": "npz", "path": str(tmp_path / "nothing.npz")}}), "s")


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(SiteConfigError, match="'data.format' is 'csv'"):
        load_site_config(_write(tmp_path, {"data": {"format": "csv", "path": "x"}}), "s")


def test_simulation_file_picks_the_site_entry(tmp_path):
    path = _write(tmp_path, {"sites": {"site-1": {"data": {"format": "synthetic", "seed": 1}}}})
    assert load_site_config(path, "site-1")["data"]["seed"] == 1
    with pytest.raises(SiteConfigError, match="no entry under 'sites' for this site"):
        load_site_config(path, "site-9")


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(SiteConfigError, match="does not exist"):
        load_site_config(tmp_path / "absent.json", "s")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SiteConfigError, match="not valid JSON"):
        load_site_config(tmp_path / "bad.json", "s")
