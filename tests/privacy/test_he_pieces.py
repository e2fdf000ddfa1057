"""The he mode's job transform and a hospital's decryption of the encrypted global model."""

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import tenseal as ts
import torch

from fedmed.flare.he import (
    ENCRYPTED_MODEL_FILE,
    HE_AGGREGATOR_ID,
    HE_GENERATOR_ID,
    HE_STEP_ID,
    apply_he_mode,
    decrypt_for_hospital,
    decrypt_global_model,
)
from fedmed.simulate import DEFAULT_JOB, resolve_job


def test_apply_he_mode_wires_flare_he_components_and_names_the_scope(tmp_path):
    job = tmp_path / "job"
    shutil.copytree(resolve_job(DEFAULT_JOB), job)
    apply_he_mode(job)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert [w["path"] for w in server["workflows"]] == ["fedmed.flare.controller.FedAvgController"]
    args = server["workflows"][0]["args"]
    assert args["aggregation_step_id"] == HE_STEP_ID
    paths = {c["id"]: c["path"] for c in server["components"]}
    assert paths[HE_STEP_ID].endswith("HEAggregation")
    assert paths[HE_AGGREGATOR_ID].endswith("HEInTimeAccumulateWeightedAggregator")
    assert paths[HE_GENERATOR_ID].endswith("HEModelShareableGenerator")
    assert json.loads((job / "meta.json").read_text())["scope"] == "he"
    assert "aggregation" not in args and "server_optimizer" not in args  # plaintext-only settings removed


def test_he_step_refuses_fewer_than_3_sites_naming_the_reason():
    from fedmed.flare.he import HEAggregation
    from fedmed.rounds import RoundFailed

    step = HEAggregation(HE_AGGREGATOR_ID, HE_GENERATOR_ID)
    assert step.min_sites == 3
    with pytest.raises(RoundFailed, match="each hospital can decrypt the aggregate"):
        step.check_federation(2)
    step.check_federation(3)


def test_controller_refuses_aggregation_settings_beside_a_step_component():
    from fedmed.flare.controller import FedAvgController

    with pytest.raises(ValueError, match="names the step that aggregates"):
        FedAvgController(aggregation_step_id="he_step", aggregation={"name": "median"})


def _contexts():
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    context.global_scale = 2**40
    public = context.serialize(save_secret_key=False)
    return context, context.serialize(save_secret_key=True), public


def test_a_hospital_decrypts_the_encrypted_global_model_and_the_server_cannot(tmp_path):
    context, private, public = _contexts()
    rng = np.random.default_rng(0)
    weights = {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "fc.bias": rng.normal(size=2).astype(np.float32)}
    out = tmp_path / "app_server" / "fedmed"
    out.mkdir(parents=True)
    arrays = {k: np.frombuffer(ts.ckks_vector(context, v.ravel()).serialize(), dtype=np.uint8) for k, v in weights.items()}
    header = json.dumps({"shapes": {k: list(v.shape) for k, v in weights.items()},
                         "dtypes": {k: "float32" for k in weights}, "encrypted": {k: True for k in weights}})
    np.savez(out / ENCRYPTED_MODEL_FILE, __header__=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)
    (tmp_path / "client_context.tenseal").write_bytes(private)
    (tmp_path / "server_context.tenseal").write_bytes(public)

    with pytest.raises(ValueError, match="no secret key"):
        decrypt_global_model(out / ENCRYPTED_MODEL_FILE, tmp_path / "server_context.tenseal")
    model_file = decrypt_for_hospital(tmp_path / "app_server", tmp_path / "client_context.tenseal")
    state = torch.load(model_file, weights_only=True)
    for key, value in weights.items():
        assert state[key].dtype == torch.float32 and tuple(state[key].shape) == value.shape
        np.testing.assert_allclose(state[key].numpy(), value, atol=1e-5)
