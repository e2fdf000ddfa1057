"""The report's PNG plots (matplotlib's object API with the Agg canvas: no display, no global pyplot state).

Every plot function draws one figure, saves it to ``path`` and returns the :class:`~matplotlib.figure.Figure`
so a test can check what was drawn (the heatmap's colour scale, the legend) without reading pixels.
AUC and Dice heatmaps use one fixed colour scale, :func:`heatmap_scale`, so runs compare at a glance and
differences of a few thousandths do not look like a failure. Every mean in a figure says what it averages.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from fedmed.report.formatting import pct
from fedmed.report.compute import _mean, comparison_rows, local_label, metric_name, model_label, ordered_models
from fedmed.report.load import RunData

# the one label every "mean over sites" carries in a figure
MEAN_OVER_SITES = "mean over sites\n(each site counts once)"

# metrics on [0, 1] where 0.5 is a useful floor: AUC (0.5 = chance) and Dice
FIXED_SCALE_METRICS = ("val_auc", "val_dice", "auc", "dice")
FIXED_SCALE = (0.5, 1.0)


def cross_site_plot(metric: str) -> str:
    """The heatmap's file name, after the metric it shows: ``cross_site_auc.png``, ``cross_site_dice.png``."""
    return f"cross_site_{metric.removeprefix('val_')}.png"


def plot_files(metric: str) -> dict[str, str]:
    """File name -> caption of every plot a report on ``metric`` can hold, in the order the report links them."""
    return {
        cross_site_plot(metric): "Cross-site matrix: every model on every site's validation data (fixed 0.5-1 colour scale)",
        "learning_curves.png": "Per-site learning curves: the global model's validation metric on each site, by round",
        "fed_vs_local_vs_pooled.png": "Federated vs each site's local model (and pooled, when trained), on each site's own validation data",
        "exam.png": "EXAM-style: own-data performance and generalizability, federated vs local",
    }


def heatmap_scale(metric: str, values: Any = None) -> tuple[float, float]:
    """The heatmap's colour scale (vmin, vmax): fixed 0.5-1 for AUC and Dice whatever the values; for
    any other metric the values' own range (0-1 when there are none)."""
    if metric in FIXED_SCALE_METRICS:
        return FIXED_SCALE
    finite = [float(v) for v in (values if values is not None else []) if v is not None and math.isfinite(float(v))]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _ylim(ax, values) -> None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03) if max(finite) <= 1 else None)


def plot_heatmap(data: RunData, metric: str, path: Path):
    import numpy as np

    models = ordered_models(data)
    values = np.array(
        [[data.matrix[m].get(s, {}).get(metric, np.nan) for s in data.sites] for m in models], dtype=float
    )
    vmin, vmax = heatmap_scale(metric, values.ravel().tolist())
    fig = _figure(2.6 + 1.1 * len(data.sites), 1.2 + 0.45 * len(models))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(data.sites)), data.sites, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), [model_label(data, m) for m in models])
    ax.set_xlabel("validation data of site")
    ax.set_title(f"{metric_name(metric)}: model (row) on site (column)")
    middle = (vmin + vmax) / 2
    for i in range(len(models)):
        for j in range(len(data.sites)):
            finite = bool(np.isfinite(values[i, j]))
            text = f"{values[i, j]:.3f}" if finite else "n/a"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if finite and values[i, j] < middle else "black")
    below = bool(np.nanmin(values) < vmin) if np.isfinite(values).any() else False
    # values below the scale's floor share its darkest colour; the colour bar's pointed end says so
    fig.colorbar(image, ax=ax, label=f"{metric_name(metric)} (fixed scale {vmin:g}-{vmax:g})", extend="min" if below else "neither")
    fig.savefig(path)
    return fig


def plot_learning_curves(data: RunData, metric: str, path: Path):
    import numpy as np
    from matplotlib.ticker import MaxNLocator

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
        axes[0].plot(xs, [_mean(by_x[x]) for x in xs], color="black", linewidth=2.5, label=MEAN_OVER_SITES.replace("\n", " "))
    axes[0].set_xlabel("rounds completed (0 = initial model)")
    axes[0].set_ylabel(f"{metric_name(metric)} of the global model")
    axes[0].set_title("global model on each site's validation data")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_loss:
        axes[1].set_xlabel("round")
        axes[1].set_ylabel("local training loss")
        axes[1].set_title("each site's training loss")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    fig.savefig(path)
    return fig


def plot_comparison(data: RunData, metric: str, path: Path):
    """Federated, each site's local model and (only when one was trained) pooled, on each site's own data."""
    import numpy as np

    rows = comparison_rows(data, metric)
    groups = [("federated", "federated", "tab:blue"), ("local", local_label(data.local_models()[1]), "tab:orange"),
              ("pooled", "pooled (all data in one place)", "tab:green")]
    groups = [g for g in groups if any(g[0] in r for r in rows)]
    fig = _figure(2.0 + 1.2 * len(rows), 4)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / max(len(groups), 1)
    shown = []
    for i, (key, label, color) in enumerate(groups):
        values = [r.get(key, np.nan) for r in rows]
        shown += values
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=label, color=color)
    ax.set_xticks(x, [MEAN_OVER_SITES if r["site"] == "mean" else r["site"] for r in rows], fontsize=8)
    ax.set_ylabel(metric_name(metric))
    _ylim(ax, shown)
    ax.set_title(f"{metric_name(metric)} on each site's own validation data")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(groups), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return fig


def plot_exam(figures: Mapping[str, Any], local_kind: str, path: Path):
    import numpy as np


    per_site = figures["per_site"]
    labels = [r["site"] for r in per_site] + [MEAN_OVER_SITES]
    fig = _figure(2 + 2.0 * len(labels), 4.4)
    axes = fig.subplots(1, 2)
    x = np.arange(len(labels))
    for ax, fed_key, loc_key, fed_mean, loc_mean, title in (
        (axes[0], "federated_own", "local_own", figures["federated_own_mean"], figures["local_own_mean"],
         f"each site's own data: mean gain {figures['mean_own_gain']:+.3f} ({pct(figures['relative_own_gain'])})"),
        (axes[1], "federated_others", "local_others", figures["federated_generalizability"], figures["local_generalizability"],
         f"the other sites' data: mean gain {figures['generalizability_gain']:+.3f} ({pct(figures['relative_generalizability_gain'])})"),
    ):
        fed = [r[fed_key] for r in per_site] + [fed_mean]
        loc = [r[loc_key] for r in per_site] + [loc_mean]
        ax.bar(x - 0.2, fed, 0.4, label="federated", color="tab:blue")
        ax.bar(x + 0.2, loc, 0.4, label=local_label(local_kind), color="tab:orange")
        _ylim(ax, fed + loc)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(metric_name(figures["metric"]))
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.suptitle("EXAM-style comparison (site = whose local model; right: that model on the other sites' data)", fontsize=10)
    fig.savefig(path)
    return fig
