"""A hospital kit's own preflight entry (`startup/preflight.sh`), run as the README's hospital steps run
it: in an environment where `fedmed` is not installed (requirements without `-e ./custom`), with the
package that came with the kit. Real `nvflare provision` kits, real PNG datalists, the job's loaders."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy_helpers import provision_kits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hospital_env(tmp_path_factory):
    """(hospital kit, environment) where python3 is a venv that sees torch/monai/nvflare but not fedmed."""
    root = tmp_path_factory.mktemp("kitpreflight")
    prod = provision_kits(root / "provision", hospitals=1, name="fedmed_kitpf")
    venv = root / "hospital-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the packages of requirements.txt, as a plain path: the project venv's .pth files (its editable
    # `-e ./custom` install of fedmed among them) are not processed for a directory named in a .pth
    (site / "requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return prod / "hospital-01", env, root


def write_datalist(root: Path, entries: dict) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split in entries.values():
        for item in split:
            target = root / str(item.get("image", ""))
            if item.get("image") and "gone" not in item["image"] and not target.exists():
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(target)
    path = root / "datalist.json"
    path.write_text(json.dumps(entries))
    return path


def run_kit_preflight(kit: Path, env: dict, cwd: Path):
    return subprocess.run(["bash", str(kit / "startup" / "preflight.sh"), "--no-server"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_the_kits_preflight_entry_is_signed_and_fedmed_is_not_importable_in_the_hospital_env(hospital_env):
    kit, env, root = hospital_env
    script = kit / "startup" / "preflight.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert "preflight.sh" in json.loads((kit / "startup" / "signature.json").read_text())
    probe = subprocess.run(["python3", "-c", "import fedmed"], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert probe.returncode != 0 and "No module named 'fedmed'" in probe.stderr
    probe = subprocess.run(["python3", "-c", "import torch, monai, nvflare"], capture_output=True, text=True, env=env,
                           cwd=root, timeout=300)
    assert probe.returncode == 0, probe.stderr


def test_the_kits_preflight_reads_good_png_data_with_the_kits_own_package(hospital_env):
    kit, env, root = hospital_env
    data = root / "good"
    datalist = write_datalist(data, {"training": [{"image": f"img/t{i}.png", "label": i % 2} for i in range(6)],
                                     "validation": [{"image": f"img/v{i}.png", "label": i % 2} for i in range(2)]})
    (kit / "local" / "fedmed_site.json").write_text(json.dumps({"data": {"format": "datalist", "path": str(datalist)}}))
    run = run_kit_preflight(kit, env, root)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"read with the fedmed package at {kit.resolve()}/local/custom/fedmed" in run.stdout
    assert "OK   site data" in run.stdout and "training: 6 entries, 6 opened; per class normal 3, pneumonia 3" in run.stdout
    assert "ready to start" in run.stdout


def test_the_kits_preflight_fails_naming_file_and_entry_for_a_missing_image_a_bad_label_and_wrong_keys(hospital_env):
    kit, env, root = hospital_env
    data = root / "bad"
    datalist = write_datalist(data, {
        "training": [{"image": "img/t0.png", "label": 0}, {"image": "img/gone.png", "label": 1},
                     {"image": "img/t2.png", "label": 5}],
        "validation": [{"image": "img/v0.png", "label": 0}]})
    (kit / "local" / "fedmed_site.json").write_text(json.dumps({"data": {"format": "datalist", "path": str(datalist)}}))
    run = run_kit_preflight(kit, env, root)
    assert run.returncode == 1
    assert "FAIL site data" in run.stdout and "ready to start" not in run.stdout
    assert f"datalist {datalist}: training[1]: file {data / 'img' / 'gone.png'} does not exist" in run.stdout
    assert f"datalist {datalist}: training[2] (img/t2.png): label 5 is not a class of this job" in run.stdout
    datalist.write_text(json.dumps({"train": [{"image": "img/t0.png", "label": 0}], "validation": [{"image": "img/v0.png", "label": 0}]}))
    run = run_kit_preflight(kit, env, root)
    assert run.returncode == 1
    assert f"datalist {datalist}: top-level key 'training' must be a non-empty list" in run.stdout
    assert "top-level keys found: train, validation" in run.stdout
