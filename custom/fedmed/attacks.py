"""Simulated attacks by a hostile hospital: what ``simulate --attack SITE:KIND=VALUE`` does to a reply.

Pure module (numpy only). Kinds:

- ``scale=F``: multiply the update (weight difference) by F; a negative F flips its sign;
- ``samples=N``: claim N training samples (the weight FedAvg gives the site);
- ``nan``: put NaN into the update (``nan`` or ``nan=1``);
- ``metric=V``: claim the value V for every reported validation metric of the key kind
  (AUC / accuracy / Dice: ``val_auc``, ``val_accuracy``, ``val_dice*``), which would choose the "best" model;
- ``delay=S``: a slow hospital: hold every training reply S seconds before sending it (the update
  itself is honest); the FLARE adapter sleeps :func:`reply_delay` seconds at the site.

:func:`parse_attack` reads the command-line form; :func:`apply_attack` returns the attacked
``(update, meta)``. The FLARE adapter (``fedmed.flare.attack_filter.SimulatedAttackFilter``) applies
it at the named simulated site only; production jobs never carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

ATTACK_KINDS = {
    "scale": "multiply the update by VALUE (negative flips its sign), e.g. site-2:scale=-10",
    "samples": "claim VALUE training samples, e.g. site-2:samples=1e9",
    "nan": "send NaN in the update, e.g. site-2:nan",
    "metric": "claim VALUE for the validation AUC/accuracy/Dice, e.g. site-2:metric=1e9",
    "delay": "hold each training reply VALUE seconds (a slow hospital), e.g. site-4:delay=60",
}
ATTACKED_METRIC_WORDS = ("auc", "accuracy", "dice")


class AttackSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Attack:
    site: str
    kind: str
    value: float

    @property
    def label(self) -> str:
        return self.kind if self.kind == "nan" else f"{self.kind}={self.value:g}"

    def to_dict(self) -> dict:
        return {"site": self.site, "kind": self.kind, "value": self.value}


def _usage() -> str:
    return "expected SITE:KIND=VALUE with KIND one of: " + "; ".join(f"{k} ({v})" for k, v in ATTACK_KINDS.items())


def parse_attack(text: str) -> Attack:
    """``"site-2:scale=-10"`` -> Attack("site-2", "scale", -10.0). Raises :class:`AttackSyntaxError`
    listing the kinds."""
    site, sep, rest = str(text).partition(":")
    if not sep or not site.strip() or not rest:
        raise AttackSyntaxError(f"--attack {text!r}: {_usage()}")
    kind, eq, raw = rest.partition("=")
    kind = kind.strip()
    if kind not in ATTACK_KINDS:
        raise AttackSyntaxError(f"--attack {text!r}: unknown kind {kind!r}; {_usage()}")
    if kind == "nan" and not eq:
        return Attack(site.strip(), kind, 1.0)
    try:
        value = float(raw)
    except ValueError:
        raise AttackSyntaxError(f"--attack {text!r}: VALUE {raw!r} is not a number; {_usage()}") from None
    if kind == "delay" and not (0 <= value <= 24 * 3600):
        raise AttackSyntaxError(f"--attack {text!r}: delay must be between 0 and 86400 seconds, got {raw}")
    return Attack(site.strip(), kind, value)


def reply_delay(attacks) -> float:
    """Seconds the site holds its training reply: the sum of its ``delay`` attacks."""
    return float(sum(a.value for a in attacks if a.kind == "delay"))


def apply_attack(attack: Attack, update: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict, dict]:
    """The attacked copy of ``(update, meta)``; ``meta["simulated_attack"]`` names the attack."""
    update, meta = dict(update), dict(meta)
    if attack.kind == "scale":
        update = {k: (np.asarray(v) * attack.value).astype(np.asarray(v).dtype) if np.issubdtype(np.asarray(v).dtype, np.floating)
                  else v for k, v in update.items()}
    elif attack.kind == "nan":
        floats = [k for k, v in update.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        if floats:
            poisoned = np.array(update[floats[0]], copy=True)
            poisoned.flat[0] = np.nan
            update[floats[0]] = poisoned
    elif attack.kind == "samples":
        claimed = int(attack.value) if float(attack.value).is_integer() and abs(attack.value) < 2**62 else float(attack.value)
        meta["num_samples"] = claimed
        if "NUM_STEPS_CURRENT_ROUND" in meta:
            meta["NUM_STEPS_CURRENT_ROUND"] = claimed
    elif attack.kind == "metric":
        metrics = dict(meta.get("metrics") or {})
        for key in metrics:
            if key.startswith("val_") and any(word in key for word in ATTACKED_METRIC_WORDS):
                metrics[key] = attack.value
        meta["metrics"] = metrics
    meta["simulated_attack"] = attack.label
    return update, meta
