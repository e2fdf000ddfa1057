"""Simulated attacks (fedmed.attacks): the --attack syntax and what each kind does to a reply."""

import numpy as np
import pytest

from fedmed.attacks import ATTACK_KINDS, AttackSyntaxError, apply_attack, parse_attack

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _reply():
    update = {"w": np.ones((2, 2), dtype=np.float32), "steps": np.array(3, dtype=np.int64)}
    meta = {"num_samples": 120, "NUM_STEPS_CURRENT_ROUND": 120,
            "metrics": {"val_auc": 0.7, "val_accuracy": 0.6, "val_loss": 0.5, "train_loss": 0.4, "num_val_samples": 20}}
    return update, meta


@pytest.mark.parametrize("text, kind, value", [("site-2:scale=-10", "scale", -10.0), ("hospital-01:samples=1e9", "samples", 1e9),
                                               ("site-3:nan", "nan", 1.0), ("site-1:metric=1e9", "metric", 1e9)])
def test_parse_attack_reads_site_kind_and_value(text, kind, value):
    attack = parse_attack(text)
    assert (attack.kind, attack.value) == (kind, value) and attack.site == text.split(":")[0]


@pytest.mark.parametrize("text", ["site-2", "site-2:explode=3", ":scale=2", "site-2:scale=lots", "site-2:scale"])
def test_bad_attack_syntax_lists_the_kinds(text):
    with pytest.raises(AttackSyntaxError) as info:
        parse_attack(text)
    assert all(kind in str(info.value) for kind in ATTACK_KINDS) and "SITE:KIND=VALUE" in str(info.value)


def test_scale_multiplies_float_tensors_and_keeps_int_buffers():
    update, meta = apply_attack(parse_attack("s:scale=-10"), *_reply())
    assert np.all(update["w"] == -10) and update["w"].dtype == np.float32 and int(update["steps"]) == 3
    assert meta["simulated_attack"] == "scale=-10"


def test_samples_claims_the_count_in_both_meta_keys():
    _, meta = apply_attack(parse_attack("s:samples=1e9"), *_reply())
    assert meta["num_samples"] == 10**9 and meta["NUM_STEPS_CURRENT_ROUND"] == 10**9


def test_nan_poisons_the_update_and_metric_claims_the_key_metrics_only():
    update, _ = apply_attack(parse_attack("s:nan"), *_reply())
    assert np.isnan(update["w"]).any()
    original_update, original_meta = _reply()
    _, meta = apply_attack(parse_attack("s:metric=1e9"), original_update, original_meta)
    assert meta["metrics"]["val_auc"] == meta["metrics"]["val_accuracy"] == 1e9
    assert meta["metrics"]["val_loss"] == 0.5 and original_meta["metrics"]["val_auc"] == 0.7  # the input is not changed


@pytest.mark.unit
def test_delay_holds_the_reply_at_the_named_site_only_and_leaves_the_update_honest():
    import time

    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    from fedmed.attacks import reply_delay
    from fedmed.flare.attack_filter import SimulatedAttackFilter

    attack = parse_attack("site-4:delay=0.3")
    assert (attack.kind, attack.value, reply_delay([attack])) == ("delay", 0.3, 0.3)
    update, meta = apply_attack(attack, *_reply())
    assert np.all(update["w"] == 1) and meta["simulated_attack"] == "delay=0.3"
    with pytest.raises(AttackSyntaxError, match="delay must be between 0 and 86400"):
        parse_attack("site-4:delay=-1")
    attack_filter = SimulatedAttackFilter([attack.to_dict()])
    for site, least, most in (("site-4", 0.3, 5.0), ("site-1", 0.0, 0.2)):
        ctx = FLContext()
        ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        shareable = DXO(DataKind.WEIGHT_DIFF, {"w": np.ones(2, dtype=np.float32)}, {"num_samples": 5}).to_shareable()
        started = time.perf_counter()
        out = from_shareable(attack_filter.process(shareable, ctx))
        assert least <= time.perf_counter() - started < most
        assert np.all(out.data["w"] == 1)
