"""The privacy filters on real FLARE Shareables / DXOs, chained as a site's scope chains them."""

import json

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext

from fedmed.flare.replies import ERROR_HEADER
from fedmed.flare.filters import (
    BUDGET_SPENT,
    RELEASE_REFUSED,
    CiphertextOnlyCheck,
    DPUpdateFilter,
    Float16CompressFilter,
    Float16DecompressFilter,
    ModelSignatureRecorder,
    ReleasePolicyFilter,
    TransferMeter,
)
from fedmed.privacy.dp import PrivacyConfigError


def _ctx(job="job-1", site="site-1", task="train", scope="dp"):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=False, sticky=False)
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, scope, private=False, sticky=False)
    return ctx


def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(16, 1, 3, 3)).astype(np.float32), "fc.weight": rng.normal(size=(2, 400)).astype(np.float32), "fc.bias": np.zeros(2, np.float32)}


def _receive(ctx, weights):
    ModelSignatureRecorder().process(DXO(DataKind.WEIGHTS, data=weights, meta={"round": 0}).to_shareable(), ctx)


def _result(weights, scale=0.01, seed=1, round_num=0):
    rng = np.random.default_rng(seed)
    diff = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in weights.items()}
    meta = {"num_samples": 50, MetaKey.NUM_STEPS_CURRENT_ROUND: 50, "site": "site-1", "round": round_num, "metrics": {"train_loss": 0.5}}
    return diff, DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()


def test_release_policy_lets_the_update_leave_and_blocks_an_extra_tensor():
    ctx = _ctx(job="job-release", scope="standard")
    weights = _global()
    _receive(ctx, weights)
    diff, shareable = _result(weights)
    out = ReleasePolicyFilter().process(shareable, ctx)
    assert out.get_return_code(ReturnCode.OK) == ReturnCode.OK
    np.testing.assert_array_equal(from_shareable(out).data["fc.bias"], diff["fc.bias"])

    leaky = dict(diff, images=np.zeros((8, 1, 28, 28), np.float32))
    blocked = ReleasePolicyFilter().process(DXO(DataKind.WEIGHT_DIFF, data=leaky, meta={}).to_shareable(), ctx)
    assert blocked.get_return_code() == RELEASE_REFUSED
    assert "images" in blocked.get_header(ERROR_HEADER) and "site-1" in blocked.get_header(ERROR_HEADER)
    with pytest.raises(ValueError):
        from_shareable(blocked)  # no data travels with a blocked result


def test_dp_filter_clips_noises_and_keeps_the_ledger(tmp_path):
    ctx = _ctx(job="job-dp")
    weights = _global()
    _receive(ctx, weights)
    ledger_file = tmp_path / "ledger.json"
    dp = DPUpdateFilter(clip_norm=0.5, noise_multiplier=0.8, delta=1e-5, epsilon_budget=100.0, ledger_file=str(ledger_file), seed=3, tb_writer_id="")
    reference = RDPAccountant()
    previous = 0.0
    for round_num in range(3):
        raw, shareable = _result(weights, scale=1.0, seed=round_num, round_num=round_num)
        out = TransferMeter().process(dp.process(ReleasePolicyFilter().process(shareable, ctx), ctx), ctx)
        dxo = from_shareable(out)
        reference.step(noise_multiplier=0.8, sample_rate=1.0)
        privacy = dxo.meta["privacy"]
        assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
        assert privacy["epsilon"] > previous and dxo.meta["metrics"]["privacy_epsilon"] == privacy["epsilon"]
        previous = privacy["epsilon"]
        assert privacy["noise_std"] == pytest.approx(0.4) and privacy["clipped"] is True
        # what leaves = clipped raw + noise of std z*C
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in raw.values()))
        noise = np.concatenate([(dxo.data[k] - raw[k] * (0.5 / norm)).ravel() for k in raw])
        assert np.std(noise) == pytest.approx(0.4, rel=0.05)
        assert dxo.meta["transfer"]["bytes"] == sum(v.nbytes for v in dxo.data.values())
    ledger = json.loads(ledger_file.read_text())
    assert [e["round"] for e in ledger["entries"]] == [0, 1, 2]
    assert ledger["epsilon"] == pytest.approx(previous)


def test_dp_filter_stops_contributing_once_the_budget_is_spent(tmp_path):
    ctx = _ctx(job="job-budget")
    weights = _global()
    _receive(ctx, weights)
    dp = DPUpdateFilter(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=8.0, ledger_file=str(tmp_path / "l.json"), tb_writer_id="")
    codes = []
    for round_num in range(4):
        _, shareable = _result(weights, round_num=round_num)
        out = dp.process(shareable, ctx)
        codes.append(out.get_return_code(ReturnCode.OK))
    assert codes == [ReturnCode.OK, ReturnCode.OK, BUDGET_SPENT, BUDGET_SPENT]
    assert "budget 8" in out.get_header(ERROR_HEADER)


def test_dp_filter_refuses_raw_weights(tmp_path):
    ctx = _ctx(job="job-dp-weights", task="submit_model")
    weights = _global()
    dp = DPUpdateFilter(ledger_file=str(tmp_path / "l.json"), tb_writer_id="")
    out = dp.process(DXO(DataKind.WEIGHTS, data=weights, meta={}).to_shareable(), ctx)
    assert out.get_return_code() == RELEASE_REFUSED
    assert "submit_model" in out.get_header(ERROR_HEADER)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"clip_norm": 0}, "clip_norm"),
        ({"noise_multiplier": -1}, "noise_multiplier"),
        ({"delta": 1.5}, "delta"),
        ({"accountant": "moments"}, "accountant"),
        ({"ledger_file": ""}, "ledger_file"),
        ({"epsilon_budget": float("inf")}, "epsilon_budget"),
    ],
)
def test_dp_filter_with_bad_configuration_raises(args, match):
    with pytest.raises(PrivacyConfigError, match=match):
        DPUpdateFilter(**args)


def test_compression_halves_the_serialized_update_and_the_server_restores_float32():
    ctx = _ctx(job="job-fp16", scope="compressed")
    weights = _global()
    _receive(ctx, weights)
    raw, shareable = _result(weights)
    full = from_shareable(TransferMeter().process(shareable, ctx)).meta["transfer"]["bytes"]
    _, shareable = _result(weights)
    out = TransferMeter().process(Float16CompressFilter().process(ReleasePolicyFilter().process(shareable, ctx), ctx), ctx)
    small = from_shareable(out).meta["transfer"]["bytes"]
    assert small * 2 == full
    restored = from_shareable(Float16DecompressFilter().process(out, _ctx(site="server")))
    assert all(v.dtype == np.float32 for v in restored.data.values())
    assert "fedmed_compression" not in restored.meta
    np.testing.assert_allclose(restored.data["fc.weight"], raw["fc.weight"], atol=1e-4)


def test_server_refuses_float16_without_a_compression_record():
    shareable = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(3, np.float16)}, meta={}).to_shareable()
    with pytest.raises(ValueError, match="compression record"):
        Float16DecompressFilter().process(shareable, _ctx(site="server"))


def test_he_server_check_drops_a_plaintext_update():
    shareable = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(3, np.float32)}, meta={"round": 0}).to_shareable()
    out = CiphertextOnlyCheck().process(shareable, _ctx(site="server", scope="he"))
    assert out.get_return_code() == RELEASE_REFUSED
    assert "plaintext" in out.get_header(ERROR_HEADER)
