"""simulate --attack in the real FLARE simulator: 3 sites x 2 rounds on a tiny npz pool, two hostile sites.

site-3 sends its update x1000 (bounded by the robust default's norm bound), site-2 claims a
validation AUC of 1e9 (its replies are refused, the site named). The final model is finite and
metrics.json names both attacks. The job folder in the repository never carries the attack filter.
"""

import json

import numpy as np
import pytest
import torch

from fedmed.simulate import SimulationError, repo_root, simulate

pytestmark = pytest.mark.slow


def _pool(path, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 2, n)
        images = (rng.random((n, 28, 28)) * 80 + labels[:, None, None] * 90).astype(np.uint8)  # learnable
        return images, labels.reshape(-1, 1).astype(np.uint8)

    (tr_x, tr_y), (va_x, va_y) = split(240), split(90)
    np.savez(path, train_images=tr_x, train_labels=tr_y, val_images=va_x, val_labels=va_y)
    return path


def test_attacks_are_applied_at_the_named_sites_and_bounded_or_refused(tmp_path):
    out = simulate(num_sites=3, rounds=2, data=str(_pool(tmp_path / "pool.npz")), out=str(tmp_path / "run"), seed=0,
                   attacks=["site-3:scale=1000", "site-2:metric=1e9"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True and metrics["aggregation"].startswith("trimmed_mean")
    for record in metrics["rounds"]:
        assert record["contributors"] == ["site-1", "site-3"]
        assert "site-2" in record["failed"]["site-2"] and "outside [0, 1]" in record["failed"]["site-2"]
        assert "simulated attack: metric=1e+09" in record["failed"]["site-2"]
        assert record["sites"]["site-3"]["simulated_attack"] == "scale=1000"
        assert record["aggregation"]["clipped"]["site-3"]["scale"] < 0.01  # the x1000 update was bounded
    model = torch.load(out / "models" / "global_model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    # the attack lives in the simulated job copy only
    client_config = (out / "job" / "app" / "config" / "config_fed_client.json").read_text()
    assert "SimulatedAttackFilter" in client_config
    assert "SimulatedAttackFilter" not in (repo_root() / "jobs" / "cxr_pneumonia_fedavg" / "app" / "config" / "config_fed_client.json").read_text()


def test_an_attack_on_a_site_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(SimulationError, match="no simulated site site-9"):
        simulate(num_sites=2, rounds=1, out=str(tmp_path / "run"), attacks=["site-9:nan"])
