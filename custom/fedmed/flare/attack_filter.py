"""FLARE adapter for simulated attacks (``simulate --attack SITE:KIND=VALUE``; math in :mod:`fedmed.attacks`).

:class:`SimulatedAttackFilter` is a task-result filter that ``simulate`` adds to the *simulated job
copy* only (:func:`fedmed.jobspec.with_attacks`); the project's job folders and the production executor
never carry it. It acts only when the FLARE identity of the site running it is the attacked site,
and only on training replies (``WEIGHT_DIFF``); it runs after every other result filter, so the
server receives exactly what the hostile site chose to send.
"""

from __future__ import annotations

import time

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedmed.attacks import ATTACK_KINDS, Attack, apply_attack, reply_delay
from fedmed.jobspec import ATTACK_FILTER_PATH as FILTER_PATH  # the spec names this class


class SimulatedAttackFilter(Filter):
    def __init__(self, attacks: list[dict] | None = None):
        """Args:
        attacks: ``[{"site": "site-2", "kind": "scale"|"samples"|"nan"|"metric"|"delay", "value": float}, ...]``
            (``delay``: the filter sleeps that many seconds before the reply leaves the site).
        """
        super().__init__()
        self.attacks: dict[str, list[Attack]] = {}
        for entry in attacks or []:
            if entry.get("kind") not in ATTACK_KINDS or not entry.get("site"):
                raise ValueError(f"SimulatedAttackFilter: bad attack {entry!r}; kinds: {', '.join(ATTACK_KINDS)}")
            attack = Attack(str(entry["site"]), entry["kind"], float(entry.get("value", 1.0)))
            self.attacks.setdefault(attack.site, []).append(attack)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        attacks = self.attacks.get(fl_ctx.get_identity_name())
        if not attacks or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return shareable
        update, meta = dxo.data, dict(dxo.meta)
        labels = []
        for attack in attacks:
            update, meta = apply_attack(attack, update, meta)
            labels.append(attack.label)
        meta["simulated_attack"] = ", ".join(labels)
        dxo.data = update
        dxo.meta.clear()
        dxo.meta.update(meta)
        self.log_warning(fl_ctx, f"simulated attack at {fl_ctx.get_identity_name()}: {meta['simulated_attack']}")
        delay = reply_delay(attacks)
        if delay > 0:  # a slow hospital: the reply really leaves this site late
            time.sleep(delay)
        return dxo.update_shareable(shareable)
