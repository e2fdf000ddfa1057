"""fedmed.jobspec: the pure job spec, its variants, the settable keys declared once, and the checks that refuse a
bad --set value in seconds (issue 17 item 6)."""

import dataclasses
import inspect
import runpy
from pathlib import Path

import pytest

from fedmed.jobspec import (CLIENT_API_SETTINGS, CONTROLLER_SETTINGS, EXECUTOR_SETTINGS, HE_STEP_ID, Component, FilterChain,
                            JobSpecError, for_simulation, settable_keys, with_attacks, with_components, with_filters, with_he,
                            with_scope, with_settings)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec():
    return runpy.run_path(str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"))["SPEC"]


def _parameters(path):
    import importlib

    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def test_every_declared_setting_is_a_real_constructor_argument():
    assert set(CONTROLLER_SETTINGS) <= _parameters("fedmed.flare.controller.FedAvgController")
    assert set(EXECUTOR_SETTINGS) <= _parameters("fedmed.flare.executor.FedMedExecutor")
    assert set(CLIENT_API_SETTINGS) <= _parameters("fedmed.flare.client_api.FedMedClientAPIExecutor")
    from fedmed.training import TrainerSettings  # the executor's settings are the local trainer's, declared there

    assert set(EXECUTOR_SETTINGS) == set(TrainerSettings.keys())


def test_the_spec_is_a_frozen_value_and_variants_return_new_specs(spec):
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"
    changed = with_settings(spec, {"lr": 0.05, "seed": 7, "network.args.channels": [8, 16, 32]})
    assert changed.executor["lr"] == 0.05 and spec.executor["lr"] == 0.003
    assert changed.executor["seed"] == 7 and changed.controller["seed"] == 7  # a key both take is set in both
    assert changed.controller["network"]["args"]["channels"] == [8, 16, 32] and changed.controller["network"]["name"] == "cxr_cnn"
    assert spec.controller["network"]["args"]["channels"] == [32, 64, 128]
    assert with_settings(spec, {"rounds": 4}).num_rounds == 4  # alias of --rounds
    assert settable_keys(spec)["seed"] == [("executor", "seed"), ("controller", "seed")]


def test_unknown_and_wiring_keys_are_refused_listing_the_valid_ones(spec):
    with pytest.raises(JobSpecError, match=r"unknown key\(s\) learning_rate .*valid keys: .*batch_size.*\blr\b"):
        with_settings(spec, {"learning_rate": 0.1, "lr": 0.2})
    for wiring in ("train_task_name", "aggregation_step_id", "job_name", "site_config_file"):
        with pytest.raises(JobSpecError, match="unknown key"):
            with_settings(spec, {wiring: "x"})
    with pytest.raises(JobSpecError, match=r"--set lr.x: lr is not a JSON object"):
        with_settings(spec, {"lr.x": 1})


def test_for_simulation_caps_min_clients_in_controller_and_meta(spec):
    sim = for_simulation(spec, num_sites=1, rounds=2)
    assert sim.num_rounds == 2 and sim.controller["min_clients"] == 1 and sim.min_clients == 1
    assert for_simulation(spec, num_sites=5).controller["min_clients"] == 2
    with pytest.raises(JobSpecError, match="sites must be >= 1"):
        for_simulation(spec, 0)


def test_filters_keep_one_chain_per_task_first_or_last(spec):
    s = with_filters(spec, "client", "task_result_filters", [{"path": "a.B", "args": {}}], ["train"])
    s = with_filters(s, "client", "task_result_filters", [{"path": "c.D", "args": {}}], ["train", "validate"], first=True)
    s = with_filters(s, "client", "task_result_filters", [{"path": "e.F", "args": {}}], ["train"], first=False)
    assert s.client_result_filters == (
        FilterChain(("train",), (Component("c.D"), Component("a.B"), Component("e.F"))),
        FilterChain(("validate",), (Component("c.D"),)),
    )
    # a chain covering more tasks than the new filters is split: the filter never leaks onto the other task
    s = with_filters(spec, "client", "task_data_filters", [{"path": "x.Y", "args": {}}], ["train", "validate"])
    s = with_filters(s, "client", "task_data_filters", [{"path": "z.W", "args": {}}], ["train"])
    assert s.client_data_filters == (FilterChain(("validate",), (Component("x.Y"),)),
                                     FilterChain(("train",), (Component("z.W"), Component("x.Y"))))
    with pytest.raises(JobSpecError, match="side must be client|server"):
        with_filters(spec, "site", "task_data_filters", [{"path": "x.Y"}], ["train"])
    assert spec.client_result_filters == () and spec.client_data_filters == ()


def test_components_scope_he_and_attacks(spec):
    s = with_components(spec, "server", [{"id": "extra", "path": "x.Y", "args": {}}])
    with pytest.raises(JobSpecError, match="'extra' already"):
        with_components(s, "server", [{"id": "extra", "path": "x.Y", "args": {}}])
    assert with_scope(spec, "dp").scope == "dp" and with_scope(with_scope(spec, "dp"), None).scope == ""
    he = with_he(spec)
    assert he.scope == "he" and he.cross_site is None
    assert "aggregation" not in he.controller and he.controller["aggregation_step_id"] == HE_STEP_ID
    assert HE_STEP_ID in [c.id for c in he.server_components] and "tb_receiver" in [c.id for c in he.server_components]
    assert with_he(he) == he  # applying it twice changes nothing
    attacked = with_attacks(with_filters(spec, "client", "task_result_filters", [{"path": "p.Q", "args": {}}], ["train"]),
                            [{"site": "site-2", "kind": "scale", "value": -10.0}])
    (chain,) = attacked.client_result_filters
    assert [f.path for f in chain.filters] == ["p.Q", "fedmed.flare.attack_filter.SimulatedAttackFilter"]  # last in its chain


@pytest.mark.parametrize("settings, key, reason", [
    ({"lr": -5}, "lr=-5", "lr must be > 0"),
    ({"batch_size": 0}, "batch_size=0", "batch_size must be >= 1"),
    ({"local_epochs": 0}, "local_epochs=0", "local_epochs must be >= 1"),
    ({"lr_schedule": "step"}, 'lr_schedule="step"', "lr_schedule must be one of"),
    ({"num_rounds": 0}, "num_rounds=0", "num_rounds must be >= 1"),
    ({"network": {"name": "no_such_net"}}, "network=", "no_such_net"),
    ({"task.args.num_classes": 1}, "task.args.num_classes=1", "num_classes must be >= 2"),
    ({"aggregation": {"name": "mean_of_nothing"}}, "aggregation=", "mean_of_nothing"),
])
def test_a_refused_set_value_names_key_and_reason(spec, settings, key, reason):
    from fedmed.flare.recipes import RecipeError, check_spec

    with pytest.raises(RecipeError, match=r"--set " + key.replace(".", r"\.").replace("[", r"\[") + r".*refuses it: .*" + reason):
        check_spec(with_settings(spec, settings), settings)


def test_the_committed_settings_pass_the_checks(spec):
    from fedmed.flare.recipes import check_spec

    check_spec(spec)
    check_spec(with_settings(spec, {"lr": 0.01, "network.args.channels": [8, 16, 32]}), {"lr": 0.01})
