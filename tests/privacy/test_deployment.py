"""Issue-5 acceptance on a real loopback deployment (2 hospitals, 1-2 rounds, tiny synthetic data).

- a site allowing only ``dp`` refuses a job asking for ``standard``;
- under ``dp`` the update the server receives differs from the raw one by noise of the configured
  scale, the ledger's epsilon grows every round and equals Opacus' value, and a site whose budget
  is spent stops contributing and says why in its log and in the job result;
- under ``he`` the server holds only ciphertext per site and the aggregated model equals
  plaintext FedAvg within CKKS tolerance;
- ``compressed`` halves the bytes per round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmed.flare.he import ENCRYPTED_MODEL_FILE, decrypt_global_model, he_job
from fedmed.networks import build_network, state_to_numpy
from fedmed.privacy.scopes import template_privacy_file

from loopback import LoopbackFederation, tiny_job

pytestmark = pytest.mark.slow

CLIP, Z, DELTA = 0.05, 2.0, 1e-5


def _server_out(result: Path) -> Path:
    return result / "workspace" / "app_server" / "fedmed"


def _network(job: Path) -> dict:
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    return server["workflows"][0]["args"]["network"]


def _dp_policy(path: Path, epsilon_budget: float, only_dp: bool) -> Path:
    policy = json.loads(template_privacy_file("client").read_text())
    if only_dp:
        policy["scopes"] = [s for s in policy["scopes"] if s["name"] == "dp"]
        policy["default_scope"] = "dp"
    for scope in policy["scopes"]:
        for f in scope.get("task_result_filters", []):
            if f["path"].endswith("DPUpdateFilter"):
                f["args"].update({"clip_norm": CLIP, "noise_multiplier": Z, "delta": DELTA, "epsilon_budget": epsilon_budget})
    path.write_text(json.dumps(policy, indent=2))
    return path


def _epsilons(rounds: int) -> list[float]:
    accountant, values = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=Z, sample_rate=1.0)
        values.append(accountant.get_epsilon(delta=DELTA))
    return values


def test_dp_only_site_refuses_standard_and_dp_ledger_noise_and_budget(tmp_path):
    eps = _epsilons(2)
    budget_site2 = (eps[0] + eps[1]) / 2  # site-2 can afford round 0 only
    fed = LoopbackFederation(
        tmp_path / "fed",
        site_privacy={
            "site-1": _dp_policy(tmp_path / "site1_privacy.json", 1000.0, only_dp=True),
            "site-2": _dp_policy(tmp_path / "site2_privacy.json", budget_site2, only_dp=False),
        },
    )
    fed.provision()
    try:
        fed.start()
        # 1. a site allowing only dp refuses a job that asks for standard
        _, meta, _ = fed.run_job(tiny_job(tmp_path / "job_standard", scope="standard"), timeout=180)
        assert meta["status"] != "FINISHED:COMPLETED"
        assert "site-1: NVFLARE_ERROR: privacy scope 'standard' is not allowed" in fed.site_log("localhost")
        assert "site-2: OK" in fed.site_log("localhost")  # site-2 allows standard; only site-1 refused

        # 2. dp: 2 rounds, min_clients 1 so the run survives site-2 spending its budget
        job = tiny_job(tmp_path / "job_dp", num_rounds=2, scope="dp")
        server_path = job / "app" / "config" / "config_fed_server.json"
        server = json.loads(server_path.read_text())
        server["workflows"][0]["args"]["min_clients"] = 1
        server_path.write_text(json.dumps(server))
        _, meta, result = fed.run_job(job, timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        out = _server_out(result)
        metrics = json.loads((out / "metrics.json").read_text())
    finally:
        fed.stop()

    # the ledger: epsilon grows every round and equals the accountant's value
    rounds = metrics["rounds"]
    assert rounds[0]["sites"]["site-1"]["privacy_epsilon"] == pytest.approx(eps[0], rel=1e-9)
    assert rounds[1]["sites"]["site-1"]["privacy_epsilon"] == pytest.approx(eps[1], rel=1e-9)
    ledger = json.loads((fed.kits["site-1"] / "privacy_ledger.json").read_text())
    assert [e["epsilon"] for e in ledger["entries"]] == pytest.approx(eps, rel=1e-9)
    assert ledger["entries"][1]["epsilon"] > ledger["entries"][0]["epsilon"]

    # the budget: site-2 contributed round 0, then stopped and said why (log and job result)
    assert rounds[0]["contributors"] == ["site-1", "site-2"] and rounds[1]["contributors"] == ["site-1"]
    assert "budget" in rounds[1]["failed"]["site-2"] and "stops contributing" in rounds[1]["failed"]["site-2"]
    assert "stops contributing" in fed.site_log("site-2") or any(
        "stops contributing" in p.read_text(errors="replace") for p in fed.kits["site-2"].rglob("log.txt")
    )
    site2_ledger = json.loads((fed.kits["site-2"] / "privacy_ledger.json").read_text())
    assert len(site2_ledger["entries"]) == 1 and site2_ledger["epsilon"] <= budget_site2

    # the noise: global model change = sum over rounds of the weighted mean of (clipped update + noise);
    # clipping bounds the signal to norm <= CLIP per round, so the spread is the noise's:
    # std = Z*CLIP*sqrt(sum_rounds sum_sites w^2) with w = 1/2, 1/2 in round 0 and 1 in round 1
    initial = state_to_numpy(build_network(_network(job), seed=0))
    final = torch.load(out / "global_model.pt", map_location="cpu", weights_only=True)
    delta = np.concatenate([(final[k].numpy().astype(np.float64) - initial[k]).ravel() for k in initial])
    expected_std = Z * CLIP * np.sqrt(0.25 + 0.25 + 1.0)
    assert np.std(delta) == pytest.approx(expected_std, rel=0.03)
    assert abs(np.mean(delta)) < 0.05 * expected_std
    signal_bound = 2 * CLIP / np.sqrt(delta.size)  # what the std could be with no noise at all
    assert np.std(delta) > 50 * signal_bound


def _fedavg_reference(job: Path, fed: LoopbackFederation) -> dict[str, np.ndarray]:
    """Plaintext FedAvg of round 0, recomputed here with the sites' own trainer, data and seeds."""
    from fedmed.aggregation import apply_update, weight_difference, weighted_mean
    from fedmed.tasks import build_task
    from fedmed.training import LocalTrainer

    torch.set_num_threads(1)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["executors"][0]["executor"]["args"]
    trainer_args = {k: client[k] for k in ("local_epochs", "lr", "batch_size", "fedprox_mu", "seed", "amp", "lr_schedule") if k in client}
    initial = state_to_numpy(build_network(server["network"], seed=server.get("seed", 0)))
    updates = []
    for site in fed.sites:
        site_config = json.loads((fed.kits[site] / "local" / "fedmed_site.json").read_text())
        task = build_task(server["task"])
        train_ds, val_ds = task.load_site_data(site_config["data"], site)
        trainer = LocalTrainer(task, train_ds, val_ds, device="cpu", **trainer_args)
        trainer.evaluate(server["network"], initial)
        result = trainer.train(server["network"], initial, 0, num_rounds=server["num_rounds"])  # as the executor does
        updates.append((weight_difference(result.weights, initial), result.num_samples))
    return apply_update(initial, weighted_mean(updates))


def test_he_ciphertext_only_aggregation_and_compressed_bytes(tmp_path):
    fed = LoopbackFederation(tmp_path / "fed", he=True)
    fed.provision()
    try:
        fed.start()
        _, meta, result = fed.run_job(tiny_job(tmp_path / "job_standard", scope="standard"), timeout=240)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        standard = json.loads((_server_out(result) / "metrics.json").read_text())

        _, meta, result = fed.run_job(tiny_job(tmp_path / "job_compressed", scope="compressed"), timeout=240)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        compressed = json.loads((_server_out(result) / "metrics.json").read_text())
        compressed_model = torch.load(_server_out(result) / "global_model.pt", map_location="cpu", weights_only=True)

        base = tiny_job(tmp_path / "job_plain", num_rounds=1)
        server_path = base / "app" / "config" / "config_fed_server.json"
        server = json.loads(server_path.read_text())
        server["workflows"][0]["args"]["network"]["args"]["dropout"] = 0.0  # deterministic reference
        server_path.write_text(json.dumps(server))
        job = he_job(base, tmp_path / "job_he")
        _, meta, result = fed.run_job(job, timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        he_out = _server_out(result)
    finally:
        fed.stop()

    # compressed halves the bytes per round (float16 instead of float32), the server aggregates float32
    def bytes_per_round(metrics):
        return [sum(s["upload_bytes"] for s in r["sites"].values()) for r in metrics["rounds"]]

    assert bytes_per_round(standard)[0] > 0
    assert [2 * b for b in bytes_per_round(compressed)] == bytes_per_round(standard)
    assert all(t.dtype == torch.float32 for t in compressed_model.values())

    # he: every site's update reached the server as ciphertext only, with no secret key
    audit = json.loads((he_out / "he_audit.json").read_text())["records"]
    assert sorted(r["site"] for r in audit if r["task"] == "train") == ["site-1", "site-2"]
    for record in audit:
        assert record["tensors"] == record["ciphertext_tensors"] > 0 and record["server_can_decrypt"] is False
    assert not (he_out / "global_model.pt").exists()  # no plaintext global model on the server
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_global_model(he_out / ENCRYPTED_MODEL_FILE, fed.kits["localhost"] / "startup" / "server_context.tenseal")

    # a hospital decrypts the aggregate: it equals plaintext FedAvg within CKKS tolerance
    decrypted = decrypt_global_model(he_out / ENCRYPTED_MODEL_FILE, fed.kits["site-1"] / "startup" / "client_context.tenseal")
    reference = _fedavg_reference(job, fed)
    initial = state_to_numpy(build_network(_network(job), seed=0))
    moved = max(float(np.max(np.abs(reference[k] - initial[k]))) for k in reference)
    assert moved > 1e-3  # training changed the model, so the comparison means something
    for key, value in reference.items():
        np.testing.assert_allclose(decrypted[key], value, atol=1e-4, err_msg=key)
