"""fedmed.jobfolder: the one writer and the reader of job folders."""

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


def test_baselines_read_the_job_through_jobfolder(tmp_path):
    from fedmed import baselines

    broken = tmp_path / "job"
    shutil.copytree(JOB, broken)
    (broken / "app/config/config_fed_server.json").write_text(json.dumps({"workflows": []}))
    with pytest.raises(baselines.BaselineError, match="no workflow with path fedmed.flare.controller.FedAvgController"):
        baselines.job_settings(broken)


def test_the_folder_reads_back_as_a_spec_and_a_changed_spec_is_written_by_the_one_writer(job_copy):
    from fedmed.jobfolder import read_job_spec, write_job_folder

    from fedmed.jobspec import with_scope, with_settings

    spec = job_copy.spec()
    assert spec == read_job_spec(JOB) and spec.name == "cxr_pneumonia_fedavg"
    job_copy.write(with_scope(with_settings(spec, {"lr": 0.05}), "dp"))
    assert job_copy.spec().executor["lr"] == 0.05 and spec.executor["lr"] != 0.05  # the spec is a value
    assert job_copy.scope() == "dp" and json.loads((job_copy.path / "meta.json").read_text())["scope"] == "dp"
    write_job_folder(spec, job_copy.path)
    assert (job_copy.path / "app/config/config_fed_client.json").read_bytes() == (JOB / "app/config/config_fed_client.json").read_bytes()


