"""``build_report``: load a run, compute its figures, draw the plots, render the report, write it atomically.

``build_report(run_dir)`` reads a finished run's outputs (:mod:`fedmed.report.load`) and writes ``run_dir/report/``:

- ``report.md`` and a self-contained ``report.html`` (plots embedded as base64 PNG; it opens
  offline and still works when moved on its own). Its first line says when the run is incomplete
  or failed; the next ones say how the run ended and which model version it released and why
  (:func:`fedmed.report.render.status_lines`); then the verdict for a project lead
  (:func:`fedmed.report.compute.verdict`, :func:`fedmed.report.render.verdict_section`);
- ``report.json``: the numbers (verdict, external, EXAM-style figures, comparison rows, provenance status);
- PNG plots (:mod:`fedmed.report.plot`): ``cross_site_<metric>.png`` (models x sites heatmap of the
  primary metric, fixed 0.5-1 colour scale for AUC and Dice), ``learning_curves.png``,
  ``fed_vs_local_vs_pooled.png`` and ``exam.png``.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from fedmed.report.compute import exam_figures, metric_name
from fedmed.report.load import ReportError, load_run
from fedmed.report.plot import cross_site_plot, plot_comparison, plot_exam, plot_files, plot_heatmap, plot_learning_curves
from fedmed.report.render import build_sections, render_html, render_markdown, status_lines


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
        federated = data.federated_model()
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
        if data.status is not None and not data.status.complete:  # the first line says so
            title = f"{data.status.headline()}: {title}"
        meta = status_lines(data) + [
            f"Run folder: `{run_dir}`",
            f"Generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"Sites: {', '.join(data.sites) if data.sites else 'n/a'}",
            f"Primary metric: {metric_name(metric)} (`{metric}`)",
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
