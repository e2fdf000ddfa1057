"""`python -m fedmed results` and the folder resolver `report` / `verify-provenance` share, on the
layouts FLARE 2.9 downloads write (`nvflare job download`, the console's `download_job`, the admin
API): ``<job id>/meta.json`` (job store meta, status), ``<job id>/job/``, ``<job id>/workspace/``
(server logs, ``app_server/fedmed/``). The finished-job path runs on a real deployment's download in
tests/deploy (test_rehearse, test_live_federation)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.results import ResultsError, locate_job_result, resolve_run_folder, unfinished_reason

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "0f6b7c1e-1111-4222-8333-944445555666"


def make_download(root: Path, status="FINISHED:COMPLETED", metrics=None, fedmed_files=True, log="", detail=None) -> Path:
    job = root / JOB_ID
    (job / "job" / "cxr" / "app" / "config").mkdir(parents=True)
    ws = job / "workspace"
    app = ws / "app_server"
    (app / "config").mkdir(parents=True)
    meta = {"job_id": JOB_ID, "name": "cxr", "status": status, "job_deploy_detail": detail or ["server: OK"]}
    (job / "meta.json").write_text(json.dumps(meta))
    (ws / "meta.json").write_text(json.dumps({**meta, "status": "SUBMITTED"}))  # FLARE's stale copy in workspace/
    (ws / "log.txt").write_text(log)
    if fedmed_files:
        (app / "fedmed").mkdir()
        (app / "fedmed" / "run_config.json").write_text(json.dumps({"task": {"name": "classification"}}))
        if metrics is not None:
            (app / "fedmed" / "metrics.json").write_text(json.dumps(metrics))
    return job


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fedmed", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize("start", ["..", ".", "workspace", "workspace/app_server", "workspace/app_server/fedmed",
                                   "workspace/app_server/fedmed/run_config.json"])
def test_every_folder_of_a_download_locates_the_same_job(tmp_path, start):
    job = make_download(tmp_path / "dl", metrics={"finished": True, "rounds": [{}]})
    result = locate_job_result((job / start) if start != ".." else job.parent)
    assert result.job_root == job.resolve() and result.job_id == JOB_ID and result.status == "FINISHED:COMPLETED"
    assert result.app_dir == (job / "workspace" / "app_server").resolve()
    assert result.workspace == (job / "workspace").resolve()


def test_a_job_that_failed_gives_its_status_and_the_runs_recorded_error(tmp_path):
    error = "round 0: only 0 valid update(s), min_clients is 2. hospital-03: site 'hospital-03' ... placeholder"
    job = make_download(tmp_path, status="FINISHED:EXECUTION_EXCEPTION",
                        metrics={"finished": False, "error": error, "rounds": [], "num_rounds": 2})
    reason = unfinished_reason(locate_job_result(job / "workspace" / "app_server"))
    assert "ended with status FINISHED:EXECUTION_EXCEPTION" in reason and error in reason
    out = tmp_path / "out"
    run = run_cli("results", job / "workspace" / "app_server" / "fedmed", "--out", out)
    assert run.returncode == 1 and error in run.stderr and "FINISHED:EXECUTION_EXCEPTION" in run.stderr
    assert "did not finish; see the server log" not in run.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_job_refused_by_the_sites_says_so_from_the_deploy_detail_and_the_server_log(tmp_path):
    job = make_download(tmp_path, status="FINISHED:FAILED_TO_RUN", fedmed_files=False,
                        detail=["server: OK", "hospital-01: user 'admin@x' is not authorized for 'submit_job'"],
                        log="2026-12-01 10:00:00 - X - ERROR - job deployment failed at hospital-01\n")
    run = run_cli("results", job, "--out", tmp_path / "out")
    assert run.returncode == 1
    assert "FINISHED:FAILED_TO_RUN" in run.stderr and "not authorized for 'submit_job'" in run.stderr
    assert "stopped before its first round" in run.stderr and "job deployment failed at hospital-01" in run.stderr


def test_a_running_job_and_a_run_without_error_are_told_apart(tmp_path):
    running = make_download(tmp_path / "a", status="RUNNING", metrics={"finished": False, "rounds": [{}], "num_rounds": 3})
    reason = unfinished_reason(locate_job_result(running))
    assert "still RUNNING" in reason and "1 of 3 rounds recorded" in reason
    finished = make_download(tmp_path / "b", metrics={"finished": True, "rounds": [{}]})
    assert "global_model.pt" in unfinished_reason(locate_job_result(finished))  # finished but the model is missing


def test_a_foreign_folder_is_refused_by_results_report_and_verify_provenance(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "meta.json").write_text(json.dumps({"camera": "x"}))
    with pytest.raises(ResultsError, match="is not a job result"):
        locate_job_result(tmp_path / "photos")
    for command in (["results", tmp_path / "photos", "--out", tmp_path / "out"], ["report", tmp_path / "photos"],
                    ["verify-provenance", tmp_path / "photos"]):
        run = run_cli(*command)
        assert run.returncode == 2, command
        assert "is not a job result" in run.stderr and "nvflare job download" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_with_several_jobs_names_them(tmp_path):
    make_download(tmp_path / "dl", metrics={"finished": True})
    other = make_download(tmp_path / "x", metrics={"finished": True})
    other.rename(tmp_path / "dl" / "second-job")
    with pytest.raises(ResultsError, match=r"holds 2 job results .*second-job"):
        locate_job_result(tmp_path / "dl")


def test_resolve_run_folder_keeps_output_folders_and_files(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    assert resolve_run_folder(tmp_path) == tmp_path
    card = tmp_path / "provenance.json"
    card.write_text("{}")
    assert resolve_run_folder(card) == card
    job = make_download(tmp_path / "dl", metrics={"finished": True})
    assert resolve_run_folder(job).resolve() == (job / "workspace" / "app_server" / "fedmed").resolve()


def test_results_refuses_a_non_empty_out_without_force(tmp_path):
    job = make_download(tmp_path, metrics={"finished": True})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    run = run_cli("results", job, "--out", out)
    assert run.returncode == 2 and "not empty" in run.stderr and (out / "keep.txt").is_file()
