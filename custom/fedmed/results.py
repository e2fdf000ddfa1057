"""Turn a finished job's server output into the user-facing output folder.

Used by ``simulate`` (on the simulator workspace), ``rehearse`` and ``python -m fedmed results`` (on a
job result downloaded from a real deployment), so all produce the same layout:

    OUT/bundle/            MONAI bundle of the released global model (the release gate's choice)
    OUT/models/            global_model.pt (released), best_global_model.pt, and after a rollback
                           final_global_model.pt (the final model that was not released)
    OUT/metrics.json       per-round, per-site metrics
    OUT/tb_events/<site>/  TensorBoard event files
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedmed.atomic import write_json

# torch, the bundle writer and the tasks are imported in export_run_outputs: locating a job result
# (``report``, ``verify-provenance``) stays light.

SERVER_OUTPUT_DIR = "fedmed"  # inside the server's app folder
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_global_model.pt"
FINAL_MODEL_FILE = "final_global_model.pt"  # after a rollback: the final model, not released


class ResultsError(RuntimeError):
    pass


JOB_META_FILE = "meta.json"  # the job store's meta (status, job_id) at the top of a downloaded job result
FINISHED_OK = "FINISHED:COMPLETED"
RUN_FILES = (METRICS_FILE, "provenance.json", "cross_site.json")  # any of these marks a finished output folder


@dataclass
class JobResult:
    """Where the parts of a job result are: a simulator workspace, or a downloaded deployment job
    (``nvflare job download ID -o DIR``, the console's ``download_job ID`` into the admin kit's
    ``transfer/``, the admin API's ``download_job_result``): ``<job id>/meta.json`` (status),
    ``<job id>/workspace/`` (server logs, ``app_server/fedmed/``), ``<job id>/job/`` (the submitted job)."""

    given: Path
    job_root: Path | None = None  # the folder holding the job store's meta.json (downloads only)
    job_meta: dict | None = None
    workspace: Path | None = None  # the server's run folder (logs, tb_events/, app_server/)
    app_dir: Path | None = None  # the folder holding fedmed/ (None: the job never wrote its outputs)

    @property
    def job_id(self) -> str:
        return (self.job_meta or {}).get("job_id") or (self.job_root.name if self.job_root else "?")

    @property
    def status(self) -> str | None:
        return (self.job_meta or {}).get("status")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_job_root(folder: Path) -> bool:
    meta = _read_json(folder / JOB_META_FILE) if (folder / JOB_META_FILE).is_file() else None
    return isinstance(meta, dict) and "job_id" in meta and ((folder / "workspace").is_dir() or (folder / "job").is_dir())


def _server_outputs_below(root: Path) -> list[Path]:
    """Folders ``X`` below ``root`` with ``X/fedmed/run_config.json`` or ``X/fedmed/metrics.json`` (shallowest first)."""
    found = {p.parent.parent for name in (RUN_CONFIG_FILE, METRICS_FILE) for p in root.rglob(f"{SERVER_OUTPUT_DIR}/{name}")}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def locate_job_result(path: str | Path) -> JobResult:
    """Find a job result's parts from ``path``: the top folder of a download, any folder inside it
    (``<job id>/``, ``workspace/``, ``app_server/``, ``app_server/fedmed/``), or a simulator workspace.

    Raises :class:`ResultsError` for a folder that holds no job result (naming what it looked for)
    and for a folder holding several jobs (naming them).
    """
    given = Path(path).resolve()
    if not given.exists():
        raise ResultsError(f"{given} does not exist; pass the folder a job result was downloaded to")
    if given.is_file():
        given = given.parent
    result = JobResult(given)
    # upwards: are we inside a downloaded job (or inside its app_server/fedmed folder)?
    for candidate in (given, *list(given.parents)[:4]):
        if _is_job_root(candidate):
            result.job_root = candidate
            break
    if result.job_root is None:
        below = sorted({p.parent for p in given.rglob(JOB_META_FILE) if _is_job_root(p.parent)},
                       key=lambda p: (len(p.parts), str(p)))
        if len(below) > 1:
            raise ResultsError(f"{given} holds {len(below)} job results ({', '.join(p.name for p in below[:6])}); "
                               f"pass one of them")
        if below:
            result.job_root = below[0]
    if result.job_root is not None:
        result.job_meta = _read_json(result.job_root / JOB_META_FILE)
        workspace = result.job_root / "workspace"
        result.workspace = workspace if workspace.is_dir() else None
        search_from = result.job_root
    else:
        search_from = given
        if given.name == SERVER_OUTPUT_DIR and ((given / RUN_CONFIG_FILE).is_file() or (given / METRICS_FILE).is_file()):
            search_from = given.parent
    apps = [search_from] if ((search_from / SERVER_OUTPUT_DIR / RUN_CONFIG_FILE).is_file()
                             or (search_from / SERVER_OUTPUT_DIR / METRICS_FILE).is_file()) else _server_outputs_below(search_from)
    if apps:
        result.app_dir = apps[0]
        if result.workspace is None:
            result.workspace = apps[0].parent
    if result.job_root is None and result.app_dir is None:
        raise ResultsError(
            f"{given} is not a job result: it holds no job meta.json (with a job_id, beside workspace/ and job/) and no "
            f"app_server/{SERVER_OUTPUT_DIR}/ outputs. Pass the folder `nvflare job download JOB_ID -o DIR` wrote "
            f"(DIR/JOB_ID), or the console's download in the admin kit's transfer/JOB_ID"
        )
    return result


def _log_errors(workspace: Path | None, limit: int = 3) -> list[str]:
    """The last few ERROR lines of the server's job log (``error_log.txt``, else ``log.txt``)."""
    if workspace is None:
        return []
    for name in ("error_log.txt", "log.txt"):
        log = workspace / name
        if log.is_file():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if " ERROR " in line or "Error" in line]
            if lines:
                return [line[:300] for line in lines[-limit:]]
    return []


def unfinished_reason(result: JobResult) -> str | None:
    """Why the job did not produce a finished model (None when it did): the job's status, the
    run's recorded error, the deployment detail, the server log's last errors."""
    reasons = []
    status = result.status
    metrics = None
    if result.app_dir is not None:
        metrics = _read_json(result.app_dir / SERVER_OUTPUT_DIR / METRICS_FILE)
    if status and status != FINISHED_OK:
        if status in ("SUBMITTED", "DISPATCHED", "RUNNING"):
            reasons.append(f"job {result.job_id} is still {status} (job meta.json); wait until it ends, then download it again")
        else:
            reasons.append(f"job {result.job_id} ended with status {status}")
        detail = [d for d in (result.job_meta or {}).get("job_deploy_detail", []) if not str(d).endswith(": OK")]
        if detail:
            reasons.append("deployment: " + "; ".join(map(str, detail)))
    if isinstance(metrics, dict):
        if metrics.get("error"):
            reasons.append(f"the run's error ({result.app_dir / SERVER_OUTPUT_DIR / METRICS_FILE}): {metrics['error']}")
        elif not metrics.get("finished"):
            done = len(metrics.get("rounds", []))
            reasons.append(f"{result.app_dir / SERVER_OUTPUT_DIR / METRICS_FILE} says the run did not finish "
                           f"({done} of {metrics.get('num_rounds', '?')} rounds recorded, no error recorded)")
    elif result.app_dir is None:
        reasons.append("the server wrote no fedmed outputs (app_server/fedmed/): the job stopped before its first round")
    elif not (result.app_dir / SERVER_OUTPUT_DIR / METRICS_FILE).is_file():
        reasons.append(f"{result.app_dir / SERVER_OUTPUT_DIR / METRICS_FILE} is missing: the job stopped before its first round")
    if not reasons and (result.app_dir is None or not (result.app_dir / SERVER_OUTPUT_DIR / GLOBAL_MODEL_FILE).is_file()):
        reasons.append(f"the result has no {SERVER_OUTPUT_DIR}/{GLOBAL_MODEL_FILE}")
    if not reasons:
        return None
    errors = _log_errors(result.workspace)
    if errors and not (isinstance(metrics, dict) and metrics.get("error")):
        reasons.append("server log: " + " | ".join(errors))
    return "; ".join(reasons)


def find_server_app_dir(root: str | Path) -> Path:
    """Find the folder holding ``fedmed/`` (the server's outputs) from ``root`` (a workspace, a download or a folder in it)."""
    result = locate_job_result(root)
    if result.app_dir is None:
        raise ResultsError(f"{root}: {unfinished_reason(result)}")
    return result.app_dir


def resolve_run_folder(path: str | Path) -> Path:
    """The folder ``report`` and ``verify-provenance`` read: an output folder (``simulate``/``results``/
    ``rehearse``) as it is, a downloaded job result (any folder in it) as its ``app_server/fedmed/``.
    A file (e.g. a provenance card) is returned as it is."""
    given = Path(path)
    if given.is_file() or any((given / name).is_file() for name in RUN_FILES):
        return given
    result = locate_job_result(given)
    if result.app_dir is None:
        raise ResultsError(f"{given}: {unfinished_reason(result)}")
    return result.app_dir / SERVER_OUTPUT_DIR


def release_files(source: Path, metrics: dict) -> tuple[Path, Path | None]:
    """(the released model file, the final model file when it was not released) of a finished run's
    ``fedmed/`` folder; fills ``metrics["release"]``.

    The controller's release gate wrote ``metrics.json``'s ``release`` block and made
    ``global_model.pt`` the released model. A run from before the gate has no block: the gate is
    applied here with its default tolerance (a rollback then releases ``best_global_model.pt``).
    A collapse raises :class:`ResultsError`: nothing is exported.
    """
    from fedmed.release import COLLAPSE, ROLLBACK, decide_release

    if isinstance(metrics.get("release"), dict):
        release = metrics["release"]
        final = source / release.get("final_model_file", FINAL_MODEL_FILE)
        return source / GLOBAL_MODEL_FILE, final if release.get("action") == ROLLBACK else None
    decision = decide_release(metrics.get("evaluations"), metrics.get("key_metric", "val_auc"), int(metrics.get("num_rounds") or 0))
    if decision.action == COLLAPSE:
        raise ResultsError(f"{source / METRICS_FILE}: release gate: {decision.reason}; the run's model is not exported")
    metrics["release"] = {**decision.as_dict(), "decided": "at export (the run's metrics.json has no release block)"}
    if decision.action == ROLLBACK:
        if decision.version != (metrics.get("best") or {}).get("model_version") or not (source / BEST_MODEL_FILE).is_file():
            raise ResultsError(f"{source}: release gate: {decision.reason}, but {BEST_MODEL_FILE} is not that version; "
                               "the run's model is not exported")
        metrics["release"].update(model_file=GLOBAL_MODEL_FILE, final_model_file=FINAL_MODEL_FILE)
        return source / BEST_MODEL_FILE, source / GLOBAL_MODEL_FILE
    metrics["release"]["model_file"] = GLOBAL_MODEL_FILE
    return source / GLOBAL_MODEL_FILE, None


def export_run_outputs(server_app_dir: str | Path, out_dir: str | Path, tb_events_dir: str | Path | None = None) -> dict:
    """Write bundle, models, metrics and TensorBoard events from a finished run into ``out_dir``.

    Returns the metrics dict.
    """
    import torch

    from fedmed.bundle import write_bundle
    from fedmed.provenance import CARD_FILENAME, bundle_metadata
    from fedmed.release import released_evaluation
    from fedmed.tasks import WindowedInference, build_task
    from fedmed.threshold import choose_threshold

    server_app_dir = Path(server_app_dir)
    source = server_app_dir / SERVER_OUTPUT_DIR
    out_dir = Path(out_dir)
    if not source.is_dir():
        raise ResultsError(f"{source} does not exist: pass the folder holding {SERVER_OUTPUT_DIR}/ (see locate_job_result)")
    metrics = _read_json(source / METRICS_FILE) if (source / METRICS_FILE).is_file() else None
    if isinstance(metrics, dict) and (metrics.get("error") or not metrics.get("finished")):
        raise ResultsError(unfinished_reason(JobResult(server_app_dir, app_dir=server_app_dir, workspace=server_app_dir.parent)))
    for required in (RUN_CONFIG_FILE, METRICS_FILE, GLOBAL_MODEL_FILE):
        if not (source / required).is_file():
            raise ResultsError(f"{source / required} is missing: the job stopped before its first round or the "
                               f"folder is incomplete; see the server log")
    run_config = _read_json(source / RUN_CONFIG_FILE)
    if not isinstance(metrics, dict) or not isinstance(run_config, dict):
        bad = source / (METRICS_FILE if not isinstance(metrics, dict) else RUN_CONFIG_FILE)
        raise ResultsError(f"{bad} is not a readable JSON object; download the job result again")
    released_file, final_file = release_files(source, metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = out_dir / "models"
    models_dir.mkdir(exist_ok=True)
    for name, path in ((GLOBAL_MODEL_FILE, released_file), (BEST_MODEL_FILE, source / BEST_MODEL_FILE),
                       (FINAL_MODEL_FILE, final_file)):
        if path is not None and path.is_file():
            shutil.copy2(path, models_dir / name)
    for extra in sorted(source.glob("*.json")):
        if extra.name not in (METRICS_FILE,):
            shutil.copy2(extra, out_dir / extra.name)

    task = build_task(run_config["task"])
    state = torch.load(released_file, map_location="cpu", weights_only=True)
    release = metrics["release"]
    final = released_evaluation(metrics.get("evaluations"), release["version"]) or (metrics.get("evaluations") or [{}])[-1]
    # the decision threshold: chosen on the sites' validation of the released model (fedmed.threshold)
    threshold = choose_threshold(dict(final.get("sites", {})))
    if threshold is not None:
        class_names = getattr(task, "class_names", ["class_0", "class_1"])
        threshold = {"class": class_names[1], "applies_to": f"softmax probability of class {class_names[1]!r}",
                     "rule": "probability >= threshold -> positive", **threshold}
        metrics["decision_threshold"] = threshold
    write_bundle(
        out_dir / "bundle",
        run_config["network"],
        state,
        task.network_data_format(run_config["network"]),
        name=run_config.get("job_name", "fedmed model"),
        description=f"{run_config['task']['name']} model trained by federated averaging over "
        f"{len(metrics.get('sites', []))} sites for {metrics.get('num_rounds')} rounds; released version "
        f"{release['version']} ({release['action']})",
        postprocessing=task.inference_postprocessing(),
        decision_threshold=threshold,
        inference_config=task.inference_config() if isinstance(task, WindowedInference) else None,  # e.g. sliding window
        extra_metadata={"fedmed": {"rounds": metrics.get("num_rounds"), "sites": metrics.get("sites", []),
                                   "release": {k: release.get(k) for k in ("version", "action", "reason")},
                                   "released_model_validation": {k: v for k, v in final.items() if k != "sites"}},
                        **bundle_metadata(source / CARD_FILENAME)},  # points to OUT/provenance.json
    )
    tb_events_dir = Path(tb_events_dir) if tb_events_dir else server_app_dir.parent / "tb_events"
    if tb_events_dir.is_dir():
        shutil.copytree(tb_events_dir, out_dir / "tb_events", dirs_exist_ok=True)
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics
