"""FLARE Controller: scatter-gather rounds run by the pure round engine (:mod:`fedmed.rounds`).

A thin orchestration layer. Every round the global model goes to every connected site; the round
closes when all answered, or ``min_clients`` answered and ``wait_after_min_clients`` seconds passed,
or ``round_timeout`` expired. The replies go to :class:`fedmed.rounds.RoundEngine`, which checks
every update and its metrics, leaves out (and names) the sites that failed, stops the job below
``min_clients``, keeps the best model on the median of the sites' key metric, and runs the
aggregation step this controller passes it:

- plaintext (the default): :class:`fedmed.rounds.PlaintextAggregation` with the job's
  ``aggregation`` (``fedavg``, or robust ``clipped_fedavg`` / ``trimmed_mean`` / ``median``, see
  :func:`fedmed.aggregation.check_aggregation_spec`) and ``server_optimizer``; a round whose new
  model would hold NaN/Inf is rejected, the previous model kept and the sites named;
- ``he`` (``he_aggregator_id`` / ``he_shareable_generator_id`` set): :class:`fedmed.flare.he.HEAggregation`,
  FLARE's HE aggregator over CKKS ciphertext; it refuses a round with fewer than 3 contributing sites.

Release gate (:mod:`fedmed.release`): after the final validation the controller decides which
version it releases, on the median over sites of the key metric: the final model, or (rolled back)
the best version when the final one scores below the initial model or more than
``release_tolerance`` below the best; when no trained version beats the initial model the job fails
naming the collapse. ``metrics.json``'s ``release`` block, the last ``[fedmed]`` line and the
provenance card's release record say which version and why.

Outputs in the server's app folder, ``fedmed/``: ``run_config.json``, ``global_model.pt`` (every
round; after the gate, the released model), ``final_global_model.pt`` (only after a rollback: the
final model that was not released), ``best_global_model.pt``, ``metrics.json``, ``provenance.json``
(plaintext modes), and ``resume_state.npz`` (the controller's state after the last completed round).

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
import torch

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedmed.aggregation import DEFAULT_AGGREGATION, check_aggregation_spec
from fedmed.atomic import atomic_path, write_json
from fedmed.flare.replies import collect_replies
from fedmed.networks import build_network, numpy_to_state, state_to_numpy
from fedmed.provenance import CARD_FILENAME, ProvenanceRecorder, load_model_weights
from fedmed.release import COLLAPSE, DEFAULT_RELEASE_TOLERANCE, FINAL, ROLLBACK, check_tolerance, decide_release
from fedmed.results import (
    BEST_MODEL_FILE,
    FINAL_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SERVER_OUTPUT_DIR,
)
from fedmed.rounds import PlaintextAggregation, RoundEngine, RoundFailed, SiteReply, join_arrays, split_arrays
from fedmed.server_optim import build_server_optimizer
from fedmed.tasks import build_task

DEFAULT_NETWORK = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2}}
DEFAULT_TASK = {"name": "classification", "args": {}}
RESUME_STATE_FILE = "resume_state.npz"
RESUME_META_KEY = "fedmed_resume_of"  # job meta: the id of the interrupted job this one resumes
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
        he_aggregator_id: str = "",
        he_shareable_generator_id: str = "",
        release_tolerance: float = DEFAULT_RELEASE_TOLERANCE,
    ):
        """Args (the server config's ``args``):
        num_rounds: federated rounds.
        min_clients: fewest sites whose valid update a round needs; fewer stops the job.
        round_timeout: seconds a round may take before it closes with whoever answered.
        wait_after_min_clients: seconds to wait for late sites once ``min_clients`` answered.
        network: network spec ``{"name": ..., "args": {...}}`` (see fedmed.networks); sent to sites.
        task: task spec ``{"name": "classification"|"segmentation", "args": {...}}``; sent to sites.
        seed: seeds the initial global model.
        train_task_name / validate_task_name: task names the sites' executor answers.
        final_validation: after the last round, validate the final global model at every site.
        allow_partial_updates: accept updates lacking some keys (a privacy filter removed them).
        job_name: name written into the outputs and the bundle.
        aggregation: ``{"name": "fedavg"|"clipped_fedavg"|"trimmed_mean"|"median", "args": {...}}``
            (default ``{"name": "trimmed_mean"}``: norms bounded at 2 x the round's median, then a
            coordinate-wise 20 % trimmed mean; see fedmed.aggregation.check_aggregation_spec).
        server_optimizer: ``{"name": "fedavg"|"fedavgm"|"fedadam"|"fedyogi", "args": {...}}``
            (default ``{"name": "fedavg"}``: global model + aggregated update; fedmed.server_optim).
        he_aggregator_id / he_shareable_generator_id: ids of FLARE's HE aggregator and shareable
            generator components; when set, rounds run under homomorphic encryption (privacy mode
            ``he``, see fedmed.flare.he): the server aggregates ciphertext only, at least 3 sites
            must contribute to every round, and ``aggregation`` / ``server_optimizer`` must be unset.
        release_tolerance: the release gate's tolerance (default 0.02): the final model is released
            when it scores at most this much below the best version (median over sites of the key
            metric) and not below the initial model; otherwise the best version is (fedmed.release).
        """
        super().__init__()
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if bool(he_aggregator_id) != bool(he_shareable_generator_id):
            raise ValueError("he_aggregator_id and he_shareable_generator_id must be given together (privacy mode he)")
        if he_aggregator_id and (aggregation or server_optimizer):
            raise ValueError("aggregation / server_optimizer cannot apply under he: the server sees ciphertext only; "
                             "remove them from the controller args (fedmed.flare.he.apply_he_mode does)")
        self.aggregation = check_aggregation_spec(aggregation or DEFAULT_AGGREGATION, "FedAvgController args.aggregation")
        self.server_optimizer = dict(server_optimizer or {"name": "fedavg"})
        build_server_optimizer(self.server_optimizer)  # a bad spec stops the job here, naming the key
        self.he_ids = (he_aggregator_id, he_shareable_generator_id)
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.wait_after_min_clients = wait_after_min_clients
        self.network = network or DEFAULT_NETWORK
        self.task_spec = task or DEFAULT_TASK
        self.seed = seed
        self.release_tolerance = check_tolerance(release_tolerance, "FedAvgController args.release_tolerance")
        self.best_weights = None  # plaintext: the best version's weights (for a rollback)
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.final_validation = final_validation
        self.allow_partial_updates = allow_partial_updates
        self.job_name = job_name
        self.out_dir: Path | None = None
        self.step = None  # the aggregation step
        self.engine: RoundEngine | None = None
        self.global_model = None  # plaintext: {name: ndarray}; he: FLARE's encrypted ModelLearnable
        self.reference_state = None
        self.provenance: ProvenanceRecorder | None = None
        self.resumed_from: str | None = None

    @property
    def he(self) -> bool:
        return bool(self.he_ids[0])

    # ---- lifecycle --------------------------------------------------------------------------

    def start_controller(self, fl_ctx: FLContext) -> None:
        task = build_task(self.task_spec)  # fails fast on a bad task spec
        model = build_network(self.network, seed=self.seed)
        self.reference_state = model.state_dict()
        weights = state_to_numpy(model)
        workspace = fl_ctx.get_engine().get_workspace()
        self.out_dir = Path(workspace.get_app_dir(fl_ctx.get_job_id())) / SERVER_OUTPUT_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        job_meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        self.requested_scope = job_meta.get("scope", "")
        if self.he:
            from fedmed.flare.he import HEAggregation

            self.step = HEAggregation(self.he_ids[0], self.he_ids[1], self.network, self.task_spec, self.num_rounds,
                                      self.out_dir, allow_partial=self.allow_partial_updates)
            self.global_model = self.step.start(fl_ctx, weights)
        else:
            self.step = PlaintextAggregation(self.aggregation, self.server_optimizer, self.allow_partial_updates)
            self.global_model = weights
        self.engine = RoundEngine(self.step, self.job_name, task.key_metric, self.num_rounds, self.min_clients)
        if not self.he:
            # provenance card (fedmed.provenance): hash chain over the initial and every round's global model
            weighting = "num_samples" if self.aggregation["name"] in ("fedavg", "clipped_fedavg") else "none (coordinate-wise, unweighted)"
            self.provenance = ProvenanceRecorder(self.job_name, self.network, {"method": self.aggregation["name"], "weighting": weighting,
                                                                               "aggregation": self.aggregation, "server_optimizer": self.server_optimizer,
                                                                               "min_clients": self.min_clients})
            self.provenance.record_initial_model(self.global_model)
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
                "aggregation_spec": None if self.he else self.aggregation,
                "server_optimizer": None if self.he else self.server_optimizer,
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

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored a late result for task '{task_name}' from {client.name}")

    # ---- the federation ---------------------------------------------------------------------

    def _broadcast(self, task_name: str, dxo: DXO, fl_ctx: FLContext, abort_signal: Signal):
        """Send to every connected site; return ({site: DXO}, {site: error message})."""
        clients = fl_ctx.get_engine().get_clients()
        if len(clients) < self.min_clients:
            return {}, {"(federation)": f"only {len(clients)} site(s) connected, min_clients is {self.min_clients}"}
        task = Task(name=task_name, data=dxo.to_shareable(), timeout=self.round_timeout)
        self.broadcast_and_wait(
            task=task,
            targets=clients,
            min_responses=self.min_clients,
            wait_time_after_min_received=self.wait_after_min_clients,
            fl_ctx=fl_ctx,
            abort_signal=abort_signal,
        )
        return collect_replies(task, clients)

    def _model_dxo(self, round_num: int | None, model_name: str, fl_ctx: FLContext) -> DXO:
        meta = {"network": self.network, "task": self.task_spec, "model_name": model_name, "num_rounds": self.num_rounds}
        if round_num is not None:
            meta["round"] = round_num
        if self.he:
            return self.step.model_dxo(self.global_model, meta, fl_ctx)
        return DXO(data_kind=DataKind.WEIGHTS, data=self.global_model, meta=meta)

    def _fail(self, fl_ctx: FLContext, message: str) -> None:
        self.engine.metrics["error"] = message
        self._save_metrics()
        self.log_error(fl_ctx, f"[fedmed] {message}")
        self.system_panic(message, fl_ctx)

    def _save_metrics(self) -> None:
        write_json(self.out_dir / METRICS_FILE, self.engine.metrics, default=float)

    def _save_model(self, name: str) -> None:
        if self.he:
            if name == GLOBAL_MODEL_FILE:  # no plaintext on the server: the encrypted model, no best-model file
                self.step.save_encrypted(self.global_model)
            return
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(numpy_to_state(self.global_model, self.reference_state), tmp)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        try:
            self._run(abort_signal, fl_ctx)
        except RoundFailed as exc:
            self._fail(fl_ctx, str(exc))

    def _run(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        engine = self.engine
        self._save_model(GLOBAL_MODEL_FILE)
        self._save_metrics()
        if self.he:
            self.step.check_federation(len(fl_ctx.get_engine().get_clients()))  # raises RoundFailed below 3 sites
        for round_num in range(engine.next_round, self.num_rounds):
            if abort_signal.triggered:
                return
            started = time.time()
            fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=True)
            answers, errors = self._broadcast(self.train_task_name, self._model_dxo(round_num, "global", fl_ctx), fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            if self.he:
                self.step.bind(fl_ctx, round_num)
            replies = {site: SiteReply(dxo.data_kind, dxo.data, dxo.meta) for site, dxo in answers.items()}
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
                self.provenance.record_federated_round(round_num, self.global_model, {c.site: c.meta for c in outcome.contributions},
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
                + ("" if outcome.accepted else "ROUND REJECTED, previous model kept; ")
                + f"{time.time() - started:.1f} s",
            )

        if self.final_validation and not abort_signal.triggered:
            answers, errors = self._broadcast(self.validate_task_name, self._model_dxo(self.num_rounds, "global", fl_ctx), fl_ctx, abort_signal)
            site_metrics = {site: dict(dxo.data) for site, dxo in answers.items() if dxo.data_kind == DataKind.METRICS}
            evaluation, improved, failed = engine.record_final_validation(site_metrics, errors)
            for site, message in failed.items():
                self.log_warning(fl_ctx, f"[fedmed] final validation: left out {site}: {message}")
            if improved:
                self._save_best()
            if evaluation is not None:
                self.log_info(fl_ctx, f"[fedmed] final global model{' (decrypted at the sites)' if self.he else ''}: median validation "
                                      f"{engine.key_metric} {evaluation[f'median_{engine.key_metric}']} over {len(evaluation['sites'])} sites")
        if abort_signal.triggered:
            return
        decision = self._release(fl_ctx)
        engine.finish()
        self._save_metrics()
        self._save_resume_state(fl_ctx)
        self.log_info(fl_ctx, f"[fedmed] finished {self.num_rounds} rounds; {decision.status_line()}")

    # ---- release gate -------------------------------------------------------------------------

    def _save_best(self) -> None:
        self._save_model(BEST_MODEL_FILE)
        if not self.he:
            self.best_weights = {k: np.array(v, copy=True) for k, v in self.global_model.items()}

    def _release(self, fl_ctx: FLContext):
        """Decide the released version (fedmed.release) and make ``global_model.pt`` and the provenance
        card that version. A collapse raises RoundFailed (the job fails, nothing is released)."""
        engine = self.engine
        decision = decide_release(engine.metrics["evaluations"], engine.key_metric, self.num_rounds, self.release_tolerance)
        engine.metrics["release"] = decision.as_dict()
        if decision.action == COLLAPSE:
            raise engine.fail(f"release gate: {decision.reason}; no model is released (metrics.json 'release')")
        if decision.action == ROLLBACK and self.he:  # the server holds no plaintext model to release instead
            if decision.initial is not None and decision.final is not None and decision.final < decision.initial:
                raise engine.fail(f"release gate: {decision.reason}; under he the server cannot roll back, no model is released")
            decision = dataclasses.replace(decision, action=FINAL, version=self.num_rounds, reason=(
                decision.reason.split("; rolled back")[0] + "; NOT rolled back: under he the server holds no plaintext "
                "model, the final one is released"))
            engine.metrics["release"] = decision.as_dict()
        elif decision.action == ROLLBACK:
            self._roll_back(decision.version)
            engine.metrics["release"]["final_model_file"] = FINAL_MODEL_FILE
            self.log_warning(fl_ctx, f"[fedmed] release gate: {decision.reason}")
        engine.metrics["release"]["model_file"] = GLOBAL_MODEL_FILE
        if self.provenance is not None:
            self.provenance.write(self.out_dir / CARD_FILENAME, released_model_file=GLOBAL_MODEL_FILE,
                                  released_weights=self.global_model, release=engine.metrics["release"])
        return decision

    def _roll_back(self, version: int) -> None:
        """``global_model.pt`` becomes the best version; the final model is kept as ``final_global_model.pt``."""
        best = self.engine.metrics.get("best") or {}
        if best.get("model_version") != version:
            raise self.engine.fail(f"release gate: the best version is {version}, the round engine kept "
                                   f"{best.get('model_version')}; not releasing a model that was not kept")
        weights = self.best_weights
        if weights is None:  # a resumed run: the best version was kept on disk
            weights = {k: v.numpy() for k, v in load_model_weights(self.out_dir / BEST_MODEL_FILE).items()}
        shutil.copy2(self.out_dir / GLOBAL_MODEL_FILE, self.out_dir / FINAL_MODEL_FILE)
        self.global_model = weights
        self._save_model(GLOBAL_MODEL_FILE)

    # ---- resume -------------------------------------------------------------------------------

    def _save_resume_state(self, fl_ctx: FLContext) -> None:
        """One file, written atomically after every completed round: the engine state, the global
        model, the provenance recorder. Under he the (encrypted) model is not saved: no resume."""
        if self.he:
            return
        state = {
            "job_id": fl_ctx.get_job_id(),
            "fingerprint": self._fingerprint(),
            "engine": self.engine.state_dict(),
            "global_model": self.global_model,
            "provenance": {name: getattr(self.provenance, name) for name in _PROVENANCE_FIELDS},
        }
        doc, arrays = split_arrays(state)
        header = np.frombuffer(json.dumps(doc, default=float).encode(), dtype=np.uint8)
        with atomic_path(self.out_dir / RESUME_STATE_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, __state__=header, **arrays)

    def _fingerprint(self) -> dict:
        return {"job_name": self.job_name, "num_rounds": self.num_rounds, "network": self.network, "task": self.task_spec,
                "aggregation": self.aggregation, "server_optimizer": self.server_optimizer}

    def _resume(self, fl_ctx: FLContext, previous_job: str, workspace) -> None:
        previous_out = Path(workspace.get_app_dir(previous_job)) / SERVER_OUTPUT_DIR
        source = previous_out / RESUME_STATE_FILE
        if self.he:
            self.log_warning(fl_ctx, f"[fedmed] resuming job {previous_job}: the he mode keeps no resumable state; starting from round 1")
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
        self.global_model = {k: np.asarray(v) for k, v in state["global_model"].items()}
        for name in _PROVENANCE_FIELDS:
            setattr(self.provenance, name, state["provenance"][name])
        if (previous_out / BEST_MODEL_FILE).is_file():
            shutil.copy2(previous_out / BEST_MODEL_FILE, self.out_dir / BEST_MODEL_FILE)
        resumed = self.engine.metrics.setdefault("resumed", [])
        resumed.append({"from_job": previous_job, "at_round": self.engine.next_round, "job_id": fl_ctx.get_job_id()})
        self.resumed_from = previous_job
        self.log_info(fl_ctx, f"[fedmed] resumed job {previous_job} from its state after round {self.engine.next_round} "
                              f"of {self.num_rounds}; rounds {self.engine.next_round + 1}..{self.num_rounds} follow")
