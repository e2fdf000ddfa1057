"""When a training round closes: neither waiting on one slow hospital every round nor dropping it for the whole job.

Pure module (no FLARE import); the controller (``fedmed.flare.controller``) polls
:meth:`DeadlinePolicy.should_close` while a round is open and reports each round's reply times to
:meth:`DeadlinePolicy.record_round`. The policy:

1. **Patience for the tolerance, grace after it.** A round closes when every site answered. Until
   ``target_sites`` answered (the sites the job's tolerance f needs, 2f + 1 for the median rules),
   it waits for every site not known to be slow (:meth:`DeadlinePolicy.known_slow`) up to
   ``patience_factor`` x the median reply time of the sites that answered: an honest site with more data (slower in proportion) is not
   left out, which would leave the round fewer sites than f needs. Once ``target_sites`` answered
   (and never before ``min_sites``, the job's ``min_clients``), a grace follows that adapts to the
   round: ``grace_factor`` x the answered sites' median reply time, kept within [``min_grace``,
   ``max_grace``] seconds (``max_grace`` is the job's ``wait_after_min_clients``). A round with one
   slow site costs the median site's pace times ``patience_factor`` at most, not a fixed wait.
2. **Catch-up rounds.** A site left out of ``catch_up_after`` rounds in a row makes the next round
   wait for it, for at most :meth:`catch_up_limit` seconds (2.5 x its last measured reply time;
   when it never answered, 2.5 x the longest it held a task unanswered, or 10 x the median site's
   when it never even took one; at least ``max_grace``; at most the round timeout). A site seen
   holding a task for k median replies (in the latest round's pace) gets its first catch-up only
   after k missed rounds, and a failed catch-up pushes the next one back by its cost as well, so
   waits for a site that takes tasks and never answers cost about as much wall time as the rounds
   between them. A slow site that answers then contributes to one round in ``catch_up_after + 1``,
   or fewer: its next catch-up comes after as many missed rounds as its catch-up took median reply
   times, so catch-up waits cost about as much wall time as the rounds between them (the job takes
   at most about twice as long as without the slow site);
   one that still misses it waits twice as many rounds for its next catch-up (2, 4, 8, ...), so a
   dead site costs at most ``log2(rounds)`` catch-up waits.
3. **Named every time.** The controller logs every left-out site each round; ``metrics.json``
   ``participation`` counts the rounds each site was left out of.

Wall-time bound per round: ``max(patience_factor x median reply, t_q + max_grace)`` where ``t_q`` is
the ``min_sites``-th fastest reply, plus, in catch-up rounds only, up to ``catch_up_limit`` seconds.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class DeadlinePolicy:
    """The per-round deadline (see the module docstring).

    Args:
        min_sites: answers a round needs before it may close early (the job's ``min_clients``, and
            what a stated tolerance ``f`` requires).
        target_sites: answers the job's tolerance ``f`` needs (default ``min_sites``); waited for with
            patience (sites not known to be slow).
        patience_factor: how long to wait for ``target_sites``, as a multiple of the median reply time.
        max_grace: most seconds to wait after ``min_sites`` answered (``wait_after_min_clients``).
        round_timeout: most seconds any round stays open.
        grace_factor: grace as a fraction of the median reply time of the sites that answered.
        min_grace: least grace in seconds (absorbs transport jitter).
        catch_up_after: rounds a site may miss in a row before a round waits for it.
    """

    def __init__(self, min_sites: int, max_grace: float = 30.0, round_timeout: float = 3600.0, grace_factor: float = 0.5,
                 min_grace: float = 2.0, catch_up_after: int = 2, target_sites: int | None = None, patience_factor: float = 4.0):
        if min_sites < 1 or catch_up_after < 1 or not 0 <= min_grace <= max(max_grace, min_grace) or grace_factor < 0:
            raise ValueError(f"DeadlinePolicy: bad settings min_sites={min_sites}, catch_up_after={catch_up_after}, "
                             f"min_grace={min_grace}, max_grace={max_grace}, grace_factor={grace_factor}")
        self.min_sites = int(min_sites)
        self.target_sites = max(int(target_sites or min_sites), self.min_sites)
        self.patience_factor = float(patience_factor)
        self.max_grace = float(max_grace)
        self.round_timeout = float(round_timeout)
        self.grace_factor = float(grace_factor)
        self.min_grace = min(float(min_grace), float(max_grace))
        self.catch_up_after = int(catch_up_after)
        self.missed: dict[str, int] = {}  # rounds missed in a row
        self.due: dict[str, int] = {}  # missed-in-a-row count at which the next catch-up comes
        self.reply_seconds: dict[str, float] = {}  # each site's last measured reply time (also late replies)
        self.unanswered_seconds: dict[str, float] = {}  # a lower bound: a site took the task and had not answered after this long
        self.median_seconds: float | None = None  # the median site's reply time in the last round

    # -- while a round is open -------------------------------------------------------------
    def waits_for(self, sites: Sequence[str]) -> list[str]:
        """The sites this round waits for (their catch-up is due)."""
        return sorted(s for s in sites if self.missed.get(s, 0) >= self.due.get(s, self.catch_up_after))

    def known_slow(self, site: str, patience: float) -> bool:
        """A site the patience does not wait for: it missed the last round and its last measured reply
        took longer than the patience, or it missed ``catch_up_after`` rounds in a row (then only
        catch-up rounds wait). A site that answered the last round is always waited for (round 1's
        replies include the sites' start-up)."""
        missed = self.missed.get(site, 0)
        slowest = max(self.reply_seconds.get(site, 0.0), self.unanswered_seconds.get(site, 0.0))
        return missed >= self.catch_up_after or (missed >= 1 and slowest > patience)

    def catch_up_limit(self, site: str) -> float:
        """Most seconds a catch-up round stays open for ``site``: 2.5 x its last measured reply time;
        for a site never measured, 2.5 x the longest it was seen holding a task unanswered (a wait
        shorter than that could not succeed; such catch-ups are spaced by their cost, see
        :meth:`record_round`); 10 x the median site's when nothing is known. At least ``max_grace``,
        at most the round timeout."""
        known = self.reply_seconds.get(site)
        if known:
            estimate = 2.5 * known
        elif site in self.unanswered_seconds:
            estimate = 2.5 * self.unanswered_seconds[site]
        else:
            estimate = 10.0 * (self.median_seconds or self.max_grace)
        return min(self.round_timeout, max(self.max_grace, estimate))

    def grace(self, answered: Mapping[str, float]) -> float:
        """Seconds to wait after the quorum: ``grace_factor`` x the answered sites' median reply time, clamped."""
        median = float(np.median(list(answered.values()))) if answered else 0.0
        return float(min(self.max_grace, max(self.min_grace, self.grace_factor * median)))

    def should_close(self, elapsed: float, answered: Mapping[str, float], expected: Sequence[str],
                     waiting_for: Sequence[str] = ()) -> bool:
        """Close the round now? ``answered``: {site: seconds from the round's start to its reply}."""
        if set(expected) <= set(answered) or elapsed >= self.round_timeout:
            return True
        if len(answered) < min(self.min_sites, len(expected)):
            return False
        quorum_at = sorted(answered.values())[min(self.min_sites, len(expected)) - 1]
        deadline = quorum_at + self.grace(answered)
        target = min(self.target_sites, len(expected))
        if len(answered) < target:  # the tolerance needs more: patience for the sites not known to be slow
            median = float(np.median(list(answered.values())))
            patience = min(self.round_timeout, self.patience_factor * median)
            if any(s not in answered and not self.known_slow(s, patience) for s in expected):
                deadline = max(deadline, patience)
        else:
            target_at = sorted(answered.values())[target - 1]
            deadline = max(quorum_at, target_at) + self.grace(answered)
        pending = [s for s in waiting_for if s not in answered]
        if pending:
            deadline = max(deadline, max(self.catch_up_limit(s) for s in pending))
        return elapsed >= deadline

    # -- after a round ---------------------------------------------------------------------
    def record_round(self, answered: Mapping[str, float], left_out: Sequence[str], waited_for: Sequence[str] = ()) -> list[str]:
        """File a closed round; returns notes naming the sites left out and when their catch-up comes."""
        notes = []
        if answered:
            self.median_seconds = float(np.median(list(answered.values())))
        for site, seconds in answered.items():
            self.reply_seconds[site] = float(seconds)
            self.missed[site] = 0
            self.due.pop(site, None)
            if site in waited_for and self.median_seconds:  # a catch-up answered: space the next one by its cost
                spacing = int(np.ceil(float(seconds) / max(self.median_seconds, self.min_grace)))
                if spacing > self.catch_up_after:
                    self.due[site] = spacing
        for site in sorted(left_out):
            self.missed[site] = self.missed.get(site, 0) + 1
            cost = self._rounds_of(self.unanswered_seconds.get(site) if site not in self.reply_seconds else None)
            if site in waited_for:  # a failed catch-up: back off, at least by what the next one will cost
                self.due[site] = max(2 * self.missed[site], self.missed[site] + cost)
            elif cost > self.catch_up_after:  # seen needing long: its catch-up spaced by its cost in the latest
                self.due[site] = max(self.due.get(site, 0), cost)  # round's pace (round 1's start-up inflates its median)
            due = self.due.get(site, self.catch_up_after)
            notes.append(f"{site} left out ({self.missed[site]} round(s) in a row); "
                         + (f"a round waits for it after {due} missed in a row" if self.missed[site] < due
                            else "the next round waits for it"))
        return notes

    def _rounds_of(self, seconds: float | None) -> int:
        """How many median replies ``seconds`` is (0 when unknown)."""
        if not seconds or not self.median_seconds:
            return 0
        return int(np.ceil(float(seconds) / max(self.median_seconds, self.min_grace)))

    def record_unanswered(self, site: str, seconds: float) -> None:
        """A site took the round's task and had not answered when the round closed ``seconds`` after
        it started: it needs at least that long (FLARE's simulator drops a late reply unseen, so
        this may be all that is ever measured of a slow site)."""
        self.unanswered_seconds[site] = max(float(seconds), self.unanswered_seconds.get(site, 0.0))

    def record_late(self, site: str, seconds: float) -> None:
        """A reply that came after its round closed: remember how long the site takes."""
        self.reply_seconds[site] = max(float(seconds), self.reply_seconds.get(site, 0.0))

    def state_dict(self) -> dict:
        return {"missed": dict(self.missed), "due": dict(self.due), "reply_seconds": dict(self.reply_seconds),
                "unanswered_seconds": dict(self.unanswered_seconds), "median_seconds": self.median_seconds}

    def load_state_dict(self, state: Mapping) -> None:
        state = state or {}
        self.missed = {k: int(v) for k, v in (state.get("missed") or {}).items()}
        self.due = {k: int(v) for k, v in (state.get("due") or {}).items()}
        self.reply_seconds = {k: float(v) for k, v in (state.get("reply_seconds") or {}).items()}
        self.unanswered_seconds = {k: float(v) for k, v in (state.get("unanswered_seconds") or {}).items()}
        self.median_seconds = state.get("median_seconds")
