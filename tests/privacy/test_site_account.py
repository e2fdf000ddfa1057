"""A dp site's two accounts (fedmed.privacy.site_account): the training ledger exact to the steps
Opacus' loader runs, the validation account of noised histograms, and what the server derives."""

import json
import math

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from fedmed import data
from fedmed.privacy.dp import (
    DPSettings,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    accountant_epsilon,
    discrete_laplace,
    ledger_file_payload,
    noised_histogram,
    poisson_sampling,
    public_train_size,
    recompute_validation_accounts,
    validation_epsilon,
)
from fedmed.privacy.site_account import DPSiteAccount
from fedmed.tasks import build_task
from fedmed.threshold import (
    DP_HISTOGRAM_KEY,
    HISTOGRAM_KEY,
    choose_threshold,
    derive_histogram_metrics,
    histogram_metrics,
    logit_edges,
    logit_histogram,
    score_histogram,
)
from fedmed.training import LocalTrainer, TrainerSettings

SPEC = {"name": "small_cnn", "args": {"width": 8}}


@pytest.mark.unit
def test_steps_per_epoch_are_the_steps_opacus_poisson_sampler_runs():
    for batch in (1, 8, 32):
        for n in range(1, 4000, 1 if batch == 1 else 7):
            rate, steps = poisson_sampling(n, batch)
            sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate)
            assert (rate, steps) == (1 / math.ceil(n / batch), len(sampler)), (n, batch)
    # the sizes where floating point makes Opacus run one step fewer than ceil(n / batch)
    assert [poisson_sampling(k, 1)[1] for k in (93, 99, 105)] == [92, 98, 104]


def _charge_like_the_trainer(ledger, plan, n, batch, epochs, rounds):
    """Charge ``rounds`` rounds as fedmed.training's DP-SGD does: Opacus' real Poisson loader, its
    own sample rate, the steps it yields."""
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
    for round_num in range(rounds):
        ledger.charge("job", round_num, [(plan["noise_multiplier"], loader.sample_rate, epochs * len(loader))])


@pytest.mark.parametrize("n, batch", [(93, 1), (99, 1), (105, 1), (117, 1), (93 * 32, 32), (99 * 32 - 5, 32),
                                      (105 * 32, 32), (210 * 16, 16), (1000, 32), (4000, 64), (20000, 32)])
def test_the_ledger_never_shows_epsilon_over_the_budget(tmp_path, n, batch):
    settings = DPSettings(epsilon=8.0, delta=min(1e-5, 0.5 / n))
    account = DPSiteAccount("site-1", settings, tmp_path / "ledger.json")
    ledger = PrivacyLedger("site-1", settings.delta, settings.epsilon, path=tmp_path / "ledger.json", validation_budget=12.0)
    plan = account.plan("job", SPEC, n, batch, 2, 0, 10, ledger)
    for round_num in range(10):
        ledger.check_affordable([(plan["noise_multiplier"], plan["sample_rate"], plan["round_steps"])], f"round {round_num}")
        _charge_like_the_trainer(ledger, plan, n, batch, 2, 1)
    assert ledger.epsilon <= settings.epsilon
    assert ledger.epsilon > settings.epsilon - 0.05  # and the plan spends it (not wastefully noisy)
    # planning with ceil(n / batch) steps and charging Opacus' 1 / len(loader) rate went over for these sizes
    k = math.ceil(n / batch)
    if int(1 / (1 / k)) < k:
        naive = accountant_epsilon("rdp", [(plan["noise_multiplier"], 1 / (k - 1), 20 * (k - 1))], settings.delta)
        assert naive > ledger.epsilon


@pytest.fixture(scope="module")
def parts():
    task = build_task({"name": "classification", "args": {"class_names": ["normal", "pneumonia"]}})
    site = data.synthetic_site_data(99, 60, seed=4)
    return task, task.to_dataset(site.train), task.to_dataset(site.val)


def test_a_dp_round_is_charged_as_planned_and_reports_only_the_public_size(tmp_path, parts):
    task, train_ds, val_ds = parts
    trainer = LocalTrainer(task, train_ds, val_ds, TrainerSettings(batch_size=1, lr=1e-3, device="cpu"))
    settings = DPSettings(epsilon=4.0, delta=1e-3, validation_epsilon=3.0, validation_queries=3)
    account = DPSiteAccount("site-1", settings, tmp_path / "ledger.json", rng=np.random.default_rng(0))
    result, privacy = account.train_round("job-1", trainer, SPEC, None, 0, 1)
    # 99 records, batch 1: Opacus runs 98 steps at rate 1/99; the ledger holds exactly that
    assert privacy["history"] == [{"noise_multiplier": privacy["noise_multiplier"], "sample_rate": 1 / 99, "steps": 98}]
    assert privacy["epsilon"] <= 4.0 and privacy["public_train_size"] == result.num_samples == 99
    assert privacy["validation"]["epsilon"] == 0.0 and privacy["validation"]["budget"] == 3.0
    with pytest.raises(PrivacyBudgetExceeded, match="site-1.*above the site's budget 4"):
        account.train_round("job-1", trainer, SPEC, result.weights, 1, 1)  # the plan was for one round
    assert account.stopped
    # validation: 3 queries of epsilon 1 each, then nothing (and nothing charged)
    scored = trainer.positive_scores(SPEC, result.weights)
    assert len(scored[0]) == len(scored[1]) == len(val_ds)
    released = [account.release_validation("job-1", f"q{i}", scored) for i in range(4)]
    assert all(set(r) == {DP_HISTOGRAM_KEY, "val_dp_epsilon"} and r["val_dp_epsilon"] == 1.0 for r in released[:3])
    assert account.release_validation("job-1", "segmentation", None) == {}  # nothing to score: nothing charged
    assert released[3] == {}
    site_file = json.loads((tmp_path / "ledger.json").read_text())
    assert site_file["validation"]["queries"] == [{"epsilon": 1.0, "count": 3}]
    assert [e["query"] for e in site_file["validation"]["entries"]] == ["q0", "q1", "q2"]
    assert validation_epsilon(site_file["validation"]["queries"]) == 3.0 == account.validation_record()["epsilon"]
    payload = ledger_file_payload({"site-1": {**privacy, "validation": account.validation_record()}})
    assert recompute_validation_accounts(payload) == {"site-1": 3.0}


@pytest.mark.unit
def test_discrete_laplace_has_the_variance_of_its_epsilon_and_is_integer():
    rng = np.random.default_rng(1)
    for eps in (0.5, 1.0, 2.0):
        draws = np.array(discrete_laplace(eps, 40000, rng))
        a = math.exp(-eps)
        assert draws.dtype.kind == "i"
        assert abs(draws.mean()) < 0.05
        assert draws.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.06)
        # P(0) = (1 - a) / (1 + a): the two-sided geometric law
        assert np.mean(draws == 0) == pytest.approx((1 - a) / (1 + a), abs=0.01)


@pytest.mark.unit
def test_noised_logit_histogram_is_non_negative_and_close_to_the_counts():
    rng = np.random.default_rng(2)
    scores, labels = 1 / (1 + np.exp(-rng.normal(4, 2, 400))), rng.integers(0, 2, 400)  # piled up near 1
    exact = logit_histogram(scores, labels)
    assert len(exact[0]) == 32 and sum(map(sum, exact)) == 400
    assert sum(c > 0 for c in exact[0]) >= 8  # log-odds bins spread what equal probability bins lump together
    top = logit_edges()[:-1] >= 0.95  # what equal probability bins (0.05 wide) would lump into one bin
    assert sum(c > 0 for c, t in zip(exact[0], top) if t) >= 3
    edges = logit_edges()
    assert edges[0] == 0 and edges[-1] == 1 and edges[16] == 0.5 and np.all(np.diff(edges) > 0)
    noised = noised_histogram(exact, 1.0, rng)
    assert len(noised[0]) == 32 and all(isinstance(c, int) and c >= 0 for row in noised for c in row)
    assert abs(sum(map(sum, noised)) - 400) < 60


@pytest.mark.unit
def test_the_server_derives_auc_accuracy_and_size_from_a_histogram():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(0.35 * labels + 0.65 * rng.random(500), 0, 1)
    histogram = score_histogram(scores, labels)
    derived = histogram_metrics(histogram)
    centers = (np.minimum((scores * 100).astype(int), 99) + 0.5) / 100  # the same data at bin resolution
    pos, neg = centers[labels == 1], centers[labels == 0]
    pairwise = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))
    assert derived["val_auc"] == pytest.approx(pairwise, abs=1e-12)
    assert derived["val_accuracy"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    assert derived["num_val_samples"] == 500
    # only a DP release is derived from; an exact site's metrics are left alone
    assert derive_histogram_metrics({HISTOGRAM_KEY: histogram}) == {HISTOGRAM_KEY: histogram}
    logits = logit_histogram(scores, labels)
    dp = derive_histogram_metrics({DP_HISTOGRAM_KEY: logits, "val_dp_epsilon": 1.0})
    assert dp["num_val_samples"] == 500 and dp["val_accuracy"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    assert abs(dp["val_auc"] - derived["val_auc"]) < 0.05
    threshold = choose_threshold({"site-1": dp, "site-2": dp})
    assert threshold["method"] == "youden_j_on_dp_site_validation" and threshold["threshold"] in logit_edges()
    assert threshold["dp"]["epsilon_per_site"] == {"site-1": 1.0, "site-2": 1.0}


@pytest.mark.unit
def test_trainer_settings_are_declared_once_and_checked():
    assert TrainerSettings.keys()[:3] == ("local_epochs", "lr", "batch_size")
    with pytest.raises(ValueError, match="job X: unknown trainer setting.*bogus.*valid: local_epochs"):
        TrainerSettings.from_mapping({"bogus": 1}, "job X")
    with pytest.raises(ValueError, match="job X: lr must be > 0"):
        TrainerSettings.from_mapping({"lr": 0}, "job X")
    assert public_train_size(99, 32) == 128 and public_train_size(64, 32) == 64
