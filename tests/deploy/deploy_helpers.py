"""Helpers for the deployment tests (real `nvflare provision`, real FLARE processes on 127.0.0.1)."""

import json
import os
from pathlib import Path

from fedmed.deploy.provision import customize_project, load_project, provision

REPO = Path(__file__).resolve().parents[2]
LEAD = "lead@fedmed.example.org"
PROJECT_ADMIN = "admin@fedmed.example.org"
SYNTHETIC_SITE = {"data": {"format": "synthetic", "num_train": 48, "num_val": 24, "seed": 1}}


def process_env() -> dict:
    """Environment for started kits: Python may write bytecode, so a test can see which copy of
    fedmed a kit's processes imported (its __pycache__ appears next to the imported source)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def provision_kits(out_dir: Path, hospitals=None, port=None, he=False, name="fedmed_test") -> Path:
    project = customize_project(load_project(REPO / "provisioning" / "project.yml"), server_name="localhost",
                                port=port, hospitals=hospitals, he=he, name=name)
    return provision(project, out_dir, log=lambda line: None)


def fill_site(kit: Path, config: dict = SYNTHETIC_SITE) -> None:
    (kit / "local" / "fedmed_site.json").write_text(json.dumps(config))


