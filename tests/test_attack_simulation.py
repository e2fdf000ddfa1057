"""simulate --attack in the real FLARE simulator: 3 sites x 3 rounds on a tiny npz pool, one hostile site of three.

site-3 sends its update x(-10) every round (the issue-18 attack that broke the old trimmed mean at
3 sites). The job's default (geometric median, f = the most 3 sites allow = 1) contains it: the
final model is as good on the sites' validation data as a clean model is expected to be on this
easily learnable pool, site-3 is flagged every round and the honest sites are not flagged as
outliers, and metrics.json carries ``participation``; the controller's final status line names
site-3. One run is shared by every assertion. The job folder in the repository never carries the
attack filter.
"""

import json

import numpy as np
import pytest
import torch

from fedmed.simulate import SimulationError, repo_root, simulate

pytestmark = pytest.mark.slow
ROUNDS = 3


def _pool(path, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 2, n)
        images = (rng.random((n, 28, 28)) * 80 + labels[:, None, None] * 90).astype(np.uint8)  # learnable
        return images, labels.reshape(-1, 1).astype(np.uint8)

    (tr_x, tr_y), (va_x, va_y) = split(240), split(90)
    np.savez(path, train_images=tr_x, train_labels=tr_y, val_images=va_x, val_labels=va_y)
    return path


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    out = simulate(num_sites=3, rounds=ROUNDS, data=str(_pool(tmp / "pool.npz")), out=str(tmp / "run"), seed=0,
                   attacks=["site-3:scale=-10"])
    return out, json.loads((out / "metrics.json").read_text())


def test_one_hostile_site_of_three_is_contained(hostile_run):
    out, metrics = hostile_run
    assert metrics["finished"] is True and metrics["aggregation"].startswith("geometric_median")
    for record in metrics["rounds"]:
        assert record["contributors"] == ["site-1", "site-2", "site-3"]
        assert record["sites"]["site-3"]["simulated_attack"] == "scale=-10"
        assert record["aggregation"]["f"] == 1
    final = metrics["evaluations"][-1]
    assert final["model_version"] == ROUNDS and final["median_val_auc"] > 0.9  # the pool is easy: a reversed model is far below
    assert metrics["evaluations"][-1]["median_val_auc"] > metrics["evaluations"][0]["median_val_auc"]
    model = torch.load(out / "models" / "global_model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["tolerance_f"] == 1


def test_the_hostile_site_is_flagged_every_round_and_participation_is_written(hostile_run):
    out, metrics = hostile_run
    part = metrics["participation"]
    assert set(part) == {"site-1", "site-2", "site-3"}
    assert part["site-3"]["rounds_flagged"] == ROUNDS and part["site-3"]["flagged_as"]["outlier"] == ROUNDS
    for honest in ("site-1", "site-2"):
        assert part[honest]["rounds_contributed"] == ROUNDS and part[honest]["rounds_left_out"] == 0
        assert part[honest]["flagged_as"].get("outlier", 0) == 0
    # the controller's final status line names the site flagged in most rounds
    log = (out / "simulator.log").read_text()
    final_line = next(line for line in log.splitlines() if f"finished {ROUNDS} rounds" in line)
    assert "flagged in most rounds: site-3" in final_line and "site-1" not in final_line.split("flagged in most rounds")[1]
    # the attack lives in the simulated job copy only
    client_config = (out / "job" / "app" / "config" / "config_fed_client.json").read_text()
    assert "SimulatedAttackFilter" in client_config
    assert "SimulatedAttackFilter" not in (repo_root() / "jobs" / "cxr_pneumonia_fedavg" / "app" / "config" / "config_fed_client.json").read_text()


def test_an_attack_on_a_site_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(SimulationError, match="no simulated site site-9"):
        simulate(num_sites=2, rounds=1, out=str(tmp_path / "run"), attacks=["site-9:nan"])


def test_a_job_stating_more_tolerance_than_its_sites_allow_is_refused_before_the_simulator(tmp_path):
    with pytest.raises(SimulationError, match=r"cannot start with 4 sites: aggregation geometric_median with f=2 .* "
                                              r"needs at least 5 sites, this job has 4"):
        simulate(num_sites=4, rounds=1, out=str(tmp_path / "run"), settings={"aggregation.args.f": 2})
    assert not (tmp_path / "run" / "workspace" / "server").exists()  # the simulator never started


def test_the_controller_itself_refuses_a_tolerance_its_sites_cannot_support(tmp_path, monkeypatch):
    """One step past the early check: with simulate's own check switched off, the job reaches the real
    FLARE simulator, and the server's controller refuses at start (it counts the sites that joined),
    naming f and the site count; no round runs and no model is released."""
    from fedmed import runner

    monkeypatch.setattr(runner, "check_tolerance", lambda *args, **kwargs: None)
    with pytest.raises(SimulationError, match=r"refused to start: aggregation geometric_median with f=2 .*needs at least 5 sites, "
                                              r"this job has 3"):
        simulate(num_sites=3, rounds=1, data=str(_pool(tmp_path / "pool.npz")), out=str(tmp_path / "run"), seed=0,
                 settings={"aggregation.args.f": 2})
    metrics = json.loads(next((tmp_path / "run" / "workspace").rglob("metrics.json")).read_text())
    assert metrics["rounds"] == [] and metrics.get("finished") is not True
    assert not (tmp_path / "run" / "models" / "global_model.pt").exists()
    assert (tmp_path / "run" / "INCOMPLETE").exists()
