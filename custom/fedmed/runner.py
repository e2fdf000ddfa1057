"""The one runner behind every front door: ``simulate``, ``python jobs/<name>/job.py`` (SimEnv) and ``rehearse``.

Each door does the same four steps; only *where the job runs* differs (FLARE's simulator in a
subprocess, FLARE's ``SimEnv`` through the recipe, or a real deployment on 127.0.0.1):

1. :func:`plan_job`: the job's :class:`~fedmed.jobspec.JobSpec` with the run's options applied
   (``--set``, rounds and ``min_clients`` for the number of sites, privacy, attacks, HE), checked
   by building the real objects (:func:`fedmed.flare.recipes.check_spec`) before anything starts,
   so a refused ``--set`` value fails in seconds naming key and reason;
2. :func:`prepare_sites`: every site's data (a seeded non-IID partition or synthetic data) and its
   data config, plus the held-out external hospitals in ``OUT/external/``; :func:`write_site_locals`
   writes the simulated sites' ``local/`` files (``fedmed_site.json``, ``resources.json``);
3. the door runs the job folder :func:`fedmed.jobfolder.write_job_folder` wrote (``OUT/job``);
4. :func:`finish_outputs`: the outputs (``fedmed.results.export_run_outputs``: bundle, models,
   ``metrics.json``, provenance card, TensorBoard), baselines when asked, the external evaluation
   (``metrics.json`` ``external``), the report.

Glue module (imports ``fedmed.flare`` lazily: the allow-list and the recipe checks).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from fedmed.atomic import write_json
from fedmed.jobfolder import JobFolder, JobFolderError, write_job_folder
from fedmed.jobspec import HE_MODES, JobSpec, JobSpecError, for_simulation, setting_targets, with_attacks, with_he, with_scope, with_settings
from fedmed.site_config import SITE_CONFIG_FILE

DEFAULT_JOB = "jobs/cxr_pneumonia_fedavg"
INCOMPLETE_MARKER = "INCOMPLETE"  # in OUT while a run is in progress or after it failed / was interrupted
DOORS = ("simulate", "simenv", "rehearse")


class RunError(RuntimeError):
    """A run that cannot start or did not finish; the message says what and where to look."""


@dataclass
class RunOptions:
    """What a run asks for, the same for every door."""

    sites: int = 5
    rounds: int | None = None
    settings: dict = field(default_factory=dict)
    privacy: str | None = None
    privacy_file: str | None = None
    attacks: list[str] = field(default_factory=list)
    data: str | None = None
    alpha: float = 0.5
    seed: int = 0


def load_spec(job: str | Path | JobSpec) -> JobSpec:
    """A job given as a spec, a job folder path, or a folder relative to the repository root."""
    if isinstance(job, JobSpec):
        return job
    try:
        return JobFolder.resolve(job).spec()
    except JobFolderError as exc:
        raise RunError(str(exc)) from exc


def plan_job(job: str | Path | JobSpec, options: RunOptions, door: str = "simulate", log: Callable[[str], None] | None = None) -> JobSpec:
    """The job spec a run of ``door`` executes: ``options`` applied, every object's checks passed.

    The simulated doors (``simulate``, ``simenv``) copy a privacy mode's site filters into the job
    (FLARE's simulator does not enforce site scopes) and may add simulated attacks; ``rehearse``
    names the scope (real sites apply their own ``privacy.json``) and, for ``he`` / ``dp_he``, adds
    the secure-aggregation step and the sites' protocol executor. Raises :class:`RunError` naming the option, key and reason.
    """
    if door not in DOORS:
        raise RunError(f"unknown door {door!r}; one of {', '.join(DOORS)}")
    if options.sites < 1:
        raise RunError(f"--sites must be >= 1, got {options.sites}")
    if options.rounds is not None and options.rounds < 1:
        raise RunError(f"--rounds must be >= 1, got {options.rounds}")
    log = log or (lambda line: None)
    spec = load_spec(job)
    settings = dict(options.settings or {})
    from fedmed.attacks import parse_attack  # bad syntax is refused before any work

    attacks = [parse_attack(text) for text in options.attacks or []]
    if attacks and door == "rehearse":
        raise RunError("--attack is for simulated hospitals only (simulate, job.py); a deployment has real ones")
    try:
        targets = setting_targets(spec, settings)
        spec = for_simulation(with_settings(spec, settings), options.sites, options.rounds)
    except JobSpecError as exc:
        raise RunError(str(exc)) from exc
    for key, where in targets.items():
        log(f"--set {key}={json.dumps(settings[key])} ({', '.join(f'{c} argument {a}' for c, a in where)})")
    if options.privacy and door == "rehearse":
        spec = with_he(spec, scope=options.privacy) if options.privacy in HE_MODES else with_scope(spec, options.privacy)
    elif options.privacy:
        from fedmed.privacy.simulation import with_privacy_mode

        spec, applied = with_privacy_mode(spec, options.privacy, options.privacy_file)
        log(f"privacy mode '{options.privacy}' from {applied['client_privacy_file']}: site filters "
            f"{', '.join(applied['client_filters'])}; server filters {', '.join(applied['server_filters']) or 'none'}")
    if attacks:
        site_names = [f"site-{i}" for i in range(1, options.sites + 1)]
        unknown = sorted({a.site for a in attacks} - set(site_names))
        if unknown:
            raise RunError(f"--attack: no simulated site {', '.join(unknown)}; the sites are {', '.join(site_names)}")
        spec = with_attacks(spec, [a.to_dict() for a in attacks])
        log("simulated attack(s): " + "; ".join(f"{a.site} {a.label}" for a in attacks))
    from fedmed.flare.recipes import check_spec

    try:
        check_spec(spec, settings)
    except JobSpecError as exc:
        raise RunError(str(exc)) from exc
    if door != "rehearse":
        check_tolerance(spec, options.sites, log)
    return spec


def check_tolerance(spec: JobSpec, num_sites: int, log: Callable[[str], None] | None = None) -> None:
    """Refuse before any site is prepared when the job states a tolerance f (hostile sites tolerated)
    that ``num_sites`` sites cannot support; the controller refuses the same at start
    (:func:`fedmed.aggregation.resolve_tolerance`). A step component's own aggregation is not checked here."""
    from fedmed.aggregation import ToleranceError, resolve_tolerance

    aggregation = (spec.controller or {}).get("aggregation")
    if not aggregation or (spec.controller or {}).get("aggregation_step_id"):
        return
    try:
        f = resolve_tolerance(aggregation, num_sites)
    except (ToleranceError, ValueError) as exc:
        raise RunError(f"the job cannot start with {num_sites} sites: {exc}") from None
    if log:
        name = aggregation.get("name") if isinstance(aggregation, Mapping) else aggregation
        log(f"tolerates f={f} hostile site(s) of {num_sites} ({name})")


def start_output_folder(out: str | Path | None, default_name: str, force: bool = False) -> Path:
    """Create ``out`` (default ``runs/<default_name>-<timestamp>``) marked ``INCOMPLETE`` until the run finishes.
    A non-empty folder is refused unless ``force`` or it holds an incomplete run (then it is replaced)."""
    out_dir = Path(out or f"runs/{default_name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force and not (out_dir / INCOMPLETE_MARKER).exists():
            raise RunError(f"output folder {out_dir} is not empty; choose another --out or pass --force")
        if not force:
            print(f"  {out_dir} holds an incomplete run ({INCOMPLETE_MARKER}); replacing it", flush=True)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE_MARKER).write_text(
        "this run has not finished (in progress, failed or interrupted); rerun with the same --out to replace it\n")
    return out_dir


def prepare_sites(spec: JobSpec, num_sites: int, out_dir: Path, data: str | None = None, alpha: float = 0.5,
                  seed: int = 0) -> tuple[dict, list[str]]:
    """Every site's data under ``OUT/sites`` and the external hospitals under ``OUT/external``
    (held-out data no site config names, :mod:`fedmed.external`); returns ``({site: data config}, summary lines)``."""
    from fedmed.tasks import build_task

    task = build_task(spec.task_spec)
    return task.prepare_simulation(num_sites, out_dir / "sites", data, alpha, seed, external_dir=out_dir / "external")


def write_site_locals(local_dir: Path, site_configs: dict) -> None:
    """The simulated sites' shared ``local/`` files: ``fedmed_site.json`` (each site picks its entry)
    and ``resources.json`` with this project's class allow-list."""
    from fedmed.flare.allow_list import class_allow_list

    write_json(local_dir / SITE_CONFIG_FILE, {"sites": site_configs})
    write_json(local_dir / "resources.json", {"format_version": 2, "class_allow_list": class_allow_list()})


def write_run_job(spec: JobSpec, out_dir: Path) -> Path:
    """``OUT/job``: the job folder this run executes, through the one writer."""
    return write_job_folder(spec, out_dir / "job").path


def finish_outputs(server_app: Path, out_dir: Path, spec: JobSpec, site_configs: dict | None = None,
                   baselines: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Every door's outputs from a finished run's server app folder: bundle, models, ``metrics.json``,
    provenance card, TensorBoard (:func:`fedmed.results.export_run_outputs`); ``baselines.json`` when
    asked; the external evaluation into ``metrics.json`` ``external``; ``report/``. Returns the metrics."""
    from fedmed.external import evaluate_run, external_sets
    from fedmed.report import build_report
    from fedmed.results import METRICS_FILE, export_run_outputs

    log = log or say
    metrics = export_run_outputs(server_app, out_dir)
    _print_summary(metrics, out_dir, log)
    if baselines:
        from fedmed.baselines import BASELINES_FILE, run_for_job

        log("  baselines: local-only and pooled models with the same partition and budget")
        run_for_job(out_dir / "job", site_configs or {}, out_dir / BASELINES_FILE, num_rounds=spec.num_rounds,
                    federated_model=out_dir / "models" / "global_model.pt", log=log, external=external_sets(out_dir))
    evaluate_run(out_dir, log=lambda line: log("  " + line))
    mark_complete(out_dir)  # every output is in place: the report may call the run finished
    build_report(out_dir, log=lambda line: log("  " + line))
    from fedmed.provenance import signing_note

    log(f"  report: {out_dir / 'report' / 'report.html'}\n  provenance card: {out_dir / 'provenance.json'} "
        f"(python -m fedmed verify-provenance {out_dir}; {signing_note(out_dir / 'provenance.json')})")
    return json.loads((out_dir / METRICS_FILE).read_text())


def _print_summary(metrics: dict, out_dir: Path, log: Callable[[str], None]) -> None:
    from fedmed.results import METRICS_FILE

    key = metrics["key_metric"]
    evaluations = metrics.get("evaluations", [])
    release = metrics.get("release") or {}
    if release:  # the release gate's decision (fedmed.release)
        log(f"  release gate: released model version {release.get('version')} of {metrics.get('num_rounds')} "
            f"({release.get('action')}): {release.get('reason')}")
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        log(f"  mean validation {key}: initial model {first.get('mean_' + key):.4f} -> "
            f"final global model {last.get('mean_' + key):.4f}")
        for site, site_metrics in sorted(last["sites"].items()):
            log(f"    {site}: " + ", ".join(f"{k} {v:.4f}" for k, v in site_metrics.items()
                                           if k.startswith("val_") and isinstance(v, (int, float))))
    from fedmed.rounds import participation_summary  # issue 18: the sites flagged or left out in most rounds

    seen = participation_summary(metrics.get("participation") or {}, len(metrics.get("rounds", [])))
    if seen:
        log(f"  {seen}")
    log(f"  bundle: {out_dir / 'bundle'}\n  metrics: {out_dir / METRICS_FILE}\n"
        f"  TensorBoard: tensorboard --logdir {out_dir / 'tb_events'}")


def say(line: str) -> None:
    print(line, flush=True)


def mark_complete(out_dir: Path) -> None:
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
