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
METRIC_DECIMALS = 2  # validation metrics leave a dp site rounded to this many decimals
COUNT_ROUNDING = 10  # sample counts leave a dp site rounded to a multiple of this


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be used; the message names the file, the key and what to do."""


class PrivacyBudgetExceeded(RuntimeError):
    """Training one more round would take the site past its epsilon budget."""


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
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    ledger_file: str = "privacy_ledger.json"

    def __post_init__(self):
        check_dp_settings(self.epsilon, self.delta, self.max_grad_norm, self.accountant, self.ledger_file)

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
    """(sample_rate, steps per epoch) as Opacus' Poisson data loader uses them for this data size:
    ``steps = ceil(n / batch_size)`` and ``sample_rate = 1 / steps``."""
    if num_train < 1 or batch_size < 1:
        raise PrivacyConfigError(f"need a positive training-set size and batch size, got {num_train} and {batch_size}")
    steps = math.ceil(num_train / batch_size)
    return 1.0 / steps, steps


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
# what leaves a dp site besides the update
# --------------------------------------------------------------------------------------------
def round_count(count, multiple: int = COUNT_ROUNDING) -> int:
    """A count rounded to the nearest ``multiple`` (never below ``multiple``)."""
    return max(multiple, int(multiple * round(float(count) / multiple)))


def coarsen_metrics(metrics: Mapping, keep_extra: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """The metrics a dp site may send: validation numbers (``val_*``) rounded to 2 decimals,
    ``num_val_samples`` rounded to a multiple of 10, plus ``keep_extra`` keys (public numbers such as
    the learning rate and the ledger's epsilon). Everything else (training loss, timings, lists such
    as score histograms) is dropped. Returns ``(kept, dropped keys)``."""
    keep_extra = set(keep_extra)
    kept, dropped = {}, []
    for key, value in metrics.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "num_val_samples" and is_number:
            kept[key] = round_count(value)
        elif key.startswith("val_") and is_number:
            kept[key] = round(float(value), METRIC_DECIMALS) if math.isfinite(float(value)) else None
        elif key in keep_extra and is_number:
            kept[key] = value
        else:
            dropped.append(key)
    return kept, sorted(dropped)


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
                 path: str | os.PathLike | None = None):
        check_dp_settings(epsilon_budget, delta, 1.0, accountant)
        self.site = site
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
        }

    def record(self) -> dict:
        """The site's entry of ``privacy_ledger.json``: what anyone can recompute."""
        return {"accountant": self.accountant, "delta": self.delta, "epsilon": self.epsilon,
                "budget": self.epsilon_budget, "history": [dict(h) for h in self.history]}

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
    """For a ``privacy_ledger.json`` payload: {site: epsilon recomputed from its history}."""
    return {site: accountant_epsilon(entry["accountant"], entry["history"], entry["delta"])
            for site, entry in (ledger.get("sites") or {}).items()}


LEDGER_FILE = "privacy_ledger.json"  # the server's (and simulate's / rehearse's) record of every site's ledger
LEDGER_KEYS = ("accountant", "delta", "epsilon", "budget", "history")


def ledger_file_payload(site_privacy: Mapping[str, Mapping]) -> dict | None:
    """``privacy_ledger.json`` from the latest ``privacy`` meta each site sent (record-level DP-SGD
    only): ``{"unit": "record", "sites": {site: {accountant, delta, epsilon, budget, history}}}``.
    None when no site reported a record-level ledger."""
    sites = {
        site: {key: privacy[key] for key in LEDGER_KEYS}
        for site, privacy in sorted(site_privacy.items())
        if isinstance(privacy, Mapping) and privacy.get("unit") == LEDGER_UNIT and all(k in privacy for k in LEDGER_KEYS)
    }
    return {"unit": LEDGER_UNIT, "sites": sites} if sites else None
