import numpy as np
import pytest
import torch

from fedmed import data
from fedmed.networks import build_network, numpy_to_state, state_to_numpy
from fedmed.tasks import build_task
from fedmed.training import LocalTrainer, TrainingAborted

SPEC = {"name": "small_cnn", "args": {"width": 8}}


@pytest.fixture(scope="module")
def trainer_parts():
    task = build_task({"name": "classification", "args": {"class_names": ["normal", "pneumonia"]}})
    site = data.synthetic_site_data(256, 128, seed=4)
    return task, task.to_dataset(site.train), task.to_dataset(site.val)


def _trainer(parts, **kwargs):
    task, train_ds, val_ds = parts
    kwargs = {"lr": 3e-3, "batch_size": 32, "device": "cpu", **kwargs}
    return LocalTrainer(task, train_ds, val_ds, **kwargs)


def test_an_epoch_lowers_the_validation_loss(trainer_parts):
    trainer = _trainer(trainer_parts, local_epochs=3)
    start = state_to_numpy(build_network(SPEC, seed=0))
    before = trainer.evaluate(SPEC, start)
    result = trainer.train(SPEC, start)
    after = trainer.evaluate(SPEC, result.weights)
    assert after["val_loss"] < before["val_loss"]
    assert after["val_auc"] > before["val_auc"]


def test_train_reports_real_sample_counts_not_batches(trainer_parts):
    result = _trainer(trainer_parts).train(SPEC, None)
    assert result.num_samples == 256
    assert set(result.weights) == set(build_network(SPEC).state_dict())
    assert result.metrics["train_loss"] > 0


def test_train_starts_from_the_given_weights(trainer_parts):
    trainer = _trainer(trainer_parts)
    zeros = {k: np.zeros_like(v) for k, v in state_to_numpy(build_network(SPEC)).items()}
    model = trainer.model(SPEC, zeros)
    assert all(float(p.abs().sum()) == 0 for p in model.parameters())


def test_evaluate_uses_monai_auc_and_reports_counts(trainer_parts):
    metrics = _trainer(trainer_parts).evaluate(SPEC, None)
    assert set(metrics) == {"val_auc", "val_accuracy", "val_loss", "num_val_samples", "val_score_histogram"}
    assert metrics["num_val_samples"] == 128
    assert sum(map(sum, metrics["val_score_histogram"])) == 128  # every image in one bin of its class
    assert 0.0 <= metrics["val_auc"] <= 1.0


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(trainer_parts):
    start = state_to_numpy(build_network(SPEC, seed=1))

    def drift(mu):
        result = _trainer(trainer_parts, local_epochs=2, fedprox_mu=mu).train(SPEC, start)
        return sum(float(np.sum((result.weights[k] - start[k]) ** 2)) for k in start)

    assert drift(10.0) < drift(0.0)


def test_abort_stops_training(trainer_parts):
    with pytest.raises(TrainingAborted):
        _trainer(trainer_parts).train(SPEC, None, should_abort=lambda: True)


@pytest.mark.parametrize("kwargs", [{"local_epochs": 0}, {"lr": 0.0}, {"fedprox_mu": -1.0}])
def test_bad_trainer_arguments_are_rejected(trainer_parts, kwargs):
    with pytest.raises(ValueError):
        _trainer(trainer_parts, **kwargs)


def test_numpy_state_round_trip_keeps_dtypes():
    model = build_network({"name": "densenet121", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}})
    state = numpy_to_state(state_to_numpy(model), model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype
    model.load_state_dict(state)


def test_monai_networks_are_chosen_by_config():
    net = build_network({"name": "densenet121", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}})
    assert type(net).__module__.startswith("monai.networks")
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="must be one of"):
        build_network({"name": "no_such_net"})


def test_cosine_schedule_decays_over_the_federations_rounds():
    from fedmed.training import round_learning_rate

    rates = [round_learning_rate(1e-3, "cosine", r, 10) for r in range(10)]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] < 0.05 * 1e-3
    assert round_learning_rate(1e-3, "constant", 9, 10) == 1e-3
    assert round_learning_rate(1e-3, "cosine", 3, None) == 1e-3


def test_min_local_steps_makes_a_small_site_train_whole_extra_epochs(trainer_parts):
    task, train_ds, val_ds = trainer_parts
    small = torch.utils.data.Subset(train_ds, range(17))  # 17 images: one step of batch 32 per epoch
    plain = LocalTrainer(task, small, val_ds, lr=3e-3, batch_size=32, device="cpu").train(SPEC, None)
    assert plain.metrics["local_steps"] == 1
    trainer = LocalTrainer(task, small, val_ds, lr=3e-3, batch_size=32, device="cpu", min_local_steps=16)
    assert trainer.round_epochs == 16
    assert trainer.train(SPEC, None).metrics["local_steps"] == 16
    # a site whose one epoch already makes the steps trains one epoch: 256 images = 8 steps of 32, min 5
    big = _trainer(trainer_parts, min_local_steps=5).train(SPEC, None)
    assert big.metrics["local_steps"] == 8 and big.num_samples == 256
    # whole epochs: 8 steps an epoch, at least 12 -> 2 epochs (16 steps), never a partial one
    assert _trainer(trainer_parts, min_local_steps=12).train(SPEC, None).metrics["local_steps"] == 16


def test_min_local_steps_is_not_applied_under_dp_sgd(trainer_parts):
    from fedmed.privacy.dp import poisson_sampling
    from fedmed.training import DPSGD

    result = _trainer(trainer_parts, min_local_steps=40).train(SPEC, None, dp=DPSGD(noise_multiplier=0.8, max_grad_norm=1.0))
    rate, steps = poisson_sampling(256, 32)
    assert result.privacy_steps == [(0.8, rate, steps)]  # one epoch, as planned: no extra passes over the records
    assert "local_steps" not in result.metrics


@pytest.mark.parametrize("value", [-1, 2.5, True, "8"])
def test_min_local_steps_must_be_a_whole_number(trainer_parts, value):
    with pytest.raises(ValueError, match="min_local_steps"):
        _trainer(trainer_parts, min_local_steps=value)


def test_train_reports_the_learning_rate_it_used(trainer_parts):
    result = _trainer(trainer_parts, lr_schedule="cosine").train(SPEC, None, round_num=5, num_rounds=10)
    assert result.metrics["learning_rate"] == pytest.approx(3e-3 * 0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        _trainer(trainer_parts, lr_schedule="step")


def test_dp_sgd_round_trains_and_reports_the_steps_opacus_accounted(trainer_parts):
    from fedmed.privacy.dp import poisson_sampling
    from fedmed.training import DPSGD

    trainer = _trainer(trainer_parts, local_epochs=2)
    start = state_to_numpy(build_network(SPEC, seed=0))
    result = trainer.train(SPEC, start, dp=DPSGD(noise_multiplier=0.8, max_grad_norm=1.0))
    rate, steps = poisson_sampling(256, 32)
    assert result.privacy_steps == [(0.8, rate, 2 * steps)]
    assert set(result.weights) == set(start) and result.num_samples == 256
    assert max(float(np.max(np.abs(result.weights[k] - start[k]))) for k in start) > 1e-4
    # the cached model of the non-DP path carries no Opacus hooks afterwards
    model = trainer.model(SPEC, start)
    assert not any(module._forward_hooks or module._backward_hooks for module in model.modules())


def test_dp_sgd_refuses_batchnorm_networks_and_fedprox_by_name(trainer_parts):
    from fedmed.training import DPSGD, DPNetworkError, check_dp_network

    with pytest.raises(DPNetworkError, match=r"'resnet18' \(the job's config_fed_server.json, key 'network'\).*BatchNorm"):
        check_dp_network({"name": "resnet18", "args": {"spatial_dims": 2, "n_input_channels": 1, "num_classes": 2}})
    check_dp_network(SPEC)  # GroupNorm: fine
    with pytest.raises(ValueError, match="fedprox_mu"):
        _trainer(trainer_parts, fedprox_mu=0.1).train(SPEC, None, dp=DPSGD(1.0, 1.0))
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGD(0.0, 1.0)
