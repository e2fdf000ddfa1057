"""The report's text: sections (verdict first) and their Markdown and self-contained HTML renderings.

:func:`build_sections` turns :class:`~fedmed.report.load.RunData` and the figures of
:mod:`fedmed.report.compute` into :class:`Section` objects; :func:`render_markdown` and
:func:`render_html` write them out. The verdict is for a project lead: plain words, each metric
explained once, every hospital named, no hashes and no field names.

Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from typing import Any, Mapping, Sequence

from fedmed.report.compute import (
    SAME_WITHIN,
    HospitalVerdict,
    Verdict,
    comparison_rows,
    exam_figures,
    local_label,
    metric_explained,
    metric_name,
    model_label,
    ordered_models,
    verdict,
)
from fedmed.report.formatting import f3, fmt, pct
from fedmed.report.load import FEDERATED, LOCAL_ONLY_PREFIX, POOLED, ReportError, RunData
from fedmed.report.plot import cross_site_plot, plot_files
from fedmed.report.section import Section
from fedmed.report.stats import Estimate


MEAN_ROW = "mean over sites (each counts once)"


def _rounds(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (str(int(x)) if float(x).is_integer() else str(x))


_f3 = f3




def _local_words(local_kind: str) -> str:
    if local_kind == "local_only":
        return "local-only baselines (each trained only on its own site's data, same budget as the federation)"
    return ("each site's last-round local model from cross-site evaluation (the previous global model trained one "
            "more round at that site: not a model trained alone, so these figures do not say whether a site would do "
            "better alone; run `simulate --baselines` for true local-only models)")



def build_sections(data: RunData, plots: Mapping[str, bool]) -> tuple[list[Section], dict[str, Any]]:
    """The report's sections in order (verdict first) and the ``report.json`` summary."""
    metric = data.primary_metric()
    summary: dict[str, Any] = {"metric": metric, "status": _status_summary(data), "release": data.release or None}
    sections = [verdict_section(data, verdict(data, metric), summary)]
    from fedmed.report.participation import participation_section  # issue 18: hostile or absent hospitals, first screen

    taking_part = participation_section(data.metrics_doc, summary)
    if taking_part is not None:
        sections.append(taking_part)
    if data.external:
        sections.append(external_section(data.external, summary))
    sections.append(exam_section(data, metric, plots, summary))
    if data.matrix:
        sections += [comparison_section(data, metric, plots, summary), matrix_section(data, metric, plots)]
    if data.curves:
        sections.append(curves_section(data, metric, plots))
    sections.append(provenance_section(data, summary))
    return sections, summary


def _status_summary(data: RunData) -> dict[str, Any]:
    status = data.status
    return {"state": status.state, "reasons": status.reasons} if status else {"state": "unknown", "reasons": []}


def status_lines(data: RunData) -> list[str]:
    """The report's first lines after the title: how the run ended and which model it released."""
    lines = [data.status.sentence()] if data.status else []
    release = data.release
    if release:
        if release.get("action") == "collapse":
            lines.append(f"Released model: **none**: {release.get('reason')}.")
        else:
            rolled = release.get("action") == "rollback"
            lines.append(f"Released model: **version {release.get('version')}** of {release.get('final_version')}"
                         + (" (**rolled back** from the final model)" if rolled else "")
                         + f": {release.get('reason')} (statistic: {release.get('statistic')}).")
    elif data.status is None or data.status.complete:
        lines.append("Released model: the final global model (this run's metrics.json has no release-gate decision).")
    return lines


def exam_section(data: RunData, metric: str, plots: Mapping[str, bool], summary: dict[str, Any]) -> Section:
    name = metric_name(metric)
    local_models, local_kind = data.local_models()
    headline = Section("Gains in detail (EXAM-style)")
    federated = data.federated_model()
    if not (federated and local_models):
        missing = "a federated (global) model" if not federated else "local models"
        headline.paragraphs.append(
            f"EXAM-style figures not available: the run has no cross-site matrix with {missing} "
            "(cross_site.json / baselines.json missing)."
        )
        return headline
    try:
        figures = exam_figures(data.matrix, data.sites, local_models, federated, metric)
    except ReportError as exc:
        headline.paragraphs.append(f"EXAM-style figures not available: {exc}.")
        return headline
    summary["exam"] = figures
    headline.paragraphs += [
        f"Local models are {_local_words(local_kind)}. Means are over sites, each site counting once.",
        f"**Own data**: the federated model's {name} on each site's own validation data, mean over sites "
        f"{fmt(figures['federated_own_mean'])}, against {fmt(figures['local_own_mean'])} for the sites' local "
        f"models: mean gain {figures['mean_own_gain']:+.4f} ({pct(figures['relative_own_gain'])}); the federated "
        f"model is better on {figures['sites_where_federated_wins']} of {len(data.sites)} sites.",
        f"**Generalizability** (a site's model on the other sites' data, mean over sites): federated "
        f"{fmt(figures['federated_generalizability'])} against local {fmt(figures['local_generalizability'])}: "
        f"gain {figures['generalizability_gain']:+.4f} ({pct(figures['relative_generalizability_gain'])}).",
    ]
    headline.tables.append((
        ["site", "own data: federated", "local", "gain", "other sites: federated", "local", "gain"],
        [[r["site"], fmt(r["federated_own"]), fmt(r["local_own"]), f"{r['own_gain']:+.4f}", fmt(r["federated_others"]),
          fmt(r["local_others"]), fmt(r["generalizability_gain"]) if math.isnan(r["generalizability_gain"]) else f"{r['generalizability_gain']:+.4f}"]
         for r in figures["per_site"]],
    ))
    if plots.get("exam.png"):
        headline.image, headline.caption = "exam.png", plot_files(metric)["exam.png"]
    return headline


def comparison_section(data: RunData, metric: str, plots: Mapping[str, bool], summary: dict[str, Any]) -> Section:
    name = metric_name(metric)
    _, local_kind = data.local_models()
    pooled = data.pooled_model()
    local_title = "local-only" if local_kind == "local_only" else "federated + 1 round at each site"
    comparison = Section(f"Federated vs {local_title}" + (" vs pooled" if pooled else ""))
    rows = comparison_rows(data, metric)
    summary["comparison"] = rows
    columns = {"federated": "federated", "local": local_label(local_kind), "pooled": "pooled (all data in one place)"}
    cols = [c for c in columns if any(c in r for r in rows)]
    comparison.paragraphs.append(
        ("The first table: " if data.pooled_validation else "")
        + f"{name} of each model on each site's own validation data; the last row is the mean over sites (each "
        "site counts once)." + ("" if pooled else " No pooled model was trained in this run (`simulate --baselines` trains one).")
    )
    comparison.tables.append((
        ["site"] + [columns[c] for c in cols],
        [[MEAN_ROW if r["site"] == "mean" else r["site"]] + [fmt(r.get(c, math.nan)) for c in cols] for r in rows],
    ))
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
            f"The second table is every model on all sites' validation images together ({pv.get('num_val_samples', 'n/a')} "
            f"images; one {name} over all of them, not a mean of per-site values, so it differs from the first "
            f"table's mean row)."
        )
        shown = [m for m in (metric, "val_accuracy", "val_loss") if any(m in pv["results"][x] for x in order)]
        comparison.tables.append((
            ["model"] + [f"{metric_name(m)}, all images together" for m in shown],
            [[names.get(m, m.replace(LOCAL_ONLY_PREFIX, "") + " (local only)")] + [fmt(pv["results"][m].get(k, math.nan)) for k in shown] for m in order],
        ))
        summary["pooled_validation"] = pv
    if plots.get("fed_vs_local_vs_pooled.png"):
        comparison.image, comparison.caption = "fed_vs_local_vs_pooled.png", plot_files(metric)["fed_vs_local_vs_pooled.png"]
    return comparison


def matrix_section(data: RunData, metric: str, plots: Mapping[str, bool]) -> Section:
    _, local_kind = data.local_models()
    section = Section("Cross-site matrix")
    section.paragraphs.append(
        "Rows are models, columns are the sites whose held-out validation data they were evaluated on. "
        + ("Rows \"federated + 1 round at site\" are each site's last-round local model: the previous global model "
           "trained one more round there, not a model trained alone. " if local_kind == "local" or any(
               k == "local" for k in data.model_kinds.values()) else "")
        + "The heatmap's colour scale is fixed from 0.5 to 1."
    )
    for shown in [metric] + (["val_accuracy"] if metric != "val_accuracy" else []):
        if any(shown in cell for row in data.matrix.values() for cell in row.values()):
            section.tables.append((
                [f"{metric_name(shown)}: model \\ site"] + data.sites,
                [[model_label(data, m)] + [fmt(data.matrix[m].get(s, {}).get(shown, math.nan)) for s in data.sites]
                 for m in ordered_models(data)],
            ))
    failures = flatten_errors(data.cross_site_errors)
    if failures:
        section.paragraphs.append("Failures during cross-site evaluation (missing cells): " + "; ".join(failures) + ".")
    heatmap = cross_site_plot(metric)
    if plots.get(heatmap):
        section.image, section.caption = heatmap, plot_files(metric)[heatmap]
    return section


def curves_section(data: RunData, metric: str, plots: Mapping[str, bool]) -> Section:
    curves = Section("Learning curves")
    curves.paragraphs.append(
        f"Each point is the global model after that many rounds (0 = the initial model), evaluated on the "
        f"site's validation data (from metrics.json); the black line is the mean over sites (each site counts "
        f"once). The right panel is each site's local training loss. The table gives each site's {metric_name(metric)} before "
        f"training, after the last round and at its best."
    )
    table_rows = []
    for site in sorted(data.curves):
        series = data.curves[site].get(metric)
        if series and series["y"]:
            finite = [(y, x) for x, y in zip(series["x"], series["y"]) if math.isfinite(y)]
            best_y, best_x = max(finite, key=lambda yx: (yx[0], -yx[1])) if finite else (math.nan, math.nan)
            table_rows.append([site, fmt(series["y"][0]) if series["x"][0] == 0 else "n/a", fmt(series["y"][-1]),
                               _rounds(series["x"][-1]), fmt(best_y), _rounds(best_x)])
    if table_rows:
        curves.tables.append((["site", "before training", "final", "after round", "best", "after round"], table_rows))
    if plots.get("learning_curves.png"):
        curves.image, curves.caption = "learning_curves.png", plot_files(metric)["learning_curves.png"]
    return curves


def provenance_section(data: RunData, summary: dict[str, Any]) -> Section:
    prov = Section("Provenance")
    if data.card is None:
        prov.paragraphs.append("No provenance card (provenance.json) was found for this run.")
        return prov
    card = data.card
    s = card.get("summary", {}) if isinstance(card.get("summary"), Mapping) else {}
    chain = card.get("chain", []) if isinstance(card.get("chain"), list) else []
    release = chain[-1] if chain and isinstance(chain[-1], Mapping) else {}
    agg = s.get("aggregation", {})
    gate = release.get("release") if isinstance(release.get("release"), Mapping) else None
    prov.paragraphs += [
        f"Chain verification: **{data.card_status}**. Check it yourself with "
        "`python -m fedmed verify-provenance provenance.json`.",
        f"Job `{s.get('job')}`, {s.get('num_rounds')} rounds, aggregation "
        f"`{agg.get('method') if isinstance(agg, Mapping) else agg}` "
        f"(weights: {agg.get('weighting') if isinstance(agg, Mapping) else 'n/a'}), network `{json.dumps(s.get('network'))}`.",
        f"Released model: the global model after round index {release.get('round')} (0-based; chain record "
        f"{release.get('released_from_record')}), "
        f"weights sha256 `{release.get('model_sha256')}`; chain head `{card.get('head_sha256')}` over {len(chain)} records."
        + (f" Release gate (chained in the release record): version {gate.get('version')}, {gate.get('action')}: "
           f"{gate.get('reason')}." if gate else ""),
    ]
    site_rows = []
    for site in s.get("sites", []):
        if isinstance(site, Mapping):
            privacy = site.get("privacy")
            site_rows.append([
                str(site.get("site")), fmt(site.get("num_train_samples")), fmt(site.get("num_val_samples")),
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
    _privacy_ledgers(prov, s, summary)
    software = s.get("software", {})
    if isinstance(software, Mapping) and software:
        prov.tables.append((["software", "version"], [[k, str(v)] for k, v in software.items()]))
    summary["provenance"] = {"status": data.card_status, "head_sha256": card.get("head_sha256")}
    return prov


def _privacy_ledgers(prov: Section, card_summary: Mapping[str, Any], summary: dict[str, Any]) -> None:
    """Record-level DP (privacy scope dp): each site's ledger as the card carries it."""
    ledgers = {
        str(site.get("site")): site["privacy"] for site in card_summary.get("sites", [])
        if isinstance(site, Mapping) and isinstance(site.get("privacy"), Mapping) and site["privacy"].get("unit") == "record"
    }
    if not ledgers:
        return
    rows = [[name, str(p.get("accountant")), fmt(p.get("epsilon")), fmt(p.get("budget")), str(p.get("delta")),
             str(sum(int(h.get("steps", 0)) for h in p.get("history", []) if isinstance(h, Mapping))),
             ", ".join(f"{h.get('noise_multiplier'):.3g}" for h in p.get("history", []) if isinstance(h, Mapping))]
            for name, p in sorted(ledgers.items())]
    prov.tables.append((["site", "accountant", "epsilon (record level)", "budget", "delta", "DP-SGD steps", "noise multipliers"], rows))
    prov.paragraphs.append(
        "Record-level DP-SGD ledger (privacy_ledger.json): feeding a site's history of (noise multiplier, sample "
        "rate, steps) to the named Opacus accountant gives its epsilon (docs/privacy.md)."
    )
    summary["privacy_ledger"] = {name: {"epsilon": p.get("epsilon"), "budget": p.get("budget"), "delta": p.get("delta")}
                                 for name, p in sorted(ledgers.items())}


def _join(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _external_lines(v: Verdict, data: RunData) -> list[str]:
    """Data no site held: the released model against the hospitals alone and the pooled model."""
    if not v.external:
        if data.unevaluated_external:
            return [f"**Hospitals that took no part**: external hospital data is present ({_join(data.unevaluated_external)}) "
                    "but was not evaluated in this run (simulate evaluates it after training, so the run stopped before "
                    "that or the evaluation failed); how the model does at a new hospital is not measured here."]
        return ["**Hospitals that took no part**: this run has no external hospital data (images no hospital "
                "trained or validated on), so how the model does at a new hospital is not measured here."]
    lines = []
    for e in v.external:
        line = (f"**Hospitals that took no part** ({e.name}, {e.num_images} images): the released federated model has "
                f"AUC {_f3(e.federated_auc)}" + (f" and accuracy {_f3(e.federated_accuracy)}" if e.federated_accuracy is not None else ""))
        if e.alone_auc:
            worst = min(e.alone_auc, key=e.alone_auc.get)
            best = max(e.alone_auc, key=e.alone_auc.get)
            beaten = sum(e.federated_auc > a for a in e.alone_auc.values())
            line += (f". A model trained by one hospital alone reaches AUC {_f3(e.alone_auc[worst])} ({worst}) to "
                     f"{_f3(e.alone_auc[best])} ({best}); the federated model beats {beaten} of {len(e.alone_auc)}")
        if e.pooled_auc is not None:
            line += (f". All hospitals' data pooled in one place (what federation avoids) gives AUC {_f3(e.pooled_auc)}"
                     + (f", accuracy {_f3(e.pooled_accuracy)}" if e.pooled_accuracy is not None else ""))
        if not e.alone_auc and e.pooled_auc is None:
            line += (". There is no model trained by one hospital alone, nor one on pooled data, to compare with: "
                     "rerun with `python -m fedmed simulate --baselines`")
        lines.append(line + ".")
    return lines


def _vs(fed: Estimate | None, alone: Estimate | None, fed_plain: float | None, alone_plain: float | None) -> str:
    if fed is not None and alone is not None:
        return f"{fed.interval()} vs {alone.interval()} alone"
    return f"{_f3(fed_plain)} vs {_f3(alone_plain)} alone (no interval: the run kept no class counts)"


def hospital_figures(h: HospitalVerdict, short: str) -> str:
    """One hospital's comparisons with their 95 % intervals and sample sizes."""
    sized = h.federated_auc or h.alone_auc or h.federated_accuracy
    where = f"on its own images ({sized.sizes()})" if sized else "on its own images"
    parts = [f"{short} {_vs(h.federated_auc, h.alone_auc, h.federated_own, h.alone_own)} {where}"]
    if h.federated_accuracy is not None and h.alone_accuracy is not None:
        parts.append(f"accuracy {h.federated_accuracy.interval()} at the federation's threshold "
                     f"({_f3(h.federated_threshold)}) vs {h.alone_accuracy.interval()} alone at its own "
                     f"({_f3(h.alone_threshold)})")
    for set_name, fed_e, alone_e in h.external_compared:
        parts.append(f"{short} {fed_e.interval()} vs {alone_e.interval()} alone on {set_name} ({fed_e.sizes()})")
    if not h.external_compared and h.alone_external is not None:
        parts.append(f"{_f3(h.federated_external)} vs {_f3(h.alone_external)} on the external hospitals")
    return "; ".join(parts)


_OUTCOME_WORDS = {
    "better": "is **better off in the federation**",
    "worse": "is **better off alone**",
    "unclear": "shows **no difference these images can establish**",
}


def _hospital_item(h: HospitalVerdict, short: str) -> str:
    figures = hospital_figures(h, short)
    if h.outcome == "mixed":
        gains = [k for k, s in h.signs.items() if s == 1]
        losses = [k for k, s in h.signs.items() if s == -1]
        return f"{h.site} **gains on {_join(gains)} but loses on {_join(losses)}** in the federation: {figures}."
    if h.outcome in _OUTCOME_WORDS:
        item = f"{h.site} {_OUTCOME_WORDS[h.outcome]}: {figures}."
        small = [e for e in (h.federated_auc, h.alone_auc) if e and e.n_negative is not None and min(e.n_positive, e.n_negative) < 10]
        if small:
            item += f" (Only {min(min(e.n_positive, e.n_negative) for e in small)} images of one class: its figures are fragile.)"
        return item
    return f"{h.site}: not compared ({figures})."


def verdict_lines(v: Verdict, data: RunData) -> list[str | list[str]]:
    """The verdict in plain words: external hospitals first, then every hospital by name."""
    short = metric_name(v.metric)
    paragraphs: list[str | list[str]] = []
    threshold = data.decision_threshold or {}
    positive = threshold.get("class")
    how = f"{metric_explained(v.metric)} measures how well a model ranks " + (
        f"{positive} cases above the others" if positive else "the cases it should find above the others"
    ) if v.metric == "val_auc" else f"{metric_explained(v.metric)} measures how well a model's outline matches the reference"
    if v.external or threshold:
        at = threshold.get("threshold", v.external[0].threshold if v.external else None)
        how += (f"; accuracy is the share of correct calls at the decision threshold ({_f3(at) if isinstance(at, float) else at}) "
                "chosen on the hospitals' own validation images")
    paragraphs.append(how + ".")
    paragraphs += _external_lines(v, data)

    if v.local_kind != "local_only":
        items = [f"{h.site}: the federated model has {short} {_f3(h.federated_own)} on {h.site}'s own validation images."
                 for h in v.hospitals]
        paragraphs.append("**Each hospital**: whether a hospital would do better alone cannot be said from this run, "
                          "because it has no model trained by one hospital alone (rerun with `python -m fedmed simulate "
                          "--baselines`; a real deployment cannot train them, the hospitals' data never leave). What "
                          "the run shows:")
        paragraphs.append(items)
        return paragraphs
    where = "on its own validation images" + (" and on the external hospitals" if v.external else "")
    paragraphs.append(
        f"**Each hospital, in the federation vs alone** (the federated model vs the model the hospital trained alone "
        f"with the same effort, {where}; figures are value [95 % interval], with the number of images: Wilson "
        f"intervals for accuracy, Hanley-McNeil for {short}. A gain or loss is called only when the difference is at "
        f"least {SAME_WITHIN:g} and larger than the intervals allow, treating the two models as independent, which is "
        "cautious: both are scored on the same images):")
    paragraphs.append([_hospital_item(h, short) for h in v.hospitals])
    counts = v.counts()
    better = [h.site for h in v.hospitals if h.outcome == "better"]
    line = f"**In short**: {len(better)} of {len(v.hospitals)} hospitals are better off in the federation"
    line += f" ({_join(better)})" if better and len(better) < len(v.hospitals) else ""
    rest = [f"{counts[k]} {one if counts[k] == 1 else many}" for k, one, many in (
        ("mixed", "gains in one comparison and loses in another", "gain in one comparison and lose in another"),
        ("unclear", "shows no difference its images can establish", "show no difference their images can establish"),
        ("worse", "is better off alone", "are better off alone")) if counts.get(k)]
    paragraphs.append(line + ("; " + "; ".join(rest) if rest else "") + ".")
    return paragraphs


def verdict_section(data: RunData, v: Verdict, summary: dict[str, Any]) -> Section:
    """The report's opening: the verdict a project lead can act on."""
    section = Section("Verdict")
    section.paragraphs += verdict_lines(v, data)

    def est(e: Estimate | None):
        return None if e is None else {"value": e.value, "low": e.low, "high": e.high, "n": e.n,
                                       "n_positive": e.n_positive, "n_negative": e.n_negative}

    summary["verdict"] = {
        "metric": v.metric,
        "compared_with": "local_only" if v.local_kind == "local_only" else None,
        "hospitals": [{"site": h.site, "outcome": h.outcome, "federated_own": h.federated_own, "alone_own": h.alone_own,
                       "federated_external": h.federated_external, "alone_external": h.alone_external,
                       "federated_auc": est(h.federated_auc), "alone_auc": est(h.alone_auc),
                       "federated_accuracy": est(h.federated_accuracy), "alone_accuracy": est(h.alone_accuracy),
                       "federated_threshold": h.federated_threshold, "alone_threshold": h.alone_threshold,
                       "comparisons": h.signs}
                      for h in v.hospitals],
        "external": [{"set": e.name, "num_images": e.num_images, "federated_auc": e.federated_auc,
                      "federated_accuracy": e.federated_accuracy, "threshold": e.threshold,
                      "alone_auc": e.alone_auc, "pooled_auc": e.pooled_auc, "pooled_accuracy": e.pooled_accuracy}
                     for e in v.external],
    }
    return section


def external_section(external: Mapping[str, Any], summary: dict[str, Any]) -> Section:
    """Models on hospitals no site trained on, validated on or selected with (metrics.json 'external')."""
    section = Section("External hospitals (data no site held)")
    names = {FEDERATED: "federated (released model)", "best_global_model": "federated (best on site validation)",
             POOLED: "pooled (all sites' data in one place)"}
    rows, lines = [], []
    for set_name, by_model in external["results"].items():
        size = external.get("sets", {}).get(set_name, {}).get("num_images", "?")
        ranked = sorted(by_model.items(), key=lambda kv: (0 if kv[0] == FEDERATED else 1 if kv[0] == "best_global_model"
                                                          else 2 if kv[0] == POOLED else 3, kv[0]))
        for model, figures in ranked:
            label = names.get(model, model[len(LOCAL_ONLY_PREFIX):] + ": local only" if model.startswith(LOCAL_ONLY_PREFIX) else model)
            rows.append([f"{set_name} ({size})", label, fmt(figures.get("auc")), fmt(figures.get("accuracy")),
                         fmt(figures.get("threshold"), 2) if "threshold" in figures else "argmax"])
        fed = by_model.get(FEDERATED)
        locals_ = {m: f for m, f in by_model.items() if m.startswith(LOCAL_ONLY_PREFIX)}
        if fed:
            line = f"On {set_name} ({size} images) the released federated model has AUC {fmt(fed['auc'])} and accuracy {fmt(fed['accuracy'])}"
            if locals_:
                beaten = sum(fed["auc"] > f["auc"] for f in locals_.values())
                line += f"; it beats {beaten} of {len(locals_)} hospitals' local-only models on AUC"
            if POOLED in by_model:
                line += f"; the pooled model (data moved to one place) has AUC {fmt(by_model[POOLED]['auc'])}"
            lines.append(line + ".")
    section.paragraphs += lines + [
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
            out += ([f"- {item}" for item in paragraph] if isinstance(paragraph, list) else [paragraph]) + [""]
        for header, rows in section.tables:
            out += [_md_table(header, rows), ""]
        if section.image:
            out += [f"![{section.caption}]({section.image})", ""]
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """Escape for HTML, then render the two inline forms the report uses: **bold** and `code`."""
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
        parts += ["<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in p) + "</ul>" if isinstance(p, list)
                  else f"<p>{_inline_md(p)}</p>" for p in section.paragraphs]
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




# kept for code that imported the private names
_fmt, _pct = fmt, pct
