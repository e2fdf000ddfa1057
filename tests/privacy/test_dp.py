"""Record-level DP pieces: settings, the noise multiplier, the ledger against Opacus' accountants."""

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.privacy.dp import (
    DPSettings,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    PrivacyLedger,
    accountant_epsilon,
    check_delta_for_dataset,
    compact_history,
    ledger_file_payload,
    noise_multiplier_for_budget,
    poisson_sampling,
    recompute_ledger_file,
)


def test_poisson_sampling_matches_opacus_data_loader():
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    for n, batch in ((1000, 32), (48, 16), (37, 64)):
        loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
        rate, steps = poisson_sampling(n, batch)
        assert steps == len(loader) and rate == pytest.approx(loader.sample_rate)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_meets_the_budget(accountant):
    rate, steps = poisson_sampling(1000, 32)
    z = noise_multiplier_for_budget(3.0, 1e-5, rate, 10 * steps, accountant)
    eps = accountant_epsilon(accountant, [(z, rate, 10 * steps)], 1e-5)
    assert 3.0 - 0.01 <= eps <= 3.0
    # a little less noise would break the budget: the multiplier is not wastefully large
    assert accountant_epsilon(accountant, [(z * 0.98, rate, 10 * steps)], 1e-5) > 3.0 - 0.01


def test_noise_multiplier_with_earlier_jobs_in_the_ledger_meets_the_total_budget():
    rate, steps = poisson_sampling(500, 50)
    prior = [(1.2, rate, 30)]
    z = noise_multiplier_for_budget(8.0, 1e-5, rate, 40, "rdp", prior_history=prior)
    total = accountant_epsilon("rdp", prior + [(z, rate, 40)], 1e-5)
    assert 8.0 - 0.01 <= total <= 8.0
    with pytest.raises(PrivacyBudgetExceeded, match="already spent"):
        noise_multiplier_for_budget(0.5, 1e-5, rate, 40, "rdp", prior_history=prior)


def test_ledger_equals_the_opacus_accountant_fed_its_history_and_persists(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("site-1", delta=1e-5, epsilon_budget=100.0, accountant="rdp", path=path)
    reference = RDPAccountant()
    previous = 0.0
    for round_num in range(3):
        entry = ledger.charge("job-1", round_num, [(1.1, 0.05, 20)])
        reference.history.append((1.1, 0.05, 20))
        assert entry["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
        assert entry["epsilon"] > previous
        previous = entry["epsilon"]
    saved = json.loads(path.read_text())
    assert saved["unit"] == "record" and saved["history"] == [{"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 60}]
    fresh = RDPAccountant()
    fresh.history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in saved["history"]]
    assert saved["epsilon"] == pytest.approx(fresh.get_epsilon(delta=saved["delta"]), rel=1e-12)

    # a restarted site (a new ledger object on the same file) continues it
    restarted = PrivacyLedger("site-1", 1e-5, 100.0, "rdp", path)
    assert restarted.epsilon == pytest.approx(previous) and restarted.steps == 60
    restarted.charge("job-2", 0, [(0.9, 0.05, 20)])
    reference.history.append((0.9, 0.05, 20))
    assert restarted.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    assert [e["job_id"] for e in json.loads(path.read_text())["entries"]] == ["job-1"] * 3 + ["job-2"]


def test_prv_ledger_equals_opacus_prv():
    ledger = PrivacyLedger("site-1", 1e-5, 100.0, "prv")
    ledger.charge("job", 0, [(1.0, 0.1, 30)])
    reference = PRVAccountant()
    reference.history = [(1.0, 0.1, 30)]
    assert ledger.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


def test_ledger_refuses_steps_past_the_budget_and_records_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("site-1", delta=1e-5, epsilon_budget=8.0, path=path)
    ledger.charge("job", 0, [(1.0, 0.1, 10)])
    spent = ledger.epsilon
    assert spent < 8.0
    with pytest.raises(PrivacyBudgetExceeded, match="site-1.*budget 8.*stops contributing"):
        ledger.check_affordable([(1.0, 0.1, 500)], "training round 1")
    assert PrivacyLedger("site-1", 1e-5, 8.0, path=path).epsilon == pytest.approx(spent)


def test_ledger_refuses_a_file_kept_with_another_delta_or_the_old_update_level_format(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger("site-1", 1e-5, 100.0, path=path).charge("job", 0, [(1.0, 0.1, 10)])
    with pytest.raises(PrivacyConfigError, match="delta"):
        PrivacyLedger("site-1", 1e-6, 100.0, path=path)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "fedmed-privacy-ledger/1", "accountant": "rdp", "delta": 1e-5, "history": [[1.0, 1.0, 3]]}))
    with pytest.raises(PrivacyConfigError, match="record-level.*ledger_file"):
        PrivacyLedger("site-1", 1e-5, 100.0, path=old)


def test_corrupt_ledger_file_names_the_file(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(PrivacyConfigError, match=str(path)):
        PrivacyLedger("site-1", 1e-5, 100.0, path=path)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"epsilon": 0}, "epsilon"), ({"epsilon": "8"}, "epsilon"), ({"delta": -1e-5}, "delta"), ({"delta": float("nan")}, "delta"),
     ({"delta": 2.0}, "delta"), ({"max_grad_norm": 0}, "max_grad_norm"), ({"accountant": "gdp"}, "accountant"),
     ({"ledger_file": ""}, "ledger_file"), ({"epsilon": True}, "epsilon")],
)
def test_bad_settings_name_the_key_and_the_file(kwargs, key):
    with pytest.raises(PrivacyConfigError, match=rf"'{key}' \(the site's local/privacy.json"):
        DPSettings(**kwargs)


def test_delta_must_be_below_one_over_the_training_size():
    check_delta_for_dataset(1e-5, 1000)
    with pytest.raises(PrivacyConfigError, match=r"'delta'.*privacy.json.*1/\(training-set size 400\)"):
        check_delta_for_dataset(0.01, 400)


def test_ledger_file_payload_is_recomputable():
    history = compact_history([(1.0, 0.1, 10), (0.8, 0.1, 5), (1.0, 0.1, 10)])
    assert history == [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 20}, {"noise_multiplier": 0.8, "sample_rate": 0.1, "steps": 5}]
    eps = accountant_epsilon("rdp", history, 1e-5)
    payload = ledger_file_payload({
        "site-1": {"unit": "record", "accountant": "rdp", "delta": 1e-5, "epsilon": eps, "budget": 8.0, "history": history, "noise_multiplier": 1.0},
        "site-2": {"scope": "standard"},
    })
    assert payload["unit"] == "record" and list(payload["sites"]) == ["site-1"]
    assert set(payload["sites"]["site-1"]) == {"accountant", "delta", "epsilon", "budget", "history"}  # no validation sent
    assert recompute_ledger_file(payload)["site-1"] == pytest.approx(eps, rel=1e-12)
    assert ledger_file_payload({"site-2": {"scope": "standard"}}) is None
