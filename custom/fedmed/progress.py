"""A running job's progress, as the project lead watches it (``python -m fedmed watch``).

The server's controller answers FLARE's ``show_stats`` admin command with :func:`job_progress` of its
round engine's ``metrics`` (group ``fedmed``); :func:`progress_line` turns one such answer into the
line ``watch`` prints. Pure: no FLARE import; the numbers come only from what the controller already
records in ``metrics.json``.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmed.rounds import participation, participation_summary, round_flags

STATS_GROUP = "fedmed"  # the group name under which the controller's stats appear in show_stats


def job_progress(metrics: Mapping[str, Any], elapsed_s: float) -> dict:
    """The JSON-safe progress summary of a job from its round engine's ``metrics``."""
    rounds = metrics.get("rounds") or []
    part = metrics.get("participation") or participation(rounds, metrics.get("sites") or [])
    sites = sorted({*(metrics.get("sites") or []), *part})  # a site left out of every round is still a site
    key = metrics.get("key_metric") or "val_auc"
    last = rounds[-1] if rounds else {}
    evaluations = metrics.get("evaluations") or []
    return {
        "rounds_completed": len(rounds),
        "num_rounds": int(metrics.get("num_rounds") or 0),
        "last_round": {"round": last.get("round"), "answered": list(last.get("contributors") or []),
                       "failed": sorted(last.get("failed") or {}), "flagged": sorted(round_flags(last))},
        "sites": sites,
        "participation": part,
        "key_metric": key,
        f"median_{key}": evaluations[-1].get(f"median_{key}") if evaluations else None,
        "elapsed_s": round(float(elapsed_s), 1),
        "finished": bool(metrics.get("finished")),
        "error": metrics.get("error"),
    }


def eta_seconds(progress: Mapping[str, Any]) -> float | None:
    """Seconds left at the pace of the rounds completed so far (``None`` before the first round ends)."""
    done, total = progress.get("rounds_completed") or 0, progress.get("num_rounds") or 0
    if not done or not total:
        return None
    return max(0.0, progress["elapsed_s"] / done * (total - done))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(progress: Mapping[str, Any]) -> str:
    """``round 3/10: 4 of 5 sites answered (left out: h-05); flagged: h-02; median val_auc 0.912; 2m10s, ETA 4m20s``."""
    last = progress.get("last_round") or {}
    sites = progress.get("sites") or []
    answered = last.get("answered") or []
    left_out = [s for s in sites if s not in answered]
    key = progress.get("key_metric", "val_auc")
    median = progress.get(f"median_{key}")
    parts = [f"round {progress.get('rounds_completed')}/{progress.get('num_rounds')}: "
             f"{len(answered)} of {len(sites)} site(s) answered"
             + (f" (left out: {', '.join(left_out)})" if left_out else "")]
    if last.get("flagged"):
        parts.append(f"flagged: {', '.join(last['flagged'])}")
    parts.append(f"median {key} {median:.3f}" if isinstance(median, (int, float)) else f"median {key} n/a")
    parts.append(f"{_duration(progress.get('elapsed_s'))} elapsed, ETA {_duration(eta_seconds(progress))}")
    return "; ".join(parts)


def final_summary(progress: Mapping[str, Any]) -> str:
    """Sites flagged or left out in most rounds (:func:`fedmed.rounds.participation_summary`), "" when none."""
    return participation_summary(progress.get("participation") or {}, int(progress.get("rounds_completed") or 0))
