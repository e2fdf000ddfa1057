"""The privacy filters on real FLARE Shareables / DXOs, chained as a site's scope chains them."""

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext

from fedmed.flare.replies import ERROR_HEADER
from fedmed.flare.filters import (
    RELEASE_REFUSED,
    CompressFilter,
    DecompressFilter,
    DPReleaseFilter,
    DPTrainingPolicy,
    Float16CompressFilter,
    Float16DecompressFilter,
    ModelSignatureRecorder,
    ReleasePolicyFilter,
    TransferMeter,
    dp_policy,
    log_streamer_components,
    resources_allow_log_streaming,
)
from fedmed.privacy.compression import CompressionError
from fedmed.privacy.dp import DPSettings, PrivacyConfigError

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


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


def _dp_update(weights, privacy=True, num_samples=47):
    rng = np.random.default_rng(0)
    diff = {k: (rng.normal(size=v.shape) * 0.01).astype(np.float32) for k, v in weights.items()}
    meta = {
        "num_samples": num_samples, MetaKey.NUM_STEPS_CURRENT_ROUND: num_samples, "site": "site-1", "round": 0,
        "metrics": {"train_loss": 0.5, "train_seconds": 1.0, "samples_per_second": 47.0, "learning_rate": 0.003,
                    "val_auc": 0.87654, "val_loss": 0.5432, "num_val_samples": 24, "privacy_epsilon": 1.5,
                    "val_score_histogram": [[3, 1, 0, 0], [0, 0, 2, 5]], "val_logit_histogram": [[3, 1, 0, 0], [0, 0, 2, 5]],
                    "val_dp_epsilon": 1.0},
        "secret_note": "n=47",  # anything the dp release does not know is dropped
    }
    if privacy:
        history = [{"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4}]
        meta["privacy"] = {"scope": "dp", "unit": "record", "mechanism": "dp-sgd", "accountant": "rdp", "delta": 1e-5,
                           "epsilon": 1.5, "budget": 8.0, "history": history, "noise_multiplier": 1.0, "sample_rate": 0.25,
                           "max_grad_norm": 1.0, "steps": 4, "public_train_size": 64,
                           "validation": {"epsilon": 1.0, "delta": 0.0, "mechanism": "discrete-laplace-histogram",
                                          "sensitivity": 1, "budget": 12.0, "queries": [{"epsilon": 1.0, "count": 1}]}}
    return diff, DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()


def test_dp_training_policy_hands_the_sites_settings_to_the_executor_through_the_context():
    ctx = _ctx(job="job-policy")
    policy = DPTrainingPolicy(epsilon=3.0, delta=1e-6, max_grad_norm=0.5, accountant="prv", ledger_file="l.json",
                              validation_epsilon=4.0, validation_queries=8)
    assert dp_policy(ctx) is None
    policy.process(DXO(DataKind.WEIGHTS, data=_global(), meta={}).to_shareable(), ctx)
    assert dp_policy(ctx) == DPSettings(epsilon=3.0, delta=1e-6, max_grad_norm=0.5, accountant="prv", ledger_file="l.json",
                                        validation_epsilon=4.0, validation_queries=8)
    assert dp_policy(ctx).query_epsilon == 0.5


class _Streamer:  # named like FLARE's JobLogStreamer: the check goes by the class name
    pass


_Streamer.__name__ = "JobLogStreamer"


def test_log_streaming_is_refused_under_dp():
    assert log_streamer_components({"auto_log_streamer": _Streamer(), "tb_writer": object()}) == ["auto_log_streamer"]
    assert log_streamer_components({"tb_writer": object()}) == []
    site_streamer = [{"path": "nvflare.app_common.logging.site_log_streamer.SiteLogStreamer"}]
    assert resources_allow_log_streaming({"components": site_streamer}) is True  # FLARE's default is to stream
    assert resources_allow_log_streaming({"allow_log_streaming": True, "components": site_streamer}) is True
    assert resources_allow_log_streaming({"allow_log_streaming": False, "components": site_streamer}) is False
    assert resources_allow_log_streaming({"allow_log_streaming": True}) is False  # nothing configured to stream
    # the shipped client template streams nothing
    import json

    from fedmed.privacy.scopes import template_privacy_file
    resources = json.loads((template_privacy_file("client").parent / "resources.json").read_text())
    assert resources_allow_log_streaming(resources) is False


def test_dp_release_sends_no_training_loss_no_exact_count_and_only_the_dp_histogram():
    ctx = _ctx(job="job-dp")
    weights = _global()
    _receive(ctx, weights)
    diff, shareable = _dp_update(weights)
    out = TransferMeter().process(DPReleaseFilter().process(ReleasePolicyFilter().process(shareable, ctx), ctx), ctx)
    assert out.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(out)
    np.testing.assert_array_equal(dxo.data["fc.weight"], diff["fc.weight"])  # DP-SGD noised it already
    # the public training size the ledger declares, never the exact 47
    assert dxo.meta["num_samples"] == 64 and dxo.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 64
    assert "secret_note" not in dxo.meta
    metrics = dxo.meta["metrics"]
    # the exact 100-bin histogram does not leave; the DP one does
    assert set(metrics) == {"val_logit_histogram", "val_dp_epsilon", "learning_rate", "privacy_epsilon", "upload_bytes"}
    assert metrics["privacy_epsilon"] == 1.5 and metrics["upload_bytes"] > 0
    assert dxo.meta["privacy"]["history"] == [{"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4}]


def test_dp_release_refuses_an_update_not_trained_with_dp_sgd_and_raw_weights():
    ctx = _ctx(job="job-dp-refuse")
    weights = _global()
    _receive(ctx, weights)
    _, shareable = _dp_update(weights, privacy=False)
    out = DPReleaseFilter().process(shareable, ctx)
    assert out.get_return_code() == RELEASE_REFUSED
    assert "not trained with record-level DP-SGD" in out.get_header(ERROR_HEADER) and "DPTrainingPolicy" in out.get_header(ERROR_HEADER)
    out = DPReleaseFilter().process(DXO(DataKind.WEIGHTS, data=weights, meta={}).to_shareable(), _ctx(job="job-dp-refuse", task="submit_model"))
    assert out.get_return_code() == RELEASE_REFUSED and "submit_model" in out.get_header(ERROR_HEADER)


def test_dp_release_of_validation_sends_only_a_dp_histogram():
    ctx = _ctx(job="job-dp-validate", task="validate")
    metrics = {"val_auc": 0.91234, "val_accuracy": 0.8333, "num_val_samples": 37, "val_score_histogram": [[3, 1], [0, 4]]}
    shareable = DXO(DataKind.METRICS, data=metrics, meta={"site": "site-1", "model_name": "global"}).to_shareable()
    assert ReleasePolicyFilter().process(shareable, ctx).get_return_code(ReturnCode.OK) == ReturnCode.OK  # standard lets it leave
    dxo = from_shareable(DPReleaseFilter().process(shareable, ctx))
    assert dxo.data == {}  # an exact histogram (no val_dp_epsilon) is not DP: nothing of it leaves
    assert dxo.meta["model_name"] == "global"
    noised = dict(metrics, val_dp_epsilon=1.0, val_logit_histogram=[[2, 1], [0, 5]])
    dxo = from_shareable(DPReleaseFilter().process(DXO(DataKind.METRICS, data=noised, meta={}).to_shareable(), ctx))
    assert dxo.data == {"val_logit_histogram": [[2, 1], [0, 5]], "val_dp_epsilon": 1.0}


@pytest.mark.parametrize(
    "args, match",
    [
        ({"epsilon": 0}, "'epsilon'"),
        ({"epsilon": "eight"}, "'epsilon'"),
        ({"delta": 1.5}, "'delta'"),
        ({"delta": -1}, "'delta'"),
        ({"max_grad_norm": float("inf")}, "'max_grad_norm'"),
        ({"accountant": "moments"}, "'accountant'"),
        ({"ledger_file": ""}, "'ledger_file'"),
    ],
)


def test_dp_policy_with_bad_configuration_raises_naming_the_file_and_key(args, match):
    with pytest.raises(PrivacyConfigError, match=match + r".*local/privacy.json"):
        DPTrainingPolicy(**args)


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


def test_int8_compression_sends_a_quarter_and_the_server_restores_float32():
    ctx = _ctx(job="job-int8", scope="compressed_int8")
    weights = _global()
    _receive(ctx, weights)
    raw, shareable = _result(weights)
    full = from_shareable(TransferMeter().process(shareable, ctx)).meta["transfer"]["bytes"]
    _, shareable = _result(weights)
    out = TransferMeter().process(CompressFilter(codec="int8").process(ReleasePolicyFilter().process(shareable, ctx), ctx), ctx)
    assert from_shareable(out).meta["transfer"]["bytes"] * 4 == full
    restored = from_shareable(DecompressFilter().process(out, _ctx(site="server")))
    assert all(v.dtype == np.float32 for v in restored.data.values()) and restored.meta["decompressed_from"] == "int8"
    np.testing.assert_allclose(restored.data["fc.weight"], raw["fc.weight"], atol=float(np.ptp(raw["fc.weight"])) / 500)
    with pytest.raises(CompressionError, match="codec"):
        CompressFilter(codec="int4")


def test_server_refuses_float16_without_a_compression_record():
    shareable = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(3, np.float16)}, meta={}).to_shareable()
    with pytest.raises(ValueError, match="compression record"):
        Float16DecompressFilter().process(shareable, _ctx(site="server"))


def test_he_server_check_drops_a_plaintext_update():
    from fedmed.flare.he import MaskedOnlyCheck
    from fedmed.privacy.secagg import MASKED_KEY

    shareable = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(3, np.float32)}, meta={"round": 0}).to_shareable()
    out = MaskedOnlyCheck().process(shareable, _ctx(site="server", scope="he"))
    assert out.get_return_code() == RELEASE_REFUSED
    assert "not one masked uint64 vector" in out.get_header(ERROR_HEADER)
    masked = DXO(DataKind.WEIGHT_DIFF, data={MASKED_KEY: np.zeros(3, np.uint64)}, meta={"round": 0}).to_shareable()
    assert MaskedOnlyCheck().process(masked, _ctx(site="server", scope="he")).get_return_code(ReturnCode.OK) == ReturnCode.OK
