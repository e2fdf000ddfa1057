"""Baselines: local-only and pooled models with the federation's partition and budget."""

import json
import shutil
from pathlib import Path

import pytest

from fedmed import baselines
from fedmed.data import synthetic_site_data
from fedmed.networks import build_network, state_to_numpy
from fedmed.provenance import weights_sha256
from fedmed.tasks import build_task
from fedmed.training import LocalTrainer

JOB = Path(__file__).resolve().parents[1] / "jobs" / "cxr_pneumonia_fedavg"
NETWORK = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}
TRAINER = {"local_epochs": 1, "lr": 0.003, "batch_size": 16, "seed": 0, "device": "cpu"}


def _datasets(task, sizes=((48, 24), (32, 20))):
    out = {}
    for i, (n_train, n_val) in enumerate(sizes):
        site = synthetic_site_data(n_train, n_val, 28, seed=10 + i)
        out[f"site-{i + 1}"] = (task.to_dataset(site.train), task.to_dataset(site.val))
    return out


@pytest.fixture(scope="module")
def task():
    return build_task({"name": "classification", "args": {"num_classes": 2, "image_size": 28}})


@pytest.fixture(scope="module")
def doc(task):
    return baselines.run_baselines(task, NETWORK, _datasets(task), num_rounds=2, trainer_args=TRAINER, network_seed=3, log=lambda *_: None)


def test_every_baseline_model_is_evaluated_on_every_site(doc):
    assert doc["sites"] == ["site-1", "site-2"]
    assert set(doc["results"]) == {"local-only:site-1", "local-only:site-2", "pooled"}
    for model, row in doc["results"].items():
        assert set(row) == {"site-1", "site-2"}, model
        for cell in row.values():
            assert 0.0 <= cell["val_auc"] <= 1.0 and 0.0 <= cell["val_accuracy"] <= 1.0
    assert doc["results"]["local-only:site-1"]["site-2"]["num_val_samples"] == 20
    assert doc["models"]["pooled"]["num_train_samples"] == 48 + 32
    entry = doc["models"]["local-only:site-2"]
    assert entry | {"train_seconds": 0, "train_cpu_seconds": 0} == {
        "kind": "local_only", "site": "site-2", "num_train_samples": 32, "train_seconds": 0, "train_cpu_seconds": 0,
        "model_sha256": entry["model_sha256"], "round_equivalents": 2, "kept_round_equivalent": entry["kept_round_equivalent"],
        "validation_val_auc": entry["validation_val_auc"],
    }
    assert len(entry["validation_val_auc"]) == 2 and entry["kept_round_equivalent"] in (1, 2)
    assert 0 < entry["train_cpu_seconds"]
    assert doc["budget"]["epochs"] == 2 and doc["budget"]["rounds"] == 2 and doc["budget"]["initial_model_seed"] == 3
    assert doc["pooled_validation"]["num_val_samples"] == 24 + 20
    assert set(doc["pooled_validation"]["results"]) == {"local-only:site-1", "local-only:site-2", "pooled"}


def test_federated_model_is_evaluated_on_the_same_pooled_validation_images(task, doc):
    datasets = _datasets(task)
    initial = state_to_numpy(build_network(NETWORK, seed=3))
    with_fed = baselines.run_baselines(task, NETWORK, datasets, 1, TRAINER, network_seed=3, pooled=False,
                                       federated_weights=initial, log=lambda *_: None)
    fed = with_fed["pooled_validation"]["results"]["global_model"]
    from torch.utils.data import ConcatDataset

    trainer = LocalTrainer(task, *datasets["site-1"], **TRAINER)
    expected = trainer.evaluate(NETWORK, initial, dataset=ConcatDataset([datasets["site-1"][1], datasets["site-2"][1]]))
    assert fed["val_auc"] == pytest.approx(expected["val_auc"]) and fed["num_val_samples"] == 44
    assert "pooled" not in with_fed["results"]


def test_local_only_model_is_the_federations_budget_trained_alone(task, doc):
    """Same initial model, same trainer settings, num_rounds calls of LocalTrainer.train (round r of R,
    as a federated site is told by the server); without early stopping the last weights are kept."""
    import torch

    train_ds, val_ds = _datasets(task)["site-1"]
    trainer = LocalTrainer(task, train_ds, val_ds, **TRAINER)
    weights = state_to_numpy(build_network(NETWORK, seed=3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the baselines train (float sums depend on the thread count)
    try:
        for round_num in range(2):
            weights = trainer.train(NETWORK, weights, round_num, num_rounds=2).weights
    finally:
        torch.set_num_threads(threads)
    assert weights_sha256(weights) == doc["models"]["local-only:site-1"]["model_sha256"]
    assert doc["models"]["local-only:site-1"]["kept_round_equivalent"] == 2
    one_round = trainer.train(NETWORK, state_to_numpy(build_network(NETWORK, seed=3)), 0, num_rounds=2).weights
    assert weights_sha256(one_round) != doc["models"]["local-only:site-1"]["model_sha256"]
    assert doc["models"]["local-only:site-1"]["model_sha256"] != doc["models"]["local-only:site-2"]["model_sha256"]
    assert doc["models"]["pooled"]["model_sha256"] not in {
        doc["models"][m]["model_sha256"] for m in ("local-only:site-1", "local-only:site-2")
    }


def test_job_settings_copy_the_jobs_network_rounds_and_trainer(tmp_path):
    settings = baselines.job_settings(JOB)
    server = json.loads((JOB / "app/config/config_fed_server.json").read_text())
    fedavg = next(w["args"] for w in server["workflows"] if w["path"] == baselines.CONTROLLER_PATH)
    assert settings["network"] == fedavg["network"] and settings["num_rounds"] == fedavg["num_rounds"]
    assert settings["trainer_args"]["fedprox_mu"] == 0.0
    assert "local_epochs" in settings["trainer_args"] and "tb_writer_id" not in settings["trainer_args"]

    broken = tmp_path / "job"
    shutil.copytree(JOB, broken)
    client = broken / "app/config/config_fed_client.json"
    config = json.loads(client.read_text())
    config["executors"] = []
    client.write_text(json.dumps(config))
    with pytest.raises(baselines.BaselineError, match="config_fed_client.json: no executor"):
        baselines.job_settings(broken)


def test_run_for_job_writes_baselines_json_from_site_configs(tmp_path):
    sites = {f"site-{i}": {"data": {"format": "synthetic", "num_train": 24, "num_val": 12, "seed": i}} for i in (1, 2)}
    out = tmp_path / "out" / "baselines.json"
    settings = baselines.job_settings(JOB)
    import torch

    torch.save(build_network(settings["network"], seed=5).state_dict(), tmp_path / "global_model.pt")
    doc = baselines.run_for_job(JOB, sites, out, num_rounds=1, federated_model=tmp_path / "global_model.pt", log=lambda *_: None,
                                workers=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["pooled_validation"]["results"]["global_model"]["num_val_samples"] == 24
    with pytest.raises(baselines.BaselineError, match="missing.pt does not exist"):
        baselines.run_for_job(JOB, sites, out, num_rounds=1, federated_model=tmp_path / "missing.pt", log=lambda *_: None)
    assert doc["budget"]["rounds"] == 1 and set(doc["results"]["pooled"]) == {"site-1", "site-2"}
    assert not list(out.parent.glob(".*.tmp"))
    with pytest.raises(baselines.BaselineError, match="site site-9: its config needs a 'data' object"):
        baselines.run_for_job(JOB, {"site-9": {"path": "x"}}, out, num_rounds=1, log=lambda *_: None)


def test_bad_inputs_are_named(task):
    with pytest.raises(baselines.BaselineError, match="unknown trainer settings"):
        baselines.run_baselines(task, NETWORK, _datasets(task), 1, {"learning_rate": 0.1}, log=lambda *_: None)
    with pytest.raises(baselines.BaselineError, match="num_rounds must be >= 1"):
        baselines.run_baselines(task, NETWORK, _datasets(task), 0, TRAINER, log=lambda *_: None)


@pytest.mark.unit
@pytest.mark.parametrize("history, patience, stops", [
    ([0.6, 0.7, 0.7, 0.7], 2, True),  # 2 rounds without a better score than 0.7
    ([0.6, 0.7, 0.7, 0.71], 2, False),  # the last round improved
    ([0.6, 0.7, 0.65], 2, False),  # only 1 round since the best: not yet
    ([0.6, None, None], 2, True),  # not computable counts as no improvement
    ([None, None, None], 2, False),  # nothing to compare with
    ([0.6, 0.5, 0.5, 0.5], 0, False),  # patience 0: the whole budget
])
def test_stop_early_after_patience_rounds_without_a_better_score(history, patience, stops):
    assert baselines.stop_early(history, patience) is stops


def test_early_stopping_keeps_the_best_weights_and_frees_the_budget(task):
    """A learning rate that wrecks the model after its first round: the baseline stops after patience
    rounds and keeps the weights of its best validation score; progress lines carry an ETA."""
    lines = []
    doc = baselines.run_baselines(task, NETWORK, _datasets(task), 6, {**TRAINER, "lr": 0.003, "lr_schedule": "constant"},
                                  network_seed=3, pooled=False, log=lines.append, patience=1)
    for name, entry in doc["models"].items():
        history = entry["validation_val_auc"]
        kept = entry["kept_round_equivalent"]
        assert entry["round_equivalents"] == len(history) <= 6
        assert history[kept - 1] == max(h for h in history if h is not None), name
        if entry["round_equivalents"] < 6:
            assert not baselines.stop_early(history[:-1], 1) and baselines.stop_early(history, 1)
            assert any("stopped early" in line and name in line for line in lines)
    assert any("s left" in line for line in lines)
    assert "after 1 round-equivalents" in doc["budget"]["early_stopping"]


@pytest.mark.slow
def test_worker_processes_give_the_in_process_results(task, doc):
    """Two spawned workers (one torch thread each) train the same models as this process does."""
    here, lines = doc, []
    there = baselines.run_baselines(task, NETWORK, _datasets(task), 2, TRAINER, network_seed=3, log=lines.append, workers=2,
                                    patience=0)
    assert any("in 2 worker processes" in line for line in lines)
    assert set(there["models"]) == set(here["models"]) == {"local-only:site-1", "local-only:site-2", "pooled"}
    for name in here["results"]:
        assert there["models"][name]["kept_round_equivalent"] == here["models"][name]["kept_round_equivalent"]
        for site, cell in here["results"][name].items():
            assert there["results"][name][site]["val_auc"] == pytest.approx(cell["val_auc"], abs=1e-6), (name, site)
