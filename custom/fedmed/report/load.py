"""Loading a run's outputs for the report: find the input files, parse and check them into :class:`RunData`.

Inputs in the run folder (every one optional except that at least one must exist):

- ``metrics.json``: per-round, per-site metrics written by the FedAvg controller, plus the
  ``external`` block (models on hospitals no site held, ``fedmed.external``);
- ``cross_site.json``: the models x sites matrix from the cross-site evaluation workflow
  (``fedmed.flare.cross_site``): the final global model and each site's last-round local model;
- ``baselines.json``: the local-only and pooled baselines (``fedmed.baselines``), also as a
  models x sites matrix on the same sites' validation data;
- ``provenance.json``: the provenance card (``fedmed.provenance``).

Besides the figures, :func:`load_run` reads how the run ended (:func:`run_status`: simulate's
``INCOMPLETE`` marker, ``metrics.json``'s error / ``finished``, a downloaded job's status), the
release gate's decision (``metrics.json`` ``release``) and whether external hospital data exists
that was not evaluated, so the report never looks more finished than the run.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

FEDERATED = "global_model"
BEST_FEDERATED = "best_global_model"
POOLED = "pooled"
LOCAL_ONLY_PREFIX = "local-only:"
INPUT_FILES = ("metrics.json", "cross_site.json", "baselines.json", "provenance.json")
INCOMPLETE_MARKER = "INCOMPLETE"  # fedmed.simulate.INCOMPLETE_MARKER: the run is in progress, failed or was interrupted
HISTOGRAM_KEY = "val_score_histogram"  # fedmed.threshold.HISTOGRAM_KEY


class ReportError(ValueError):
    """Report inputs are missing or malformed; the message names the file and key."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} could not be read as JSON: {exc}") from exc


def find_run_files(path: str | os.PathLike) -> dict[str, Path]:
    """Locate the report inputs under ``path``: a simulate ``--out`` folder, a job's
    ``app_server/fedmed`` folder, or a downloaded deployment job result (searched recursively;
    the shallowest copy of each file wins)."""
    root = Path(path)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; pass a simulate output folder or a downloaded job result")
    found: dict[str, Path] = {}
    for name in INPUT_FILES:
        direct = root / name
        if direct.is_file():
            found[name] = direct
            continue
        candidates = sorted(
            (p for p in root.rglob(name) if "report" not in p.relative_to(root).parts),
            key=lambda p: (len(p.relative_to(root).parts), str(p)),
        )
        if candidates:
            found[name] = candidates[0]
    if not found:
        raise ReportError(
            f"{root} holds none of {', '.join(INPUT_FILES)}; pass the folder that `python -m fedmed simulate --out` "
            "wrote, or the folder a deployment job result was downloaded to"
        )
    return found


def _check_matrix(doc: Mapping[str, Any], source: str) -> dict[str, dict[str, dict[str, float]]]:
    results = doc.get("results")
    if not isinstance(results, Mapping):
        raise ReportError(f"{source}: key 'results' (model -> site -> metrics) is missing")
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    for model, row in results.items():
        if not isinstance(row, Mapping):
            raise ReportError(f"{source}: results[{model!r}] must map site -> metrics")
        matrix[str(model)] = {}
        for site, metrics in row.items():
            if not isinstance(metrics, Mapping):
                raise ReportError(f"{source}: results[{model!r}][{site!r}] must be a metrics object")
            matrix[str(model)][str(site)] = {
                k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
    return matrix


@dataclass
class RunStatus:
    """How the run ended: ``complete``, ``incomplete`` (interrupted, in progress or unfinished) or
    ``failed`` (a recorded error, e.g. the release gate's collapse), with the reasons."""

    state: str
    reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def headline(self) -> str:
        """The report's first words: empty for a complete run."""
        return {"complete": "", "incomplete": "INCOMPLETE RUN", "failed": "FAILED RUN"}[self.state]

    def sentence(self) -> str:
        if self.complete:
            return "Run status: finished."
        what = "did not finish" if self.state == "incomplete" else "failed"
        return (f"Run status: **{self.headline()}**: this run {what}; the figures below are what it left and do not "
                f"describe a released model. " + " ".join(r.rstrip(".") + "." for r in self.reasons))


def run_status(root: Path, metrics_doc: Any) -> RunStatus:
    """How the run in ``root`` ended, from simulate's marker, ``metrics.json`` and a job's meta.json."""
    failed, incomplete = [], []
    if (root / INCOMPLETE_MARKER).exists():
        incomplete.append(f"`{INCOMPLETE_MARKER}` is in the run folder: simulate was interrupted, failed or is still running")
    if isinstance(metrics_doc, Mapping):
        if metrics_doc.get("error"):
            failed.append(f"recorded error: {metrics_doc['error']}")
        elif metrics_doc.get("finished") is False:
            done = len(metrics_doc.get("rounds") or [])
            incomplete.append(f"metrics.json records {done} of {metrics_doc.get('num_rounds', '?')} rounds and no finish")
    else:
        incomplete.append("the run has no metrics.json: no training round was recorded")
    meta = _job_meta(root)
    if meta is not None and meta.get("status") and meta["status"] != "FINISHED:COMPLETED":
        (incomplete if meta["status"] in ("SUBMITTED", "DISPATCHED", "RUNNING") else failed).append(
            f"the job's status is {meta['status']} (meta.json of job {meta.get('job_id', '?')})")
    state = "failed" if failed else "incomplete" if incomplete else "complete"
    return RunStatus(state, failed + incomplete)


def _job_meta(root: Path) -> dict | None:
    """A downloaded job's meta.json (its status): the one beside the job's ``workspace/`` or ``job/``
    folder (FLARE leaves a stale copy inside ``workspace/``), in ``root`` or up to 4 folders above it."""
    for folder in (root, *list(root.resolve().parents)[:4]):
        path = folder / "meta.json"
        if path.is_file() and ((folder / "workspace").is_dir() or (folder / "job").is_dir()):
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(meta, dict) and "job_id" in meta:
                return meta
    return None


@dataclass
class RunData:
    """Everything the report shows, already parsed."""

    source: Path
    sites: list[str] = field(default_factory=list)
    matrix: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> site -> metrics
    model_kinds: dict[str, str] = field(default_factory=dict)  # model -> global | local | local_only | pooled
    model_sites: dict[str, str] = field(default_factory=dict)  # local model -> its site
    curves: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)  # site -> metric -> {x, y}
    budget: dict[str, Any] = field(default_factory=dict)
    pooled_validation: dict[str, Any] = field(default_factory=dict)  # baselines.json: every model on all val data
    card: dict[str, Any] | None = None
    card_status: str | None = None
    cross_site_errors: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    external: dict[str, Any] = field(default_factory=dict)  # metrics.json 'external': models on held-out hospitals
    decision_threshold: dict[str, Any] = field(default_factory=dict)  # metrics.json 'decision_threshold'
    status: RunStatus | None = None  # how the run ended (run_status)
    release: dict[str, Any] = field(default_factory=dict)  # metrics.json 'release': the version released and why
    released_site_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> the released model's validation
    histograms: dict[str, dict[str, list]] = field(default_factory=dict)  # model -> site -> val_score_histogram
    model_thresholds: dict[str, float] = field(default_factory=dict)  # baseline model -> its own decision threshold
    unevaluated_external: list[str] = field(default_factory=list)  # external sets present but never evaluated
    metrics_doc: Any = None  # metrics.json as read (participation, rounds) for sections that need more of it

    def primary_metric(self) -> str:
        for metric in ("val_auc", "val_dice"):
            if any(metric in m for row in self.matrix.values() for m in row.values()):
                return metric
            if any(metric in series for series in self.curves.values()):
                return metric
        return "val_auc"

    def federated_model(self) -> str | None:
        """The released federated model's name in the matrix (None when the run has no cross-site matrix)."""
        return next((m for m, k in self.model_kinds.items() if k == "global"), None)

    def pooled_model(self) -> str | None:
        """The pooled model's name (None unless ``simulate --baselines`` trained one)."""
        return next((m for m, k in self.model_kinds.items() if k == "pooled"), None)

    def local_models(self) -> tuple[dict[str, str], str]:
        """site -> the model that counts as that site's local model, and what kind it is."""
        local_only = {self.model_sites[m]: m for m, k in self.model_kinds.items() if k == "local_only"}
        if local_only:
            return local_only, "local_only"
        return {self.model_sites[m]: m for m, k in self.model_kinds.items() if k == "local"}, "local"


def learning_curves(metrics_doc: Any, source: str = "metrics.json") -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per-site series from the controller's metrics.json: ``{site: {metric: {"x": [...], "y": [...]}}}``.

    Reads ``rounds[].sites[site]`` (what each site reported while training round ``round``, x = round)
    and ``evaluations[].sites[site]`` (the global model of version ``model_version``, i.e. after that
    many rounds, evaluated on the site's validation data; x = model_version). Either may be absent.
    """
    if not isinstance(metrics_doc, Mapping):
        raise ReportError(f"{source}: must be a JSON object with 'rounds' and/or 'evaluations'")
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    found = False
    for list_key, x_key in (("rounds", "round"), ("evaluations", "model_version")):
        records = metrics_doc.get(list_key)
        if records is None:
            continue
        if not isinstance(records, list):
            raise ReportError(f"{source}: '{list_key}' must be a list of per-round records")
        found = True
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ReportError(f"{source}: {list_key}[{i}] must be an object")
            sites = record.get("sites")
            if not isinstance(sites, Mapping):
                raise ReportError(f"{source}: {list_key}[{i}] has no 'sites' object (site -> metrics)")
            x = record.get(x_key, i)
            for site, values in sites.items():
                if not isinstance(values, Mapping):
                    raise ReportError(f"{source}: {list_key}[{i}].sites[{site!r}] must be an object of metrics")
                for metric, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        series = curves.setdefault(str(site), {}).setdefault(metric, {"x": [], "y": []})
                        series["x"].append(float(x))
                        series["y"].append(float(value))
    if not found:
        raise ReportError(f"{source}: expected a 'rounds' and/or 'evaluations' list of per-round records")
    for site_series in curves.values():
        for series in site_series.values():
            order = sorted(range(len(series["x"])), key=lambda j: series["x"][j])
            series["x"] = [series["x"][j] for j in order]
            series["y"] = [series["y"][j] for j in order]
    return curves


def load_run(path: str | os.PathLike) -> RunData:
    files = find_run_files(path)
    data = RunData(source=Path(path), files=files)
    sites: list[str] = []
    baseline_external_results: dict[str, dict[str, Any]] = {}

    if "cross_site.json" in files:
        doc = _read_json(files["cross_site.json"])
        if not isinstance(doc, Mapping):
            raise ReportError(f"{files['cross_site.json']}: must be a JSON object")
        matrix = _check_matrix(doc, str(files["cross_site.json"]))
        models = doc.get("models", {})
        for model, row in matrix.items():
            info = models.get(model, {}) if isinstance(models, Mapping) else {}
            kind = info.get("kind") or ("global" if model == FEDERATED else "local")
            data.matrix[model] = row
            data.model_kinds[model] = kind
            _keep_histograms(data, model, doc["results"][model])
            if kind == "local":
                data.model_sites[model] = str(info.get("site", model))
        sites += [str(s) for s in doc.get("sites", [])]
        data.cross_site_errors = dict(doc.get("errors") or {})

    if "baselines.json" in files:
        doc = _read_json(files["baselines.json"])
        if not isinstance(doc, Mapping):
            raise ReportError(f"{files['baselines.json']}: must be a JSON object")
        matrix = _check_matrix(doc, str(files["baselines.json"]))
        models = doc.get("models", {})
        for model, row in matrix.items():
            info = models.get(model, {}) if isinstance(models, Mapping) else {}
            kind = info.get("kind")
            if kind not in ("local_only", "pooled"):
                raise ReportError(f"{files['baselines.json']}: models[{model!r}].kind must be 'local_only' or 'pooled'")
            data.matrix[model] = row
            data.model_kinds[model] = kind
            _keep_histograms(data, model, doc["results"][model])
            threshold = (info.get("decision_threshold") or {}).get("threshold") if isinstance(info.get("decision_threshold"), Mapping) else None
            if isinstance(threshold, (int, float)):
                data.model_thresholds[model] = float(threshold)
            if kind == "local_only":
                if "site" not in info:
                    raise ReportError(f"{files['baselines.json']}: models[{model!r}] needs the 'site' it was trained on")
                data.model_sites[model] = str(info["site"])
        data.budget = dict(doc.get("budget") or {})
        baseline_external = doc.get("external")
        if isinstance(baseline_external, Mapping):
            baseline_external_results = {str(k): dict(v) for k, v in baseline_external.items() if isinstance(v, Mapping)}
        pooled_val = doc.get("pooled_validation")
        if pooled_val is not None:
            if not isinstance(pooled_val, Mapping) or not isinstance(pooled_val.get("results"), Mapping):
                raise ReportError(f"{files['baselines.json']}: 'pooled_validation' needs a 'results' object (model -> metrics)")
            data.pooled_validation = dict(pooled_val)
        sites += [str(s) for s in doc.get("sites", [])]

    metrics_doc = None
    if "metrics.json" in files:
        metrics_doc = _read_json(files["metrics.json"])
        data.metrics_doc = metrics_doc
        data.curves = learning_curves(metrics_doc, str(files["metrics.json"]))
        _read_release(data, metrics_doc)
        external = metrics_doc.get("external") if isinstance(metrics_doc, Mapping) else None
        if isinstance(external, Mapping) and isinstance(external.get("results"), Mapping):
            data.external = dict(external)
            data.external["results"] = {str(k): dict(v) for k, v in external["results"].items() if isinstance(v, Mapping)}
        threshold = metrics_doc.get("decision_threshold") if isinstance(metrics_doc, Mapping) else None
        if isinstance(threshold, Mapping):
            data.decision_threshold = dict(threshold)
        sites += list(data.curves)

    if "baselines.json" in files and baseline_external_results:
        # metrics.json's external block normally holds these already; fill in what it lacks
        if not data.external:
            data.external = {"results": {}, "sets": {}}
        for set_name, by_model in baseline_external_results.items():
            target = data.external["results"].setdefault(set_name, {})
            for model, figures in by_model.items():
                target.setdefault(model, figures)

    if "provenance.json" in files:
        from fedmed import provenance  # pure module

        try:
            data.card = provenance.load_card(files["provenance.json"])
            result = provenance.verify_card(data.card)
            data.card_status = ("intact" if result.ok else "BROKEN") + f" ({result.message})"
        except provenance.ProvenanceError as exc:
            data.card_status = f"BROKEN: {exc}"

    for row in data.matrix.values():
        sites += list(row)
    data.sites = sorted(dict.fromkeys(sites))
    data.status = run_status(Path(path), metrics_doc)
    from fedmed.external import external_sets  # pure

    evaluated = set((data.external.get("results") or {}))
    data.unevaluated_external = sorted(set(external_sets(path)) - evaluated)
    return data


def _keep_histograms(data: RunData, model: str, row: Any) -> None:
    for site, metrics in (row or {}).items():
        if isinstance(metrics, Mapping) and isinstance(metrics.get(HISTOGRAM_KEY), list):
            data.histograms.setdefault(model, {})[str(site)] = metrics[HISTOGRAM_KEY]


def _read_release(data: RunData, metrics_doc: Any) -> None:
    """The release block and the released version's per-site validation (the verdict's federated figures)."""
    if not isinstance(metrics_doc, Mapping):
        return
    if isinstance(metrics_doc.get("release"), Mapping):
        data.release = dict(metrics_doc["release"])
    evaluations = [e for e in metrics_doc.get("evaluations") or [] if isinstance(e, Mapping)]
    version = data.release.get("version") if data.release else None
    chosen = [e for e in evaluations if e.get("model_version") == version] if version is not None else evaluations[-1:]
    if chosen and isinstance(chosen[-1].get("sites"), Mapping):
        data.released_site_metrics = {str(s): dict(m) for s, m in chosen[-1]["sites"].items() if isinstance(m, Mapping)}
