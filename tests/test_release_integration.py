"""The release gate in the real FLARE simulator: a federation whose model collapses is never a success.

3 sites x 2 rounds on a tiny learnable npz pool with a learning rate that destroys the model (Adam at
lr 1.0: every trained version calls every image the same class, AUC 0.5). The initial model is seeded
(seed 4) so that it already ranks the pool's images fairly well (AUC about 0.88 on its val split). No
trained version beats the initial model,
so the controller's release gate fails the job naming the collapse: `simulate` exits non-zero,
writes no bundle, leaves the output folder marked INCOMPLETE, and the failed run's report says so
in its first line. A second run (final validation off) is rolled back: the released model is the
best version in the bundle, the models folder and the provenance card.
"""

import argparse
import json
import subprocess
import sys

import pytest

from fedmed import simulate as simulate_cmd
from test_attack_simulation import _pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse")
    parser = argparse.ArgumentParser()
    simulate_cmd.add_arguments(parser)
    args = parser.parse_args(["--sites", "3", "--rounds", "2", "--data", str(_pool(root / "pool.npz")), "--out", str(root / "run"),
                              "--set", "lr=1.0", "--set", "seed=4"])
    rc = simulate_cmd.main(args)
    return rc, root / "run"


def test_a_collapsed_federation_exits_non_zero_and_releases_nothing(collapsed, capsys):
    rc, out = collapsed
    assert rc == 1
    assert (out / simulate_cmd.INCOMPLETE_MARKER).exists()
    assert not (out / "bundle").exists() and not (out / "models").exists()
    metrics = json.loads((out / "workspace" / "server" / "simulate_job" / "app_server" / "fedmed" / "metrics.json").read_text())
    release = metrics["release"]
    assert release["action"] == "collapse" and release["version"] is None
    assert release["best_version"] == 0 and release["final"] is not None and release["final"] <= release["initial"]
    assert metrics["error"].startswith("release gate: collapse: no trained version beats the initial model")
    assert metrics["finished"] is False


def test_the_failed_runs_report_says_so_first(collapsed):
    _, out = collapsed
    lines = (out / "report" / "report.md").read_text().splitlines()
    assert lines[0].startswith("# FAILED RUN: Federated training report")
    assert "this run failed" in lines[2] and "release gate: collapse" in lines[2]
    assert lines[3].startswith("- Released model: **none**: collapse: no trained version beats the initial model")


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
    """2 sites x 2 rounds with the final validation switched off: the final model (version 2) is never
    validated, so the gate rolls back to the best validated version."""
    root = tmp_path_factory.mktemp("rollback")
    parser = argparse.ArgumentParser()
    simulate_cmd.add_arguments(parser)
    args = parser.parse_args(["--sites", "2", "--rounds", "2", "--data", str(_pool(root / "pool.npz")), "--out", str(root / "run"),
                              "--set", "final_validation=false"])
    return simulate_cmd.main(args), root / "run"


def test_a_rollback_releases_the_best_version_everywhere(rolled_back):
    import torch

    from fedmed.provenance import weights_sha256

    rc, out = rolled_back
    assert rc == 0 and not (out / simulate_cmd.INCOMPLETE_MARKER).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    release = metrics["release"]
    best = metrics["best"]["model_version"]
    assert release["action"] == "rollback" and release["version"] == best < 2 and "was not validated" in release["reason"]
    assert release["final_model_file"] == "final_global_model.pt"

    def sha(path):
        return weights_sha256(torch.load(path, map_location="cpu", weights_only=True))

    released = sha(out / "models" / "global_model.pt")
    assert released == sha(out / "models" / "best_global_model.pt") == sha(out / "bundle" / "models" / "model.pt")
    assert released != sha(out / "models" / "final_global_model.pt")
    card = json.loads((out / "provenance.json").read_text())
    record = card["chain"][-1]
    assert record["model_sha256"] == released and record["release"]["version"] == best
    assert record["round"] == (None if best == 0 else best - 1)  # version v is the model after round v-1
    verify = subprocess.run([sys.executable, "-m", "fedmed", "verify-provenance", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    lines = (out / "report" / "report.md").read_text().splitlines()
    assert lines[2] == "- Run status: finished." and f"**version {best}** of 2 (**rolled back**" in lines[3]
