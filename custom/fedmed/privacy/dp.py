"""Record-level differential privacy at a site: DP-SGD settings, the noise multiplier, the ledger.

Pure module (torch + opacus); never imports ``nvflare``.

What is protected
-----------------
Each site trains with DP-SGD (Opacus): every training step Poisson-samples the site's records
with rate q, clips each record's gradient to L2 norm C (``max_grad_norm``) and adds Gaussian
noise N(0, (z*C)^2) to the sum. The guarantee is *record-level* (add/remove one training record
of this site): whatever leaves the site afterwards (the weight difference, every round) is
post-processing of these noised steps. The :class:`PrivacyLedger` charges every step to an
Opacus accountant (RDP or PRV) as a history of ``(noise_multiplier, sample_rate, steps)``; feeding
that history to the same accountant gives the ledger's epsilon at its delta.

The noise multiplier z is derived *before* training from the site's budget (epsilon, delta), its
training-set size, the batch size (sample rate), local epochs and the rounds still to come, with
Opacus' ``get_noise_multiplier`` (or the same bisection over the accountant when the ledger
already holds steps from earlier jobs), so the budget is met at the end of the job.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from fedmed.atomic import write_json

ACCOUNTANTS = ("rdp", "prv")
LEDGER_FORMAT = "fedmed-privacy-ledger/2"
LEDGER_UNIT = "record"
PRIVACY_FILE_HINT = "the site's local/privacy.json, dp scope, DPTrainingPolicy args"
MAX_NOISE_MULTIPLIER = 1e4  # beyond this the budget is too small for the planned training


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be used; the message names the file, the key and what to do."""


class PrivacyBudgetExceeded(RuntimeError):
    """Training one more round would take the site past its epsilon budget."""


class ValidationBudgetSpent(RuntimeError):
    """One more validation query would take the site's validation account past its budget."""


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPSettings:
    """A site's DP-SGD policy (the ``dp`` scope's ``DPTrainingPolicy`` args in ``local/privacy.json``).

    epsilon: the site's total budget (across every job sharing the ledger file).
    delta: the delta at which epsilon is accounted; must be below 1 / (training-set size).
    max_grad_norm: C, each record's gradient is clipped to this L2 norm.
    accountant: ``rdp`` (default) or ``prv`` (Opacus).
    ledger_file: the site's ledger; relative paths are relative to the site's workspace root.
    validation_epsilon: the site's total budget for validation queries (its validation records,
        disjoint from training: a separate account, pure epsilon-DP, delta 0).
    validation_queries: the most validation queries the budget pays for; each spends
        ``validation_epsilon / validation_queries``.
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    ledger_file: str = "privacy_ledger.json"
    validation_epsilon: float = 12.0
    validation_queries: int = 12

    def __post_init__(self):
        check_dp_settings(self.epsilon, self.delta, self.max_grad_norm, self.accountant, self.ledger_file)
        check_validation_settings(self.validation_epsilon, self.validation_queries)

    @property
    def query_epsilon(self) -> float:
        """The epsilon each validation query spends: the validation budget over the query cap."""
        return float(self.validation_epsilon) / int(self.validation_queries)

    def to_json(self) -> dict:
        return asdict(self)


def check_dp_settings(epsilon, delta, max_grad_norm=1.0, accountant="rdp", ledger_file="privacy_ledger.json",
                      where: str = PRIVACY_FILE_HINT) -> None:
    """Raise :class:`PrivacyConfigError` naming the first bad DP setting and where it is set."""
    for key, value in (("epsilon", epsilon), ("delta", delta), ("max_grad_norm", max_grad_norm)):
        if not _is_positive_number(value):
            raise PrivacyConfigError(f"DP setting '{key}' ({where}) must be a positive number, got {value!r}")
    if delta >= 1:
        raise PrivacyConfigError(f"DP setting 'delta' ({where}) must be below 1 (typically 1e-5), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"DP setting 'accountant' ({where}) must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not isinstance(ledger_file, str) or not ledger_file.strip():
        raise PrivacyConfigError(f"DP setting 'ledger_file' ({where}) must name the site's privacy ledger file, got {ledger_file!r}")


def check_validation_settings(validation_epsilon, validation_queries, where: str = PRIVACY_FILE_HINT) -> None:
    if not _is_positive_number(validation_epsilon):
        raise PrivacyConfigError(f"DP setting 'validation_epsilon' ({where}) must be a positive number, got {validation_epsilon!r}")
    if isinstance(validation_queries, bool) or not isinstance(validation_queries, int) or validation_queries < 1:
        raise PrivacyConfigError(f"DP setting 'validation_queries' ({where}) must be an integer >= 1, got {validation_queries!r}")


def check_delta_for_dataset(delta: float, num_train: int, where: str = PRIVACY_FILE_HINT) -> None:
    """delta must be below 1/n: a larger delta allows leaking a whole record with that probability."""
    if num_train < 1:
        raise PrivacyConfigError("the site has no training records to train on with DP-SGD")
    if delta >= 1.0 / num_train:
        raise PrivacyConfigError(
            f"DP setting 'delta' ({where}) is {delta:g}, not below 1/(training-set size {num_train}) = {1.0 / num_train:.3g}; "
            f"set 'delta' below {1.0 / num_train:.3g} (1e-5 is usual)"
        )


# --------------------------------------------------------------------------------------------
# sampling, noise and accounting (Opacus)
# --------------------------------------------------------------------------------------------
def poisson_sampling(num_train: int, batch_size: int) -> tuple[float, int]:
    """(sample_rate, steps per epoch) exactly as Opacus' Poisson data loader runs them for this data
    size: ``DPDataLoader.from_data_loader`` sets ``sample_rate = 1 / ceil(n / batch_size)`` and its
    sampler runs ``int(1 / sample_rate)`` steps, which floating point makes one fewer than
    ``ceil(n / batch_size)`` for some sizes (k = 93, 99, 105, ... batches: where ``1 / (1 / k) < k``). Planning and charging both use these two numbers."""
    if num_train < 1 or batch_size < 1:
        raise PrivacyConfigError(f"need a positive training-set size and batch size, got {num_train} and {batch_size}")
    sample_rate = 1 / math.ceil(num_train / batch_size)
    return sample_rate, int(1 / sample_rate)


def _history_tuples(history: Iterable) -> list[tuple[float, float, int]]:
    out = []
    for step in history:
        if isinstance(step, Mapping):
            out.append((float(step["noise_multiplier"]), float(step["sample_rate"]), int(step["steps"])))
        else:
            z, q, n = step
            out.append((float(z), float(q), int(n)))
    return out


def compact_history(history: Iterable) -> list[dict]:
    """Merge entries with the same (noise_multiplier, sample_rate): composition does not depend on
    order, so the accountant gives the same epsilon. Returns ``[{noise_multiplier, sample_rate, steps}]``."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in _history_tuples(history):
        merged[(z, q)] = merged.get((z, q), 0) + n
    return [{"noise_multiplier": z, "sample_rate": q, "steps": n} for (z, q), n in merged.items() if n > 0]


def make_accountant(name: str, history: Iterable = ()):
    """An Opacus accountant (``rdp`` or ``prv``) replaying ``history``."""
    from opacus.accountants import create_accountant  # heavy import (torch), only when accounting

    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    accountant = create_accountant(mechanism=name)
    accountant.history = _history_tuples(history)
    return accountant


def accountant_epsilon(name: str, history: Iterable, delta: float) -> float:
    """Cumulative epsilon at ``delta`` the named Opacus accountant gives for ``history``."""
    history = _history_tuples(history)
    if not history:
        return 0.0
    with warnings.catch_warnings():  # RDP warns when the best order is its largest: harmless for large noise
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(make_accountant(name, history).get_epsilon(delta=delta))


def noise_multiplier_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                                prior_history: Sequence = (), tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (within ``tolerance`` in epsilon) such that ``prior_history``
    plus ``steps`` steps at ``sample_rate`` stays within ``epsilon`` at ``delta``.

    A fresh ledger uses Opacus' own ``get_noise_multiplier``; a ledger with earlier steps uses the
    same doubling-then-bisection search over the accountant with those steps prepended. Raises
    :class:`PrivacyBudgetExceeded` when no noise level fits (the budget is already spent).
    """
    if steps < 1:
        raise PrivacyConfigError(f"planned steps must be >= 1, got {steps}")
    prior = _history_tuples(prior_history)
    spent = accountant_epsilon(accountant, prior, delta)
    if spent >= epsilon:
        raise PrivacyBudgetExceeded(f"epsilon {spent:.4g} already spent of the budget {epsilon:g}")
    if not prior:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                                  steps=int(steps), accountant=accountant, epsilon_tolerance=tolerance))
        except ValueError as exc:  # "The privacy budget is too low."
            raise PrivacyBudgetExceeded(f"no noise multiplier up to 1e6 meets epsilon {epsilon:g} for {steps} steps ({exc})") from exc

    def eps_at(sigma: float) -> float:
        return accountant_epsilon(accountant, prior + [(sigma, sample_rate, int(steps))], delta)

    low, high, eps_high = 0.0, 10.0, eps_at(10.0)
    while eps_high > epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetExceeded(
                f"the remaining budget ({epsilon:g} total, {spent:.4g} spent) is too small for {steps} more steps"
            )
        eps_high = eps_at(high)
    while epsilon - eps_high > tolerance and high - low > 1e-6:
        mid = (low + high) / 2
        eps_mid = eps_at(mid)
        if eps_mid < epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return float(high)


# --------------------------------------------------------------------------------------------
# what leaves a dp site besides the update: validation as noised histograms, public numbers
# --------------------------------------------------------------------------------------------
VALIDATION_MECHANISM = "discrete-laplace-histogram"  # two-sided geometric noise on integer bin counts
DP_EPSILON_METRIC = "val_dp_epsilon"  # the epsilon one noised validation histogram spent (public)
DP_PUBLIC_METRICS = ("learning_rate", "privacy_epsilon")  # public numbers a dp update may carry


def discrete_laplace(epsilon: float, size: int, rng) -> list[int]:
    """``size`` draws of the two-sided geometric (discrete Laplace) distribution with
    P(k) proportional to exp(-epsilon |k|): added to counts of L1 sensitivity 1 it gives pure
    epsilon-DP (Ghosh, Roughgarden, Sundararajan 2009). Integer noise on integer counts has no
    floating-point least-significant bits to leak (unlike a float Laplace sample, Mironov 2012)."""
    if not _is_positive_number(epsilon):
        raise PrivacyConfigError(f"validation query epsilon must be a positive number, got {epsilon!r}")
    p = 1.0 - math.exp(-float(epsilon))
    return [int(a) - int(b) for a, b in zip(rng.geometric(p, size), rng.geometric(p, size))]


def noised_histogram(histogram: Sequence[Sequence[int]], epsilon: float, rng) -> list[list[int]]:
    """A validation score histogram released under ``epsilon``-DP for the site's validation records.

    Adding or removing one validation record changes one count of one class by 1 (L1 sensitivity
    1), so discrete Laplace noise of scale 1/epsilon on every count is pure epsilon-DP; clamping
    at 0 is post-processing. Everything the server derives from it (AUC, accuracy, the decision
    threshold, the validation-set size) is post-processing too."""
    exact = [[int(c) for c in row] for row in histogram]
    bins = len(exact[0])
    flat = [c for row in exact for c in row]
    noise = discrete_laplace(epsilon, len(flat), rng)
    noised = [max(0, c + e) for c, e in zip(flat, noise)]
    return [noised[i * bins:(i + 1) * bins] for i in range(len(exact))]


def validation_rng():
    """Noise for validation releases from the OS entropy pool (never seeded from job settings)."""
    import secrets

    import numpy as np

    return np.random.default_rng(secrets.randbits(128))


def dp_release_metrics(metrics: Mapping, keep_extra: Iterable[str] = DP_PUBLIC_METRICS) -> tuple[dict, list[str]]:
    """The metrics a dp site may send: the DP-noised validation histogram with the epsilon it spent
    (only together), plus ``keep_extra`` public numbers (the learning rate, the ledger's epsilon).
    Everything else (exact AUC / accuracy / loss, counts, training loss, timings) is dropped.
    Returns ``(kept, dropped keys)``."""
    from fedmed.threshold import DP_HISTOGRAM_KEY

    keep_extra = set(keep_extra)
    kept, dropped = {}, []
    noised = _is_positive_number(metrics.get(DP_EPSILON_METRIC)) and DP_HISTOGRAM_KEY in metrics
    for key, value in metrics.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if noised and key in (DP_HISTOGRAM_KEY, DP_EPSILON_METRIC):
            kept[key] = value
        elif key in keep_extra and is_number:
            kept[key] = value
        else:
            dropped.append(key)
    return kept, sorted(dropped)


def public_train_size(num_train: int, batch_size: int) -> int:
    """The training-set size a dp site publishes: ceil(n / batch size) x batch size. The DP-SGD
    sampling rate 1 / ceil(n / batch size) already makes ceil(n / batch size) public; nothing finer
    is sent (it is the update's FedAvg weight, the same number every round)."""
    return math.ceil(num_train / batch_size) * batch_size


# --------------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------------
def _now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PrivacyLedger:
    """A site's cumulative record-level privacy loss.

    ``history`` is the accountant's history: ``{noise_multiplier, sample_rate, steps}`` per charge
    (one per trained round). ``entries`` say which job and round each charge came from and the
    epsilon after it. With ``path`` the ledger is persisted atomically after every charge, so a
    restarted site and later jobs continue it; a file kept with another accountant, delta or unit
    is refused rather than mixed.
    """

    def __init__(self, site: str, delta: float, epsilon_budget: float, accountant: str = "rdp",
                 path: str | os.PathLike | None = None, validation_budget: float | None = None):
        check_dp_settings(epsilon_budget, delta, 1.0, accountant)
        self.site = site
        self.validation_budget = None if validation_budget is None else float(validation_budget)
        self.validation_queries: list[dict] = []  # [{"epsilon": per query, "count": queries}]
        self.validation_entries: list[dict] = []  # kept at the site: which job asked what
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self.accountant = accountant
        self.path = Path(path) if path else None
        self.history: list[dict] = []
        self.entries: list[dict] = []
        if self.path is not None and self.path.exists():
            self._load()

    # -- persistence -----------------------------------------------------------------------
    def _load(self) -> None:
        try:
            payload = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise PrivacyConfigError(
                f"privacy ledger {self.path} of site {self.site} cannot be read ({exc}); restore it from backup — "
                "deleting it would forget privacy already spent"
            ) from exc
        if payload.get("format") != LEDGER_FORMAT or payload.get("unit") != LEDGER_UNIT:
            raise PrivacyConfigError(
                f"privacy ledger {self.path} of site {self.site} has format {payload.get('format')!r} / unit "
                f"{payload.get('unit')!r}, expected {LEDGER_FORMAT} / {LEDGER_UNIT!r} (record-level DP-SGD); keep it, and "
                "name a new 'ledger_file' in the dp scope for record-level accounting"
            )
        for key, mine in (("accountant", self.accountant), ("delta", self.delta)):
            if payload.get(key) != mine:
                raise PrivacyConfigError(
                    f"privacy ledger {self.path} of site {self.site} was kept with {key}={payload.get(key)!r} but the "
                    f"dp scope now says {key}={mine!r}; keep the setting, or start a new ledger_file on purpose"
                )
        self.history = compact_history(payload.get("history", []))
        self.entries = list(payload.get("entries", []))
        validation = payload.get("validation") or {}
        self.validation_queries = compact_queries(validation.get("queries", []))
        self.validation_entries = list(validation.get("entries", []))

    def to_json(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "unit": LEDGER_UNIT,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "budget": self.epsilon_budget,
            "history": self.history,
            "entries": self.entries,
            "validation": {**self.validation_record(), "entries": self.validation_entries},
        }

    def record(self) -> dict:
        """The site's entry of ``privacy_ledger.json``: what anyone can recompute (the training
        account, and the validation account under ``validation``)."""
        return {"accountant": self.accountant, "delta": self.delta, "epsilon": self.epsilon,
                "budget": self.epsilon_budget, "history": [dict(h) for h in self.history],
                "validation": self.validation_record()}

    def validation_record(self) -> dict:
        """The validation account: pure epsilon-DP queries (delta 0) composed by summing."""
        return {"epsilon": validation_epsilon(self.validation_queries), "delta": 0.0, "mechanism": VALIDATION_MECHANISM,
                "sensitivity": 1, "budget": self.validation_budget,
                "queries": [dict(q) for q in self.validation_queries]}

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.to_json())

    # -- accounting ------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return accountant_epsilon(self.accountant, self.history, self.delta)

    @property
    def steps(self) -> int:
        return sum(int(h["steps"]) for h in self.history)

    def epsilon_after(self, extra: Iterable) -> float:
        return accountant_epsilon(self.accountant, list(_history_tuples(self.history)) + _history_tuples(extra), self.delta)

    def check_affordable(self, planned: Iterable, what: str) -> float:
        """Raise :class:`PrivacyBudgetExceeded` (naming the site, the numbers and the ledger) when
        ``planned`` steps would take the site past its budget; else return the epsilon after them."""
        after = self.epsilon_after(planned)
        if after > self.epsilon_budget:
            raise PrivacyBudgetExceeded(
                f"site {self.site}: {what} would raise epsilon from {self.epsilon:.4g} to {after:.4g} (delta {self.delta:g}, "
                f"{self.accountant} accountant, record level), above the site's budget {self.epsilon_budget:g}"
                f"{' (ledger ' + str(self.path) + ')' if self.path else ''}; this site stops contributing under the dp scope"
            )
        return after

    def charge(self, job_id: str, round_num: int, steps: Iterable) -> dict:
        """Add the steps a round trained (Opacus' history for it) and persist. Returns the entry."""
        steps = compact_history(steps)
        self.history = compact_history(self.history + steps)
        entry = {"job_id": str(job_id), "round": int(round_num), "steps": steps, "epsilon": self.epsilon,
                 "timestamp_utc": _now_utc()}
        self.entries.append(entry)
        self.save()
        return entry


    # -- the validation account -------------------------------------------------------------
    def charge_validation(self, job_id: str, what: str, epsilon: float) -> dict:
        """Charge one validation query of ``epsilon`` and persist; raise
        :class:`ValidationBudgetSpent` (nothing charged) when it would pass the validation budget."""
        if self.validation_budget is None:
            raise PrivacyConfigError(f"site {self.site}: the ledger has no validation budget; set 'validation_epsilon'")
        spent = validation_epsilon(self.validation_queries)
        if spent + float(epsilon) > self.validation_budget * (1 + 1e-9):
            raise ValidationBudgetSpent(
                f"site {self.site}: validation budget spent (epsilon {spent:.4g} of {self.validation_budget:g}); "
                "no more validation queries are answered under the dp scope"
            )
        self.validation_queries = compact_queries(self.validation_queries + [{"epsilon": float(epsilon), "count": 1}])
        entry = {"job_id": str(job_id), "query": str(what), "epsilon": float(epsilon), "timestamp_utc": _now_utc()}
        self.validation_entries.append(entry)
        self.save()
        return entry


def compact_queries(queries: Iterable[Mapping]) -> list[dict]:
    """Merge validation queries of the same epsilon: ``[{"epsilon", "count"}]``."""
    merged: dict[float, int] = {}
    for query in queries:
        merged[float(query["epsilon"])] = merged.get(float(query["epsilon"]), 0) + int(query.get("count", 1))
    return [{"epsilon": e, "count": n} for e, n in merged.items() if n > 0]


def validation_epsilon(queries: Iterable[Mapping]) -> float:
    """The validation account's epsilon from its queries: basic composition of pure epsilon-DP
    releases (the sum). This is the function that recomputes ``validation.epsilon``."""
    return float(math.fsum(float(q["epsilon"]) * int(q.get("count", 1)) for q in queries))


class LedgerLock:
    """An exclusive lock beside a ledger file, so two jobs at one site cannot interleave charges."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(str(path) + ".lock") if path else None
        self._handle = None

    def __enter__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "w")
            fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        return False


def recompute_ledger_file(ledger: Mapping) -> dict[str, float]:
    """For a ``privacy_ledger.json`` payload: {site: training epsilon recomputed from its history}."""
    return {site: accountant_epsilon(entry["accountant"], entry["history"], entry["delta"])
            for site, entry in (ledger.get("sites") or {}).items()}


def recompute_validation_accounts(ledger: Mapping) -> dict[str, float]:
    """For a ``privacy_ledger.json`` payload: {site: validation epsilon recomputed from its queries}."""
    return {site: validation_epsilon((entry.get("validation") or {}).get("queries", []))
            for site, entry in (ledger.get("sites") or {}).items()}


LEDGER_FILE = "privacy_ledger.json"  # the server's (and simulate's / rehearse's) record of every site's ledger
LEDGER_KEYS = ("accountant", "delta", "epsilon", "budget", "history")


def ledger_file_payload(site_privacy: Mapping[str, Mapping]) -> dict | None:
    """``privacy_ledger.json`` from the latest ``privacy`` meta each site sent (record-level DP-SGD
    only): ``{"unit": "record", "sites": {site: {accountant, delta, epsilon, budget, history,
    validation}}}``.
    None when no site reported a record-level ledger."""
    sites = {
        site: {key: privacy[key] for key in LEDGER_KEYS + ("validation",) if key in privacy}
        for site, privacy in sorted(site_privacy.items())
        if isinstance(privacy, Mapping) and privacy.get("unit") == LEDGER_UNIT and all(k in privacy for k in LEDGER_KEYS)
    }
    return {"unit": LEDGER_UNIT, "sites": sites} if sites else None
