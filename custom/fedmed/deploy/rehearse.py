"""``python -m fedmed rehearse``: a real deployment of the federation on 127.0.0.1, end to end.

1. provisions a small project (server ``localhost`` on a free port, the first K hospitals, the
   admins) into a temporary folder with the real ``nvflare provision`` and this project's builder;
2. fills each hospital's ``local/fedmed_site.json`` with its own data (a seeded non-IID partition of
   ``--data`` or synthetic X-rays, prepared as every door prepares sites: :mod:`fedmed.runner`),
   the step a hospital's IT team does;
3. starts the server and the K hospital clients from their kits as real processes;
4. submits the job (``OUT/job``: the job spec with ``--rounds`` / ``--set`` / ``--privacy`` applied and
   checked before anything starts, :func:`fedmed.runner.plan_job`) as the lead researcher through
   FLARE's admin API, waits, downloads the result;
5. writes the output folder as every door does (:func:`fedmed.runner.finish_outputs`: bundle,
   models, metrics with the external evaluation, provenance card, TensorBoard, ``report/``) plus every
   process's log in ``logs/`` and the downloaded result in ``job_result/``;
6. shuts the system down and ends every process it started by PID.

Exit code 0 only when the job finished, the global model was downloaded and the report was written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedmed.atomic import write_json
from fedmed.deploy.faults import FaultError, FaultInjector, parse_fault
from fedmed.deploy.federation import LocalFederation
from fedmed.deploy.processes import DeploymentError, free_port
from fedmed.flare.resume import RESUMED_AS_META_KEY
from fedmed.deploy.provision import ProvisionError, customize_project, load_project, provision, server_of

DEFAULT_JOB = "jobs/cxr_pneumonia_fedavg"
PRIVACY_MODES = ("standard", "dp", "compressed", "he")
FINISHED_OK = "FINISHED:COMPLETED"
RESUME_GRACE_S = 30  # after a server restart: how long an ended job may take to name the job that resumes it


class RehearsalError(RuntimeError):
    pass


def plan_project(project_file: str, hospitals: int, port: int, he: bool) -> dict:
    project = customize_project(load_project(project_file), server_name="localhost", port=port, hospitals=hospitals,
                                he=he, name="fedmed_rehearsal")
    return project


def roles(project: dict) -> dict:
    """Names by role: server, hospitals, project_admin, lead, org_admins."""
    people = [p for p in project["participants"] if p["type"] == "admin"]

    def first(role):
        match = [p["name"] for p in people if p.get("role") == role]
        if not match:
            raise RehearsalError(f"the project has no admin with role {role}")
        return match[0]

    return {
        "server": server_of(project)["name"],
        "hospitals": [p["name"] for p in project["participants"] if p["type"] == "client"],
        "project_admin": first("project_admin"),
        "lead": first("lead"),
        "org_admins": {p["org"]: p["name"] for p in people if p.get("role") == "org_admin"},
    }


def fill_site_configs(prod_dir: Path, hospitals: list[str], out_dir: Path, spec, data: str | None = None,
                      seed: int = 0, alpha: float = 0.5) -> list[str]:
    """Give each hospital kit its own data (prepared as every door prepares sites, :func:`fedmed.runner.prepare_sites`:
    ``OUT/sites``, the external hospitals in ``OUT/external``) and write its ``local/fedmed_site.json``; return summary lines."""
    from fedmed.runner import prepare_sites

    configs, summary = prepare_sites(spec, len(hospitals), out_dir, data, alpha, seed)
    for hospital, (sim_name, config) in zip(hospitals, configs.items()):
        write_json(prod_dir / hospital / "local" / "fedmed_site.json", config)
    return [line.replace(f"site-{i}:", f"{h}:", 1) for i, (h, line) in enumerate(zip(hospitals, summary), start=1)]


def plan(job: str, num_sites: int, rounds: int | None, privacy: str | None, settings: dict | None = None):
    """The job spec rehearse submits (:func:`fedmed.runner.plan_job`, door ``rehearse``): a refused
    ``--set`` value fails here, before anything is provisioned."""
    from fedmed.runner import RunError, RunOptions, plan_job

    try:
        return plan_job(job, RunOptions(sites=num_sites, rounds=rounds, settings=dict(settings or {}), privacy=privacy),
                        door="rehearse", log=lambda line: print("  " + line, flush=True))
    except RunError as exc:
        raise RehearsalError(str(exc)) from exc


def prepare_job_copy(job: str, dest_root: Path, num_sites: int, rounds: int | None, privacy: str | None,
                     settings: dict | None = None) -> Path:
    """:func:`plan` written into ``dest_root/<job name>`` by the one writer; returns the folder."""
    from fedmed.jobfolder import write_job_folder

    spec = plan(job, num_sites, rounds, privacy, settings)
    return write_job_folder(spec, Path(dest_root) / spec.name).path


def run_job(session, job_dir: Path, timeout: float, server_workspace: Path | None = None, log=print,
            injector: FaultInjector | None = None, reopen_session=None) -> tuple[str, dict]:
    """Submit ``job_dir``, print progress until it ends; return (job id, final job meta).

    With an ``injector`` (``--fault``), each poll lets it fire the faults whose round is running; after a
    server restart ``reopen_session()`` gives a new admin session and monitoring goes on with the same job."""
    job_id = session.submit_job(str(job_dir))
    log(f"  submitted job {job_id} ({job_dir.name})")
    started = time.time()
    if injector is not None:
        injector.started = started
    seen = {"status": None, "rounds": 0}
    deadline = started + timeout
    last_error = None
    ended_at = None  # when the watched job was first seen ended
    if injector is not None:
        injector.job_ids = [job_id]
    while time.time() < deadline:
        try:
            meta = session.get_job_meta(job_id)
            last_error = None
        except Exception as exc:  # the server is gone (a fault) or restarting: keep polling until the deadline
            meta, last_error = None, exc
        if meta:
            status = meta.get("status")
            if status != seen["status"]:
                log(f"  [{time.time() - started:5.0f} s] job status {status}")
                seen["status"] = status
            if server_workspace:
                _log_rounds(server_workspace / job_id / "app_server" / "fedmed" / "metrics.json", seen, started, log)
            resumed_as = meta.get(RESUMED_AS_META_KEY)  # a restarted server re-submitted it (fedmed.flare.resume)
            if resumed_as and resumed_as != job_id:
                log(f"  [{time.time() - started:5.0f} s] job {job_id} was interrupted by the server restart; "
                    f"it resumes from its last completed round as job {resumed_as}")
                job_id, seen["status"], ended_at = resumed_as, None, None
                if injector is not None:
                    injector.job_ids.append(job_id)
                continue
            if str(status).startswith("FINISHED"):
                # after a server restart the interrupted job is marked ended before it names the job that
                # resumes it: give it RESUME_GRACE_S to do so
                restarted = injector is not None and any(f.record.get("restarted") for f in injector.faults)
                ended_at = ended_at or time.time()
                if not restarted or status == FINISHED_OK or time.time() - ended_at > RESUME_GRACE_S:
                    return job_id, meta
        if injector is not None:
            injector.poll()
            if injector.server_restarted:
                injector.server_restarted = False
                try:
                    session = reopen_session()
                except Exception as exc:
                    last_error = exc
        time.sleep(1.0)
    raise RehearsalError(f"job {job_id} did not end within {timeout:.0f} s (last status {seen['status']}"
                         + (f"; last error {type(last_error).__name__}: {last_error}" if last_error else "") + ")")


def _log_rounds(metrics_path: Path, seen: dict, started: float, log) -> None:
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    rounds = metrics.get("rounds", [])
    for record in rounds[seen["rounds"]:]:
        failed = record.get("failed") or {}
        log(f"  [{time.time() - started:5.0f} s] round {record.get('round')}: contributors "
            f"{', '.join(record.get('contributors', [])) or 'none'}"
            + (f"; failed {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""))
    seen["rounds"] = max(seen["rounds"], len(rounds))


def rehearse(
    hospitals: int = 2,
    rounds: int | None = 2,
    job: str = DEFAULT_JOB,
    data: str | None = None,
    out: str | None = None,
    privacy: str | None = None,
    project_file: str = "provisioning/project.yml",
    timeout: float = 900.0,
    workdir: str | None = None,
    keep: bool = False,
    seed: int = 0,
    faults: list[str] | None = None,
    settings: dict | None = None,
) -> Path:
    try:
        planned_faults = [parse_fault(text, rounds) for text in faults or []]
    except FaultError as exc:
        raise RehearsalError(str(exc)) from exc
    if sum(f.kind == "kill-hospital" for f in planned_faults) >= hospitals:
        raise RehearsalError(f"--fault kill-hospital {sum(f.kind == 'kill-hospital' for f in planned_faults)} time(s) "
                             f"with --hospitals {hospitals} leaves no hospital to train; start more hospitals")
    spec = plan(job, hospitals, rounds, privacy, settings)  # a bad job or a refused --set value fails before anything is created
    from fedmed.runner import RunError, start_output_folder

    try:
        out_dir = start_output_folder(out, "rehearse")  # marked INCOMPLETE until the outputs are written
    except RunError as exc:
        raise RehearsalError(str(exc)) from exc
    if workdir:  # the caller's folder: used, never deleted
        work = Path(workdir).resolve()
        if work.exists() and any(work.iterdir()):
            raise RehearsalError(f"work folder {work} is not empty; choose another --workdir")
        work.mkdir(parents=True, exist_ok=True)
    else:  # a temp folder, deleted afterwards (it holds the rehearsal's keys) unless --keep
        work = Path(tempfile.mkdtemp(prefix="fedmed-rehearse-"))
    he = privacy == "he"
    port = free_port()
    federation = injector = None
    summary = {"job_id": None, "status": None, "hospitals": [], "port": port, "out": str(out_dir),
               "faults": [], "rounds_completed": 0}
    metrics = None
    try:
        from fedmed.jobfolder import write_job_folder

        job_copy = write_job_folder(spec, out_dir / "job").path  # every door: the run's job in OUT/job
        project = plan_project(project_file, hospitals, port, he)
        names = roles(project)
        summary["hospitals"] = names["hospitals"]
        print(f"[1/6] provisioning server localhost:{port}, {hospitals} hospitals, admins"
              f"{' (HE kits)' if he else ''} into {work}", flush=True)
        prod = provision(project, work / "provision")
        print(f"[2/6] hospitals fill local/fedmed_site.json with their own data "
              f"({'partition of ' + data if data else 'synthetic X-rays'})", flush=True)
        for line in fill_site_configs(prod, names["hospitals"], out_dir, spec, data, seed):
            print("  " + line, flush=True)
        print(f"[3/6] starting server and {hospitals} hospitals from their kits (logs in {out_dir / 'logs'})", flush=True)
        federation = LocalFederation(prod, out_dir / "logs", project_admin=names["project_admin"])
        federation.start_all(names["server"], names["hospitals"])
        print(f"[4/6] submitting {job_copy.name} as {names['lead']} (rounds: {rounds or 'job default'}, "
              f"privacy scope: {privacy or 'site default'}"
              + (f", faults: {' '.join(f.spec for f in planned_faults)}" if planned_faults else "") + ")", flush=True)
        session = federation.session(names["lead"])
        injector = FaultInjector(planned_faults, federation, names["server"], names["hospitals"],
                                 log=lambda line: print(line, flush=True))
        job_id, meta = run_job(session, job_copy, timeout, prod / names["server"], injector=injector,
                               reopen_session=lambda: federation.session(names["lead"]))
        status = meta.get("status")
        summary.update({"job_id": job_id, "status": status, "job_ended_at_s": injector.now(),
                        "job_ids": injector.job_ids or [job_id]})
        print(f"[5/6] job {job_id} ended: {status}; downloading the result", flush=True)
        download = Path(federation.session(names["lead"]).download_job_result(job_id, str(work / "download")))
        server_app = _find_app(download)
        metrics = _read_metrics(server_app)
        if status != FINISHED_OK:
            raise RehearsalError(f"job {job_id} ended with status {status}: {_server_error(server_app)}. "
                                 f"Logs: {out_dir / 'logs'}")
        if he:  # issue 5: the server holds the model encrypted; a hospital decrypts it with its own key
            from fedmed.flare.he import decrypt_for_hospital

            decrypt_for_hospital(server_app, prod / names["hospitals"][0] / "startup" / "client_context.tenseal")
            print(f"  he: {names['hospitals'][0]} decrypted the encrypted global model with its own key", flush=True)
        shutil.copytree(download, out_dir / "job_result", dirs_exist_ok=True)
        from fedmed.runner import finish_outputs, mark_complete

        # as every door does (fedmed.runner): bundle, metrics, provenance card, external evaluation, report;
        # a ReportError (names the file and key) fails the rehearsal
        finish_outputs(server_app, out_dir, spec)
        if not (out_dir / "models" / "global_model.pt").is_file():
            raise RehearsalError(f"the downloaded result has no global model ({out_dir / 'models' / 'global_model.pt'} missing)")
        mark_complete(out_dir)
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if federation is not None:  # first: nothing below may keep a started process alive
            print("[6/6] shutting down (admin API, then every started process by PID)", flush=True)
            left = federation.stop()
            if left:
                print(f"  WARNING: processes still alive after kill: {left}", file=sys.stderr, flush=True)
                summary["processes_left"] = left
        if injector is not None:
            try:
                rounds_seen = injector.rounds_done()
                summary["faults"] = injector.finish(metrics, summary["status"])
                summary["round_end_s"] = {str(n): t for n, t in sorted(injector.round_times.items())}
                summary["rounds_completed"] = len((metrics or {}).get("rounds") or []) if metrics else rounds_seen
                if summary.get("job_ended_at_s") is not None and injector.round_times:
                    summary["job_end_after_last_round_s"] = round(
                        summary["job_ended_at_s"] - max(injector.round_times.values()), 1)
            except Exception as exc:  # recording must not hide the rehearsal's own outcome
                summary["record_error"] = f"{type(exc).__name__}: {exc}"
        if not keep and not workdir:
            shutil.rmtree(work, ignore_errors=True)
        write_json(out_dir / "rehearsal.json", summary)  # also for a failed rehearsal: what happened, and why
    for record in summary["faults"]:
        print(f"  fault {record.get('fault')}: {record.get('outcome')}", flush=True)
    print(f"  done: {out_dir} ({summary['rounds_completed']} rounds completed)", flush=True)
    return out_dir


def _read_metrics(server_app: Path) -> dict | None:
    try:
        return json.loads((server_app / "fedmed" / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _find_app(download: Path) -> Path:
    from fedmed.results import ResultsError, find_server_app_dir

    try:
        return find_server_app_dir(download)
    except ResultsError as exc:
        raise RehearsalError(str(exc)) from exc


def _server_error(server_app: Path) -> str:
    metrics_path = server_app / "fedmed" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        return metrics.get("error") or "no error recorded in metrics.json"
    return "no metrics.json in the result"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hospitals", type=int, default=2, help="hospital clients to start (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2; 0 = the job's own)")
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"job folder (default {DEFAULT_JOB})")
    parser.add_argument("--data", default=None, help="data pool to partition across hospitals: a MedMNIST-style .npz for classification, "
                        "an MSD-style datalist JSON for segmentation (default: synthetic)")
    parser.add_argument("--out", default=None, help="output folder (default runs/rehearse-<timestamp>)")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default=None,
                        help="privacy scope the job asks for (meta.json 'scope'); 'he' provisions HE kits")
    parser.add_argument("--project", default="provisioning/project.yml", help="FLARE project file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the job (default 900)")
    parser.add_argument("--workdir", default=None,
                        help="empty folder for kits, data and downloads, kept afterwards (default: a temp folder, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder (kits, keys) after the run")
    parser.add_argument("--seed", type=int, default=0, help="data partition seed (default 0)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND:ROUND",
                        help="chaos, repeatable: restart-server:N (SIGKILL the server during round N, restart it from "
                             "its kit, wait for the job to resume) or kill-hospital:N (SIGKILL one hospital during "
                             "round N; keep min_clients below --hospitals). Rounds count from 1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a job argument of the controller or executor, as simulate --set "
                             "(e.g. wait_after_min_clients=5)")


def main(args: argparse.Namespace) -> int:
    try:
        from fedmed.jobfolder import parse_assignments

        rehearse(args.hospitals, args.rounds or None, args.job, args.data, args.out, args.privacy, args.project,
                 args.timeout, args.workdir, args.keep, args.seed, args.fault, parse_assignments(args.set))
    except (RehearsalError, ProvisionError, DeploymentError, ValueError, OSError) as exc:
        print(f"rehearse failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # e.g. the admin API refusing a command: still a failed rehearsal, with its reason
        print(f"rehearse failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
