"""Every front door (simulate, python jobs/<name>/job.py, rehearse) goes through one runner: for the same options they
write the same job folder, and a refused --set value stops each of them before anything starts (issue 21 item 3,
issue 17 item 6). Real processes are kept to one short command-line run."""

import argparse
import re
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "cxr_pneumonia_fedavg"
OPTIONS = ["--rounds", "2", "--set", "lr=0.01", "--set", "network.args.channels=[8,16,32]", "--seed", "3"]


def _simulate(argv):
    from fedmed import simulate

    parser = argparse.ArgumentParser(allow_abbrev=False)
    simulate.add_arguments(parser)
    return simulate.main(parser.parse_args(argv))


def _job_py(argv):
    from fedmed.flare.recipes import run_job_script

    return run_job_script(runpy.run_path(str(JOB / "job.py"))["SPEC"], argv)


def _rehearse(argv):
    from fedmed.deploy import rehearse

    parser = argparse.ArgumentParser(allow_abbrev=False)
    rehearse.add_arguments(parser)
    return rehearse.main(parser.parse_args(argv))


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_front_door_writes_the_same_job_folder_for_the_same_options(tmp_path):
    assert _simulate(["--job", str(JOB), "--sites", "3", *OPTIONS, "--dry-run", "--out", str(tmp_path / "simulate")]) == 0
    assert _job_py(["--sites", "3", *OPTIONS, "--dry-run", "--out", str(tmp_path / "job_py")]) == 0
    assert _rehearse(["--job", str(JOB), "--hospitals", "3", *OPTIONS, "--dry-run", "--out", str(tmp_path / "rehearse")]) == 0
    folders = {door: _files(tmp_path / door / "job") for door in ("simulate", "job_py", "rehearse")}
    assert folders["simulate"], "the dry run wrote the run's job folder"
    assert folders["simulate"] == folders["job_py"] == folders["rehearse"]
    from fedmed.jobfolder import read_job_spec

    spec = read_job_spec(tmp_path / "simulate" / "job")
    assert spec.num_rounds == 2 and spec.executor["lr"] == 0.01 and spec.controller["network"]["args"]["channels"] == [8, 16, 32]
    assert spec.controller["min_clients"] == 2 and spec.min_clients == 2
    # a different option gives a different folder (the comparison can fail)
    assert _simulate(["--job", str(JOB), "--sites", "1", *OPTIONS, "--dry-run", "--out", str(tmp_path / "one_site")]) == 0
    assert _files(tmp_path / "one_site" / "job") != folders["simulate"]


def test_a_refused_set_value_stops_every_door_before_anything_is_created(tmp_path, capsys):
    assert _simulate(["--job", str(JOB), "--set", "lr=-5", "--out", str(tmp_path / "a")]) == 1
    assert _job_py(["--set", "batch_size=0", "--out", str(tmp_path / "b")]) == 1
    assert _rehearse(["--job", str(JOB), "--set", "local_epochs=0", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"--set lr=-5: the executor of job cxr_pneumonia_fedavg refuses it: .*lr must be > 0.*got -5", err), err
    assert "--set batch_size=0" in err and "batch_size must be >= 1" in err
    assert "--set local_epochs=0" in err and "local_epochs must be >= 1" in err
    assert not any((tmp_path / name).exists() for name in "abc"), "nothing was created"


def test_simulate_refuses_a_bad_set_value_within_seconds_in_a_real_process(tmp_path):
    """issue 17: `--set lr=-5` used to be refused only after the simulator had run (75 s)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "custom"))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "fedmed", "simulate", "--set", "lr=-5", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    elapsed = time.time() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--set lr=-5" in result.stderr and "lr must be > 0, got -5" in result.stderr
    assert not (tmp_path / "out").exists() and "FLARE simulator" not in result.stdout
    assert elapsed < 120, f"{elapsed:.0f} s (imports only; about 7 s on an idle 2-core machine)"
