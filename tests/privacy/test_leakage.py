"""The leakage audit's pure pieces (fedmed.privacy.leakage) and its command."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.privacy.leakage import DPAudit, image_scores, invert_update, membership_auc, site_update


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def _images(n=1, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, 64).reshape(1, 8, 8)
    images = np.clip(base + 0.3 * rng.random((n, 1, 8, 8)), 0, 1).astype(np.float32)
    return torch.from_numpy(images), torch.tensor([1, 0, 1, 0][:n])


def test_standard_update_is_the_sgd_step_and_compression_stays_close():
    model = _linear_model()
    x, y = _images(2)
    update = site_update(model, x, y, "standard", lr=0.5)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(update["1.weight"], -0.5 * model[1].weight.grad)
    for mode, tol in (("compressed", 1e-3), ("compressed_int8", 1e-2)):
        other = site_update(model, x, y, mode, lr=0.5)
        scale = float(update["1.weight"].abs().max())
        assert float((other["1.weight"] - update["1.weight"]).abs().max()) <= tol * scale


def test_dp_update_is_clipped_and_noised_with_the_budgets_noise_multiplier():
    model = _linear_model()
    x, y = _images(2)
    dp = DPAudit(epsilon=8.0, max_grad_norm=0.01, site_size=400, rounds=20)
    z = dp.noise_multiplier(2)
    assert 0.3 < z < 3
    updates = torch.stack([site_update(model, x, y, "dp", lr=1.0, dp=dp, generator=torch.Generator().manual_seed(s))["1.weight"]
                           for s in range(200)])
    # clipped signal: each record contributes at most C / B; noise std per coordinate z * C / B
    assert float(updates.std(0).mean()) == pytest.approx(z * 0.01 / 2, rel=0.1)
    assert float(updates.mean(0).norm()) <= 0.01 * 1.1


def test_inversion_recovers_an_image_from_a_standard_update_and_not_from_a_dp_one():
    model = _linear_model()
    x, y = _images(1)
    standard = invert_update(model, site_update(model, x, y, "standard"), y, (1, 8, 8), iterations=300, lr=0.1, tv_weight=0.0)
    dp = DPAudit(epsilon=1.0, max_grad_norm=0.1, site_size=400, rounds=20)
    noised = site_update(model, x, y, "dp", dp=dp, generator=torch.Generator().manual_seed(0))
    private = invert_update(model, noised, y, (1, 8, 8), iterations=300, lr=0.1, tv_weight=0.0)
    good, bad = image_scores(standard, x), image_scores(private, x)
    assert good["psnr"] > 25 and good["psnr"] > bad["psnr"] + 10


def test_image_scores_match_each_true_image_to_its_reconstruction():
    x, _ = _images(3)
    shuffled = x[[2, 0, 1]]
    scores = image_scores(shuffled, x)
    assert scores["matching"] == [1, 2, 0]
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-4) and scores["psnr"] > 60


def test_membership_auc_is_the_loss_threshold_attacks_auc():
    assert membership_auc(np.array([0.1, 0.2]), np.array([0.5, 0.6])) == 1.0
    assert membership_auc(np.array([0.5, 0.6]), np.array([0.1, 0.2])) == 0.0
    assert membership_auc(np.array([0.3, 0.3]), np.array([0.3, 0.3])) == 0.5
    with pytest.raises(ValueError):
        membership_auc(np.array([]), np.array([0.1]))


@pytest.mark.slow
def test_audit_leakage_command_writes_scores_and_the_reconstruction_png(tmp_path):
    from fedmed.cli import main

    code = main(["audit-leakage", "--out", str(tmp_path), "--iterations", "5", "--membership", "8", "--epochs", "1",
                 "--modes", "standard,dp"])
    assert code == 0
    result = json.loads((tmp_path / "leakage.json").read_text())
    assert sorted(result["modes"]) == ["dp", "standard"]
    for scores in result["modes"].values():
        assert len(scores["psnr_per_image"]) == 2 and 0 <= scores["membership_auc"] <= 1
    assert result["dp"]["noise_multiplier"] > 0 and result["no_information_baseline"]["psnr"] > 0
    assert (tmp_path / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["audit-leakage", "--out", str(tmp_path), "--modes", "he"]) == 1
