"""fedmed.jobfolder: the one writer and the reader of job folders, and its wrappers kept for older callers."""

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

from fedmed.jobfolder import JobFolder, JobFolderError, parse_assignments, parse_value

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "cxr_pneumonia_fedavg"


@pytest.fixture
def job_copy(tmp_path):
    return JobFolder(JOB).copy_to(tmp_path / "job")


def test_set_values_parse_as_json_when_they_can():
    assert parse_value("3") == 3 and parse_value("0.01") == 0.01 and parse_value("true") is True
    assert parse_value('{"name": "resnet18"}') == {"name": "resnet18"}
    assert parse_value("cosine") == "cosine"
    assert parse_assignments(["lr=0.01", "lr_schedule=constant"]) == {"lr": 0.01, "lr_schedule": "constant"}
    with pytest.raises(JobFolderError, match="expected KEY=VALUE"):
        parse_assignments(["lr"])


def test_finds_the_controller_and_executor_args():
    job = JobFolder.resolve("jobs/cxr_pneumonia_fedavg")
    assert job.controller_args()["network"]["name"]
    assert "lr" in job.executor_args()
    assert job.client_tasks() == ["submit_model", "train", "validate"]


def test_a_folder_without_configs_is_refused_naming_the_file(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(JobFolderError, match="config_fed_server.json"):
        JobFolder(tmp_path)


def test_apply_settings_writes_executor_and_controller_args(job_copy):
    applied = job_copy.apply_settings({"lr": 0.05, "local_epochs": 3, "num_rounds": 4, "seed": 7,
                                       "network": {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}})
    executor, controller = job_copy.executor_args(), job_copy.controller_args()
    assert executor["lr"] == 0.05 and executor["local_epochs"] == 3 and executor["seed"] == 7
    assert controller["num_rounds"] == 4 and controller["seed"] == 7 and controller["network"]["args"]["width"] == 8
    assert applied["seed"] == [("executor", "seed"), ("controller", "seed")]
    # the original job is untouched
    assert JobFolder(JOB).executor_args()["lr"] != 0.05


def test_an_unknown_setting_is_refused_listing_the_valid_keys(job_copy):
    before = job_copy.load_all()
    with pytest.raises(JobFolderError, match=r"unknown key\(s\) learning_rate .*valid keys: .*batch_size.*\blr\b"):
        job_copy.apply_settings({"learning_rate": 0.1, "lr": 0.2})
    assert job_copy.load_all() == before  # nothing half-applied
    # wiring between components is not a setting
    with pytest.raises(JobFolderError, match="unknown key"):
        job_copy.apply_settings({"train_task_name": "x"})


def test_fit_to_simulation_caps_min_clients_and_sets_rounds(job_copy):
    args = job_copy.fit_to_simulation(num_sites=1, rounds=2)
    assert args["num_rounds"] == 2 and args["min_clients"] == 1
    assert job_copy.load_meta()["min_clients"] == 1
    assert job_copy.controller_args()["num_rounds"] == 2


def test_filters_components_and_scope(job_copy):
    job_copy.add_filters("client", "task_result_filters", [{"path": "a.B", "args": {}}], ["train"])
    job_copy.add_filters("client", "task_result_filters", [{"path": "c.D", "args": {}}], ["train", "validate"], first=True)
    job_copy.add_filters("client", "task_result_filters", [{"path": "e.F", "args": {}}], ["train"], first=False)
    chains = job_copy.load_client()["task_result_filters"]  # FLARE: one chain per task
    assert chains == [{"tasks": ["train"], "filters": [{"path": "c.D", "args": {}}, {"path": "a.B", "args": {}}, {"path": "e.F", "args": {}}]},
                      {"tasks": ["validate"], "filters": [{"path": "c.D", "args": {}}]}]
    job_copy.add_components("server", [{"id": "extra", "path": "x.Y", "args": {}}])
    with pytest.raises(JobFolderError, match="'extra' already"):
        job_copy.add_components("server", [{"id": "extra", "path": "x.Y", "args": {}}])
    job_copy.set_scope("dp")
    assert job_copy.scope() == "dp" and json.loads((job_copy.path / "meta.json").read_text())["scope"] == "dp"
    job_copy.set_scope(None)
    assert job_copy.scope() == ""


def test_baselines_read_the_job_through_jobfolder(tmp_path):
    from fedmed import baselines

    broken = tmp_path / "job"
    shutil.copytree(JOB, broken)
    (broken / "app/config/config_fed_server.json").write_text(json.dumps({"workflows": []}))
    with pytest.raises(baselines.BaselineError, match="no workflow with path fedmed.flare.controller.FedAvgController"):
        baselines.job_settings(broken)


def test_the_folder_reads_back_as_a_spec_and_wrappers_write_through_the_one_writer(job_copy):
    from fedmed.jobfolder import read_job_spec, write_job_folder

    spec = job_copy.spec()
    assert spec == read_job_spec(JOB) and spec.name == "cxr_pneumonia_fedavg"
    job_copy.apply_settings({"lr": 0.05})
    assert job_copy.spec().executor["lr"] == 0.05 and spec.executor["lr"] != 0.05  # the spec is a value
    write_job_folder(spec, job_copy.path)
    assert (job_copy.path / "app/config/config_fed_client.json").read_bytes() == (JOB / "app/config/config_fed_client.json").read_bytes()


def test_a_dotted_key_changes_one_entry_of_a_dict_setting(job_copy):
    before = job_copy.controller_args()["network"]
    job_copy.apply_settings({"network.args.width": 32, "task.args.image_size": 28})
    after = job_copy.controller_args()["network"]
    assert after["args"]["width"] == 32 and after["name"] == before["name"]
    assert {k: v for k, v in after["args"].items() if k != "width"} == {k: v for k, v in before["args"].items() if k != "width"}
    with pytest.raises(JobFolderError, match=r"--set lr.x: lr is not a JSON object"):
        job_copy.apply_settings({"lr.x": 1})
    with pytest.raises(JobFolderError, match=r"unknown key\(s\) nope.args.width"):
        job_copy.apply_settings({"nope.args.width": 1})
