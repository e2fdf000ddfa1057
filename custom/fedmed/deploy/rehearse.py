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

``--hosts netns`` runs the same rehearsal across separate network hosts on this machine
(:mod:`fedmed.deploy.netns`): the server, each hospital and the admins' workstation each get a
network namespace with its own address and host name, joined by a virtual bridge. The kits are
provisioned for the server's host name (``NETNS_SERVER_HOST``), which every host resolves through
its own hosts file; this command re-runs itself on the admin host (``ip netns exec``), so the admin
sessions, too, cross the bridge. The namespaces and everything running in them are removed at the end,
on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmed.atomic import write_json
from fedmed.deploy.faults import FaultError, FaultInjector, parse_fault
from fedmed.deploy.federation import LocalFederation
from fedmed.deploy.processes import DeploymentError, MemorySampler, free_port, network_facts
from fedmed.flare.resume import RESUMED_AS_META_KEY
from fedmed.deploy.provision import ProvisionError, customize_project, load_project, provision, server_of

DEFAULT_JOB = "jobs/cxr_pneumonia_fedavg"
HOSTS_MODES = ("loopback", "netns")
NETNS_SERVER_HOST = "fl-server.fedmed-rehearsal.test"  # the server's host name on the rehearsal's network
NETNS_DOMAIN = "fedmed-rehearsal.test"
NETNS_PORT = 8002  # the server's FL and admin port on its own host (a fresh namespace: always free)
NETNS_STATE_ENV = "FEDMED_REHEARSE_NETNS"  # set for the rehearsal driver running on the admin host
ADMIN_HOST = "admin"
PRIVACY_MODES = ("standard", "dp", "compressed", "he")
FINISHED_OK = "FINISHED:COMPLETED"
RESUME_GRACE_S = 30  # after a server restart: how long an ended job may take to name the job that resumes it


class RehearsalError(RuntimeError):
    pass


def plan_project(project_file: str, hospitals: int, port: int, he: bool, server_name: str = "localhost") -> dict:
    project = customize_project(load_project(project_file), server_name=server_name, port=port, hospitals=hospitals,
                                he=he, name="fedmed_rehearsal")
    return project


def network_hosts(names: dict) -> dict[str, str]:
    """``{participant: host name}`` of a ``--hosts netns`` rehearsal: the server, each hospital, the admins' host."""
    hosts = {names["server"]: names["server"]}
    hosts.update({h: f"{h}.{NETNS_DOMAIN}" for h in names["hospitals"]})
    hosts[ADMIN_HOST] = f"{ADMIN_HOST}.{NETNS_DOMAIN}"
    return hosts


def participants_record(network, names: dict) -> dict:
    """``rehearsal.json`` ``participants``: every participant's address and host name (admins share the admin host)."""
    hosts = network.describe()
    record = {name: {"address": hosts[name]["address"], "host": hosts[name]["host"]}
              for name in [names["server"], *names["hospitals"]]}
    admin = hosts[ADMIN_HOST]
    for user in sorted({names["lead"], names["project_admin"], *names["org_admins"].values()}):
        record[user] = {"address": admin["address"], "host": admin["host"]}
    return record


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


def run_job(session, job_dir: Path, timeout: float, log=print, injector: FaultInjector | None = None,
            reopen_session=None, sampler=None) -> tuple[str, dict]:
    """Submit ``job_dir``, print progress until it ends; return (job id, final job meta).

    Progress comes as the project lead sees it with ``python -m fedmed watch``: through the admin API
    (:class:`fedmed.deploy.watch.JobWatcher`), never from the server's files. With an ``injector``
    (``--fault``), each poll lets it fire the faults whose round is running; after a server restart
    ``reopen_session()`` gives a new admin session and monitoring goes on with the same job."""
    from fedmed.deploy.watch import JobWatcher

    job_id = session.submit_job(str(job_dir))
    log(f"  submitted job {job_id} ({job_dir.name})")
    watcher = JobWatcher(session, job_id, log)
    started = watcher.started
    if injector is not None:
        injector.started = started
    deadline = started + timeout
    last_error = None
    ended_at = None  # when the watched job was first seen ended
    if injector is not None:
        injector.job_ids = [job_id]
    while time.time() < deadline:
        if sampler is not None:
            sampler.sample()
        status = watcher.poll()
        meta = watcher.meta
        last_error = watcher.error
        if status is not None:
            resumed_as = meta.get(RESUMED_AS_META_KEY)  # a restarted server re-submitted it (fedmed.flare.resume)
            if resumed_as and resumed_as != job_id:
                log(f"  [{time.time() - started:5.0f} s] job {job_id} was interrupted by the server restart; "
                    f"it resumes from its last completed round as job {resumed_as}")
                job_id = watcher.job_id = resumed_as
                watcher.status, ended_at = None, None
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
                    session = watcher.session = reopen_session()
                except Exception as exc:
                    last_error = exc
        time.sleep(1.0)
    raise RehearsalError(f"job {job_id} did not end within {timeout:.0f} s (last status {watcher.status}"
                         + (f"; last error {type(last_error).__name__}: {last_error}" if last_error else "") + ")")


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
    dry_run: bool = False,
    network=None,
) -> Path:
    """Run the rehearsal; with ``network`` (a :class:`fedmed.deploy.netns.HostNetwork`, this process on its
    admin host) each participant runs on its own network host."""
    began = time.time()
    try:
        planned_faults = [parse_fault(text, rounds) for text in faults or []]
    except FaultError as exc:
        raise RehearsalError(str(exc)) from exc
    if network is None and any(f.kind == "partition-hospital" for f in planned_faults):
        raise RehearsalError("--fault partition-hospital cuts a hospital's network link: it needs --hosts netns")
    if sum(f.kind == "kill-hospital" for f in planned_faults) >= hospitals:
        raise RehearsalError(f"--fault kill-hospital {sum(f.kind == 'kill-hospital' for f in planned_faults)} time(s) "
                             f"with --hospitals {hospitals} leaves no hospital to train; start more hospitals")
    spec = plan(job, hospitals, rounds, privacy, settings)  # a bad job or a refused --set value fails before anything is created
    from fedmed.runner import RunError, start_output_folder

    try:
        out_dir = start_output_folder(out, "rehearse")  # marked INCOMPLETE until the outputs are written
    except RunError as exc:
        raise RehearsalError(str(exc)) from exc
    if dry_run:
        from fedmed.jobfolder import write_job_folder

        print(f"  dry run: the job is checked and written to {write_job_folder(spec, out_dir / 'job').path}; "
              "nothing provisioned or started", flush=True)
        return out_dir
    if workdir:  # the caller's folder: used, never deleted
        work = Path(workdir).resolve()
        if work.exists() and any(work.iterdir()):
            raise RehearsalError(f"work folder {work} is not empty; choose another --workdir")
        work.mkdir(parents=True, exist_ok=True)
    else:  # a temp folder, deleted afterwards (it holds the rehearsal's keys) unless --keep
        work = Path(tempfile.mkdtemp(prefix="fedmed-rehearse-"))
    port = NETNS_PORT if network is not None else free_port()
    server_name = NETNS_SERVER_HOST if network is not None else "localhost"
    federation = injector = None
    summary = {"job_id": None, "status": None, "hospitals": [], "port": port, "out": str(out_dir),
               "faults": [], "rounds_completed": 0}
    metrics = None
    try:
        from fedmed.jobfolder import write_job_folder

        job_copy = write_job_folder(spec, out_dir / "job").path  # every door: the run's job in OUT/job
        project = plan_project(project_file, hospitals, port, False, server_name)  # he (secure aggregation) needs no HE kits
        names = roles(project)
        summary["hospitals"] = names["hospitals"]
        if network is not None:
            summary["participants"] = participants_record(network, names)
            print(f"[0/6] network hosts (one namespace each, joined by a bridge): "
                  + ", ".join(f"{n} {p['address']}" for n, p in summary["participants"].items()
                              if n in (names["server"], *names["hospitals"]))
                  + f", admins {network.host(ADMIN_HOST).address}", flush=True)
        print(f"[1/6] provisioning server {server_name}:{port}, {hospitals} hospitals, admins into {work}", flush=True)
        prod = provision(project, work / "provision")
        print(f"[2/6] hospitals fill local/fedmed_site.json with their own data "
              f"({'partition of ' + data if data else 'synthetic X-rays'})", flush=True)
        for line in fill_site_configs(prod, names["hospitals"], out_dir, spec, data, seed):
            print("  " + line, flush=True)
        print(f"[3/6] starting server and {hospitals} hospitals from their kits (logs in {out_dir / 'logs'})", flush=True)
        federation = LocalFederation(prod, out_dir / "logs", project_admin=names["project_admin"], network=network)
        federation.start_all(names["server"], names["hospitals"])
        print(f"[4/6] submitting {job_copy.name} as {names['lead']} (rounds: {rounds or 'job default'}, "
              f"privacy scope: {privacy or 'site default'}"
              + (f", faults: {' '.join(f.spec for f in planned_faults)}" if planned_faults else "") + ")", flush=True)
        session = federation.session(names["lead"])
        injector = FaultInjector(planned_faults, federation, names["server"], names["hospitals"],
                                 log=lambda line: print(line, flush=True), network=network)
        sampler = MemorySampler(federation.processes)
        job_id, meta = run_job(session, job_copy, timeout, injector=injector, sampler=sampler,
                               reopen_session=lambda: federation.session(names["lead"]))
        if network is not None:  # while every kit still runs: who listens where, who talks to whom
            for name, proc in federation.processes.items():
                summary["participants"][name].update(network_facts(proc.pid))
        summary["peak_rss_mb"] = sampler.peaks  # per kit: its own process, and its job processes together
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
        if injector is not None and network is not None:
            injector.heal_all()  # a link still cut would stall the shutdown below
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
        summary["wall_s"] = round(time.time() - began, 1)
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
                        help="privacy scope the job asks for (meta.json 'scope'); 'he' runs secure aggregation (no keys provisioned)")
    parser.add_argument("--project", default="provisioning/project.yml", help="FLARE project file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the job (default 900)")
    parser.add_argument("--workdir", default=None,
                        help="empty folder for kits, data and downloads, kept afterwards (default: a temp folder, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder (kits, keys) after the run")
    parser.add_argument("--seed", type=int, default=0, help="data partition seed (default 0)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND:ROUND",
                        help="chaos, repeatable: restart-server:N (SIGKILL the server during round N, restart it from "
                             "its kit, wait for the job to resume) or kill-hospital:N (SIGKILL one hospital during "
                             "round N; keep min_clients below --hospitals) or partition-hospital:N (--hosts netns: cut "
                             "one hospital's network link during round N, heal it when the round is over). Rounds "
                             "count from 1")
    parser.add_argument("--hosts", choices=HOSTS_MODES, default="loopback",
                        help="where the participants run: loopback (default: every process on 127.0.0.1) or netns "
                             "(each participant on its own network host, a Linux network namespace with its own "
                             "address and host name, joined by a bridge; needs root)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job and its --set values, write the job it would submit to OUT/job and stop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a job argument of the controller or executor, as simulate --set "
                             "(e.g. wait_after_min_clients=5)")


def run_on_hosts(args: argparse.Namespace) -> int:
    """``--hosts netns``: create the network hosts, run this rehearsal on the admin host, remove them all."""
    from fedmed.deploy.netns import HostNetwork, NetnsError, require_netns

    try:
        require_netns()
        names = roles(plan_project(args.project, args.hospitals, NETNS_PORT, False, NETNS_SERVER_HOST))
    except (NetnsError, ProvisionError, RehearsalError, OSError, ValueError) as exc:
        print(f"rehearse failed: {exc}", file=sys.stderr, flush=True)
        return 1
    network = HostNetwork(network_hosts(names))
    state = Path(tempfile.mkdtemp(prefix="fedmed-netns-")) / "state.json"
    driver = None
    try:
        network.create()
        options = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        write_json(state, {"network": network.to_json(), "args": options})  # the driver runs in this folder too
        env = {**os.environ, NETNS_STATE_ENV: str(state)}
        command = network.command(ADMIN_HOST, [sys.executable, "-m", "fedmed", "rehearse", "--hosts", "netns"])
        driver = subprocess.Popen(command, env=env, start_new_session=True)
        return driver.wait()
    except NetnsError as exc:
        print(f"rehearse failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("rehearse: interrupted; removing the network hosts and every process on them", file=sys.stderr, flush=True)
        return 130
    finally:
        if driver is not None and driver.poll() is None:
            import signal

            with _suppress():
                os.killpg(driver.pid, signal.SIGINT)  # the driver shuts the federation down itself
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        left = network.close()
        if left:
            print(f"rehearse: WARNING: processes still alive in the rehearsal's namespaces: {left}",
                  file=sys.stderr, flush=True)
        shutil.rmtree(state.parent, ignore_errors=True)


def _suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


def _driver_options(args: argparse.Namespace):
    """On the admin host: the options and network the outer ``rehearse --hosts netns`` saved."""
    from fedmed.deploy.netns import HostNetwork

    state = json.loads(Path(os.environ[NETNS_STATE_ENV]).read_text())
    return argparse.Namespace(**state["args"]), HostNetwork.from_json(state["network"])


def main(args: argparse.Namespace) -> int:
    network = None
    if getattr(args, "hosts", "loopback") == "netns":
        if not os.environ.get(NETNS_STATE_ENV):
            return run_on_hosts(args)
        args, network = _driver_options(args)
    try:
        from fedmed.jobfolder import parse_assignments

        rehearse(args.hospitals, args.rounds or None, args.job, args.data, args.out, args.privacy, args.project,
                 args.timeout, args.workdir, args.keep, args.seed, args.fault, parse_assignments(args.set),
                 dry_run=args.dry_run, network=network)
    except (RehearsalError, ProvisionError, DeploymentError, ValueError, OSError) as exc:
        print(f"rehearse failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # e.g. the admin API refusing a command: still a failed rehearsal, with its reason
        print(f"rehearse failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
