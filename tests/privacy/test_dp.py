"""Pure DP pieces: clipping, noise, and the ledger against Opacus' accountants."""

import json

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.privacy.dp import (
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    PrivacyLedger,
    clip_update,
    privatize_update,
    update_norm,
)


def _update(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": (rng.normal(size=(8, 1, 3, 3)) * scale).astype(np.float32), "fc.bias": (rng.normal(size=(2,)) * scale).astype(np.float32)}


def test_clip_update_scales_to_clip_norm_and_keeps_direction():
    update = _update()
    norm = update_norm(update)
    assert norm > 1.0
    clipped, before = clip_update(update, 1.0)
    assert before == pytest.approx(norm)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["conv.weight"] * norm, update["conv.weight"], rtol=1e-4)


def test_clip_update_leaves_small_updates_alone():
    update = _update(scale=0.001)
    clipped, before = clip_update(update, 1.0)
    assert before < 1.0
    np.testing.assert_array_equal(clipped["fc.bias"], update["fc.bias"])


def test_privatize_adds_noise_of_the_configured_scale():
    rng = np.random.default_rng(1)
    big = {"w": np.zeros((200, 500), dtype=np.float32)}
    released, info = privatize_update(big, clip_norm=0.5, noise_multiplier=2.0, rng=rng)
    assert info["noise_std"] == pytest.approx(1.0)
    assert released["w"].dtype == np.float32
    assert np.std(released["w"]) == pytest.approx(1.0, rel=0.02)
    assert abs(np.mean(released["w"])) < 0.01


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_bad_dp_settings_raise(bad):
    with pytest.raises(PrivacyConfigError, match="clip_norm"):
        privatize_update(_update(), clip_norm=bad, noise_multiplier=1.0, rng=np.random.default_rng(0))
    with pytest.raises(PrivacyConfigError):
        PrivacyLedger("site-1", delta=1e-5, epsilon_budget=bad)


def test_nan_update_is_refused():
    update = _update()
    update["fc.bias"][0] = np.nan
    with pytest.raises(ValueError, match="fc.bias"):
        clip_update(update, 1.0)


def test_ledger_epsilon_grows_every_round_and_equals_opacus_rdp(tmp_path):
    ledger = PrivacyLedger("site-1", delta=1e-5, epsilon_budget=1e9, accountant="rdp", path=tmp_path / "ledger.json")
    reference = RDPAccountant()
    previous = 0.0
    for round_num in range(4):
        entry = ledger.record_release("job-1", round_num, noise_multiplier=1.3, clip_norm=1.0)
        reference.step(noise_multiplier=1.3, sample_rate=1.0)
        assert entry.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
        assert entry.epsilon > previous
        previous = entry.epsilon
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["epsilon"] == pytest.approx(previous)
    assert [e["round"] for e in saved["entries"]] == [0, 1, 2, 3]


def test_ledger_persists_across_jobs(tmp_path):
    path = tmp_path / "ledger.json"
    first = PrivacyLedger("site-1", 1e-5, 1e9, "prv", path)
    first.record_release("job-1", 0, 1.0, 1.0)
    second = PrivacyLedger("site-1", 1e-5, 1e9, "prv", path)
    entry = second.record_release("job-2", 0, 1.0, 1.0)
    reference = PRVAccountant()
    reference.step(noise_multiplier=1.0, sample_rate=1.0)
    reference.step(noise_multiplier=1.0, sample_rate=1.0)
    assert entry.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert second.rounds == 2


def test_ledger_refuses_a_release_past_the_budget_and_records_nothing(tmp_path):
    ledger = PrivacyLedger("site-1", delta=1e-5, epsilon_budget=8.0, path=tmp_path / "ledger.json")
    ledger.record_release("job", 0, 1.0, 1.0)  # RDP: epsilon about 4.7
    ledger.record_release("job", 1, 1.0, 1.0)  # about 7.1
    spent = ledger.epsilon
    with pytest.raises(PrivacyBudgetExceeded, match="site-1.*budget 8"):
        ledger.record_release("job", 2, 1.0, 1.0)  # would be about 9.0
    assert ledger.epsilon == spent and ledger.rounds == 2
    reloaded = PrivacyLedger("site-1", delta=1e-5, epsilon_budget=8.0, path=tmp_path / "ledger.json")
    assert reloaded.epsilon == pytest.approx(spent)


def test_ledger_refuses_a_file_kept_with_another_delta(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger("site-1", 1e-5, 100.0, path=path).record_release("job", 0, 1.0, 1.0)
    with pytest.raises(PrivacyConfigError, match="delta"):
        PrivacyLedger("site-1", 1e-6, 100.0, path=path)


def test_corrupt_ledger_file_names_the_file(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(PrivacyConfigError, match=str(path)):
        PrivacyLedger("site-1", 1e-5, 100.0, path=path)
