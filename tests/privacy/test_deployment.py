"""Issue-5 acceptance on a real loopback deployment (2 hospitals; 3 for he, 1-2 rounds, tiny synthetic data).

- a site allowing only ``dp`` refuses a job asking for ``standard``;
- under ``dp`` sites train with record-level DP-SGD: no training loss leaves, counts and validation
  metrics are coarsened, the server's ``privacy_ledger.json`` recomputes with Opacus' accountant, a
  site whose budget is spent stops contributing and says why, and a later job continues the ledger;
- under ``he`` (secure aggregation, no provisioned keys) the server receives only masked vectors,
  never holds enough shares to unmask one site, and the aggregated model equals plaintext FedAvg
  within the fixed-point tolerance;
- ``compressed`` halves the bytes per round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmed.flare.he import AUDIT_FILE, he_job
from fedmed.networks import build_network, state_to_numpy
from fedmed.privacy.scopes import template_privacy_file
from fedmed.threshold import choose_threshold, final_site_metrics

from loopback import LoopbackFederation, tiny_job

pytestmark = pytest.mark.slow

DELTA = 1e-5


def _server_out(result: Path) -> Path:
    return result / "workspace" / "app_server" / "fedmed"


def _network(job: Path) -> dict:
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    return server["workflows"][0]["args"]["network"]


def _dp_policy(path: Path, epsilon: float, only_dp: bool) -> Path:
    policy = json.loads(template_privacy_file("client").read_text())
    if only_dp:
        policy["scopes"] = [s for s in policy["scopes"] if s["name"] == "dp"]
        policy["default_scope"] = "dp"
    for scope in policy["scopes"]:
        for f in scope.get("task_data_filters", []):
            if f["path"].endswith("DPTrainingPolicy"):
                f["args"].update({"epsilon": epsilon, "delta": DELTA})
    path.write_text(json.dumps(policy, indent=2))
    return path


def _rdp(history: list[dict]) -> float:
    accountant = RDPAccountant()
    accountant.history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history]
    return accountant.get_epsilon(delta=DELTA)


def _dp_job(dest: Path, num_rounds: int) -> Path:
    job = tiny_job(dest, num_rounds=num_rounds, scope="dp")
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"][0]["args"].update({"min_clients": 1, "wait_after_min_clients": 120})  # site-2 has no budget left; wait for site-1
    server_path.write_text(json.dumps(server))
    return job


NUM_TRAIN, NUM_VAL = 53, 29  # distinctive: neither may appear in anything that leaves a dp site
PUBLIC_TRAIN_SIZE = 64  # ceil(53 / batch 16) x 16: what the guarantee declares public
RECEIVED_LOG = "received_results.jsonl"


def _recording_server_privacy(path: Path) -> Path:
    """The server's template privacy.json with a recorder of every result arriving under dp."""
    policy = json.loads(template_privacy_file("server").read_text())
    for scope in policy["scopes"]:
        if scope["name"] == "dp":
            scope.setdefault("task_result_filters", []).insert(
                0, {"path": "fedmed.flare.filters.ReceivedResultLog", "args": {"log_file": RECEIVED_LOG}})
    path.write_text(json.dumps(policy, indent=2))
    return path


# what the dp guarantee covers (docs/privacy.md, "What leaves a dp site"): every key of every message
DP_UPDATE_META = {"num_samples", "NUM_STEPS_CURRENT_ROUND", "site", "round", "privacy_scope", "metrics", "privacy", "transfer"}
DP_UPDATE_METRICS = {"val_logit_histogram", "val_dp_epsilon", "learning_rate", "privacy_epsilon", "upload_bytes"}
DP_PRIVACY_META = {"scope", "unit", "mechanism", "noise_multiplier", "sample_rate", "max_grad_norm", "steps", "public_train_size",
                   "accountant", "delta", "epsilon", "budget", "history", "validation"}
DP_VALIDATE_DATA = {"val_logit_histogram", "val_dp_epsilon"}
DP_VALIDATE_META = {"site", "model_name"}


def _leaves(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def _check_no_exact_counts(where: str, value) -> None:
    import re

    for path, leaf in _leaves(value):
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            assert leaf not in (NUM_TRAIN, NUM_VAL), f"{where}{path} = {leaf}: an exact count left the dp site"
        if isinstance(leaf, str):
            # a count as a number of its own (not a part of 18.53 or of an id)
            assert not re.search(rf"(?<![\w.])({NUM_TRAIN}|{NUM_VAL})(?![\w]|\.\d)", leaf), \
                f"{where}{path} = {leaf!r}: an exact count left the dp site"


def check_what_left_a_dp_site(records: list[dict], site: str) -> dict:
    """Fail on anything in a dp site's results that the guarantee does not cover; count what was seen."""
    seen = {"train": 0, "validate": 0, "errors": 0}
    for record in (r for r in records if r["site"] == site):
        where = f"{site} {record['task']} result"
        _check_no_exact_counts(where, record)
        assert set(record["body_keys"]) <= {"DXO"}, f"{where}: body {record['body_keys']}"
        if record["return_code"] != "OK":
            seen["errors"] += 1
            assert record["kind"] is None and record["data"] is None, f"{where}: an error reply carried data"
            continue
        if record["task"] == "train":
            seen["train"] += 1
            assert record["kind"] == "WEIGHT_DIFF"
            assert all(set(d) == {"array", "shape"} and d["array"] == "float32" for d in record["data"].values())
            meta = record["meta"]
            assert set(meta) <= DP_UPDATE_META, f"{where}: meta {sorted(set(meta) - DP_UPDATE_META)}"
            assert meta["num_samples"] == meta["NUM_STEPS_CURRENT_ROUND"] == PUBLIC_TRAIN_SIZE
            assert set(meta["metrics"]) <= DP_UPDATE_METRICS, f"{where}: metrics {sorted(set(meta['metrics']) - DP_UPDATE_METRICS)}"
            assert set(meta["privacy"]) <= DP_PRIVACY_META, f"{where}: privacy {sorted(set(meta['privacy']) - DP_PRIVACY_META)}"
            assert set(meta["transfer"]) == {"bytes", "tensors"}
        elif record["task"] == "validate":
            seen["validate"] += 1
            assert record["kind"] == "METRICS"
            assert set(record["data"]) <= DP_VALIDATE_DATA and set(record["meta"]) <= DP_VALIDATE_META, where
        else:
            raise AssertionError(f"{where}: task {record['task']!r} is not one a dp site answers with data")
        released = (record["meta"] or {}).get("metrics", record["data"])
        if "val_logit_histogram" in released:
            assert released["val_dp_epsilon"] > 0 and len(released["val_logit_histogram"][0]) == 32
    return seen


def test_dp_only_site_refuses_standard_and_dp_sgd_ledger_budget_and_what_leaves(tmp_path):
    fed = LoopbackFederation(
        tmp_path / "fed",
        site_privacy={
            "site-1": _dp_policy(tmp_path / "site1_privacy.json", 8.0, only_dp=True),
            "site-2": _dp_policy(tmp_path / "site2_privacy.json", 2.0, only_dp=False),
        },
        num_train=NUM_TRAIN, num_val=NUM_VAL, server_privacy=_recording_server_privacy(tmp_path / "server_privacy.json"),
    )
    fed.provision()
    # site-2 spent its budget in earlier jobs: its ledger already holds steps worth more than epsilon 2
    spent = [{"noise_multiplier": 0.8, "sample_rate": 0.25, "steps": 40}]
    assert _rdp(spent) > 2.0
    (fed.kits["site-2"] / "privacy_ledger.json").write_text(json.dumps({
        "format": "fedmed-privacy-ledger/2", "unit": "record", "site": "site-2", "accountant": "rdp", "delta": DELTA,
        "epsilon": _rdp(spent), "budget": 2.0, "history": spent, "entries": [],
    }))
    try:
        fed.start()
        # 1. a site allowing only dp refuses a job that asks for standard
        _, meta, _ = fed.run_job(tiny_job(tmp_path / "job_standard", scope="standard"), timeout=180)
        assert meta["status"] != "FINISHED:COMPLETED"
        assert "site-1: NVFLARE_ERROR: privacy scope 'standard' is not allowed" in fed.site_log("localhost")
        assert "site-2: OK" in fed.site_log("localhost")  # site-2 allows standard; only site-1 refused

        # 2. dp, 2 rounds: site-1 trains with DP-SGD; site-2 has no budget left and says so
        _, meta, result = fed.run_job(_dp_job(tmp_path / "job_dp", 2), timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        metrics = json.loads((_server_out(result) / "metrics.json").read_text())
        server_ledger = json.loads((_server_out(result) / "privacy_ledger.json").read_text())
        ledger_after_job1 = json.loads((fed.kits["site-1"] / "privacy_ledger.json").read_text())
        received = [json.loads(line) for line in (_server_out(result) / RECEIVED_LOG).read_text().splitlines()]
        job_result = result

        # 3. a later job at site-1 (a fresh job process) continues the same ledger
        _, meta, result = fed.run_job(_dp_job(tmp_path / "job_dp2", 1), timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        server_ledger2 = json.loads((_server_out(result) / "privacy_ledger.json").read_text())
    finally:
        fed.stop()

    # every message that left the dp sites, as the server received it: only what the guarantee covers
    seen = check_what_left_a_dp_site(received, "site-1")
    assert seen["train"] == 2 and seen["validate"] >= 1  # two rounds, the final validation
    seen2 = check_what_left_a_dp_site(received, "site-2")
    assert seen2["errors"] >= 1 and seen2["train"] == 0
    # TensorBoard events from the dp sites: only the public numbers and the DP epsilon of each release
    for tb_site in (job_result / "workspace").rglob("tb_events/site-*"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb_site))
        events.Reload()
        assert set(events.Tags()["scalars"]) <= {"learning_rate", "privacy_epsilon", "val_dp_epsilon"}, tb_site
        for tag in events.Tags()["scalars"]:
            _check_no_exact_counts(f"{tb_site} {tag}", [e.value for e in events.Scalars(tag)])
    # site logs: none reached the server (no log streamer; the site's own log stays at the site)
    marker = "trained with DP-SGD noise multiplier"
    assert marker in fed.site_log("site-1") or any(marker in p.read_text(errors="replace") for p in fed.kits["site-1"].rglob("log.txt"))
    server_files = [p for p in (job_result / "workspace").rglob("*") if p.is_file() and p.suffix in (".txt", ".log", "")]
    assert not any(marker in p.read_text(errors="replace") for p in server_files), "a dp site's log reached the server"
    # the dp site's own log at INFO holds no exact counts either
    for log in fed.kits["site-1"].rglob("log.txt"):
        for line in log.read_text(errors="replace").splitlines():
            if "INFO" in line and "site site-1" in line:  # fedmed's messages (the timestamp before them is not checked)
                _check_no_exact_counts(f"{log} INFO", line[line.index("site site-1"):])

    rounds = metrics["rounds"]
    assert [r["contributors"] for r in rounds] == [["site-1"], ["site-1"]]
    for r in rounds:
        reported = r["sites"]["site-1"]
        assert "train_loss" not in reported and "train_seconds" not in reported
        assert reported["num_samples"] == PUBLIC_TRAIN_SIZE
    for evaluation in metrics["evaluations"]:  # the server derived AUC from the noised histogram
        for site_metrics in evaluation["sites"].values():
            assert site_metrics["val_dp_epsilon"] == 1.0 and 0 <= site_metrics["val_auc"] <= 1
    assert choose_threshold(final_site_metrics(metrics["evaluations"]))["method"] == "youden_j_on_dp_site_validation"
    # the validation account: each query charged, recomputable from its queries
    validation = server_ledger["sites"]["site-1"]["validation"]
    assert validation["mechanism"] == "discrete-laplace-histogram" and validation["delta"] == 0.0
    assert validation["epsilon"] == pytest.approx(sum(q["epsilon"] * q["count"] for q in validation["queries"]))
    assert validation["epsilon"] >= 2.0  # the two rounds' entering models (the final validation came after this update)

    # the budget: site-2 stopped contributing, with the reason in the job result and its log
    assert "budget" in rounds[0]["failed"]["site-2"] and "stops contributing" in rounds[0]["failed"]["site-2"]
    assert any("stops contributing" in p.read_text(errors="replace") for p in fed.kits["site-2"].rglob("log.txt"))
    assert json.loads((fed.kits["site-2"] / "privacy_ledger.json").read_text())["history"] == spent  # nothing charged

    # the server's privacy_ledger.json: site-1's history, fed to Opacus' RDP accountant, gives its epsilon
    entry = server_ledger["sites"]["site-1"]
    assert server_ledger["unit"] == "record" and entry["accountant"] == "rdp" and entry["budget"] == 8.0
    assert entry["epsilon"] == pytest.approx(_rdp(entry["history"]), rel=1e-9)
    assert entry["history"] == ledger_after_job1["history"] and 0 < entry["epsilon"] <= 8.0
    assert rounds[1]["sites"]["site-1"]["privacy_epsilon"] == pytest.approx(entry["epsilon"])

    # the later job continued the ledger and stayed within the budget over both jobs
    entry2 = server_ledger2["sites"]["site-1"]
    ledger_site1 = json.loads((fed.kits["site-1"] / "privacy_ledger.json").read_text())
    assert len(ledger_site1["entries"]) == 3 and len({e["job_id"] for e in ledger_site1["entries"]}) == 2
    assert entry["epsilon"] < entry2["epsilon"] == pytest.approx(_rdp(entry2["history"]), rel=1e-9)
    assert entry2["epsilon"] <= 8.0


def _fedavg_reference(job: Path, fed: LoopbackFederation) -> dict[str, np.ndarray]:
    """Plaintext FedAvg of round 0, recomputed here with the sites' own trainer, data and seeds."""
    from fedmed.aggregation import apply_update, weight_difference, weighted_mean
    from fedmed.tasks import build_task
    from fedmed.training import LocalTrainer, TrainerSettings

    torch.set_num_threads(1)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["executors"][0]["executor"]["args"]
    trainer_args = {k: v for k, v in client.items() if k in TrainerSettings.keys() and k not in ("device", "num_workers")}
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


def bytes_per_round(metrics):
    return [sum(s["upload_bytes"] for s in r["sites"].values()) for r in metrics["rounds"]]


def test_he_secure_aggregation_and_compressed_bytes(tmp_path):
    fed = LoopbackFederation(tmp_path / "fed", sites=("site-1", "site-2", "site-3"))  # he refuses fewer than 3 sites; no HE kits
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

        _, meta, result = fed.run_job(tiny_job(tmp_path / "job_int8", scope="compressed_int8"), timeout=240)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        int8 = json.loads((_server_out(result) / "metrics.json").read_text())

        # dp + he: DP-SGD at every site, then masked: the server sees neither a plaintext nor a noised update
        dp_he = he_job(tiny_job(tmp_path / "job_dp_he_base", num_rounds=1), tmp_path / "job_dp_he")
        dp_he_meta = json.loads((dp_he / "meta.json").read_text())
        dp_he_meta["scope"] = "dp_he"
        (dp_he / "meta.json").write_text(json.dumps(dp_he_meta))
        _, meta, result = fed.run_job(dp_he, timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        dp_he_audit = json.loads((_server_out(result) / AUDIT_FILE).read_text())["rounds"]
        dp_he_metrics = json.loads((_server_out(result) / "metrics.json").read_text())
    finally:
        fed.stop()

    # compressed_int8 sends exactly a quarter of the tensor bytes
    assert [4 * b for b in bytes_per_round(int8)] == bytes_per_round(standard)
    # dp_he: masked updates from every site, DP-SGD charged to each site's ledger, no training loss
    assert [r["survivors"] for r in dp_he_audit] == [["site-1", "site-2", "site-3"]]
    assert all(r["single_site_unmaskable"] == [] for r in dp_he_audit)
    for site in fed.sites:
        ledger = json.loads((fed.kits[site] / "privacy_ledger.json").read_text())
        assert ledger["unit"] == "record" and len(ledger["entries"]) == 1 and 0 < ledger["epsilon"] <= 8.0
        assert ledger["epsilon"] == pytest.approx(_rdp(ledger["history"]), rel=1e-9)
        reported = dp_he_metrics["rounds"][0]["sites"][site]
        assert "train_loss" not in reported and reported["privacy_epsilon"] == pytest.approx(ledger["epsilon"])

    # compressed halves the bytes per round (float16 instead of float32), the server aggregates float32
    assert bytes_per_round(standard)[0] > 0
    assert [2 * b for b in bytes_per_round(compressed)] == bytes_per_round(standard)
    assert all(t.dtype == torch.float32 for t in compressed_model.values())

    # he: no kit holds a key for it (nothing provisioned); every site's update arrived masked, and the
    # server received seed shares (t=2 of 3) only for sites whose masked update arrived, key shares for none
    assert not [p for kit in fed.kits.values() for p in kit.rglob("*.tenseal")]
    audit = json.loads((he_out / AUDIT_FILE).read_text())["rounds"]
    assert [(r["threshold"], r["survivors"], r["dropped"]) for r in audit] == [(2, ["site-1", "site-2", "site-3"], [])]
    assert audit[0]["single_site_unmaskable"] == []
    assert all(v["s_shares_of"] == [] for v in audit[0]["shares_received"].values())
    he_metrics = json.loads((he_out / "metrics.json").read_text())
    total = sum(size for size in (np.asarray(v).size for v in state_to_numpy(build_network(_network(job), seed=0)).values()))
    assert [r["sites"][s]["upload_bytes"] for r in he_metrics["rounds"] for s in fed.sites] == [8 * total] * 3  # one uint64 vector

    # the server learns the aggregate (the new global model): it equals plaintext FedAvg within fixed-point tolerance.
    # A 1-round job on 53 images may fall below the initial model; the gate then releases version 0 and keeps the
    # aggregate as final_global_model.pt (which only works because the he step can restore a kept version)
    release = he_metrics["release"]
    aggregate_file = "final_global_model.pt" if release["action"] == "rollback" else "global_model.pt"
    assert release["action"] == "final" or release["version"] == 0, release
    decrypted = {k: v.numpy() for k, v in torch.load(he_out / aggregate_file, map_location="cpu", weights_only=True).items()}
    reference = _fedavg_reference(job, fed)
    initial = state_to_numpy(build_network(_network(job), seed=0))
    moved = max(float(np.max(np.abs(reference[k] - initial[k]))) for k in reference)
    assert moved > 1e-3  # training changed the model, so the comparison means something
    for key, value in reference.items():
        np.testing.assert_allclose(decrypted[key], value, atol=1e-4, err_msg=key)
