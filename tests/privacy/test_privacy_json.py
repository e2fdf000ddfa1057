"""The shipped privacy.json templates load in FLARE 2.9's own privacy configurator."""

import shutil

import pytest

from nvflare.apis.workspace import Workspace
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from fedmed.flare.filters import DPReleaseFilter, DPTrainingPolicy, Float16CompressFilter, Float16DecompressFilter, ReleasePolicyFilter, TransferMeter
from fedmed.privacy import MODES
from fedmed.privacy.scopes import ScopeError, get_scope, inject_scope_filters, scope_filter_chains, scope_names, template_privacy_file

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _manager(tmp_path, role, policy_path=None):
    (tmp_path / "local").mkdir()
    (tmp_path / "startup").mkdir()
    shutil.copy(policy_path or template_privacy_file(role), tmp_path / "local" / "privacy.json")
    return create_privacy_manager(Workspace(str(tmp_path), site_name="site-1"), names_only=False, is_server=role == "server")


@pytest.mark.parametrize("role", ["client", "server"])
def test_template_loads_in_flare_with_every_mode(tmp_path, role):
    manager = _manager(tmp_path, role)
    assert manager.is_policy_defined()
    assert sorted(manager.name_to_scopes) == sorted(MODES)
    assert manager.default_scope.name == "standard"


def test_client_scopes_chain_the_release_policy_first_and_the_meter_last(tmp_path):
    manager = _manager(tmp_path, "client")
    expected = {"standard": None, "dp": DPReleaseFilter, "compressed": Float16CompressFilter}
    for name, middle in expected.items():
        chain = manager.get_scope(name).task_result_filters["out"]
        assert isinstance(chain[0], ReleasePolicyFilter) and isinstance(chain[-1], TransferMeter)
        if middle:
            assert isinstance(chain[1], middle)
    dp_in = manager.get_scope("dp").task_data_filters["in"]
    assert [type(f).__name__ for f in dp_in] == ["ModelSignatureRecorder", "DPTrainingPolicy"]
    assert dp_in[1].settings.epsilon == 8.0 and dp_in[1].settings.delta == 1e-5  # the default budget
    dp_he_out = [type(f).__name__ for f in manager.get_scope("dp_he").task_result_filters["out"]]
    assert dp_he_out == ["ReleasePolicyFilter", "DPReleaseFilter", "SecAggMasker", "TransferMeter"]  # noise, then mask
    assert "DPTrainingPolicy" in [type(f).__name__ for f in manager.get_scope("dp_he").task_data_filters["in"]]
    he_chain = [type(f).__name__ for f in manager.get_scope("he").task_result_filters["out"]]
    assert he_chain == ["ReleasePolicyFilter", "SecAggMasker", "TransferMeter"]
    he_in = manager.get_scope("he").task_data_filters["in"]
    assert [type(f).__name__ for f in he_in] == ["ModelSignatureRecorder", "SecAggPolicy"] and he_in[1].min_sites == 3


def test_server_decompresses_compressed_updates(tmp_path):
    manager = _manager(tmp_path, "server")
    assert [type(f) for f in manager.get_scope("compressed").task_result_filters["in"]] == [Float16DecompressFilter]
    assert [type(f).__name__ for f in manager.get_scope("compressed_int8").task_result_filters["in"]] == ["DecompressFilter"]
    assert [type(f).__name__ for f in manager.get_scope("he").task_result_filters["in"]] == ["MaskedOnlyCheck"]


def test_a_dp_scope_with_a_bad_setting_stops_the_site_from_loading(tmp_path):
    import json

    policy = json.loads(template_privacy_file("client").read_text())
    for scope in policy["scopes"]:
        for f in scope.get("task_data_filters", []):
            if f["path"].endswith("DPTrainingPolicy"):
                f["args"]["delta"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(policy))
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(Exception, match="'delta'.*local/privacy.json"):
        _manager(site, "client", bad)


def test_scope_helpers_name_the_file_and_scope(tmp_path):
    path = template_privacy_file("client")
    assert scope_names(path) == ["standard", "dp", "compressed", "compressed_int8", "he", "dp_he"]
    with pytest.raises(ScopeError, match="'research'.*not allowed"):
        get_scope(path, "research")
    data, result = scope_filter_chains(path, "dp")
    config = {"task_result_filters": [{"tasks": ["train"], "filters": [{"path": "x.JobFilter", "args": {}}]}]}
    merged = inject_scope_filters(config, data, result, ["train", "validate"])
    chains = {tuple(c["tasks"]): [f["path"].rsplit(".", 1)[1] for f in c["filters"]] for c in merged["task_result_filters"]}
    assert chains[("train",)] == ["ReleasePolicyFilter", "DPReleaseFilter", "TransferMeter", "JobFilter"]
    assert chains[("validate",)] == ["ReleasePolicyFilter", "DPReleaseFilter", "TransferMeter"]
    assert merged["task_data_filters"] == [{"tasks": ["train", "validate"], "filters": data}]
