"""Helpers for the deployment tests (real `nvflare provision`, real FLARE processes on 127.0.0.1)."""

import json
import os
import sys
from pathlib import Path

from fedmed.deploy.provision import customize_project, load_project, provision

REPO = Path(__file__).resolve().parents[2]
LEAD = "lead@fedmed.example.org"
PROJECT_ADMIN = "admin@fedmed.example.org"
# enough images that one round of the job beats the initial model (the release gate fails a job that does not)
SYNTHETIC_SITE = {"data": {"format": "synthetic", "num_train": 160, "num_val": 48, "seed": 1}}


def process_env() -> dict:
    """Environment for started kits: this one without PYTHONPATH (a developer's PYTHONPATH naming a working
    copy of fedmed would shadow the kit's signed copy, and the kit would refuse to start, as a hospital's
    would). Bytecode goes to PYTHONPYCACHEPREFIX (fedmed.deploy.processes.kit_environment), outside the
    kit, mirroring the source paths: a test sees there which copy of fedmed a kit's processes imported."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}


def preflight_env() -> dict:
    """Environment for `python -m fedmed preflight` from this checkout: the code under test (this
    environment's PYTHONPATH, if any) runs preflight, which checks where fedmed would resolve for the kit's
    start.sh run with no PYTHONPATH, as startup/preflight.sh tells it (FEDMED_START_PYTHONPATH)."""
    return {**os.environ, "FEDMED_START_PYTHONPATH": ""}


def kit_shell_env(**extra) -> dict:
    """Environment for running a kit's own shell scripts (sub_start.sh, preflight.sh) as a hospital would:
    no PYTHONPATH, this test's Python first on PATH."""
    env = process_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def provision_kits(out_dir: Path, hospitals=None, port=None, he=False, name="fedmed_test") -> Path:
    project = customize_project(load_project(REPO / "provisioning" / "project.yml"), server_name="localhost",
                                port=port, hospitals=hospitals, he=he, name=name)
    return provision(project, out_dir, log=lambda line: None)


def fill_site(kit: Path, config: dict = SYNTHETIC_SITE) -> None:
    (kit / "local" / "fedmed_site.json").write_text(json.dumps(config))


