"""Chaos in `python -m fedmed rehearse --fault KIND:ROUND`: real server and hospital processes on 127.0.0.1,
killed by PID during a round; rehearsal.json says what each fault did."""

import json
import subprocess
import sys
import time

import psutil
import pytest

from fedmed.deploy.faults import FaultError, kill_tree, parse_fault, rounds_in_logs

from deploy_helpers import REPO


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p.info["pid"])
        except psutil.NoSuchProcess:
            pass
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_fault_specs_are_checked_and_name_what_is_allowed():
    fault = parse_fault("kill-hospital:1", num_rounds=2)
    assert (fault.kind, fault.round, fault.spec) == ("kill-hospital", 1, "kill-hospital:1")
    assert parse_fault("restart-server:2").round == 2
    for bad in ("kill-server:1", "kill-hospital", "kill-hospital:0", "restart-server:x"):
        with pytest.raises(FaultError, match="restart-server, kill-hospital"):
            parse_fault(bad)
    with pytest.raises(FaultError, match="runs 2 round"):
        parse_fault("restart-server:3", num_rounds=2)


def test_round_lines_are_read_from_every_server_log(tmp_path):
    (tmp_path / "a.log").write_text("x [fedmed] round 1/3: 2/2 sites answered\n[fedmed] round 0: left out h3\n")
    (tmp_path / "b.log").write_text("[fedmed] round 2/3: 2/2 sites\n")
    assert rounds_in_logs([tmp_path / "a.log", tmp_path / "b.log", tmp_path / "missing.log"]) == {1: 3, 2: 3}


def test_kill_tree_ends_a_process_and_its_children_by_pid():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not psutil.Process(parent.pid).children():
            time.sleep(0.1)
        child = psutil.Process(parent.pid).children()[0].pid
        killed = kill_tree(parent.pid)
        assert killed == [parent.pid, child]
        parent.wait(timeout=10)
        assert _gone(parent.pid) and _gone(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _rehearse(tmp_path, *args):
    out, work = tmp_path / "out", tmp_path / "work"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "fedmed", "rehearse", *args, "--out", str(out), "--workdir", str(work)],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    print(f"rehearse {' '.join(args)}: {time.time() - started:.1f} s\n{result.stdout[-4000:]}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = json.loads((out / "rehearsal.json").read_text())
    assert _processes_mentioning(str(work)) == []  # every server/client/job process ended, the killed ones included
    return out, summary, result.stdout


@pytest.mark.slow
def test_rehearse_kill_hospital_1_finishes_the_job_within_2_minutes_after_the_last_round(tmp_path):
    """3 hospitals, min_clients 2: one is SIGKILLed during round 1; training, the final validation and the
    cross-site evaluation go on without it, and nothing waits out a 600 s timeout for it."""
    out, summary, stdout = _rehearse(tmp_path, "--hospitals", "3", "--rounds", "1", "--fault", "kill-hospital:1")
    assert summary["status"] == "FINISHED:COMPLETED" and summary["rounds_completed"] == 1
    (fault,) = summary["faults"]
    assert fault["fired"] and fault["hospital"] == "hospital-03" and fault["signal"] == "SIGKILL"
    assert fault["round"] == 1 and fault["rounds_completed_before"] == 0 and len(fault["killed_pids"]) >= 2
    assert fault["rounds_without_it"] == [1] and "without hospital-03" in fault["outcome"]
    assert all(_gone(pid) for pid in fault["killed_pids"])
    assert 0 <= summary["job_end_after_last_round_s"] < 120, summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][0]["contributors"] == ["hospital-01", "hospital-02"]
    cross_site = json.loads((out / "cross_site.json").read_text())
    assert list(cross_site["skipped_sites"]) == ["hospital-03"]
    assert sorted(cross_site["results"]["global_model"]) == ["hospital-01", "hospital-02"]
    assert "fault kill-hospital:1: SIGKILLed hospital hospital-03" in stdout


@pytest.mark.slow
def test_rehearse_restart_server_2_resumes_the_job_and_completes_every_round(tmp_path):
    """The server and its job process are SIGKILLed during round 2 and the server is started again from its
    kit: the interrupted job is resumed from round 1's state (fedmed.flare.resume) and finishes round 2."""
    out, summary, stdout = _rehearse(tmp_path, "--hospitals", "2", "--rounds", "2", "--fault", "restart-server:2")
    assert summary["status"] == "FINISHED:COMPLETED" and summary["rounds_completed"] == 2
    (fault,) = summary["faults"]
    assert fault["fired"] and fault["restarted"] and fault["resumed"], fault
    assert fault["round"] == 2 and fault["rounds_completed_before"] == 1 and len(fault["killed_pids"]) >= 2
    assert fault["new_pid"] not in fault["killed_pids"] and fault["rounds_completed_after_restart"] == [2]
    assert all(_gone(pid) for pid in fault["killed_pids"])
    assert len(summary["job_ids"]) == 2 and summary["job_id"] == summary["job_ids"][-1]  # the resuming job
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert all(r["contributors"] == ["hospital-01", "hospital-02"] for r in metrics["rounds"])
    assert (out / "models" / "global_model.pt").is_file() and (out / "report" / "report.html").is_file()
    assert (out / "logs" / "localhost.restart1.log").is_file()
    # the interrupted job was closed, not left RUNNING, and pointed at the job resuming it
    assert "job status FINISHED:ABNORMAL" in stdout and f"job {summary['job_ids'][0]} was interrupted by the server restart" in stdout
    # the controller resumed from the interrupted job's state: one record of it, one verified provenance chain
    assert metrics["resumed"] == [{"from_job": summary["job_ids"][0], "at_round": 1, "job_id": summary["job_ids"][-1]}]
    assert [e["model_version"] for e in metrics["evaluations"]] == [0, 1, 2]
    import torch

    from fedmed.provenance import verify_card

    card = json.loads((out / "provenance.json").read_text())
    check = verify_card(card, torch.load(out / "models" / "global_model.pt", map_location="cpu", weights_only=True))
    assert check.ok, check
    assert [r["round"] for r in card["chain"] if r["kind"] == "round"] == [0, 1]
