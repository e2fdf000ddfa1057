"""Every job folder is complete, names no site or data path, and every class path in it instantiates."""

import importlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())


def _components(config):
    """Yield every {"path": ..., "args": ...} node in a FLARE config."""
    if isinstance(config, dict):
        if "path" in config and isinstance(config["path"], str) and "." in config["path"]:
            yield config
        for value in config.values():
            yield from _components(value)
    elif isinstance(config, list):
        for item in config:
            yield from _components(item)


def test_there_are_jobs():
    assert any(job.name == "cxr_pneumonia_fedavg" for job in JOBS)


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_folder_layout(job):
    for name in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json", "README.md"):
        assert (job / name).is_file(), f"{job.name} lacks {name}"
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    client_api = any(e["executor"]["path"] == "fedmed.flare.client_api.FedMedClientAPIExecutor" for e in client["executors"])
    if client_api:  # the Client API job carries exactly the sites' training script (its README says so)
        assert sorted(p.name for p in (job / "app" / "custom").iterdir() if p.name != "__pycache__") == ["train.py"]
    else:
        assert not (job / "app" / "custom").exists(), "jobs must not carry bring-your-own-code"


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_holds_no_site_names_or_data_paths(job):
    for path in job.rglob("*.json"):
        text = path.read_text()
        for forbidden in ("site-1", "hospital", ".npz", "/data/", "password", "FILL_IN"):
            assert forbidden not in text, f"{path.relative_to(REPO)} contains {forbidden!r}"


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_class_path_imports_and_instantiates(job):
    count = 0
    for config_file in ("config_fed_server.json", "config_fed_client.json"):
        config = json.loads((job / "app" / "config" / config_file).read_text())
        for node in _components(config):
            module_name, _, class_name = node["path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), class_name)
            cls(**node.get("args", {}))
            count += 1
    assert count >= 3
