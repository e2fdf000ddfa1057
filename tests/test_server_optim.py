"""Server optimizers: each pure update checked against a step computed by hand."""

import numpy as np
import pytest

from fedmed.server_optim import build_server_optimizer

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _weights():
    return {"w": np.array([1.0, -2.0], dtype=np.float32), "count": np.array(3, dtype=np.int64)}


def test_fedavg_moves_by_the_mean_update_and_rounds_int_buffers():
    opt = build_server_optimizer({"name": "fedavg"})
    new = opt.step(_weights(), {"w": np.array([0.5, 0.25]), "count": np.array(1.4)})
    np.testing.assert_allclose(new["w"], [1.5, -1.75])
    assert new["w"].dtype == np.float32
    assert new["count"] == 4 and new["count"].dtype == np.int64


def test_fedavgm_accumulates_momentum_over_rounds():
    opt = build_server_optimizer({"name": "fedavgm", "args": {"lr": 0.5, "momentum": 0.9}})
    d1, d2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    w1 = opt.step({"w": np.zeros(2)}, {"w": d1})
    np.testing.assert_allclose(w1["w"], 0.5 * d1)  # m1 = d1
    w2 = opt.step(w1, {"w": d2})
    np.testing.assert_allclose(w2["w"], 0.5 * d1 + 0.5 * (0.9 * d1 + d2))  # m2 = 0.9 m1 + d2


def test_fedadam_first_step_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = build_server_optimizer({"name": "fedadam", "args": {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}})
    d = np.array([0.2, -0.4])
    m = (1 - b1) * d
    v = b2 * tau**2 + (1 - b2) * d**2
    new = opt.step({"w": np.array([1.0, 1.0])}, {"w": d})
    np.testing.assert_allclose(new["w"], 1.0 + lr * m / (np.sqrt(v) + tau), rtol=1e-12)


def test_fedyogi_second_moment_moves_additively_by_hand():
    lr, b1, b2, tau = 0.1, 0.0, 0.5, 0.1
    opt = build_server_optimizer({"name": "fedyogi", "args": {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}})
    d = np.array([1.0])
    # v0 = tau^2 = 0.01 < d^2 = 1: v1 = v0 - (1 - b2) * d^2 * sign(v0 - d^2) = 0.01 + 0.5
    new = opt.step({"w": np.zeros(1)}, {"w": d})
    np.testing.assert_allclose(new["w"], lr * d / (np.sqrt(0.51) + tau), rtol=1e-12)
    # Adam would give v1 = 0.5 * 0.01 + 0.5 = 0.505 instead: the two differ
    adam = build_server_optimizer({"name": "fedadam", "args": {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}})
    assert not np.allclose(adam.step({"w": np.zeros(1)}, {"w": d})["w"], new["w"])


def test_state_round_trips_so_a_resumed_server_takes_the_same_step():
    spec = {"name": "fedadam", "args": {"lr": 0.05}}
    a, b = build_server_optimizer(spec), build_server_optimizer(spec)
    w = {"w": np.ones(3)}
    w = a.step(w, {"w": np.array([0.1, -0.2, 0.3])})
    b.load_state_dict(a.state_dict())
    d = {"w": np.array([0.3, 0.1, -0.1])}
    np.testing.assert_allclose(a.step(w, d)["w"], b.step(w, d)["w"])
    with pytest.raises(ValueError, match="fedavgm"):
        build_server_optimizer({"name": "fedavgm"}).load_state_dict(a.state_dict())


@pytest.mark.parametrize("spec, match", [
    ({"name": "sgd"}, "must be one of fedavg, fedavgm, fedadam, fedyogi"),
    ({"name": "fedadam", "args": {"lr": -1}}, "lr must be a positive"),
    ({"name": "fedavgm", "args": {"momentum": 1.5}}, "momentum"),
    ({"name": "fedadam", "args": {"betas": 1}}, "bad 'args'"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        build_server_optimizer(spec)
