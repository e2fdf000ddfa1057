"""Differential privacy for a site's model update: clip to norm C, add Gaussian noise, keep a ledger.

Pure module (numpy + opacus); never imports ``nvflare``.

What is protected
-----------------
Each round a site releases ``clip(update, C) + N(0, (z * C)^2 I)``: the Gaussian mechanism with L2
sensitivity C applied to the site's whole contribution (site-level DP, add/remove adjacency: the
released update is compared with the site not contributing). Every round the site takes part
(sampling rate 1), so the privacy loss composes over rounds; the :class:`PrivacyLedger` asks a
maintained accountant (Opacus' RDP, PRV or GDP accountant) for the cumulative (epsilon, delta)
after every round. A change to a single patient's record is covered by the same bound, because it
changes the site's data; replacing the site's data by a different dataset moves the clipped update
by up to 2C (double the sensitivity).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np

from fedmed.atomic import write_json

ACCOUNTANTS = ("rdp", "prv", "gdp")
LEDGER_FORMAT = "fedmed-privacy-ledger/1"


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be used; the message names the setting and what to do."""


class PrivacyBudgetExceeded(RuntimeError):
    """Releasing one more update would take the site past its epsilon budget."""


# --------------------------------------------------------------------------------------------
# mechanism
# --------------------------------------------------------------------------------------------
def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every floating-point tensor of an update."""
    total = 0.0
    for value in update.values():
        value = np.asarray(value)
        if _is_float(value):
            total += float(np.sum(np.square(value, dtype=np.float64)))
    return math.sqrt(total)


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so its global L2 norm is at most ``clip_norm``.

    Returns ``(clipped, norm_before)``. Integer tensors (counters such as ``num_batches_tracked``)
    are not part of the released update under DP and must be removed by the caller
    (:func:`split_integer_tensors`); finding one here raises.
    """
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise PrivacyConfigError(f"clip_norm must be a positive number, got {clip_norm!r}")
    for key, value in update.items():
        if not _is_float(np.asarray(value)):
            raise PrivacyConfigError(f"clip_update got integer tensor '{key}'; remove integer tensors first")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"update tensor '{key}' holds NaN or infinite values; refusing to release it")
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {key: (np.asarray(value, dtype=np.float64) * scale).astype(np.asarray(value).dtype) for key, value in update.items()}
    return clipped, norm


def add_gaussian_noise(
    update: Mapping[str, np.ndarray], noise_std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Add independent N(0, noise_std^2) to every coordinate (dtype kept)."""
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise PrivacyConfigError(f"noise standard deviation must be a non-negative number, got {noise_std!r}")
    noised = {}
    for key, value in update.items():
        value = np.asarray(value)
        noise = rng.normal(0.0, noise_std, size=value.shape)
        noised[key] = (value.astype(np.float64) + noise).astype(value.dtype)
    return noised


def split_integer_tensors(update: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(floating-point tensors, names of the integer tensors that were left out)."""
    kept, dropped = {}, []
    for key, value in update.items():
        if _is_float(np.asarray(value)):
            kept[key] = value
        else:
            dropped.append(key)
    return kept, sorted(dropped)


def privatize_update(
    update: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict]:
    """Clip to ``clip_norm`` and add N(0, (noise_multiplier * clip_norm)^2) per coordinate.

    Returns ``(released, info)``; ``info`` has ``norm_before_clipping``, ``clipped`` (bool),
    ``noise_std`` and ``dropped_integer_tensors``.
    """
    check_dp_settings(clip_norm, noise_multiplier)
    floats, dropped = split_integer_tensors(update)
    if not floats:
        raise ValueError("the update holds no floating-point tensors to release")
    clipped, norm = clip_update(floats, clip_norm)
    noise_std = noise_multiplier * clip_norm
    released = add_gaussian_noise(clipped, noise_std, rng)
    return released, {
        "norm_before_clipping": norm,
        "clipped": bool(norm > clip_norm),
        "noise_std": noise_std,
        "dropped_integer_tensors": dropped,
    }


def check_dp_settings(clip_norm, noise_multiplier, delta=None, epsilon_budget=None, accountant=None) -> None:
    """Raise :class:`PrivacyConfigError` naming the first bad DP setting."""

    def positive(name, value, allow_zero=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise PrivacyConfigError(f"DP setting '{name}' must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")

    positive("clip_norm", clip_norm)
    positive("noise_multiplier", noise_multiplier)
    if delta is not None:
        positive("delta", delta)
        if delta >= 1:
            raise PrivacyConfigError(f"DP setting 'delta' must be below 1 (typically 1e-5), got {delta!r}")
    if epsilon_budget is not None:
        positive("epsilon_budget", epsilon_budget)
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"DP setting 'accountant' must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


# --------------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------------
def make_accountant(name: str, history: list | None = None):
    """An Opacus accountant (``rdp``, ``prv`` or ``gdp``) replaying ``history``
    (a list of ``(noise_multiplier, sample_rate, num_steps)``)."""
    from opacus.accountants import create_accountant  # heavy import (torch), only when accounting

    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    accountant = create_accountant(mechanism=name)
    accountant.history = [tuple(step) for step in (history or [])]
    return accountant


def accountant_epsilon(name: str, history: list, delta: float) -> float:
    """Cumulative epsilon at ``delta`` the named Opacus accountant gives for ``history``."""
    if not history:
        return 0.0
    return float(make_accountant(name, history).get_epsilon(delta=delta))


def _now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LedgerEntry:
    job_id: str
    round: int
    noise_multiplier: float
    clip_norm: float
    epsilon: float
    delta: float
    timestamp_utc: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class PrivacyLedger:
    """A site's cumulative privacy loss, one entry per released update.

    The ledger holds the accountant's history (one Gaussian-mechanism step per released round,
    sampling rate 1) and, after every release, the cumulative epsilon at ``delta`` computed by
    the accountant. With ``path`` it is persisted (write to a temp file, then rename) so the loss
    accumulates across jobs that train on the same site data; a ledger file written with another
    accountant or delta is refused rather than mixed.
    """

    def __init__(self, site: str, delta: float, epsilon_budget: float, accountant: str = "rdp", path: str | os.PathLike | None = None):
        check_dp_settings(1.0, 1.0, delta=delta, epsilon_budget=epsilon_budget, accountant=accountant)
        self.site = site
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self.accountant = accountant
        self.path = Path(path) if path else None
        self.history: list[tuple[float, float, int]] = []
        self.entries: list[LedgerEntry] = []
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
        if payload.get("format") != LEDGER_FORMAT:
            raise PrivacyConfigError(f"privacy ledger {self.path}: unknown format {payload.get('format')!r}, expected {LEDGER_FORMAT}")
        for key, mine in (("accountant", self.accountant), ("delta", self.delta)):
            if payload.get(key) != mine:
                raise PrivacyConfigError(
                    f"privacy ledger {self.path} of site {self.site} was kept with {key}={payload.get(key)!r} but the "
                    f"dp scope now says {key}={mine!r}; keep the setting, or start a new ledger_file on purpose"
                )
        self.history = [tuple(step) for step in payload.get("history", [])]
        self.entries = [LedgerEntry(**entry) for entry in payload.get("entries", [])]

    def to_json(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "epsilon": self.epsilon,
            "history": [list(step) for step in self.history],
            "entries": [entry.to_json() for entry in self.entries],
        }

    def save(self) -> None:
        if self.path is None:
            return
        write_json(self.path, self.to_json())

    # -- accounting ------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    @property
    def rounds(self) -> int:
        return len(self.entries)

    def _history_plus(self, noise_multiplier: float) -> list:
        history = [list(step) for step in self.history]
        if history and history[-1][0] == noise_multiplier and history[-1][1] == 1.0:
            history[-1][2] += 1
        else:
            history.append([noise_multiplier, 1.0, 1])
        return [tuple(step) for step in history]

    def epsilon_if_released(self, noise_multiplier: float) -> float:
        """The cumulative epsilon after one more release with ``noise_multiplier``."""
        return accountant_epsilon(self.accountant, self._history_plus(noise_multiplier), self.delta)

    def record_release(self, job_id: str, round_num: int, noise_multiplier: float, clip_norm: float) -> LedgerEntry:
        """Account one released update; raise :class:`PrivacyBudgetExceeded` (recording nothing)
        if it would take the site past its budget."""
        check_dp_settings(clip_norm, noise_multiplier)
        history = self._history_plus(noise_multiplier)
        epsilon = accountant_epsilon(self.accountant, history, self.delta)
        if epsilon > self.epsilon_budget:
            raise PrivacyBudgetExceeded(
                f"site {self.site}: releasing the update of round {round_num} would raise epsilon from "
                f"{self.epsilon:.4g} to {epsilon:.4g} (delta {self.delta:g}, {self.accountant} accountant), above the "
                f"site's budget {self.epsilon_budget:g}; this site stops contributing updates under the dp scope"
            )
        entry = LedgerEntry(
            job_id=str(job_id), round=int(round_num), noise_multiplier=float(noise_multiplier), clip_norm=float(clip_norm),
            epsilon=epsilon, delta=self.delta, timestamp_utc=_now_utc(),
        )
        self.history = history
        self.entries.append(entry)
        self.save()
        return entry


class LedgerLock:
    """An exclusive lock beside a ledger file, so two jobs at one site cannot interleave releases."""

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
