"""The round engine: one federated round's bookkeeping, checks and model selection, for every workflow.

Pure module (numpy only; never imports ``nvflare``). A FLARE controller broadcasts the global model,
collects the sites' replies and hands them to :meth:`RoundEngine.run_round`, which

1. checks every reply once: data kind, sample count (:func:`fedmed.aggregation.validate_sample_count`),
   reported metrics (:func:`check_site_metrics`: AUC / accuracy / Dice in [0, 1], losses finite and
   >= 0, counts positive, list-valued metrics such as ``val_score_histogram`` lists of finite
   non-negative numbers) and the update itself (the aggregation step's ``check_update``). A reply
   that fails any check is left out of the round and its site named with the reason;
2. records the round in ``metrics`` (``rounds[]``: contributors, per-site metrics, failed sites with
   reasons, what the aggregator bounded) and stops the job (:class:`RoundFailed`) when fewer than
   ``min_clients`` (or the step's ``min_sites``) valid updates arrived;
3. records the evaluation of the global model that entered the round (``evaluations[]``, the sites'
   validation metrics) and keeps the best model version, chosen on the **median** of the sites' key
   metric (one site reporting an extreme value cannot choose it);
4. runs the pluggable aggregation step (:class:`AggregationStep`): :class:`PlaintextAggregation`
   (plain or robust aggregation from :mod:`fedmed.aggregation`, then a server optimizer, then a
   finite check) or the ``he`` mode's secure aggregation (``fedmed.flare.he.SecureAggregation``). A
   step that cannot produce a sound model raises :class:`RoundRejected`: the previous model is kept
   and the sites are named.

A workflow drives a step through :class:`ServerStep` (create / open_round / send / receive /
check_update / aggregate / save / plaintext / restore / settings): the step owns how the global
model is created, sent, saved and resumed, and any extra exchange with the sites (:class:`Exchange`).

The engine's state (``state_dict`` / ``load_state_dict``: next round, metrics, the step's state,
e.g. the server optimizer's) is what a resumed server needs besides the global model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from fedmed.aggregation import (
    DEFAULT_AGGREGATION,
    UpdateError,
    aggregate_updates,
    apply_update,
    check_aggregation_spec,
    nonfinite_keys,
    resolve_tolerance,
    sites_needed,
    stated_tolerance,
    validate_sample_count,
    validate_update,
)
from fedmed.server_optim import build_server_optimizer
from fedmed.threshold import derive_histogram_metrics

WEIGHT_DIFF = "WEIGHT_DIFF"  # the data kind a site's training reply carries (FLARE's DataKind.WEIGHT_DIFF)
STATE_FORMAT = "fedmed-round-engine/1"
ATTACK_META_KEY = "simulated_attack"  # set by fedmed.flare.attack_filter in simulated jobs only
UNIT_INTERVAL_METRICS = ("auc", "accuracy", "dice")  # a val_* metric naming one of these lies in [0, 1]


class RoundFailed(RuntimeError):
    """The job must stop; the message names the round, the reason and every failed site."""


class RoundRejected(Exception):
    """The aggregation step refused to produce a new global model this round (the previous one is kept)."""

    def __init__(self, message: str, sites: Sequence[str] = ()):
        super().__init__(message)
        self.sites = sorted(sites)


class MetricError(UpdateError):
    """A site reported a metric outside its range; the message names the site and the metric."""


# ---- metrics -----------------------------------------------------------------------------------

def _check_list_metric(site: str, key: str, value) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
            continue
        if isinstance(item, bool) or not isinstance(item, (int, float, np.integer, np.floating)) or not math.isfinite(item) or item < 0:
            raise MetricError(f"site {site}: metric '{key}' must be a list of finite non-negative numbers, holds {item!r}")


def check_site_metrics(site: str, metrics: Mapping[str, Any] | None) -> tuple[dict, list[str]]:
    """Range-check the metrics a site reported; return (the metrics to file, notes).

    - ``val_*`` metrics naming auc / accuracy / dice: in [0, 1]; NaN or None means "not
      computable" (e.g. AUC on one class): dropped with a note;
    - metrics naming a loss: finite and >= 0;
    - ``num_*`` counts: finite and > 0;
    - other numbers: finite; booleans and strings pass;
    - lists (e.g. ``val_score_histogram``, per-class lists of counts): finite non-negative numbers,
      passed through unchanged.

    Anything else raises :class:`MetricError` naming the site and the metric.
    """
    if metrics is None:
        return {}, []
    if not isinstance(metrics, Mapping):
        raise MetricError(f"site {site}: metrics must be a mapping of name -> value, got {type(metrics).__name__}")
    try:  # a dp site sends only a noised histogram: the server derives AUC / accuracy from it
        metrics = derive_histogram_metrics(metrics)
    except ValueError as exc:
        raise MetricError(f"site {site}: {exc}") from exc
    clean, notes = {}, []
    for key, value in metrics.items():
        lowered = str(key).lower()
        bounded = lowered.startswith("val_") and any(word in lowered for word in UNIT_INTERVAL_METRICS)
        if isinstance(value, (bool, str)):
            clean[key] = value
            continue
        if isinstance(value, (list, tuple)):
            _check_list_metric(site, key, value)
            clean[key] = value
            continue
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value) and bounded):
            notes.append(f"site {site}: metric '{key}' is not available ({value}); left out")
            continue
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise MetricError(f"site {site}: metric '{key}' has type {type(value).__name__}; expected a number or a list of numbers")
        value = value.item() if isinstance(value, np.generic) else value
        if not math.isfinite(value):
            raise MetricError(f"site {site}: metric '{key}' is {value}; metrics must be finite")
        if bounded and not 0.0 <= value <= 1.0:
            raise MetricError(f"site {site}: metric '{key}' = {value} is outside [0, 1]")
        if "loss" in lowered and value < 0:
            raise MetricError(f"site {site}: metric '{key}' = {value} is negative; a loss is >= 0")
        if lowered.startswith("num_") and value <= 0:
            raise MetricError(f"site {site}: count '{key}' = {value} must be positive")
        clean[key] = value
    return clean, notes


def is_validation_metric(key: str) -> bool:
    return key.startswith("val_") or key == "num_val_samples"


def weighted_site_mean(site_metrics: Mapping[str, Mapping], key: str) -> float | None:
    """Mean of ``key`` over sites, weighted by each site's validation sample count."""
    pairs = [(m[key], m.get("num_val_samples", 1)) for m in site_metrics.values() if key in m]
    pairs = [(v, w) for v, w in pairs if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not pairs:
        return None
    values, weights = zip(*pairs)
    return float(np.average(values, weights=weights))


def site_median(site_metrics: Mapping[str, Mapping], key: str) -> float | None:
    """Median of ``key`` over sites (the robust statistic the best model is chosen on)."""
    values = [m[key] for m in site_metrics.values() if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
    values = [v for v in values if math.isfinite(v)]
    return float(np.median(values)) if values else None


# ---- aggregation steps ---------------------------------------------------------------------------

@dataclass
class Contribution:
    """A site's update admitted to the round."""

    site: str
    update: Mapping[str, Any]
    num_samples: float
    meta: Mapping[str, Any] = field(default_factory=dict)


class AggregationStep(Protocol):
    """What the engine needs from an aggregation: plain, robust or HE."""

    description: str  # written to metrics.json "aggregation"
    min_sites: int  # fewest contributors the step can aggregate safely
    min_sites_reason: str  # why (named when the job stops)

    def check_update(self, site: str, update: Mapping[str, Any], num_samples: float, global_model: Any,
                     meta: Mapping[str, Any] | None = None) -> None:
        """Raise UpdateError (naming the site) when the update must not enter the aggregate (``meta``: the reply's)."""

    def aggregate(self, global_model: Any, contributions: Sequence[Contribution], round_num: int) -> tuple[Any, dict]:
        """Return (the new global model, a JSON-able report); raise RoundRejected to keep the old one."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


WEIGHTS = "WEIGHTS"  # the data kind of a task carrying a plaintext global model (FLARE's DataKind.WEIGHTS)


class Exchange(Protocol):
    """One extra task on the sites, run by the workflow for a step (e.g. secure aggregation's key
    exchange): send ``(kind, data, meta)`` to ``targets`` (every connected site when None) and wait
    for all of them, or, once ``min_responses`` answered, for the workflow's grace period at most
    (the round timeout bounds the wait); return ({site: SiteReply}, {site: error message})."""

    def __call__(self, task_name: str, kind: str, data: Mapping[str, Any], meta: Mapping[str, Any],
                 targets: Sequence[str] | None = None,
                 min_responses: int | None = None) -> tuple[dict[str, "SiteReply"], dict[str, str]]: ...


@dataclass
class StepContext:
    """What a workflow hands its aggregation step: the job's settings, where outputs go, how to reach
    the sites. ``platform`` is the workflow's own context (FLARE's FLContext), opaque here: only a
    step built on that platform's components reads it."""

    out_dir: Any  # pathlib.Path of the server's output folder
    network: Mapping[str, Any]
    task: Mapping[str, Any]
    num_rounds: int
    min_clients: int
    reference_state: Any = None  # the network's state_dict (tensor types and shapes for saving)
    exchange: Exchange | None = None
    sites: Callable[[], list[str]] | None = None  # the sites connected now
    platform: Any = None


class ServerStep(AggregationStep, Protocol):
    """The aggregation step as the workflow sees it: it owns how the global model is created, sent,
    received, aggregated, saved and resumed, and any extra exchange with the sites a round needs
    (secure aggregation's key and unmasking tasks). The workflow (``fedmed.flare.controller``) has
    no branch on the kind of step; :class:`PlaintextStepBase` gives the plaintext behaviour."""

    def create(self, weights: Mapping[str, np.ndarray], context: StepContext) -> Any:
        """The initial global model as the step holds it (``weights``: the seeded network's arrays)."""

    def open_round(self, round_num: int, context: StepContext) -> dict:
        """Run what must happen before the model goes out (may use ``context.exchange``); return meta
        for the round's task. Raise :class:`RoundFailed` when the round cannot be run."""

    def send(self, model: Any, meta: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], dict]:
        """(data kind, data, meta) of a task carrying ``model`` (train or validate)."""

    def receive(self, site: str, kind: str, data: Mapping[str, Any], meta: Mapping[str, Any]) -> "SiteReply":
        """A site's training answer as the engine checks it."""

    def save(self, model: Any, path: Any, context: StepContext) -> bool:
        """Write ``model`` to ``path`` (atomically); False when this step keeps no model file."""

    def plaintext(self, model: Any) -> Mapping[str, np.ndarray] | None:
        """The model's arrays when the server holds it in plaintext (provenance, resume), else None."""

    def restore(self, arrays: Mapping[str, np.ndarray], context: StepContext) -> Any:
        """The global model from :meth:`plaintext`'s arrays (resume after a server crash)."""

    def settings(self) -> dict:
        """The step's settings, JSON types: run_config.json and the resume fingerprint."""


class PlaintextStepBase:
    """Default :class:`ServerStep` behaviour for a step whose server holds the global model in
    plaintext (a ``{name: ndarray}`` dict): no extra exchange, the model sent as WEIGHTS, saved as a
    torch state dict, resumable."""

    def create(self, weights, context):
        return {key: np.asarray(value) for key, value in weights.items()}

    def open_round(self, round_num, context) -> dict:
        return {}

    def send(self, model, meta):
        return WEIGHTS, model, dict(meta)

    def receive(self, site, kind, data, meta) -> "SiteReply":
        return SiteReply(kind, data, meta)

    def save(self, model, path, context) -> bool:
        import torch  # noqa: PLC0415 - only the workflow saves; the engine stays numpy-only

        from fedmed.atomic import atomic_path  # noqa: PLC0415
        from fedmed.networks import numpy_to_state  # noqa: PLC0415

        with atomic_path(path) as tmp:
            torch.save(numpy_to_state(model, context.reference_state), tmp)
        return True

    def plaintext(self, model):
        return model

    def restore(self, arrays, context):
        return {key: np.asarray(value) for key, value in arrays.items()}


class PlaintextAggregation(PlaintextStepBase):
    """Aggregation of plaintext weight differences: plain or robust combination
    (:func:`fedmed.aggregation.aggregate_updates`), then the server optimizer, then a finite check.

    Args:
        aggregation: ``{"name", "args"}`` aggregator spec (default ``clipped_fedavg``, see
            :func:`fedmed.aggregation.check_aggregation_spec`).
        server_optimizer: ``{"name", "args"}`` spec for ``fedmed.server_optim`` (default
            ``{"name": "fedavg"}``: global + aggregated update).
        allow_partial: accept updates lacking some keys (a privacy filter removed them).
        num_sites: the sites of the federation; fixes the tolerance ``f`` (the spec's, or the most
            its rule supports with that many sites, :func:`fedmed.aggregation.resolve_tolerance`,
            which raises ``ToleranceError`` when there are too few) and makes every round need the
            sites that ``f`` requires (``min_sites``). None: ``f`` follows each round's contributors.
    """

    min_sites = 1
    min_sites_reason = ""

    def __init__(self, aggregation: Mapping | None = None, server_optimizer: Mapping | None = None, allow_partial: bool = False,
                 num_sites: int | None = None):
        self.spec = check_aggregation_spec(aggregation or DEFAULT_AGGREGATION)
        self.tolerance = None
        if num_sites is not None:
            self.spec, self.min_sites, self.min_sites_reason, self.tolerance = tolerance_spec(self.spec, num_sites)
        self.server_optimizer_spec = dict(server_optimizer or {"name": "fedavg"})
        self.optimizer = build_server_optimizer(self.server_optimizer_spec)
        self.allow_partial = allow_partial
        self.description = f"{self.spec['name']} {self.spec['args'] or ''}".strip() + f"; server optimizer {self.server_optimizer_spec['name']}"

    def check_update(self, site, update, num_samples, global_model, meta=None) -> None:
        validate_update(update, global_model, num_samples, site, self.allow_partial)

    def _combine(self, global_model, contributions, spec):
        norm_keys = [k for k, v in global_model.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        return aggregate_updates([(c.site, c.update, c.num_samples) for c in contributions], spec, norm_keys)

    def aggregate(self, global_model, contributions, round_num):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below by the finite check
            mean_update, report = self._combine(global_model, contributions, self.spec)
            saved = copy.deepcopy(self.optimizer.state_dict())
            new_model = self.optimizer.step(global_model, mean_update)
        bad = nonfinite_keys(new_model)
        if bad:
            self.optimizer.load_state_dict(saved)  # a rejected round leaves no trace in the optimizer
            sites = self._responsible(global_model, contributions)
            raise RoundRejected(
                f"round {round_num}: the new global model would hold NaN/Inf in {len(bad)} tensor(s) "
                f"({', '.join(bad[:3])}); the previous global model is kept. Responsible: {', '.join(sites)}",
                sites,
            )
        report = {k: v for k, v in report.items() if v or k == "aggregator"}
        return new_model, report

    def _responsible(self, global_model, contributions) -> list[str]:
        """The sites without which the round's model would be finite (else every contributor)."""
        if len(contributions) > 1:
            culprits = []
            np_state = np.seterr(over="ignore", invalid="ignore")
            for left_out in contributions:
                rest = [c for c in contributions if c is not left_out]
                mean_update, _ = self._combine(global_model, rest, self.spec)
                if not nonfinite_keys(apply_update(global_model, mean_update)):
                    culprits.append(left_out.site)
            np.seterr(**np_state)
            if culprits:
                return culprits
        return [c.site for c in contributions]

    def settings(self) -> dict:
        return {"aggregation": self.spec, "server_optimizer": self.server_optimizer_spec}

    def state_dict(self) -> dict:
        return {"server_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict((state or {}).get("server_optimizer", {}))


def tolerance_spec(spec: Mapping, num_sites: int) -> tuple[dict, int, str, int]:
    """(the spec to aggregate with, the fewest contributing sites each round needs, why, the job's f)
    for a federation of ``num_sites`` sites. A stated ``f`` is checked (``ToleranceError`` naming f
    and the site count) and every round then needs the sites it requires. The default ``f: "auto"``
    stays per round: the job tolerates the most its rule supports with ``num_sites`` sites, and a round
    with fewer contributors the most they allow (its ``aggregation.f`` in metrics.json)."""
    spec = check_aggregation_spec(spec)
    f = resolve_tolerance(spec, num_sites)
    if stated_tolerance(spec) is None:
        return spec, 1, "", f
    need = sites_needed(spec["name"], f) or 1
    reason = (f"the aggregation {spec['name']} tolerates f={f} hostile site(s) and needs {need} contributing sites for it"
              if f else "")
    return {"name": spec["name"], "args": {**spec["args"], "f": f}}, need, reason, f


# ---- participation -------------------------------------------------------------------------------

FLAG_SOURCES = ("clipped", "capped", "outliers", "excluded")  # aggregation report entries that flag a site


def round_flags(record: Mapping) -> dict[str, list[str]]:
    """{site: [why]} for the sites one round's record flags: refused (an invalid reply), bounded
    (norm scaled down), capped (sample count), outlier (far from the aggregate: trimmed or
    down-weighted), excluded (left out of multi-Krum's mean), round rejected (named for a NaN/Inf model)."""
    flags: dict[str, list[str]] = {}
    left_out = set(record.get("left_out", []))
    for site in record.get("failed", {}):
        if site not in left_out and not site.startswith("("):
            flags.setdefault(site, []).append("refused")
    report = record.get("aggregation") or {}
    names = {"clipped": "bounded", "capped": "capped", "outliers": "outlier", "excluded": "excluded"}
    for source in FLAG_SOURCES:
        for site in report.get(source) or ():
            flags.setdefault(site, []).append(names[source])
    for site in (record.get("rejected") or {}).get("sites", []):
        flags.setdefault(site, []).append("round rejected")
    return flags


def participation(rounds: Sequence[Mapping], sites: Sequence[str] = ()) -> dict:
    """Per site, over the rounds run: ``rounds_contributed`` (its update entered the aggregate),
    ``rounds_flagged`` (refused, bounded, capped, outlier, excluded or named in a rejected round;
    ``flagged_as`` counts each reason) and ``rounds_left_out`` (no answer before the round closed,
    or an error at the site). ``rounds`` are ``metrics["rounds"]`` records."""
    out: dict[str, dict] = {}

    def entry(site):
        return out.setdefault(site, {"rounds_contributed": 0, "rounds_flagged": 0, "rounds_left_out": 0, "flagged_as": {}})

    for site in sites:
        entry(site)
    for record in rounds:
        left_out = set(record.get("left_out", []))
        for site in record.get("contributors", []):
            entry(site)["rounds_contributed"] += 1
        for site in record.get("failed", {}):
            if site in left_out and not site.startswith("("):
                entry(site)["rounds_left_out"] += 1
        for site, why in round_flags(record).items():
            e = entry(site)
            e["rounds_flagged"] += 1
            for reason in dict.fromkeys(why):
                e["flagged_as"][reason] = e["flagged_as"].get(reason, 0) + 1
    return {site: out[site] for site in sorted(out)}


def participation_summary(part: Mapping[str, Mapping], rounds_run: int) -> str:
    """One line naming the sites flagged or left out in most (more than half) of ``rounds_run`` rounds,
    or "" when there are none."""
    if rounds_run <= 0:
        return ""
    flagged = [f"{site} ({p['rounds_flagged']}/{rounds_run}: {', '.join(p.get('flagged_as', {}))})"
               for site, p in part.items() if p["rounds_flagged"] * 2 > rounds_run]
    left = [f"{site} ({p['rounds_left_out']}/{rounds_run})" for site, p in part.items() if p["rounds_left_out"] * 2 > rounds_run]
    parts = ([f"flagged in most rounds: {'; '.join(flagged)}"] if flagged else []) + \
            ([f"left out of most rounds: {'; '.join(left)}"] if left else [])
    return "; ".join(parts)


# ---- the engine ----------------------------------------------------------------------------------

@dataclass
class SiteReply:
    """A site's answer to a training task: its data kind, the update and the DXO meta."""

    kind: str
    update: Mapping[str, Any]
    meta: Mapping[str, Any]


@dataclass
class RoundOutcome:
    model: Any  # the new global model (the previous one when the round was rejected)
    accepted: bool  # False: the step rejected the round and the previous model was kept
    record: dict  # the round's entry in metrics["rounds"]
    evaluation: dict  # the evaluation of the global model that entered the round
    entering_model_is_best: bool  # save the model that entered the round as the best one
    contributions: list[Contribution]
    val_metrics: dict
    notes: list[str]


class RoundEngine:
    """Round bookkeeping, checks and best-model selection (see the module docstring).

    Args:
        step: the aggregation step (:class:`PlaintextAggregation`, or the controller's HE step).
        job_name, key_metric, num_rounds: written into ``metrics``.
        min_clients: fewest valid updates a round needs; fewer stops the job.
    """

    def __init__(self, step: AggregationStep, job_name: str, key_metric: str, num_rounds: int, min_clients: int):
        if num_rounds < 1 or min_clients < 1:
            raise ValueError(f"num_rounds and min_clients must be >= 1, got {num_rounds}, {min_clients}")
        self.step = step
        self.key_metric = key_metric
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.next_round = 0
        self.metrics: dict = {
            "job_name": job_name,
            "key_metric": key_metric,
            "num_rounds": num_rounds,
            "aggregation": step.description,
            "sites": [],
            "rounds": [],
            "evaluations": [],
            "best": None,
            "finished": False,
        }

    # -- a round -------------------------------------------------------------------------
    def _admit(self, site: str, reply: SiteReply, global_model) -> tuple[Contribution, dict, list[str]]:
        if reply.kind != WEIGHT_DIFF:
            raise UpdateError(f"site {site}: sent {reply.kind}, expected {WEIGHT_DIFF}")
        meta = dict(reply.meta or {})
        num_samples = meta.get("num_samples")
        validate_sample_count(num_samples, site)
        metrics, notes = check_site_metrics(site, meta.get("metrics"))
        self.step.check_update(site, reply.update, num_samples, global_model, meta)  # last: HE accepts into its aggregator here
        return Contribution(site, reply.update, num_samples, meta), metrics, notes

    def run_round(self, round_num: int, global_model, replies: Mapping[str, SiteReply], errors: Mapping[str, str] | None = None) -> RoundOutcome:
        """Check the replies, record the round and its evaluation, aggregate. Raises :class:`RoundFailed`."""
        failed = dict(errors or {})
        contributions, train_metrics, val_metrics, notes = [], {}, {}, []
        for site in sorted(replies):
            reply = replies[site]
            attack = (reply.meta or {}).get(ATTACK_META_KEY)
            try:
                contribution, metrics, site_notes = self._admit(site, reply, global_model)
            except UpdateError as exc:
                failed[site] = str(exc) + (f" (simulated attack: {attack})" if attack else "")
                continue
            contributions.append(contribution)
            notes += site_notes
            train_metrics[site] = {"num_samples": contribution.num_samples,
                                   **{k: v for k, v in metrics.items() if not is_validation_metric(k)}}
            if attack:
                train_metrics[site][ATTACK_META_KEY] = attack
            val_metrics[site] = {k: v for k, v in metrics.items() if is_validation_metric(k)}
            if site not in self.metrics["sites"]:
                self.metrics["sites"].append(site)
        record = {"round": round_num, "contributors": sorted(train_metrics), "sites": train_metrics, "failed": failed,
                  "left_out": sorted(errors or {})}
        self.metrics["rounds"].append(record)
        self.update_participation()
        if len(contributions) < self.min_clients:
            raise self.fail(f"round {round_num}: only {len(contributions)} valid update(s), min_clients is {self.min_clients}. "
                            + "; ".join(f"{site}: {msg}" for site, msg in sorted(failed.items())))
        if len(contributions) < self.step.min_sites:
            raise self.fail(f"round {round_num}: only {len(contributions)} site(s) contributed "
                            f"({', '.join(sorted(train_metrics))}); refused: {self.step.min_sites_reason}"
                            + "".join(f"; {site}: {msg}" for site, msg in sorted(failed.items())))
        evaluation, improved = self.record_evaluation(round_num, val_metrics)
        accepted = True
        try:
            model, report = self.step.aggregate(global_model, contributions, round_num)
            if report:
                record["aggregation"] = report
        except RoundRejected as exc:
            model, accepted = global_model, False
            record["rejected"] = {"reason": str(exc), "sites": exc.sites}
        self.update_participation()
        self.next_round = round_num + 1
        return RoundOutcome(model, accepted, record, evaluation, improved, contributions, val_metrics, notes)

    def update_participation(self) -> dict:
        """Recompute ``metrics["participation"]`` from the rounds run (see :func:`participation`)."""
        seen = set(self.metrics["sites"])
        for record in self.metrics["rounds"]:
            seen.update(s for s in record.get("failed", {}) if not s.startswith("("))
        self.metrics["participation"] = participation(self.metrics["rounds"], sorted(seen))
        return self.metrics["participation"]

    def participation_line(self) -> str:
        """The sites flagged or left out in most rounds so far ("" when none)."""
        return participation_summary(self.metrics.get("participation") or self.update_participation(), len(self.metrics["rounds"]))

    # -- evaluations -----------------------------------------------------------------------
    def record_evaluation(self, version: int, site_metrics: Mapping[str, Mapping]) -> tuple[dict, bool]:
        """File the sites' (checked) validation of global model ``version``; True if it is the new best."""
        key = self.key_metric
        evaluation = {"model_version": version, "after_round": version - 1, "sites": dict(site_metrics),
                      f"mean_{key}": weighted_site_mean(site_metrics, key), f"median_{key}": site_median(site_metrics, key)}
        for other in ("val_accuracy", "val_loss"):
            if other != key:
                value = weighted_site_mean(site_metrics, other)
                if value is not None:
                    evaluation[f"mean_{other}"] = value
        self.metrics["evaluations"].append(evaluation)
        score, best = evaluation[f"median_{key}"], self.metrics["best"]
        if score is not None and (best is None or best.get(f"median_{key}") is None or score > best[f"median_{key}"]):
            self.metrics["best"] = {"model_version": version, f"median_{key}": score, f"mean_{key}": evaluation[f"mean_{key}"],
                                    "selected_by": f"median over sites of {key}"}
            return evaluation, True
        return evaluation, False

    def record_final_validation(self, site_metrics: Mapping[str, Mapping], errors: Mapping[str, str] | None = None) -> tuple[dict | None, bool, dict]:
        """Check and file the sites' validation of the final model (version ``num_rounds``).

        Returns (the evaluation or None when no site's metrics passed, whether it is the best, failed sites).
        """
        failed, checked = dict(errors or {}), {}
        for site, metrics in sorted(site_metrics.items()):
            try:
                checked[site], _ = check_site_metrics(site, metrics)
            except MetricError as exc:
                failed[site] = str(exc)
        if not checked:
            return None, False, failed
        evaluation, improved = self.record_evaluation(self.num_rounds, checked)
        if failed:
            evaluation["failed"] = failed
        return evaluation, improved, failed

    # -- end -------------------------------------------------------------------------------
    def fail(self, message: str) -> RoundFailed:
        """Record ``message`` as the job's error; return the exception to raise."""
        self.metrics["error"] = message
        return RoundFailed(message)

    def finish(self) -> None:
        self.metrics["finished"] = True

    @property
    def done(self) -> bool:
        return self.next_round >= self.num_rounds

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the global model: next round, metrics, the step's state (JSON types
        except numpy arrays a server optimizer may hold; see :func:`split_arrays`)."""
        return {"format": STATE_FORMAT, "next_round": self.next_round, "num_rounds": self.num_rounds,
                "metrics": copy.deepcopy(self.metrics), "step": self.step.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a round-engine state (format {STATE_FORMAT}): {str(state)[:80]}")
        if int(state["num_rounds"]) != self.num_rounds:
            raise ValueError(f"saved state is for {state['num_rounds']} rounds, this job has {self.num_rounds}")
        self.next_round = int(state["next_round"])
        self.metrics = copy.deepcopy(dict(state["metrics"]))
        self.metrics.pop("error", None)
        self.metrics["finished"] = False
        self.step.load_state_dict(state.get("step") or {})


def split_arrays(obj, arrays: dict | None = None, prefix: str = "a"):
    """(obj with every numpy array replaced by ``{"__array__": name}``, {name: array}) for JSON + npz."""
    arrays = {} if arrays is None else arrays
    if isinstance(obj, np.ndarray):
        name = f"{prefix}{len(arrays)}"
        arrays[name] = obj
        return {"__array__": name}, arrays
    if isinstance(obj, Mapping):
        return {str(k): split_arrays(v, arrays, prefix)[0] for k, v in obj.items()}, arrays
    if isinstance(obj, (list, tuple)):
        return [split_arrays(v, arrays, prefix)[0] for v in obj], arrays
    if isinstance(obj, np.generic):
        return obj.item(), arrays
    return obj, arrays


def join_arrays(obj, arrays: Mapping[str, np.ndarray]):
    """Inverse of :func:`split_arrays`."""
    if isinstance(obj, Mapping):
        if set(obj) == {"__array__"}:
            return np.asarray(arrays[obj["__array__"]])
        return {k: join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_arrays(v, arrays) for v in obj]
    return obj
