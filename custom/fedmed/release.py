"""The release gate: which global model version a federation releases, and why.

Pure module (no torch, no ``nvflare``). The FedAvg controller calls :func:`decide_release` once
after the final validation, with ``metrics.json``'s ``evaluations`` (every model version validated
by the sites); :func:`fedmed.results.export_run_outputs` calls it for a run whose ``metrics.json``
has no ``release`` block (a result made before the gate existed).

The statistic is the one the best model is chosen on (:class:`fedmed.rounds.RoundEngine`): the
**median over sites** of the key metric on the sites' validation data (one site reporting an
extreme value cannot move it). Version 0 is the initial (untrained) model, version ``N`` the model
after ``N`` rounds. The rule, with ``tolerance`` (the controller's ``release_tolerance``, default
:data:`DEFAULT_RELEASE_TOLERANCE`):

- **collapse** (the job fails, nothing is released; with ``on_collapse="initial"`` the initial model
  is released instead and the decision says so loudly): no trained version scores above the initial
  model (version 0). A tie is a collapse (a model that calls every image the same class ties an
  untrained one at AUC 0.5), except at the metric's maximum (1.0 for AUC and Dice): an initial model
  that already scores 1.0 cannot be beaten, and a trained version that also scores 1.0 is kept;
- **rollback** to the best version: the final model scores below the initial model, or more than
  ``tolerance`` below the best version, or was never validated;
- **final**: otherwise (the final model is not below the initial one and within ``tolerance`` of
  the best; exactly ``tolerance`` below the best is still within it);
- **unchecked**: no version has a score (no site reported the key metric): the final model is
  released and the decision says the gate could not check it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

DEFAULT_RELEASE_TOLERANCE = 0.02
PERFECT = 1.0  # the maximum of AUC, accuracy and Dice
_EPS = 1e-9  # float slack: a final model exactly `tolerance` below the best is within it

FINAL, ROLLBACK, COLLAPSE, UNCHECKED = "final", "rollback", "collapse", "unchecked"
ON_COLLAPSE = ("fail", "initial")  # a collapse fails the job (default), or releases the initial model, saying so


class ReleaseError(ValueError):
    """A bad gate setting; the message names it."""


def check_tolerance(tolerance: Any, where: str = "release_tolerance") -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ReleaseError(f"{where} must be a finite number >= 0 (how far below the best version, in the key metric, "
                           f"the final model may score and still be released), got {tolerance!r}")
    return float(tolerance)


@dataclass(frozen=True)
class ReleaseDecision:
    action: str  # final | rollback | collapse | unchecked
    version: int | None  # the model version released (None: collapse)
    reason: str
    key_metric: str
    statistic: str
    tolerance: float
    final_version: int
    final: float | None  # the statistic of each version compared (None: not validated)
    initial: float | None
    best_version: int | None
    best: float | None

    @property
    def released(self) -> bool:
        return self.action != COLLAPSE

    def as_dict(self) -> dict[str, Any]:
        """The ``release`` block of ``metrics.json``."""
        return asdict(self)

    def status_line(self) -> str:
        if self.action == COLLAPSE:
            return f"NOT RELEASED (collapse): {self.reason}"
        what = "the final model" if self.version == self.final_version else f"version {self.version} (rolled back)"
        return f"released model version {self.version} of {self.final_version}, {what}: {self.reason}"


def version_scores(evaluations: Iterable[Mapping[str, Any]] | None, key_metric: str) -> dict[int, float | None]:
    """``{model_version: median over sites of key_metric}`` (a later evaluation of a version wins)."""
    scores: dict[int, float | None] = {}
    for evaluation in evaluations or []:
        if not isinstance(evaluation, Mapping) or not isinstance(evaluation.get("model_version"), int):
            continue
        value = evaluation.get(f"median_{key_metric}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        scores[evaluation["model_version"]] = float(value) if ok else None
    return scores


def _f(value: float | None) -> str:
    return "not validated" if value is None else f"{value:.4f}"


def check_on_collapse(value: Any, where: str = "release_on_collapse") -> str:
    if value not in ON_COLLAPSE:
        raise ReleaseError(f"{where} must be one of {', '.join(map(repr, ON_COLLAPSE))} ('fail': a federation whose "
                           f"training beat no model fails the job; 'initial': it releases the initial model, saying "
                           f"so), got {value!r}")
    return value


def decide_release(evaluations: Iterable[Mapping[str, Any]] | None, key_metric: str, final_version: int,
                   tolerance: float = DEFAULT_RELEASE_TOLERANCE, on_collapse: str = "fail") -> ReleaseDecision:
    """Apply the release gate (module docstring) to a run's ``evaluations``."""
    tolerance = check_tolerance(tolerance)
    on_collapse = check_on_collapse(on_collapse)
    scores = version_scores(evaluations, key_metric)
    known = {v: s for v, s in scores.items() if s is not None}
    initial, final = known.get(0), known.get(final_version)
    statistic = f"median over sites of validation {key_metric}"
    common = dict(key_metric=key_metric, statistic=statistic, tolerance=tolerance, final_version=final_version,
                  final=final, initial=initial)
    if not known:
        return ReleaseDecision(UNCHECKED, final_version, f"no version has a {statistic}; the gate could not check the "
                               "final model, released unchecked", best_version=None, best=None, **common)
    best_version = min(known, key=lambda v: (-known[v], v))  # the highest score, the earliest on ties
    best = known[best_version]
    common.update(best_version=best_version, best=best)
    trained = {v: s for v, s in known.items() if v > 0}
    top_score = max(trained.values()) if trained else None
    perfect_tie = top_score is not None and initial >= PERFECT if initial is not None else False
    if initial is not None and (top_score is None or top_score < initial or (top_score == initial and not perfect_tie)):
        top = max(trained, key=lambda v: (trained[v], -v)) if trained else None
        detail = (f"the best trained version ({top}) scores {_f(trained[top])}" if top is not None
                  else "no trained version was validated")
        reason = (f"collapse: no trained version beats the initial model (version 0, {statistic} {_f(initial)}); "
                  f"{detail}, the final model {_f(final)}")
        if on_collapse == "initial":  # version 0 is the best version here (the earliest of the highest scores)
            return ReleaseDecision(ROLLBACK, 0, reason + "; released the INITIAL (untrained) model, as "
                                   "release_on_collapse='initial' asks", **common)
        return ReleaseDecision(COLLAPSE, None, reason, **common)
    if final is None:
        return ReleaseDecision(ROLLBACK, best_version, f"the final model (version {final_version}) was not validated; "
                               f"released the best validated version {best_version} ({_f(best)})", **common)
    if initial is not None and final < initial:
        return ReleaseDecision(ROLLBACK, best_version, f"the final model ({_f(final)}) scores below the initial model "
                               f"({_f(initial)}); rolled back to the best version {best_version} ({_f(best)})", **common)
    if final < best - tolerance - _EPS:
        return ReleaseDecision(ROLLBACK, best_version, f"the final model ({_f(final)}) scores {best - final:.4f} below the "
                               f"best version {best_version} ({_f(best)}), more than the tolerance {tolerance:g}; "
                               f"rolled back to version {best_version}", **common)
    against_initial = f" and above the initial model ({_f(initial)})" if initial is not None else " (version 0 not validated)"
    return ReleaseDecision(FINAL, final_version, f"the final model ({_f(final)}) is within {tolerance:g} of the best "
                           f"version {best_version} ({_f(best)}){against_initial}", **common)


def released_evaluation(evaluations: Iterable[Mapping[str, Any]] | None, version: int | None) -> dict:
    """The (last) evaluation of model ``version`` ({} if none): its sites' metrics choose the threshold."""
    found: dict = {}
    for evaluation in evaluations or []:
        if isinstance(evaluation, Mapping) and evaluation.get("model_version") == version:
            found = dict(evaluation)
    return found
