"""FLARE Controller: scatter-gather rounds run by the pure round engine (:mod:`fedmed.rounds`).

A thin orchestration layer. Every round the global model goes to every connected site; the round
closes by :class:`fedmed.deadline.DeadlinePolicy`: when all answered, or once the sites the
tolerance ``f`` needs answered (waited for up to 4x the median reply time) and a grace that adapts
to the median site's reply time passed (at most ``wait_after_min_clients`` s; never before
``min_clients`` answered), or, when a site missed
rounds in a row, once it answered or its catch-up limit passed; ``round_timeout`` bounds every
round. Sites left out are named in the log each round and counted in ``metrics.json``
``participation``. At start the job's tolerance ``f`` (``aggregation.args.f``: hostile sites
tolerated; default the most the rule supports with the sites connected) is fixed; a job stating an
``f`` its sites cannot support stops before round 1, naming f and the site count. The replies go to :class:`fedmed.rounds.RoundEngine`, which checks
every update and its metrics, leaves out (and names) the sites that failed, stops the job below
``min_clients``, keeps the best model on the median of the sites' key metric, and runs the
aggregation step this controller passes it:

- plaintext (the default): :class:`fedmed.rounds.PlaintextAggregation` with the job's
  ``aggregation`` (``fedavg``, or robust ``clipped_fedavg`` / ``trimmed_mean`` / ``median`` /
  ``geometric_median`` / ``multi_krum``, see
  :func:`fedmed.aggregation.check_aggregation_spec`) and ``server_optimizer``; a round whose new
  model would hold NaN/Inf is rejected, the previous model kept and the sites named;
- any other step (``aggregation_step_id`` names a server component implementing
  :class:`fedmed.rounds.ServerStep`), e.g. the ``he`` privacy mode's step (:mod:`fedmed.flare.he`).

The controller has no branch on the kind of step: the step creates the initial global model, makes
the task data that carries it, runs any extra exchange a round needs before the model goes out
(``open_round``, through :meth:`FedAvgController.exchange`), checks and aggregates the replies, saves
the model and gives its arrays for provenance and resume (or None when the server holds no
plaintext model: no provenance card, no resume).

Release gate (:mod:`fedmed.release`): after the final validation the controller decides which
version it releases, on the median over sites of the key metric: the final model, or (rolled back)
the best version when the final one scores below the initial model or more than
``release_tolerance`` below the best; when no trained version beats the initial model the job fails
naming the collapse. ``metrics.json``'s ``release`` block, the last ``[fedmed]`` line and the
provenance card's release record say which version and why.

Outputs in the server's app folder, ``fedmed/``: ``run_config.json``, ``global_model.pt`` (every
round; after the gate, the released model), ``final_global_model.pt`` (only after a rollback: the
final model that was not released), ``best_global_model.pt``, ``metrics.json``, ``provenance.json``,
and ``resume_state.npz`` (the controller's state after the last completed round).

Resume after a server crash: when the job's meta names ``fedmed_resume_of: <job id>`` (set by
:class:`fedmed.flare.resume.ResumeInterruptedJobs` when a restarted server re-submits a job that
was running when the server died), the controller loads that job's ``resume_state.npz`` (round,
global model, round-engine state with metrics, provenance chain, server-optimizer state) and goes
on from the first round that had not completed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.widgets.info_collector import InfoCollector

from fedmed.aggregation import DEFAULT_AGGREGATION, ToleranceError, check_aggregation_spec
from fedmed.atomic import atomic_path, write_json
from fedmed.deadline import DeadlinePolicy
from fedmed.flare.replies import collect_replies
from fedmed.networks import build_network, state_to_numpy
from fedmed.progress import STATS_GROUP, job_progress
from fedmed.provenance import CARD_FILENAME, CardSigner, ProvenanceRecorder, load_model_weights
from fedmed.release import (
    COLLAPSE,
    DEFAULT_RELEASE_TOLERANCE,
    FINAL,
    ROLLBACK,
    check_on_collapse,
    check_tolerance,
    decide_release,
)
from fedmed.results import (
    BEST_MODEL_FILE,
    FINAL_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SERVER_OUTPUT_DIR,
)
from fedmed.rounds import (
    PlaintextAggregation,
    RoundEngine,
    RoundFailed,
    ServerStep,
    SiteReply,
    StepContext,
    join_arrays,
    split_arrays,
)
from fedmed.server_optim import build_server_optimizer
from fedmed.tasks import build_task

DEFAULT_NETWORK = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2}}
DEFAULT_TASK = {"name": "classification", "args": {}}
RESUME_STATE_FILE = "resume_state.npz"
RESUME_META_KEY = "fedmed_resume_of"  # job meta: the id of the interrupted job this one resumes
_STEP_METHODS = ("create", "open_round", "send", "receive", "check_update", "aggregate", "save", "plaintext", "restore",
                 "settings", "state_dict", "load_state_dict")
_PROVENANCE_FIELDS = ("job", "network", "aggregation", "created_utc", "sites", "chain", "extra")


class FedAvgController(Controller):
    def __init__(
        self,
        num_rounds: int = 5,
        min_clients: int = 2,
        round_timeout: int = 3600,
        wait_after_min_clients: int = 10,
        network: dict | None = None,
        task: dict | None = None,
        seed: int = 0,
        train_task_name: str = "train",
        validate_task_name: str = "validate",
        final_validation: bool = True,
        allow_partial_updates: bool = False,
        job_name: str = "fedmed",
        aggregation: dict | None = None,
        server_optimizer: dict | None = None,
        aggregation_step_id: str = "",
        release_tolerance: float = DEFAULT_RELEASE_TOLERANCE,
        release_on_collapse: str = "fail",
    ):
        """Args (the server config's ``args``):
        num_rounds: federated rounds.
        min_clients: fewest sites whose valid update a round needs; fewer stops the job.
        round_timeout: seconds a round may take before it closes with whoever answered.
        wait_after_min_clients: most seconds to wait for late sites once the quorum answered (the
            grace is 0.5 x the median site's reply time, within [2 s, this]; fedmed.deadline).
        network: network spec ``{"name": ..., "args": {...}}`` (see fedmed.networks); sent to sites.
        task: task spec ``{"name": "classification"|"segmentation", "args": {...}}``; sent to sites.
        seed: seeds the initial global model.
        train_task_name / validate_task_name: task names the sites' executor answers.
        final_validation: after the last round, validate the final global model at every site.
        allow_partial_updates: accept updates lacking some keys (a privacy filter removed them).
        job_name: name written into the outputs and the bundle.
        aggregation: ``{"name": "fedavg"|"clipped_fedavg"|"trimmed_mean"|"median"|"geometric_median"|"multi_krum",
            "args": {"f": ..., ...}}`` (default ``{"name": "geometric_median"}``: norms bounded at 2 x the
            round's median, then the geometric median; ``f``, the hostile sites tolerated, defaults to
            the most the rule supports with the sites connected; see fedmed.aggregation.check_aggregation_spec).
        server_optimizer: ``{"name": "fedavg"|"fedavgm"|"fedadam"|"fedyogi", "args": {...}}``
            (default ``{"name": "fedavg"}``: global model + aggregated update; fedmed.server_optim).
        aggregation_step_id: id of a server component implementing :class:`fedmed.rounds.ServerStep`
            (e.g. the ``he`` mode's step, see fedmed.flare.he); when set, it decides how updates are
            combined, and ``aggregation`` / ``server_optimizer`` belong in its own args, not here.
        release_tolerance: the release gate's tolerance (default 0.02): the final model is released
            when it scores at most this much below the best version (median over sites of the key
            metric) and not below the initial model; otherwise the best version is (fedmed.release).
        release_on_collapse: when no trained version beats the initial model: ``"fail"`` (default) ends the
            job with the collapse named and releases nothing; ``"initial"`` releases the initial model
            and says so (tests of plumbing on data too small to learn from in a round or two).
        """
        super().__init__()
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if aggregation_step_id and (aggregation or server_optimizer):
            raise ValueError(f"FedAvgController args: aggregation / server_optimizer are set but aggregation_step_id "
                             f"'{aggregation_step_id}' names the step that aggregates; put them in that component's args "
                             "or remove them")
        self.aggregation = check_aggregation_spec(aggregation or DEFAULT_AGGREGATION, "FedAvgController args.aggregation")
        self.server_optimizer = dict(server_optimizer or {"name": "fedavg"})
        build_server_optimizer(self.server_optimizer)  # a bad spec stops the job here, naming the key
        self.aggregation_step_id = aggregation_step_id
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.wait_after_min_clients = wait_after_min_clients
        self.network = network or DEFAULT_NETWORK
        self.task_spec = task or DEFAULT_TASK
        self.seed = seed
        self.release_tolerance = check_tolerance(release_tolerance, "FedAvgController args.release_tolerance")
        self.release_on_collapse = check_on_collapse(release_on_collapse, "FedAvgController args.release_on_collapse")
        self.best_model = None  # the best version as the step holds it (for a rollback)
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.final_validation = final_validation
        self.allow_partial_updates = allow_partial_updates
        self.job_name = job_name
        self.out_dir: Path | None = None
        self.step: ServerStep | None = None  # the aggregation step
        self.context: StepContext | None = None
        self.engine: RoundEngine | None = None
        self.global_model = None  # as the step holds it (plaintext steps: {name: ndarray})
        self.reference_state = None
        self.provenance: ProvenanceRecorder | None = None
        self.resumed_from: str | None = None
        self._fl_ctx: FLContext | None = None  # control_flow's context and abort signal, for exchange()
        self._abort: Signal | None = None
        self.refusal: str | None = None  # why the job cannot start (too few sites for its tolerance f)
        self.deadline: DeadlinePolicy | None = None
        self._train_started: float | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start_controller(self, fl_ctx: FLContext) -> None:
        self._started = time.time()
        task = build_task(self.task_spec)  # fails fast on a bad task spec
        model = build_network(self.network, seed=self.seed)
        self.reference_state = model.state_dict()
        weights = state_to_numpy(model)
        self.initial_weights = {k: np.array(v, copy=True) for k, v in weights.items()}  # version 0, for a rollback to it
        workspace = fl_ctx.get_engine().get_workspace()
        self.out_dir = Path(workspace.get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        job_meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        self.requested_scope = job_meta.get("scope", "")
        self.step = self._build_step(fl_ctx)
        self.context = StepContext(self.out_dir, self.network, self.task_spec, self.num_rounds, self.min_clients,
                                   reference_state=self.reference_state, exchange=self.exchange,
                                   sites=lambda: [c.name for c in fl_ctx.get_engine().get_clients()], platform=fl_ctx)
        self.global_model = self.step.create(weights, self.context)
        self.engine = RoundEngine(self.step, self.job_name, task.key_metric, self.num_rounds, self.min_clients)
        self.deadline = self._deadline_policy()
        settings = self.step.settings()
        plain = self.step.plaintext(self.global_model)
        if plain is not None:
            # provenance card (fedmed.provenance): hash chain over the initial and every round's global model
            method = settings.get("aggregation", {}).get("name", "?")
            weighting = "num_samples" if method in ("fedavg", "clipped_fedavg") else "none (coordinate-wise, unweighted)"
            self.provenance = ProvenanceRecorder(self.job_name, self.network, {"method": method, "weighting": weighting,
                                                                               **settings, "min_clients": self.min_clients})
            self.provenance.record_initial_model(plain)
            # a deployed server signs the card with its kit's key (the project's PKI); the simulator has none: unsigned
            self.provenance.signer = CardSigner.from_startup_kit(workspace.get_startup_kit_dir())
        write_json(
            self.out_dir / RUN_CONFIG_FILE,
            {
                "job_name": self.job_name,
                "job_id": fl_ctx.get_job_id(),
                "network": self.network,
                "task": self.task_spec,
                "num_rounds": self.num_rounds,
                "min_clients": self.min_clients,
                "aggregation": self.engine.metrics["aggregation"],
                "aggregation_spec": settings.get("aggregation"),
                "server_optimizer": settings.get("server_optimizer"),
                "aggregation_step": settings,
                "tolerance_f": getattr(self.step, "tolerance", None),
                "seed": self.seed,
            },
            default=float,
        )
        resume_of = job_meta.get(RESUME_META_KEY)
        if resume_of:
            self._resume(fl_ctx, str(resume_of), workspace)
        n_params = sum(int(np.prod(v.shape)) for v in weights.values())
        self.log_info(fl_ctx, f"[fedmed] {self.network['name']} with {n_params} parameters; aggregation "
                              f"{self.engine.metrics['aggregation']}; outputs in {self.out_dir}")

    def _build_step(self, fl_ctx: FLContext) -> ServerStep:
        if not self.aggregation_step_id:
            return self._plaintext_step(fl_ctx)
        step = fl_ctx.get_engine().get_component(self.aggregation_step_id)
        missing = [name for name in _STEP_METHODS if not callable(getattr(step, name, None))]
        # a step that is also an FLComponent can have a step method shadowed by FLARE's own (StatePersistable.restore)
        missing += [f"{name} (FLARE's {getattr(step, name).__qualname__} comes first)" for name in _STEP_METHODS
                    if name not in missing and getattr(getattr(step, name), "__module__", "").startswith("nvflare")]
        if step is None or missing:
            raise TypeError(f"FedAvgController args.aggregation_step_id '{self.aggregation_step_id}': "
                            + ("no such server component" if step is None else
                               f"{type(step).__name__} lacks {', '.join(missing)} (see fedmed.rounds.ServerStep)")
                            + "; check the server config's components")
        return step

    def _plaintext_step(self, fl_ctx: FLContext) -> PlaintextAggregation:
        """The plaintext step with the job's tolerance f fixed for the sites present; with too few
        sites for the stated f the job is refused (``self.refusal``, raised in ``control_flow``)."""
        num_sites = len(fl_ctx.get_engine().get_clients())
        try:
            step = PlaintextAggregation(self.aggregation, self.server_optimizer, self.allow_partial_updates, num_sites=num_sites)
        except ToleranceError as exc:
            self.refusal = f"refused to start: {exc}"
            self.log_error(fl_ctx, f"[fedmed] {self.refusal}")
            return PlaintextAggregation(self.aggregation, self.server_optimizer, self.allow_partial_updates)
        self.log_info(fl_ctx, f"[fedmed] tolerates f={step.tolerance} hostile site(s) of {num_sites} "
                              f"({self.aggregation['name']}); every round needs {max(step.min_sites, self.min_clients)} contributing site(s)")
        return step

    def _deadline_policy(self) -> DeadlinePolicy:
        """The round deadline (fedmed.deadline): at least ``min_clients`` answers (or what a stated f
        needs), patience for the answers the job's tolerance f needs, then an adaptive grace."""
        from fedmed.aggregation import sites_needed

        floor = max(self.min_clients, getattr(self.step, "min_sites", 1))
        tolerance = getattr(self.step, "tolerance", None)
        spec = getattr(self.step, "spec", None) or {}
        target = (sites_needed(spec.get("name", ""), tolerance) or 1) if tolerance else floor
        return DeadlinePolicy(floor, max_grace=self.wait_after_min_clients, round_timeout=self.round_timeout,
                              target_sites=max(floor, target))

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Answer FLARE's ``show_stats`` admin command with the job's progress (``python -m fedmed watch``)."""
        super().handle_event(event_type, fl_ctx)
        if event_type == InfoCollector.EVENT_TYPE_GET_STATS and self.engine is not None:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if collector is not None:
                collector.add_info(group_name=STATS_GROUP,
                                   info=job_progress(self.engine.metrics, time.time() - self._started))

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        if task_name == self.train_task_name and self.deadline is not None and self._train_started is not None:
            self.deadline.record_late(client.name, time.time() - self._train_started)
        self.log_warning(fl_ctx, f"ignored a late result for task '{task_name}' from {client.name}")

    # ---- the federation ---------------------------------------------------------------------

    def _broadcast(self, task_name: str, dxo: DXO, fl_ctx: FLContext, abort_signal: Signal, targets=None, min_responses=None):
        """Send to every connected site (or the named ``targets``); return ({site: DXO}, {site: error message})."""
        clients = fl_ctx.get_engine().get_clients()
        if targets is not None:
            clients = [c for c in clients if c.name in set(targets)]
        if len(clients) < self.min_clients:
            return {}, {"(federation)": f"only {len(clients)} site(s) connected, min_clients is {self.min_clients}"}
        task = Task(name=task_name, data=dxo.to_shareable(), timeout=self.round_timeout)
        self.broadcast_and_wait(
            task=task,
            targets=clients,
            min_responses=self.min_clients if min_responses is None else min_responses,
            wait_time_after_min_received=self.wait_after_min_clients,
            fl_ctx=fl_ctx,
            abort_signal=abort_signal,
        )
        return collect_replies(task, clients)

    def _broadcast_train(self, dxo: DXO, fl_ctx: FLContext, abort_signal: Signal):
        """Send a training round to every connected site and close it by the deadline policy
        (fedmed.deadline): all answered, or the quorum plus an adaptive grace, or a due catch-up.
        Returns ({site: DXO}, {site: error message}, notes naming the sites left out)."""
        clients = fl_ctx.get_engine().get_clients()
        if len(clients) < self.min_clients:
            return {}, {"(federation)": f"only {len(clients)} site(s) connected, min_clients is {self.min_clients}"}, []
        names = [c.name for c in clients]
        waiting_for = self.deadline.waits_for(names)
        if waiting_for:
            self.log_info(fl_ctx, f"[fedmed] this round waits for {', '.join(waiting_for)} (left out of "
                                  f"{', '.join(str(self.deadline.missed[s]) for s in waiting_for)} round(s) in a row), at most "
                                  f"{max(self.deadline.catch_up_limit(s) for s in waiting_for):.0f} s")
        task = Task(name=self.train_task_name, data=dxo.to_shareable(), timeout=self.round_timeout)
        self.broadcast(task=task, fl_ctx=fl_ctx, targets=clients, min_responses=len(clients), wait_time_after_min_received=0)
        started = task.schedule_time or time.time()
        self._train_started = started

        def answered() -> dict:  # an error reply is no answer toward the quorum (a fast refusal must not close the round)
            return {ct.client.name: ct.result_received_time - started for ct in list(task.client_tasks)
                    if ct.result_received_time and (ct.result is None or ct.result.get_return_code(ReturnCode.OK) == ReturnCode.OK)}

        while task.completion_status is None:
            if abort_signal.triggered:
                self.cancel_task(task, fl_ctx=fl_ctx)
                break
            if self.deadline.should_close(time.time() - started, answered(), names, waiting_for):
                self.cancel_task(task, fl_ctx=fl_ctx)
                break
            time.sleep(0.1)
        closed_after = time.time() - started
        retire_by = time.time() + 10
        while task.is_standing and time.time() < retire_by:  # let FLARE's task monitor retire the task
            time.sleep(0.05)
        times = answered()
        for ct in list(task.client_tasks):  # took the task, no answer yet: it needs at least this long
            if not ct.result_received_time:
                self.deadline.record_unanswered(ct.client.name, closed_after)
        answers, errors = collect_replies(task, clients)
        notes = self.deadline.record_round({s: t for s, t in times.items() if s in answers}, sorted(s for s in errors if s in names), waiting_for)
        return answers, errors, notes

    def exchange(self, task_name: str, kind: str, data, meta, targets=None, min_responses=None):
        """:class:`fedmed.rounds.Exchange` for the step: one extra task; waits for every targeted site,
        or for ``wait_after_min_clients`` seconds once ``min_responses`` answered (the round timeout
        bounds the wait); ({site: SiteReply}, {site: error})."""
        if self._fl_ctx is None:
            raise RuntimeError("exchange() runs only inside the controller's rounds")
        wanted = list(targets) if targets is not None else None
        n = len(wanted) if wanted is not None else len(self._fl_ctx.get_engine().get_clients())
        answers, errors = self._broadcast(task_name, DXO(data_kind=kind, data=dict(data), meta=dict(meta)), self._fl_ctx,
                                          self._abort, targets=wanted, min_responses=min(n, min_responses or n))
        return {site: SiteReply(dxo.data_kind, dxo.data, dxo.meta) for site, dxo in answers.items()}, errors

    def _model_dxo(self, round_num: int | None, model_name: str, extra_meta: dict | None = None) -> DXO:
        meta = {"network": self.network, "task": self.task_spec, "model_name": model_name, "num_rounds": self.num_rounds,
                **(extra_meta or {})}
        if round_num is not None:
            meta["round"] = round_num
        kind, data, meta = self.step.send(self.global_model, meta)
        return DXO(data_kind=kind, data=dict(data), meta=meta)

    def _fail(self, fl_ctx: FLContext, message: str) -> None:
        self.engine.metrics["error"] = message
        self._save_metrics()
        self.log_error(fl_ctx, f"[fedmed] {message}")
        self.system_panic(message, fl_ctx)

    def _save_metrics(self) -> None:
        write_json(self.out_dir / METRICS_FILE, self.engine.metrics, default=float)

    def _save_model(self, name: str) -> bool:
        return self.step.save(self.global_model, self.out_dir / name, self.context)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        self._fl_ctx, self._abort = fl_ctx, abort_signal
        self.context.platform = fl_ctx
        if self.refusal:
            self._fail(fl_ctx, self.refusal)
            return
        try:
            self._run(abort_signal, fl_ctx)
        except RoundFailed as exc:
            self._fail(fl_ctx, str(exc))

    def _run(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        engine = self.engine
        self._save_model(GLOBAL_MODEL_FILE)
        self._save_metrics()
        for round_num in range(engine.next_round, self.num_rounds):
            if abort_signal.triggered:
                return
            started = time.time()
            fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=True)
            round_meta = self.step.open_round(round_num, self.context)  # raises RoundFailed when the round cannot run
            if abort_signal.triggered:
                return
            answers, errors, deadline_notes = self._broadcast_train(self._model_dxo(round_num, "global", round_meta), fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            for note in deadline_notes:
                self.log_warning(fl_ctx, f"[fedmed] round {round_num}: {note}")
            replies = {site: self.step.receive(site, dxo.data_kind, dxo.data, dxo.meta) for site, dxo in answers.items()}
            outcome = engine.run_round(round_num, self.global_model, replies, errors)
            for site, message in outcome.record["failed"].items():
                self.log_warning(fl_ctx, f"[fedmed] round {round_num}: left out {site}: {message}")
            for note in outcome.notes:
                self.log_warning(fl_ctx, f"[fedmed] round {round_num}: {note}")
            if outcome.entering_model_is_best:
                self._save_best()  # the model that entered this round, before it is replaced
            if not outcome.accepted:
                self.log_error(fl_ctx, f"[fedmed] {outcome.record['rejected']['reason']}")
            self.global_model = outcome.model
            self._save_model(GLOBAL_MODEL_FILE)
            if self.provenance is not None and outcome.accepted:
                self.provenance.record_federated_round(round_num, self.step.plaintext(self.global_model), {c.site: c.meta for c in outcome.contributions},
                                                       outcome.val_metrics, self.requested_scope)
            if self.provenance is not None:
                self.provenance.write(self.out_dir / CARD_FILENAME, released_model_file=GLOBAL_MODEL_FILE)
            self._save_metrics()
            self._save_resume_state(fl_ctx)
            score = outcome.evaluation[f"median_{engine.key_metric}"]
            bounded = sorted({**outcome.record.get("aggregation", {}).get("clipped", {}), **outcome.record.get("aggregation", {}).get("capped", {})})
            self.log_info(
                fl_ctx,
                f"[fedmed] round {round_num + 1}/{self.num_rounds}: {len(outcome.contributions)}/{len(replies) + len(errors)} "
                f"sites answered ({', '.join(outcome.record['contributors'])}); median validation {engine.key_metric} "
                f"of the global model entering the round: {score if score is None else round(score, 4)}; "
                + (f"bounded: {', '.join(bounded)}; " if bounded else "")
                + (f"outliers: {', '.join(sorted(outcome.record['aggregation']['outliers']))}; "
                   if outcome.record.get("aggregation", {}).get("outliers") else "")
                + (f"left out: {', '.join(outcome.record['left_out'])}; " if outcome.record.get("left_out") else "")
                + ("" if outcome.accepted else "ROUND REJECTED, previous model kept; ")
                + f"{time.time() - started:.1f} s",
            )

        if self.final_validation and not abort_signal.triggered:
            answers, errors = self._broadcast(self.validate_task_name, self._model_dxo(self.num_rounds, "global"), fl_ctx, abort_signal)
            site_metrics = {site: dict(dxo.data) for site, dxo in answers.items() if dxo.data_kind == DataKind.METRICS}
            evaluation, improved, failed = engine.record_final_validation(site_metrics, errors)
            for site, message in failed.items():
                self.log_warning(fl_ctx, f"[fedmed] final validation: left out {site}: {message}")
            if improved:
                self._save_best()
            if evaluation is not None:
                self.log_info(fl_ctx, f"[fedmed] final global model: median validation "
                                      f"{engine.key_metric} {evaluation[f'median_{engine.key_metric}']} over {len(evaluation['sites'])} sites")
        if abort_signal.triggered:
            return
        decision = self._release()
        engine.finish()
        self._save_metrics()
        self._save_resume_state(fl_ctx)
        seen = engine.participation_line()
        self.log_info(fl_ctx, f"[fedmed] finished {self.num_rounds} rounds; "
                              + (seen if seen else "no site flagged or left out in most rounds"))
        self.log_info(fl_ctx, f"[fedmed] {decision.status_line()}")

    # ---- release gate -------------------------------------------------------------------------

    def _save_best(self) -> None:
        self._save_model(BEST_MODEL_FILE)
        plain = self.step.plaintext(self.global_model)
        # plaintext arrays are copied; another step's model object is kept as the step made it
        self.best_model = self.global_model if plain is None else self.step.restore({k: np.array(v, copy=True) for k, v in plain.items()}, self.context)

    def _release(self):
        """Decide the released version (fedmed.release) and make ``global_model.pt`` and the provenance
        card that version. A collapse raises RoundFailed (the job fails, nothing is released)."""
        engine = self.engine
        decision = decide_release(engine.metrics["evaluations"], engine.key_metric, self.num_rounds, self.release_tolerance,
                                  self.release_on_collapse)
        engine.metrics["release"] = decision.as_dict()
        if decision.action == COLLAPSE:
            raise engine.fail(f"release gate: {decision.reason}; no model is released (metrics.json 'release')")
        if decision.action == ROLLBACK:
            best = self._best_version(decision.version)
            if best is None:  # no copy of the best version (a resumed run whose step holds no plaintext model)
                if decision.initial is not None and decision.final is not None and decision.final < decision.initial:
                    raise engine.fail(f"release gate: {decision.reason}; the server holds no copy of version "
                                      f"{decision.version} to release instead, so no model is released")
                decision = dataclasses.replace(decision, action=FINAL, version=self.num_rounds, reason=(
                    decision.reason.split("; rolled back")[0] + f"; NOT rolled back: the server holds no copy of version "
                    f"{decision.version}, the final model is released"))
                engine.metrics["release"] = decision.as_dict()
            else:
                if self._save_model(FINAL_MODEL_FILE) is not False:
                    engine.metrics["release"]["final_model_file"] = FINAL_MODEL_FILE
                self.global_model = best
                self._save_model(GLOBAL_MODEL_FILE)
        engine.metrics["release"]["model_file"] = GLOBAL_MODEL_FILE
        if self.provenance is not None:
            self.provenance.write(self.out_dir / CARD_FILENAME, released_model_file=GLOBAL_MODEL_FILE,
                                  released_weights=self.step.plaintext(self.global_model), release=engine.metrics["release"])
        return decision

    def _best_version(self, version: int):
        """The best version as the step holds it (None when the server has no copy of it)."""
        kept = (self.engine.metrics.get("best") or {}).get("model_version")
        if kept != version:
            raise self.engine.fail(f"release gate: the best version is {version}, the round engine kept {kept}; "
                                   "not releasing a model that was not kept")
        if self.best_model is not None:
            return self.best_model
        if self.step.plaintext(self.global_model) is not None and (self.out_dir / BEST_MODEL_FILE).is_file():
            # a resumed run: the best version was kept on disk
            return self.step.restore({k: v.numpy() for k, v in load_model_weights(self.out_dir / BEST_MODEL_FILE).items()},
                                     self.context)
        if version == 0:  # the initial model is rebuilt exactly from its seed (e.g. a step that keeps no copies)
            return self.step.restore({k: np.array(v, copy=True) for k, v in self.initial_weights.items()}, self.context)
        return None

    # ---- resume -------------------------------------------------------------------------------

    def _save_resume_state(self, fl_ctx: FLContext) -> None:
        """One file, written atomically after every completed round: the engine state, the global
        model, the provenance recorder. A step whose server holds no plaintext model keeps no resume state."""
        plain = self.step.plaintext(self.global_model)
        if plain is None:
            return
        state = {
            "job_id": fl_ctx.get_job_id(),
            "fingerprint": self._fingerprint(),
            "engine": self.engine.state_dict(),
            "deadline": self.deadline.state_dict() if self.deadline else {},
            "global_model": dict(plain),
            "provenance": {name: getattr(self.provenance, name) for name in _PROVENANCE_FIELDS},
        }
        doc, arrays = split_arrays(state)
        header = np.frombuffer(json.dumps(doc, default=float).encode(), dtype=np.uint8)
        with atomic_path(self.out_dir / RESUME_STATE_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, __state__=header, **arrays)

    def _fingerprint(self) -> dict:
        settings = self.step.settings()
        return {"job_name": self.job_name, "num_rounds": self.num_rounds, "network": self.network, "task": self.task_spec,
                "aggregation": settings.get("aggregation"), "server_optimizer": settings.get("server_optimizer"),
                **({"aggregation_step": settings} if self.aggregation_step_id else {})}

    def _resume(self, fl_ctx: FLContext, previous_job: str, workspace) -> None:
        previous_out = Path(workspace.get_app_dir(previous_job)) / SERVER_OUTPUT_DIR
        source = previous_out / RESUME_STATE_FILE
        if self.step.plaintext(self.global_model) is None:
            self.log_warning(fl_ctx, f"[fedmed] resuming job {previous_job}: this aggregation step keeps no resumable state; "
                                     "starting from round 1")
            return
        if not source.is_file():
            self.log_warning(fl_ctx, f"[fedmed] resuming job {previous_job}: {source} is missing (it finished no round); starting from round 1")
            return
        with np.load(source) as npz:
            doc = json.loads(bytes(npz["__state__"]).decode())
            state = join_arrays(doc, {name: npz[name] for name in npz.files if name != "__state__"})
        if state["fingerprint"] != json.loads(json.dumps(self._fingerprint())):
            raise ValueError(f"resuming job {previous_job}: its saved state ({source}) was made by another configuration "
                             f"({state['fingerprint']}); submit the original job again instead")
        self.engine.load_state_dict(state["engine"])
        if self.deadline is not None:
            self.deadline.load_state_dict(state.get("deadline") or {})
        self.global_model = self.step.restore({k: np.asarray(v) for k, v in state["global_model"].items()}, self.context)
        for name in _PROVENANCE_FIELDS:
            setattr(self.provenance, name, state["provenance"][name])
        if (previous_out / BEST_MODEL_FILE).is_file():
            shutil.copy2(previous_out / BEST_MODEL_FILE, self.out_dir / BEST_MODEL_FILE)
        resumed = self.engine.metrics.setdefault("resumed", [])
        resumed.append({"from_job": previous_job, "at_round": self.engine.next_round, "job_id": fl_ctx.get_job_id()})
        self.resumed_from = previous_job
        self.log_info(fl_ctx, f"[fedmed] resumed job {previous_job} from its state after round {self.engine.next_round} "
                              f"of {self.num_rounds}; rounds {self.engine.next_round + 1}..{self.num_rounds} follow")
