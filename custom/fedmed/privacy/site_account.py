"""A dp site's two privacy accounts, as the executor uses them: pure (torch + opacus), no ``nvflare``.

:class:`DPSiteAccount` owns everything record-level DP that happens at one site during a job:

- **training** (DP-SGD): the noise multiplier planned once per job from the budget left in the
  ledger, the sampling the loader really runs (:func:`fedmed.privacy.dp.poisson_sampling`), the
  check that a round is affordable, the round itself and its charge, all under the ledger's lock;
- **validation** (a separate account: validation records are disjoint from training records, so
  the two compose in parallel): every query of a model on the site's validation data is answered
  only as a discrete-Laplace-noised per-class score histogram, charged to the validation account
  and refused once its budget (``validation_epsilon``, ``validation_queries`` queries) is spent.

The executor passes it the trainer and the job's numbers; it returns what may leave the site: the
round's result with the ``privacy`` meta, or the noised validation metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from fedmed.privacy.dp import (
    DP_EPSILON_METRIC,
    LEDGER_UNIT,
    DPSettings,
    LedgerLock,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    ValidationBudgetSpent,
    check_delta_for_dataset,
    noise_multiplier_for_budget,
    noised_histogram,
    poisson_sampling,
    public_train_size,
    validation_rng,
)

DP_MECHANISM = "dp-sgd"
EPSILON_METRIC = "privacy_epsilon"


class DPSiteAccount:
    """One site's training and validation accounts for the jobs this process runs."""

    def __init__(self, site: str, settings: DPSettings, ledger_path: str | Path, rng=None):
        self.site = site
        self.settings = settings
        self.ledger_path = Path(ledger_path)
        self.stopped: str | None = None  # why this site stopped training under dp (this job)
        self._plan: dict | None = None
        self._rng = rng if rng is not None else validation_rng()

    def _ledger(self) -> PrivacyLedger:
        s = self.settings
        return PrivacyLedger(self.site, s.delta, s.epsilon, s.accountant, self.ledger_path, validation_budget=s.validation_epsilon)

    # -- training -----------------------------------------------------------------------------
    def plan(self, job_id: str, network: Mapping, num_train: int, batch_size: int, local_epochs: int, round_num: int,
             num_rounds: int | None, ledger: PrivacyLedger) -> dict:
        """The job's DP-SGD plan, derived once (at the site's first round in the job, or after a
        restart) from the budget left in the ledger and the rounds still to come, with the steps per
        epoch Opacus' Poisson loader really runs."""
        key = (str(job_id), self.settings, repr(network), num_train, batch_size, local_epochs)
        if self._plan is not None and self._plan["key"] == key:
            return self._plan
        check_delta_for_dataset(self.settings.delta, num_train)
        sample_rate, steps_per_epoch = poisson_sampling(num_train, batch_size)
        round_steps = local_epochs * steps_per_epoch
        rounds_left = max(1, int(num_rounds) - round_num) if num_rounds else 1
        try:
            noise = noise_multiplier_for_budget(self.settings.epsilon, self.settings.delta, sample_rate,
                                                rounds_left * round_steps, self.settings.accountant,
                                                prior_history=ledger.history)
        except PrivacyBudgetExceeded as exc:
            raise PrivacyBudgetExceeded(
                f"site {self.site}: no DP-SGD noise level fits {rounds_left} more round(s) in the budget ({exc}; ledger "
                f"{ledger.path}); this site stops contributing under the dp scope"
            ) from exc
        self._plan = {"key": key, "noise_multiplier": noise, "sample_rate": sample_rate, "round_steps": round_steps,
                      "rounds_left": rounds_left, "public_train_size": public_train_size(num_train, batch_size)}
        return self._plan

    def train_round(self, job_id: str, trainer, network: Mapping, global_weights, round_num: int, num_rounds: int | None,
                    should_abort: Callable[[], bool] | None = None):
        """Train one round with DP-SGD, charged to the ledger before anything leaves.

        Returns ``(TrainResult, privacy)``: the result's ``num_samples`` is the public training
        size (:func:`fedmed.privacy.dp.public_train_size`) and ``privacy`` the update's meta
        (the ledger, both accounts, and this job's plan). Raises :class:`PrivacyBudgetExceeded`
        (and remembers it: the site stops training in this job) when the round does not fit."""
        from fedmed.training import DPSGD, check_dp_network

        if self.stopped:
            raise PrivacyBudgetExceeded(self.stopped)
        try:
            with LedgerLock(self.ledger_path):  # one charge at a time at this site, across jobs
                ledger = self._ledger()
                check_dp_network(dict(network))
                plan = self.plan(job_id, network, trainer.num_train_samples, trainer.batch_size, trainer.local_epochs,
                                 round_num, num_rounds, ledger)
                planned = [(plan["noise_multiplier"], plan["sample_rate"], plan["round_steps"])]
                ledger.check_affordable(planned, f"training round {round_num}")
                result = trainer.train(dict(network), global_weights, round_num, should_abort=should_abort, num_rounds=num_rounds,
                                       dp=DPSGD(plan["noise_multiplier"], self.settings.max_grad_norm, self.settings.accountant))
                entry = ledger.charge(job_id, round_num, result.privacy_steps)
        except PrivacyBudgetExceeded as exc:
            self.stopped = str(exc)
            raise
        record = ledger.record()
        privacy = {
            "unit": LEDGER_UNIT,
            "mechanism": DP_MECHANISM,
            "noise_multiplier": plan["noise_multiplier"],
            "sample_rate": plan["sample_rate"],
            "max_grad_norm": self.settings.max_grad_norm,
            "steps": sum(int(step["steps"]) for step in entry["steps"]),
            "public_train_size": plan["public_train_size"],
            **record,  # accountant, delta, epsilon, budget, history, validation: recomputable
        }
        result.num_samples = plan["public_train_size"]
        result.metrics[EPSILON_METRIC] = record["epsilon"]
        return result, privacy

    def describe_plan(self) -> str:
        """The plan without counts (for INFO logs at a dp site)."""
        if self._plan is None:
            return "no DP-SGD plan yet"
        s = self.settings
        return (f"DP-SGD noise multiplier {self._plan['noise_multiplier']:.4g} for {self._plan['rounds_left']} round(s), clip "
                f"{s.max_grad_norm:g}; budget epsilon {s.epsilon:g} at delta {s.delta:g} ({s.accountant})")

    # -- validation ---------------------------------------------------------------------------
    def release_validation(self, job_id: str, what: str, scored) -> dict:
        """What may leave of a validation query: the per-class histogram of the positive-class
        probabilities (``scored`` = (probabilities, labels) of the site's validation records, or
        None for a task without them), in log-odds bins, noised under the per-query epsilon, with
        that epsilon; charged to the validation account. ``{}`` when there is nothing to score or
        the validation budget is spent (nothing charged)."""
        from fedmed.threshold import DP_HISTOGRAM_KEY, logit_histogram

        if scored is None:
            return {}
        exact = logit_histogram(*scored)
        epsilon = self.settings.query_epsilon
        try:
            with LedgerLock(self.ledger_path):
                self._ledger().charge_validation(job_id, what, epsilon)
        except ValidationBudgetSpent:
            return {}
        return {DP_HISTOGRAM_KEY: noised_histogram(exact, epsilon, self._rng), DP_EPSILON_METRIC: epsilon}

    def validation_record(self) -> dict:
        with LedgerLock(self.ledger_path):
            return self._ledger().validation_record()
