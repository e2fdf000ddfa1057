"""`python -m fedmed rehearse` as the project lead runs it: exit code, progress, outputs, cleanup."""

import json
import re
import subprocess
import sys
import time

import psutil
import pytest

from deploy_helpers import REPO
from report_checks import check_report_links


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p.info["pid"])
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_rehearse_runs_the_job_on_loopback_writes_the_bundle_and_exits_0(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "fedmed", "rehearse", "--hospitals", "2", "--rounds", "1",
                             "--out", str(out), "--workdir", str(work)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    print(f"rehearse: {time.time() - started:.1f} s\n{result.stdout[-3000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in result.stdout
    assert "hospital-01 registered" in result.stdout and "FINISHED:COMPLETED" in result.stdout
    assert (out / "models" / "global_model.pt").is_file()
    assert (out / "bundle" / "configs" / "metadata.json").is_file() and (out / "bundle" / "models" / "model.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and sorted(metrics["sites"]) == ["hospital-01", "hospital-02"]
    # every front door's outputs (fedmed.runner): the external hospitals evaluated, the job that ran, the card
    assert metrics["external"] and (out / "external").is_dir() and (out / "provenance.json").is_file()
    assert json.loads((out / "job" / "meta.json").read_text())["name"] == "cxr_pneumonia_fedavg"
    assert not (out / "INCOMPLETE").exists()
    # the report, as simulate writes it, from the downloaded result
    report = out / "report"
    for name in ("report.md", "report.html", "report.json"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert f"report: {report / 'report.html'}" in result.stdout
    report_summary = json.loads((report / "report.json").read_text())
    assert report_summary["sites"] == ["hospital-01", "hospital-02"] and report_summary["plots"]
    images, local_refs = check_report_links(report)
    assert images == len(report_summary["plots"])
    assert "report.md" in local_refs and "../provenance.json" in local_refs  # the exported card, not job_result's copy
    assert report_summary["exam"]["metric"] == "val_auc"  # cross-site matrix from the deployment's workflow
    # cross-site evaluation ran in the real deployment: every (model, hospital) cell is filled
    cross_site = json.loads((out / "cross_site.json").read_text())
    hospitals = ["hospital-01", "hospital-02"]
    assert sorted(cross_site["results"]) == sorted(["global_model", *hospitals]) and not cross_site["errors"]
    for model, row in cross_site["results"].items():
        assert sorted(row) == hospitals, model
        assert all(0.0 <= row[h]["val_auc"] <= 1.0 and row[h]["num_val_samples"] > 0 for h in hospitals), (model, row)
    for ref in local_refs:
        assert not re.match(r"^[a-z]+://", ref), ref
        assert (report / ref).is_file(), f"report.html references missing {ref}"
    for name in report_summary["plots"]:
        assert (report / name).is_file(), name
    summary = json.loads((out / "rehearsal.json").read_text())
    assert summary["status"] == "FINISHED:COMPLETED"
    assert {"localhost.log", "hospital-01.log", "hospital-02.log"} <= {p.name for p in (out / "logs").iterdir()}
    # the kits came from the real nvflare provision, with this project's builder (signed startup)
    prod = next((work / "provision" / "fedmed_rehearsal").glob("prod_*"))
    assert (prod / "hospital-01" / "startup" / "signature.json").is_file()
    assert _processes_mentioning(str(work)) == []  # every server/client/job process ended
    # `python -m fedmed results` on the rehearsal's downloaded job writes what simulate writes (issue 14)
    again = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "fedmed", "results", str(out / "job_result"), "--out", str(again)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("metrics.json", "cross_site.json", "provenance.json", "bundle/configs/inference.json",
                 "bundle/docs/README.md", "report/report.html", "report/report.json"):
        assert (again / name).is_file(), name
    assert json.loads((again / "metrics.json").read_text())["sites"] == metrics["sites"]
    from monai.bundle import load

    net = load(name="bundle", bundle_dir=str(again), workflow_type="inference", device="cpu")
    import torch

    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 2)
    for command in ("verify-provenance", "report"):  # the same folder, for the other two commands
        check = subprocess.run([sys.executable, "-m", "fedmed", command, str(out / "job_result")],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
        assert check.returncode == 0, command + check.stdout + check.stderr


def test_rehearse_fails_with_exit_1_and_a_reason_for_a_missing_job(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedmed", "rehearse", "--job", str(tmp_path / "no_such_job"),
                             "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "no_such_job" in result.stderr and "meta.json" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    assert _processes_mentioning(str(tmp_path / "work")) == []


@pytest.mark.slow
def test_rehearse_privacy_he_runs_secure_aggregation_with_no_key_held_by_one_party(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "fedmed", "rehearse", "--privacy", "he", "--hospitals", "3",  # he refuses < 3
                             "--rounds", "1", "--out", str(out), "--workdir", str(work)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "privacy scope: he" in result.stdout
    # nothing was provisioned for it: no kit holds an HE context or any key shared between parties
    assert not list(work.rglob("*.tenseal"))
    # every hospital's update arrived masked; the server got seed shares only for hospitals whose masked
    # update arrived and key shares for none, so it never held t shares of both secrets of one hospital
    audit = json.loads((out / "secagg_audit.json").read_text())["rounds"]
    hospitals = ["hospital-01", "hospital-02", "hospital-03"]
    assert [(r["threshold"], r["survivors"], r["dropped"]) for r in audit] == [(2, hospitals, [])]
    assert audit[0]["single_site_unmaskable"] == []
    assert all(received["s_shares_of"] == [] for received in audit[0]["shares_received"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["aggregation"].startswith("he: secure aggregation")
    assert metrics["rounds"][0]["aggregation"]["survivors"] == hospitals
    assert (out / "bundle" / "models" / "model.pt").is_file() and (out / "report" / "report.html").is_file()
    assert _processes_mentioning(str(work)) == []
