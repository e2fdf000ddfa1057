"""The leakage audit's pure pieces (fedmed.privacy.leakage) and its command."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.privacy.dp import accountant_epsilon
from fedmed.privacy.leakage import (
    POWER_EPSILON,
    DPAudit,
    canary_audit,
    empirical_epsilon,
    image_scores,
    invert_update,
    membership_auc,
    site_update,
    verdict,
)


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


def test_empirical_epsilon_bounds_a_perfect_test_by_its_trials_and_a_blind_one_near_zero():
    rng = np.random.default_rng(0)
    perfect = empirical_epsilon(np.ones(400), np.zeros(400), 1e-5)
    assert 4.0 < perfect < 5.0  # log(0.991 / 0.0092): limited only by 400 trials each way
    blind = empirical_epsilon(rng.normal(size=400), rng.normal(size=400), 1e-5)
    assert blind < 0.5
    # a Gaussian shift of 1 standard deviation: the bound sits below that mechanism's true epsilon
    shifted = empirical_epsilon(rng.normal(1.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000), 1e-5)
    assert 0.3 < shifted < accountant_epsilon("rdp", [(1.0, 1.0, 1)], 1e-5)


def test_canary_test_has_power_on_standard_and_stays_below_one_steps_epsilon_under_dp():
    model = _linear_model()
    x, y = _images(4)
    dp = DPAudit(epsilon=8.0, max_grad_norm=0.1, site_size=400, rounds=20)
    standard = canary_audit(model, x, y, "standard", dp=dp, trials=300)
    private = canary_audit(model, x, y, "dp", dp=dp, trials=300)
    assert standard["epsilon_lower_bound"] >= POWER_EPSILON and standard["step_epsilon"] is None
    assert private["epsilon_lower_bound"] <= private["step_epsilon"] and private["ledger_epsilon"] == 8.0
    assert private["epsilon_lower_bound"] < standard["epsilon_lower_bound"]


def _result(standard_ssim, dp_ssim, base=0.25, standard_eps=4.6, dp_eps=0.3, step=6.0):
    modes = {"standard": {"ssim": standard_ssim}, "dp": {"ssim": dp_ssim}}
    return {"batches": {"1": {"modes": modes, "no_information_baseline": {"ssim": base}}},
            "canary": {"standard": {"epsilon_lower_bound": standard_eps, "step_epsilon": None},
                       "dp": {"epsilon_lower_bound": dp_eps, "step_epsilon": step}}}


@pytest.mark.unit
def test_verdict_fails_when_the_positive_control_shows_nothing_or_dp_leaks():
    assert verdict(_result(0.8, 0.01))[0] == 0
    code, findings = verdict(_result(0.3, 0.01))  # standard barely above the flat image: the audit is broken
    assert code == 2 and "positive control failed" in findings[0]
    assert verdict(_result(0.8, 0.01, standard_eps=1.0))[0] == 2  # the canary test has no power
    code, findings = verdict(_result(0.8, 0.6))
    assert code == 3 and "dp leaks at batch 1" in findings[0]
    assert verdict(_result(0.8, 0.01, dp_eps=7.0))[0] == 3  # empirical epsilon above one step's accounted epsilon


@pytest.mark.slow
def test_audit_leakage_command_attacks_the_jobs_network_and_exits_2_when_its_control_shows_nothing(tmp_path):
    from fedmed.cli import main

    # 2 inversion steps cannot reconstruct anything: the positive control fails and the audit says it is broken
    code = main(["audit-leakage", "--out", str(tmp_path), "--iterations", "2", "--batches", "1,2", "--canary-trials", "100",
                 "--modes", "standard,dp"])
    assert code == 2
    result = json.loads((tmp_path / "leakage.json").read_text())
    assert result["network"]["name"] == "cxr_cnn"  # the job's own network
    assert sorted(result["batches"]) == ["1", "2"] and sorted(result["batches"]["1"]["modes"]) == ["dp", "standard"]
    assert result["verdict"]["exit_code"] == 2 and "positive control failed" in result["verdict"]["findings"][0]
    assert result["canary"]["standard"]["epsilon_lower_bound"] > result["canary"]["dp"]["epsilon_lower_bound"]
    assert result["dp"]["noise_multiplier"] > 0 and result["batches"]["1"]["no_information_baseline"]["ssim"] > 0
    assert (tmp_path / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["audit-leakage", "--out", str(tmp_path), "--modes", "he"]) == 1
