"""Resume after a server crash (issue 12 item 5), with real processes on 127.0.0.1.

A 3-round job runs on a provisioned server + 2 hospitals; the server (and its job process) is
SIGKILLed after round 2 completed and restarted from its kit. The restarted server marks the
interrupted job FINISHED:ABNORMAL, re-submits it (``fedmed_resumed_as``), and the new job resumes from
the saved state: round 3 only, then the final validation, one provenance chain over all rounds.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from deploy_helpers import LEAD, PROJECT_ADMIN, fill_site, process_env, provision_kits
from fedmed.deploy.federation import LocalFederation
from fedmed.deploy.processes import free_port, process_tree
from fedmed.provenance import verify_card

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "privacy"))
from loopback import tiny_job  # noqa: E402

pytestmark = pytest.mark.slow


def _rounds_done(metrics_path: Path) -> int:
    try:
        return len(json.loads(metrics_path.read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0


def test_a_server_killed_mid_job_and_restarted_from_its_kit_resumes_and_finishes(tmp_path):
    prod = provision_kits(tmp_path / "prov", hospitals=2, port=free_port(), name="fedmed_resume")
    hospitals = ["hospital-01", "hospital-02"]
    for i, hospital in enumerate(hospitals):
        fill_site(prod / hospital, {"data": {"format": "synthetic", "num_train": 48, "num_val": 24, "seed": i + 1}})
    federation = LocalFederation(prod, tmp_path / "logs", env=process_env(), project_admin=PROJECT_ADMIN)
    server_ws = prod / "localhost"
    try:
        federation.start_all("localhost", hospitals, log=lambda line: None)
        job_id = federation.session(LEAD).submit_job(str(tiny_job(tmp_path / "job", num_rounds=3)))
        metrics_path = server_ws / job_id / "app_server" / "fedmed" / "metrics.json"
        deadline = time.time() + 240
        while _rounds_done(metrics_path) < 2:
            assert time.time() < deadline, "the job did not complete 2 rounds in time"
            time.sleep(0.3)
        server = federation.processes["localhost"]
        for proc in reversed(process_tree(server.pid)):  # the server and its job process die at once
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        federation.retired.append(server)
        time.sleep(1)
        federation.start("localhost")
        session = federation.session(LEAD)
        old = session.get_job_meta(job_id)
        assert old["status"] == "FINISHED:ABNORMAL"  # not left RUNNING with nothing behind it
        new_id = old["fedmed_resumed_as"]
        _rc, meta = session.monitor_job_and_return_job_meta(new_id, timeout=300, poll_interval=1.0)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        assert meta["fedmed_resume_of"] == job_id and meta["cloned_from"] == job_id
        download = Path(session.download_job_result(new_id, str(tmp_path / "download")))
    finally:
        assert federation.stop() == []

    out = next(download.rglob("fedmed/metrics.json")).parent
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True and "error" not in metrics
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]  # each round once: rounds 1-2 from the saved state
    assert [e["model_version"] for e in metrics["evaluations"]] == [0, 1, 2, 3]
    assert metrics["resumed"] == [{"from_job": job_id, "at_round": 2, "job_id": new_id}]
    card = json.loads((out / "provenance.json").read_text())
    model = torch.load(out / "global_model.pt", map_location="cpu", weights_only=True)
    check = verify_card(card, model)
    assert check.ok, check
    assert [r["round"] for r in card["chain"] if r["kind"] == "round"] == [0, 1, 2]
