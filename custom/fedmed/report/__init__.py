"""The run report: is each hospital better off in the federation, how does the model do on hospitals
that took no part, and where did the model come from?

``build_report(run_dir)`` writes ``run_dir/report/`` (``report.md``, a self-contained ``report.html``,
``report.json``, PNG plots); ``python -m fedmed report PATH`` runs it. One responsibility per module:

- :mod:`fedmed.report.load`: find and parse the run's outputs into :class:`RunData`, and how the
  run ended (:func:`run_status`);
- :mod:`fedmed.report.stats`: confidence intervals (Wilson, Hanley-McNeil) and sample sizes;
- :mod:`fedmed.report.compute`: the numbers (verdict, EXAM-style figures, comparison rows);
- :mod:`fedmed.report.formatting`: how numbers are written (shared by plot and render);
- :mod:`fedmed.report.plot`: the PNG plots (fixed 0.5-1 colour scale for AUC and Dice heatmaps);
- :mod:`fedmed.report.render`: sections, Markdown and HTML (the verdict opens the report);
- :mod:`fedmed.report.build`: load, compute, plot, render, then write atomically;
- :mod:`fedmed.report.cli`: the command line.

Pure package: never imports ``nvflare``. Matplotlib is imported only when a plot is drawn.
"""

from fedmed.report.build import build_report
from fedmed.report.cli import add_arguments, main
from fedmed.report.compute import (
    SAME_WITHIN,
    ExternalFigures,
    HospitalVerdict,
    Verdict,
    comparison_rows,
    exam_figures,
    external_figures,
    local_label,
    metric_explained,
    metric_name,
    model_label,
    ordered_models,
    verdict,
)
from fedmed.report.load import (
    BEST_FEDERATED,
    FEDERATED,
    INPUT_FILES,
    LOCAL_ONLY_PREFIX,
    POOLED,
    ReportError,
    RunData,
    RunStatus,
    find_run_files,
    run_status,
    learning_curves,
    load_run,
)
from fedmed.report.plot import (
    FIXED_SCALE,
    cross_site_plot,
    heatmap_scale,
    plot_comparison,
    plot_exam,
    plot_files,
    plot_heatmap,
    plot_learning_curves,
)
from fedmed.report.render import (
    Section,
    build_sections,
    external_section,
    flatten_errors,
    render_html,
    render_markdown,
    status_lines,
    verdict_lines,
    verdict_section,
)

__all__ = [
    "BEST_FEDERATED", "FEDERATED", "FIXED_SCALE", "INPUT_FILES", "LOCAL_ONLY_PREFIX", "POOLED", "SAME_WITHIN",
    "ExternalFigures", "HospitalVerdict", "ReportError", "RunData", "RunStatus", "Section", "Verdict",
    "add_arguments", "build_report", "build_sections", "comparison_rows", "cross_site_plot", "exam_figures",
    "external_figures", "external_section", "find_run_files", "flatten_errors", "heatmap_scale", "learning_curves",
    "load_run", "local_label", "main", "metric_explained", "metric_name", "model_label", "ordered_models",
    "plot_comparison", "plot_exam", "plot_files", "plot_heatmap", "plot_learning_curves", "render_html",
    "render_markdown", "run_status", "status_lines", "verdict", "verdict_lines", "verdict_section",
]
