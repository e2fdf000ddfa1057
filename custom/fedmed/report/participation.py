"""The report's "who took part" lines: hospitals flagged or left out in most rounds (issue 18).

Reads ``metrics.json`` ``participation`` (written by the round engine, :func:`fedmed.rounds.participation`)
into one short section placed right after the verdict, so a hostile or absent hospital is on the
report's first screen. Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

from typing import Any, Mapping

REASONS = {"bounded": "update scaled down to the norm bound", "outlier": "far from the other hospitals' updates",
           "refused": "reply refused", "capped": "sample count capped", "excluded": "left out of the mean",
           "round rejected": "named in a rejected round"}


def read_participation(metrics_doc: Any) -> tuple[dict[str, dict], int]:
    """({site: counts}, rounds run) from a metrics.json document; ({}, 0) when it has none."""
    if not isinstance(metrics_doc, Mapping) or not isinstance(metrics_doc.get("participation"), Mapping):
        return {}, 0
    part = {str(site): dict(p) for site, p in metrics_doc["participation"].items() if isinstance(p, Mapping)}
    rounds = metrics_doc.get("rounds")
    return part, len(rounds) if isinstance(rounds, list) else 0


def participation_lines(part: Mapping[str, Mapping], rounds_run: int) -> list[str | list[str]]:
    """Plain-words paragraphs: every hospital flagged or left out in more than half the rounds, by name."""
    if not part or rounds_run <= 0:
        return []
    flagged, absent = [], []
    for site, p in sorted(part.items()):
        if int(p.get("rounds_flagged", 0)) * 2 > rounds_run:
            why = ", ".join(f"{REASONS.get(k, k)} ({n})" for k, n in (p.get("flagged_as") or {}).items())
            flagged.append(f"**{site}** was flagged in {p['rounds_flagged']} of {rounds_run} rounds: {why}.")
        if int(p.get("rounds_left_out", 0)) * 2 > rounds_run:
            absent.append(f"**{site}** was left out of {p['rounds_left_out']} of {rounds_run} rounds (no answer before the "
                          f"round closed); it contributed to {p.get('rounds_contributed', 0)}.")
    if not flagged and not absent:
        return [f"Every hospital took part in most of the {rounds_run} rounds and none was flagged in most of them."]
    lines: list[str | list[str]] = []
    if flagged:
        lines += ["Hospitals whose updates the robust aggregation bounded, trimmed or refused in most rounds "
                  "(a hostile or broken site looks like this; check with that hospital):", flagged]
    if absent:
        lines += ["Hospitals missing from most rounds (too slow or disconnected; the model learned little from them):", absent]
    return lines


def participation_section(metrics_doc: Any, summary: dict[str, Any]):
    """The report Section (None when metrics.json has no participation)."""
    from fedmed.report.section import Section

    part, rounds_run = read_participation(metrics_doc)
    lines = participation_lines(part, rounds_run)
    if not lines:
        return None
    summary["participation"] = {"rounds": rounds_run, "sites": part}
    section = Section("Who took part")
    section.paragraphs += lines
    return section
