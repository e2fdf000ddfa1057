"""The run report: does the federation pay off for each hospital, and where did the model come from?

``build_report(run_dir)`` reads a finished run's outputs and writes ``run_dir/report/``:

- ``report.md`` and a self-contained ``report.html`` (plots embedded as base64 PNG; it opens
  offline and still works when moved on its own);
- PNG plots: ``cross_site_<metric>.png`` (models x sites heatmap of the primary metric:
  ``cross_site_auc.png`` for classification, ``cross_site_dice.png`` for segmentation),
  ``learning_curves.png`` (each site's validation metric of the global model over rounds),
  ``fed_vs_local_vs_pooled.png`` and ``exam.png`` (own-data gain and generalizability, federated vs local).

Inputs in the run folder (every one optional except that at least one must exist):

- ``metrics.json``: per-round, per-site metrics written by the FedAvg controller;
- ``cross_site.json``: the models x sites matrix from the cross-site evaluation workflow
  (``fedmed.flare.cross_site``): the final global model and each site's last local model;
- ``baselines.json``: the local-only and pooled baselines (``fedmed.baselines``), also as a
  models x sites matrix on the same sites' validation data;
- ``provenance.json``: the provenance card (``fedmed.provenance``).

EXAM-style figures (Dayan et al., Nat Med 2021) from the matrix, for metric M (AUC by default):

- own-data gain: for each site s, M(federated, s) - M(local_s, s); reported as the mean over sites
  and as the relative change of the mean (mean_fed - mean_local) / mean_local;
- generalizability: a model's mean M on the *other* sites' data. For site s: local_s's mean over
  t != s, against the federated model's mean over t != s; averaged over sites, absolute and relative.

"Local" means the local-only baseline (trained only on that site's data with the federation's
budget) when ``baselines.json`` is present; otherwise each site's last-round local model from
cross-site evaluation (the global model fine-tuned for one round on that site), and the report
says which one it used.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

FEDERATED = "global_model"
POOLED = "pooled"
LOCAL_ONLY_PREFIX = "local-only:"
INPUT_FILES = ("metrics.json", "cross_site.json", "baselines.json", "provenance.json")


def cross_site_plot(metric: str) -> str:
    """The heatmap's file name, after the metric it shows: ``cross_site_auc.png``, ``cross_site_dice.png``."""
    return f"cross_site_{metric.removeprefix('val_')}.png"


def plot_files(metric: str) -> dict[str, str]:
    """File name -> caption of every plot a report on ``metric`` can hold, in the order the report links them."""
    return {
        cross_site_plot(metric): "Cross-site matrix: every model on every site's validation data",
        "learning_curves.png": "Per-site learning curves: the global model's validation metric on each site, by round",
        "fed_vs_local_vs_pooled.png": "Federated vs local vs pooled, on each site's own validation data",
        "exam.png": "EXAM-style: own-data performance and generalizability, federated vs local",
    }


class ReportError(ValueError):
    """Report inputs are missing or malformed; the message names the file and key."""


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
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

    def primary_metric(self) -> str:
        for metric in ("val_auc", "val_dice"):
            if any(metric in m for row in self.matrix.values() for m in row.values()):
                return metric
            if any(metric in series for series in self.curves.values()):
                return metric
        return "val_auc"

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
            if kind == "local_only":
                if "site" not in info:
                    raise ReportError(f"{files['baselines.json']}: models[{model!r}] needs the 'site' it was trained on")
                data.model_sites[model] = str(info["site"])
        data.budget = dict(doc.get("budget") or {})
        pooled_val = doc.get("pooled_validation")
        if pooled_val is not None:
            if not isinstance(pooled_val, Mapping) or not isinstance(pooled_val.get("results"), Mapping):
                raise ReportError(f"{files['baselines.json']}: 'pooled_validation' needs a 'results' object (model -> metrics)")
            data.pooled_validation = dict(pooled_val)
        sites += [str(s) for s in doc.get("sites", [])]

    if "metrics.json" in files:
        metrics_doc = _read_json(files["metrics.json"])
        data.curves = learning_curves(metrics_doc, str(files["metrics.json"]))
        external = metrics_doc.get("external") if isinstance(metrics_doc, Mapping) else None
        if isinstance(external, Mapping) and isinstance(external.get("results"), Mapping):
            data.external = dict(external)
        sites += list(data.curves)

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
    return data


# --------------------------------------------------------------------------------------------
# EXAM-style figures (pure arithmetic over the matrix)
# --------------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _cell(matrix, model: str, site: str, metric: str) -> float:
    try:
        return float(matrix[model][site][metric])
    except KeyError:
        raise ReportError(f"the matrix has no {metric} for model {model!r} on site {site!r}") from None


def exam_figures(
    matrix: Mapping[str, Mapping[str, Mapping[str, float]]],
    sites: Sequence[str],
    local_models: Mapping[str, str],
    federated: str = FEDERATED,
    metric: str = "val_auc",
) -> dict[str, Any]:
    """Own-data gain and generalizability of ``federated`` over each site's local model.

    ``local_models`` maps site -> the model name of that site's local model. Raises
    :class:`ReportError` naming the first missing (model, site) cell.
    """
    if not sites:
        raise ReportError("no sites to compare")
    per_site = []
    for site in sites:
        if site not in local_models:
            raise ReportError(f"site {site!r} has no local model in the matrix")
        local = local_models[site]
        others = [t for t in sites if t != site]
        row = {
            "site": site,
            "local_model": local,
            "federated_own": _cell(matrix, federated, site, metric),
            "local_own": _cell(matrix, local, site, metric),
            "federated_others": _mean([_cell(matrix, federated, t, metric) for t in others]) if others else math.nan,
            "local_others": _mean([_cell(matrix, local, t, metric) for t in others]) if others else math.nan,
        }
        row["own_gain"] = row["federated_own"] - row["local_own"]
        row["generalizability_gain"] = row["federated_others"] - row["local_others"]
        per_site.append(row)

    def rel(new: float, old: float) -> float:
        return (new - old) / old if old else math.nan

    fed_own = _mean([r["federated_own"] for r in per_site])
    loc_own = _mean([r["local_own"] for r in per_site])
    fed_gen = _mean([r["federated_others"] for r in per_site])
    loc_gen = _mean([r["local_others"] for r in per_site])
    return {
        "metric": metric,
        "per_site": per_site,
        "federated_own_mean": fed_own,
        "local_own_mean": loc_own,
        "mean_own_gain": _mean([r["own_gain"] for r in per_site]),
        "relative_own_gain": rel(fed_own, loc_own),
        "federated_generalizability": fed_gen,
        "local_generalizability": loc_gen,
        "generalizability_gain": fed_gen - loc_gen,
        "relative_generalizability_gain": rel(fed_gen, loc_gen),
        "sites_where_federated_wins": sum(1 for r in per_site if r["own_gain"] > 0),
    }


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no display, no global pyplot state)
# --------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _model_label(data: RunData, model: str) -> str:
    kind = data.model_kinds.get(model)
    if kind == "global":
        return "federated (global)"
    if kind == "local":
        return f"{data.model_sites.get(model, model)} (last local)"
    if kind == "local_only":
        return f"{data.model_sites.get(model, model)} (local only)"
    if kind == "pooled":
        return "pooled"
    return model


def ordered_models(data: RunData) -> list[str]:
    order = {"global": 0, "pooled": 1, "local_only": 2, "local": 3}
    return sorted(data.matrix, key=lambda m: (order.get(data.model_kinds.get(m, ""), 9), data.model_sites.get(m, m)))


def plot_heatmap(data: RunData, metric: str, path: Path) -> None:
    import numpy as np

    models = ordered_models(data)
    values = np.array(
        [[data.matrix[m].get(s, {}).get(metric, np.nan) for s in data.sites] for m in models], dtype=float
    )
    fig = _figure(1.6 + 1.1 * len(data.sites), 1.2 + 0.45 * len(models))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=np.nanmin(values) if np.isfinite(values).any() else 0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(data.sites)), data.sites, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), [_model_label(data, m) for m in models])
    ax.set_xlabel("validation data of site")
    ax.set_title(f"{metric}: model (row) on site (column)")
    for i in range(len(models)):
        for j in range(len(data.sites)):
            text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if np.isfinite(values[i, j]) and values[i, j] < np.nanmean(values) else "black")
    fig.colorbar(image, ax=ax, label=metric)
    fig.savefig(path)


def plot_learning_curves(data: RunData, metric: str, path: Path) -> None:
    import numpy as np

    has_loss = any("train_loss" in c for c in data.curves.values())
    fig = _figure(10 if has_loss else 6, 4)
    axes = fig.subplots(1, 2 if has_loss else 1, squeeze=False)[0]
    by_x: dict[float, list[float]] = {}
    for site in sorted(data.curves):
        series = data.curves[site].get(metric)
        if series:
            axes[0].plot(series["x"], series["y"], marker="o", label=site)
            for x, y in zip(series["x"], series["y"]):
                if np.isfinite(y):
                    by_x.setdefault(x, []).append(y)
        loss = data.curves[site].get("train_loss")
        if has_loss and loss:
            axes[1].plot(loss["x"], loss["y"], marker="o", label=site)
    if by_x:
        xs = sorted(by_x)
        axes[0].plot(xs, [_mean(by_x[x]) for x in xs], color="black", linewidth=2.5, label="mean")
    axes[0].set_xlabel("rounds completed (0 = initial model)")
    axes[0].set_ylabel(f"{metric} of the global model")
    axes[0].set_title("global model on each site's validation data")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_loss:
        axes[1].set_xlabel("round")
        axes[1].set_ylabel("local training loss")
        axes[1].set_title("each site's training loss")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    fig.savefig(path)


def comparison_rows(data: RunData, metric: str) -> list[dict[str, Any]]:
    """Per site: federated, local (own data) and pooled values of ``metric``; plus a mean row."""
    local_models, _ = data.local_models()
    pooled = next((m for m, k in data.model_kinds.items() if k == "pooled"), None)
    federated = next((m for m, k in data.model_kinds.items() if k == "global"), None)
    rows = []
    for site in data.sites:
        row = {"site": site}
        if federated:
            row["federated"] = data.matrix[federated].get(site, {}).get(metric, math.nan)
        if site in local_models:
            row["local"] = data.matrix[local_models[site]].get(site, {}).get(metric, math.nan)
        if pooled:
            row["pooled"] = data.matrix[pooled].get(site, {}).get(metric, math.nan)
        rows.append(row)
    mean_row = {"site": "mean"}
    for key in ("federated", "local", "pooled"):
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if values:
            mean_row[key] = _mean(values)
    rows.append(mean_row)
    return rows


def plot_comparison(data: RunData, metric: str, path: Path) -> None:
    import numpy as np

    rows = comparison_rows(data, metric)
    local_label = "local only" if data.local_models()[1] == "local_only" else "last local model"
    groups = [("federated", "federated", "tab:blue"), ("local", local_label, "tab:orange"), ("pooled", "pooled", "tab:green")]
    groups = [g for g in groups if any(g[0] in r for r in rows)]
    fig = _figure(1.5 + 1.2 * len(rows), 4)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / max(len(groups), 1)
    lows = []
    for i, (key, label, color) in enumerate(groups):
        values = [r.get(key, np.nan) for r in rows]
        lows += [v for v in values if np.isfinite(v)]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=label, color=color)
    ax.set_xticks(x, [r["site"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(metric)
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.03) if max(lows) <= 1 else None)
    ax.set_title(f"{metric} on each site's own validation data")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(groups), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def plot_exam(figures: Mapping[str, Any], local_kind: str, path: Path) -> None:
    import numpy as np

    per_site = figures["per_site"]
    labels = [r["site"] for r in per_site] + ["mean"]
    local_label = "local only" if local_kind == "local_only" else "last local model"
    fig = _figure(2 + 2.0 * len(labels), 4)
    axes = fig.subplots(1, 2)
    x = np.arange(len(labels))
    for ax, fed_key, loc_key, fed_mean, loc_mean, title in (
        (axes[0], "federated_own", "local_own", figures["federated_own_mean"], figures["local_own_mean"],
         f"own data: mean gain {figures['mean_own_gain']:+.3f} ({_pct(figures['relative_own_gain'])})"),
        (axes[1], "federated_others", "local_others", figures["federated_generalizability"], figures["local_generalizability"],
         f"other sites' data: gain {figures['generalizability_gain']:+.3f} ({_pct(figures['relative_generalizability_gain'])})"),
    ):
        fed = [r[fed_key] for r in per_site] + [fed_mean]
        loc = [r[loc_key] for r in per_site] + [loc_mean]
        ax.bar(x - 0.2, fed, 0.4, label="federated", color="tab:blue")
        ax.bar(x + 0.2, loc, 0.4, label=local_label, color="tab:orange")
        finite = [v for v in fed + loc if np.isfinite(v)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03) if max(finite) <= 1 else None)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel(figures["metric"])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("EXAM-style comparison (site = whose local model; right: mean over the other sites)", fontsize=10)
    fig.savefig(path)


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.1f}%"


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    image: str | None = None  # a file name from plot_files(metric)
    caption: str = ""


def build_sections(data: RunData, plots: Mapping[str, bool]) -> tuple[list[Section], dict[str, Any]]:
    metric = data.primary_metric()
    captions = plot_files(metric)
    sections: list[Section] = []
    summary: dict[str, Any] = {"metric": metric}
    local_models, local_kind = data.local_models()
    local_words = (
        "local-only baselines (each trained only on its own site's data, same budget as the federation)"
        if local_kind == "local_only"
        else "each site's last-round local model from cross-site evaluation (the global model fine-tuned on that "
        "site for one round; run `simulate --baselines` for true local-only models)"
    )

    if data.external:
        sections.append(external_section(data.external, summary))

    headline = Section("Headline")
    federated = next((m for m, k in data.model_kinds.items() if k == "global"), None)
    if federated and local_models:
        try:
            figures = exam_figures(data.matrix, data.sites, local_models, federated, metric)
        except ReportError as exc:
            figures = None
            headline.paragraphs.append(f"EXAM-style figures not available: {exc}.")
        if figures:
            summary["exam"] = figures
            headline.paragraphs += [
                f"Local models are {local_words}.",
                f"**Own data**: the federated model's mean {metric} on each site's own validation data is "
                f"{_fmt(figures['federated_own_mean'])} against {_fmt(figures['local_own_mean'])} for the sites' local "
                f"models: mean gain {figures['mean_own_gain']:+.4f} ({_pct(figures['relative_own_gain'])}); the federated "
                f"model is better on {figures['sites_where_federated_wins']} of {len(data.sites)} sites.",
                f"**Generalizability** (mean {metric} on the other sites' data): federated "
                f"{_fmt(figures['federated_generalizability'])} against local {_fmt(figures['local_generalizability'])}: "
                f"gain {figures['generalizability_gain']:+.4f} ({_pct(figures['relative_generalizability_gain'])}).",
            ]
            headline.tables.append((
                ["site", f"federated on own", f"local on own", "own gain", "federated on others", "local on others", "generalizability gain"],
                [[r["site"], _fmt(r["federated_own"]), _fmt(r["local_own"]), f"{r['own_gain']:+.4f}", _fmt(r["federated_others"]),
                  _fmt(r["local_others"]), _fmt(r["generalizability_gain"]) if math.isnan(r["generalizability_gain"]) else f"{r['generalizability_gain']:+.4f}"]
                 for r in figures["per_site"]],
            ))
            if plots.get("exam.png"):
                headline.image, headline.caption = "exam.png", captions["exam.png"]
    else:
        missing = "a federated (global) model" if not federated else "local models"
        headline.paragraphs.append(
            f"EXAM-style figures not available: the run has no cross-site matrix with {missing} "
            "(cross_site.json / baselines.json missing)."
        )
    sections.append(headline)

    if data.matrix:
        comparison = Section("Federated vs local vs pooled")
        rows = comparison_rows(data, metric)
        summary["comparison"] = rows
        cols = [c for c in ("federated", "local", "pooled") if any(c in r for r in rows)]
        comparison.tables.append((["site"] + cols, [[r["site"]] + [_fmt(r.get(c, math.nan)) for c in cols] for r in rows]))
        if data.budget:
            comparison.paragraphs.append(
                "Baseline budget (same partition, same budget as the federation): "
                + ", ".join(f"{k} = {v}" for k, v in data.budget.items())
                + "."
            )
        if data.pooled_validation:
            pv = data.pooled_validation
            names = {FEDERATED: "federated (global)", POOLED: "pooled"}
            order = sorted(pv["results"], key=lambda m: (0 if m == FEDERATED else 1 if m == POOLED else 2, m))
            comparison.paragraphs.append(
                f"The first table is each site's own validation data (mean = unweighted mean over sites). The "
                f"second is every model on all sites' validation images together ({pv.get('num_val_samples', 'n/a')} "
                f"images; one {metric} over all of them, not a mean of per-site values)."
            )
            shown = [m for m in (metric, "val_accuracy", "val_loss") if any(m in pv["results"][x] for x in order)]
            comparison.tables.append((
                ["model"] + shown,
                [[names.get(m, m.replace(LOCAL_ONLY_PREFIX, "") + " (local only)")] + [_fmt(pv["results"][m].get(k, math.nan)) for k in shown] for m in order],
            ))
            summary["pooled_validation"] = pv
        if plots.get("fed_vs_local_vs_pooled.png"):
            comparison.image, comparison.caption = "fed_vs_local_vs_pooled.png", captions["fed_vs_local_vs_pooled.png"]
        sections.append(comparison)

        matrix_section = Section("Cross-site matrix")
        matrix_section.paragraphs.append(
            "Rows are models, columns are the sites whose held-out validation data they were evaluated on."
        )
        for shown in [metric] + (["val_accuracy"] if metric != "val_accuracy" else []):
            if any(shown in cell for row in data.matrix.values() for cell in row.values()):
                matrix_section.tables.append((
                    [f"{shown}: model \\ site"] + data.sites,
                    [[_model_label(data, m)] + [_fmt(data.matrix[m].get(s, {}).get(shown, math.nan)) for s in data.sites]
                     for m in ordered_models(data)],
                ))
        failures = flatten_errors(data.cross_site_errors)
        if failures:
            matrix_section.paragraphs.append("Failures during cross-site evaluation (missing cells): " + "; ".join(failures) + ".")
        heatmap = cross_site_plot(metric)
        if plots.get(heatmap):
            matrix_section.image, matrix_section.caption = heatmap, captions[heatmap]
        sections.append(matrix_section)

    if data.curves:
        curves = Section("Learning curves")
        xs = sorted({x for c in data.curves.values() for x in c.get(metric, {}).get("x", [])})
        curves.paragraphs.append(
            f"Each point is the global model after that many rounds (0 = the initial model), evaluated on the "
            f"site's validation data (from metrics.json); the right panel is each site's local training loss."
        )
        table_rows = []
        for site in sorted(data.curves):
            series = data.curves[site].get(metric)
            if series:
                values = dict(zip(series["x"], series["y"]))
                table_rows.append([site] + [_fmt(values.get(x, math.nan)) for x in xs])
        if table_rows:
            curves.tables.append(([f"{metric} \\ rounds completed"] + [str(int(x)) if float(x).is_integer() else str(x) for x in xs], table_rows))
        if plots.get("learning_curves.png"):
            curves.image, curves.caption = "learning_curves.png", captions["learning_curves.png"]
        sections.append(curves)

    prov = Section("Provenance")
    if data.card is None:
        prov.paragraphs.append("No provenance card (provenance.json) was found for this run.")
    else:
        card = data.card
        s = card.get("summary", {}) if isinstance(card.get("summary"), Mapping) else {}
        chain = card.get("chain", []) if isinstance(card.get("chain"), list) else []
        release = chain[-1] if chain and isinstance(chain[-1], Mapping) else {}
        agg = s.get("aggregation", {})
        prov.paragraphs += [
            f"Chain verification: **{data.card_status}**. Check it yourself with "
            "`python -m fedmed verify-provenance provenance.json`.",
            f"Job `{s.get('job')}`, {s.get('num_rounds')} rounds, aggregation "
            f"`{agg.get('method') if isinstance(agg, Mapping) else agg}` "
            f"(weights: {agg.get('weighting') if isinstance(agg, Mapping) else 'n/a'}), network `{json.dumps(s.get('network'))}`.",
            f"Released model: the global model after round index {release.get('round')} (0-based; chain record "
            f"{release.get('released_from_record')}), "
            f"weights sha256 `{release.get('model_sha256')}`; chain head `{card.get('head_sha256')}` over {len(chain)} records.",
        ]
        site_rows = []
        for site in s.get("sites", []):
            if isinstance(site, Mapping):
                privacy = site.get("privacy")
                site_rows.append([
                    str(site.get("site")), _fmt(site.get("num_train_samples")), _fmt(site.get("num_val_samples")),
                    str(len(site.get("rounds_contributed", []))),
                    (site.get("privacy_scope") or "none") + (f" ({site['privacy_scope_source']})" if site.get("privacy_scope_source") else ""),
                    json.dumps(privacy, sort_keys=True) if privacy else "",
                ])
        if site_rows:
            prov.tables.append((["site", "train samples", "val samples", "rounds contributed", "privacy scope (reported by)", "privacy details"], site_rows))
            prov.paragraphs.append(
                "Privacy scope `none` means the site applied no privacy scope; the FLARE simulator never enforces "
                "scopes, a real deployment does (each site's local/privacy.json)."
            )
        software = s.get("software", {})
        if isinstance(software, Mapping) and software:
            prov.tables.append((["software", "version"], [[k, str(v)] for k, v in software.items()]))
        summary["provenance"] = {"status": data.card_status, "head_sha256": card.get("head_sha256")}
    sections.append(prov)
    return sections, summary


def external_section(external: Mapping[str, Any], summary: dict[str, Any]) -> Section:
    """Models on hospitals no site trained on, validated on or selected with (metrics.json 'external')."""
    section = Section("External hospitals (data no site held)")
    names = {FEDERATED: "federated (released model)", "best_global_model": "federated (best on site validation)",
             POOLED: "pooled (all sites' data in one place)"}
    rows, verdict = [], []
    for set_name, by_model in external["results"].items():
        size = external.get("sets", {}).get(set_name, {}).get("num_images", "?")
        ranked = sorted(by_model.items(), key=lambda kv: (0 if kv[0] == FEDERATED else 1 if kv[0] == "best_global_model"
                                                          else 2 if kv[0] == POOLED else 3, kv[0]))
        for model, figures in ranked:
            label = names.get(model, model.replace(LOCAL_ONLY_PREFIX, "local-only ") if model.startswith(LOCAL_ONLY_PREFIX) else model)
            rows.append([f"{set_name} ({size})", label, _fmt(figures.get("auc")), _fmt(figures.get("accuracy")),
                         _fmt(figures.get("threshold"), 2) if "threshold" in figures else "argmax"])
        fed = by_model.get(FEDERATED)
        locals_ = {m: f for m, f in by_model.items() if m.startswith(LOCAL_ONLY_PREFIX)}
        if fed:
            line = f"On {set_name} ({size} images) the released federated model has AUC {_fmt(fed['auc'])} and accuracy {_fmt(fed['accuracy'])}"
            if locals_:
                beaten = sum(fed["auc"] > f["auc"] for f in locals_.values())
                line += f"; it beats {beaten} of {len(locals_)} hospitals' local-only models on AUC"
            if POOLED in by_model:
                line += f"; the pooled model (data moved to one place) has AUC {_fmt(by_model[POOLED]['auc'])}"
            verdict.append(line + ".")
    section.paragraphs += verdict + [
        "These hospitals' images took no part in training, in choosing the best round or in choosing the decision "
        "threshold (chosen on the sites' own validation data); accuracy is at that threshold."
    ]
    section.tables.append((["external set (images)", "model", "AUC", "accuracy", "threshold"], rows))
    summary["external"] = external["results"]
    return section


def flatten_errors(errors: Any, path: tuple[str, ...] = ()) -> list[str]:
    """``{"submit_model": {site: msg}, "validate": {model: {site: msg}}}`` -> readable lines."""
    if isinstance(errors, Mapping):
        lines = []
        for key, value in errors.items():
            lines += flatten_errors(value, path + (str(key),))
        return lines
    return [f"{' / '.join(path)}: {errors}"]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(title: str, meta: list[str], sections: list[Section]) -> str:
    out = [f"# {title}", ""] + [f"- {line}" for line in meta] + [""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            out += [paragraph, ""]
        for header, rows in section.tables:
            out += [_md_table(header, rows), ""]
        if section.image:
            out += [f"![{section.caption}]({section.image})", ""]
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """Escape for HTML, then render the two inline forms the report uses: **bold** and `code`."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_html(title: str, meta: list[str], sections: list[Section], images: Mapping[str, bytes], links: Sequence[str]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}"
        "code{background:#f5f5f5;padding:1px 3px;word-break:break-all}figcaption{color:#555;font-size:0.9em}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{_inline_md(line)}</li>" for line in meta) + "</ul>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{_inline_md(p)}</p>" for p in section.paragraphs]
        for header, rows in section.tables:
            parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</tbody></table>")
        if section.image and section.image in images:
            encoded = base64.b64encode(images[section.image]).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(section.caption)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{html.escape(section.caption)}</figcaption></figure>"
            )
    if links:
        parts.append("<h2>Files</h2><ul>" + "".join(f'<li><a href="{html.escape(link)}">{html.escape(link)}</a></li>' for link in links) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, log=print) -> dict[str, Any]:
    """Write the report for the run in ``run_dir`` into ``out_dir`` (default ``run_dir/report``).

    The report is assembled in a temporary sibling folder and renamed into place at the end, so a
    half-written report never looks complete. Returns the summary (figures, comparison rows,
    provenance status) that was written to ``report.json``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    log(f"[report] reading run outputs from {run_dir}")
    data = load_run(run_dir)
    log(f"[report] found {', '.join(sorted(data.files))}; {len(data.sites)} sites, {len(data.matrix)} models in the matrix")
    metric = data.primary_metric()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        plots: dict[str, bool] = {}
        local_models, local_kind = data.local_models()
        federated = next((m for m, k in data.model_kinds.items() if k == "global"), None)
        jobs = []
        if data.matrix and data.sites:
            jobs.append((cross_site_plot(metric), lambda p: plot_heatmap(data, metric, p)))
            jobs.append(("fed_vs_local_vs_pooled.png", lambda p: plot_comparison(data, metric, p)))
        if data.curves:
            jobs.append(("learning_curves.png", lambda p: plot_learning_curves(data, metric, p)))
        if federated and local_models:
            try:
                figures = exam_figures(data.matrix, data.sites, local_models, federated, metric)
                jobs.append(("exam.png", lambda p: plot_exam(figures, local_kind, p)))
            except ReportError as exc:
                log(f"[report] EXAM figures skipped and marked in the report: {exc}")
        for i, (name, draw) in enumerate(jobs, 1):
            log(f"[report] plot {i}/{len(jobs)}: {name}")
            draw(tmp / name)
            plots[name] = True

        sections, summary = build_sections(data, plots)
        card_summary = data.card.get("summary", {}) if data.card else {}
        title = f"Federated training report: {card_summary.get('job') or run_dir.resolve().name}"
        meta = [
            f"Run folder: `{run_dir}`",
            f"Generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"Sites: {', '.join(data.sites) if data.sites else 'n/a'}",
            f"Primary metric: {metric}",
            f"Inputs: {', '.join(sorted(data.files))}",
        ]
        images = {name: (tmp / name).read_bytes() for name in plots}
        links = [name for name in plot_files(metric) if name in plots] + ["report.md", "report.json"]
        card_path = data.files.get("provenance.json")
        if card_path is not None:
            rel = os.path.relpath(card_path, out_dir)
            links.append(rel.replace(os.sep, "/"))
        (tmp / "report.md").write_text(render_markdown(title, meta, sections), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(title, meta, sections, images, links), encoding="utf-8")
        summary["plots"] = sorted(plots)
        summary["sites"] = data.sites
        (tmp / "report.json").write_text(json.dumps(_without_nan(summary), indent=2, allow_nan=False), encoding="utf-8")

        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is for sharing
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[report] wrote {out_dir / 'report.html'} and {out_dir / 'report.md'}")
    return summary


def _without_nan(value: Any) -> Any:
    """JSON has no NaN: missing values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# CLI: python -m fedmed report PATH
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument(
        "path",
        help="a `simulate --out` folder, or a folder a deployment job result was downloaded to "
        "(metrics.json / cross_site.json / baselines.json / provenance.json are searched inside it)",
    )
    parser.add_argument("--out", help="where to write the report (default: PATH/report)")


def main(args) -> int:
    try:
        build_report(args.path, args.out)
    except ReportError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0
