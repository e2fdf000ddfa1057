"""The ``he`` privacy mode: secure aggregation with pairwise masks and t-of-n secret sharing.

The protocol and its guarantee are in :mod:`fedmed.privacy.secagg` (pure); this module runs it as
FLARE tasks. No party holds a key that decrypts a site's update: there is no shared secret key and
nothing to provision (the kits need no HE context); every round uses fresh keys.

The mode keeps its user-facing name ``he`` (sites' ``privacy.json`` scopes ``he`` / ``dp_he``, jobs'
``"scope": "he"``); it replaced the earlier CKKS implementation, in which every hospital held the
same secret key.

A round (server: :class:`SecureAggregation`, the controller's aggregation step; sites:
:class:`SecAggSiteExecutor` for the protocol tasks, :class:`SecAggPolicy` and :class:`SecAggMasker`
in the site's own privacy scope):

1. ``secagg_keys``: each site answers two fresh X25519 public keys.
2. ``secagg_shares``: the server sends the roster of public keys and the threshold ``t``; each site
   answers Shamir shares of its self-mask seed and mask key, encrypted for each peer.
3. ``train``: the global model (plaintext: the server learns every round's aggregate) and the
   round's cohort; the site trains, and its ``SecAggMasker`` replaces the weight difference (times
   the sample count) by the masked fixed-point vector before anything leaves.
4. ``secagg_unmask``: the server names the survivors and dropped sites and forwards the encrypted
   shares; each survivor answers the shares needed to remove the masks; the server sums, unmasks,
   divides by the total sample count and applies its server optimizer.

Every refusal below the site's minimum (``SecAggPolicy(min_sites)``, and ``t + 1``) happens at the
site, which answers an error naming the reason; the server then stops the round.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from fedmed.aggregation import UpdateError
from fedmed.atomic import write_json
from fedmed.flare.replies import error_reply
from fedmed.privacy.secagg import (  # noqa: F401 - HE_STEP_ID, apply_he_mode, he_job: re-exported
    DEFAULT_MIN_SITES,
    HE_STEP_ID,
    KEYS_TASK,
    SHARES_TASK,
    UNMASK_TASK,
    apply_he_mode,
    he_job,
    MASKED_KEY,
    PROTOCOL_KIND,
    PROTOCOL_META_KEY,
    SecAggRefused,
    SiteSession,
    check_threshold,
    default_threshold,
    flatten,
    min_cohort,
    route_shares,
    unflatten,
    unmask_sum,
    dequantize,
)
from fedmed.rounds import PlaintextAggregation, RoundFailed, RoundRejected, StepContext

ROUND_META_KEY = "secagg"  # train-task meta: {"context", "cohort", "threshold", "layout"}
POLICY_PROP = "fedmed.secagg_policy"  # FLContext property: the site's SecAggPolicy (its own min_sites)
AUDIT_FILE = "secagg_audit.json"
RELEASE_REFUSED = "FEDMED_RELEASE_REFUSED"


# ---- server --------------------------------------------------------------------------------------

class SecureAggregation(FLComponent, PlaintextAggregation):
    """The ``he`` mode's aggregation step (:class:`fedmed.rounds.ServerStep`; the controller's
    ``aggregation_step_id``): runs the key exchange before each round's training task and the
    unmasking inside :meth:`aggregate`; the server only ever sees the masked vectors and the sum.

    Args:
        threshold: Shamir threshold ``t``; 0 (default): a strict majority of the round's roster.
            Sites refuse ``t < 2``, ``2 t <= n`` and ``t > n - 1``.
        min_sites: the server's own floor on the cohort (the sites enforce theirs); default 3.
        server_optimizer: ``{"name", "args"}`` applied to the unmasked mean (default fedavg).
    """

    def __init__(self, threshold: int = 0, min_sites: int = DEFAULT_MIN_SITES, server_optimizer: dict | None = None):
        FLComponent.__init__(self)
        PlaintextAggregation.__init__(self, {"name": "fedavg"}, server_optimizer)
        if not isinstance(threshold, int) or threshold < 0 or threshold == 1:
            raise ValueError(f"SecureAggregation args.threshold must be 0 (majority) or an integer >= 2, got {threshold!r}")
        if not isinstance(min_sites, int) or min_sites < 3:
            raise ValueError(f"SecureAggregation args.min_sites must be an integer >= 3, got {min_sites!r}: with 2 sites "
                             "each could read the other's update from the aggregate")
        self.threshold_arg, self.floor = threshold, min_sites
        self.description = f"he: secure aggregation (pairwise masks, t-of-n shares), fedavg; server optimizer {self.server_optimizer_spec['name']}"
        self.min_sites = min_sites
        self.min_sites_reason = (f"the he mode (secure aggregation) needs at least {min_sites} contributing sites (and t + 1) "
                                 "so that the aggregate never reveals one hospital's update")
        self.context: StepContext | None = None
        self.round: dict = {}
        self.audit: list[dict] = []

    def restore(self, arrays, context):
        """The plaintext step's restore: FLComponent's ``StatePersistable.restore`` (which returns None)
        would otherwise come first and a rollback to a kept version would find no model."""
        return PlaintextAggregation.restore(self, arrays, context)

    def settings(self) -> dict:
        return {"aggregation": {"name": "fedavg", "args": {}}, "server_optimizer": self.server_optimizer_spec,
                "step": "secure_aggregation", "threshold": self.threshold_arg or "majority", "min_sites": self.floor}

    def create(self, weights, context):
        self.context = context
        model = PlaintextAggregation.create(self, weights, context)
        self.layout = [[key, int(np.asarray(value).size)] for key, value in model.items()]
        self.shapes = {key: list(np.asarray(value).shape) for key, value in model.items()}
        return model

    def _exchange(self, task: str, data: dict, meta: dict, targets, min_responses: int | None = None):
        answers, errors = self.context.exchange(task, PROTOCOL_KIND, data, {PROTOCOL_META_KEY: task, **meta}, targets,
                                                min_responses)
        good = {}
        for site, reply in answers.items():
            if reply.kind != PROTOCOL_KIND:
                errors[site] = f"answered {task} with {reply.kind}, expected {PROTOCOL_KIND}"
            else:
                good[site] = dict(reply.update)
        return good, errors

    def open_round(self, round_num: int, context: StepContext) -> dict:
        self.context = context
        job = getattr(context.platform, "get_job_id", lambda: "job")()
        ctx = f"{job}|{round_num}|{secrets.token_hex(8)}"
        base = {"round": round_num, "context": ctx}
        keys, errors = self._exchange(KEYS_TASK, {}, base, None, min_cohort(self.threshold_arg or 2, self.floor))
        roster = {}
        for site, answer in keys.items():
            if isinstance(answer.get("cipher_pk"), bytes) and isinstance(answer.get("mask_pk"), bytes):
                roster[site] = {"cipher_pk": answer["cipher_pk"], "mask_pk": answer["mask_pk"]}
            else:
                errors[site] = "sent no public keys"
        threshold = self.threshold_arg or default_threshold(len(roster))
        self._require(len(roster), threshold, errors, round_num, "advertised keys")
        try:
            check_threshold(threshold, len(roster), "server")
        except SecAggRefused as exc:
            raise RoundFailed(f"round {round_num}: {exc}") from exc
        shares, share_errors = self._exchange(SHARES_TASK, {"roster": roster}, {**base, "threshold": threshold}, sorted(roster),
                                              min_cohort(threshold, self.floor))
        errors.update(share_errors)
        outgoing = {site: dict(answer.get("shares") or {}) for site, answer in shares.items()}
        cohort = sorted(site for site, out in outgoing.items() if set(out) == set(roster) - {site})
        errors.update({site: "sent key shares that do not cover the roster" for site in outgoing if site not in cohort})
        self._require(len(cohort), threshold, errors, round_num, "shared their keys")
        routed = route_shares({site: {r: blob for r, blob in outgoing[site].items() if r in cohort} for site in cohort})
        self.round = {"round": round_num, "context": ctx, "threshold": threshold, "roster": roster, "cohort": cohort,
                      "routed": routed, "errors": errors}
        self.min_sites = min_cohort(threshold, self.floor)
        return {ROUND_META_KEY: {"context": ctx, "cohort": cohort, "threshold": threshold, "layout": self.layout}}

    def _require(self, count: int, threshold: int, errors: dict, round_num: int, what: str) -> None:
        need = min_cohort(threshold, self.floor)
        if count < need:
            details = "; ".join(f"{site}: {msg}" for site, msg in sorted(errors.items()))
            raise RoundFailed(f"round {round_num}: only {count} site(s) {what}, secure aggregation needs {need} "
                              f"(t={threshold} + 1, min_sites={self.floor})" + (f". {details}" if details else ""))

    def check_update(self, site, update, num_samples, global_model, meta=None) -> None:
        if site not in self.round.get("cohort", ()):
            raise UpdateError(f"site {site}: is not in this round's secure-aggregation cohort; its update cannot be unmasked")
        if set(update) != {MASKED_KEY}:
            raise UpdateError(f"site {site}: sent {sorted(update)[:3]} under he; only a masked vector ('{MASKED_KEY}') is aggregated "
                              "(check the site's privacy.json he scope: SecAggMasker)")
        vector = update[MASKED_KEY]
        total = sum(size for _, size in self.layout)
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.shape != (total,):
            raise UpdateError(f"site {site}: the masked vector must be uint64 of shape ({total},), got "
                              f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}")

    def _combine(self, global_model, contributions, spec):
        state = self.round
        masked = {c.site: c.update[MASKED_KEY] for c in contributions}
        survivors = sorted(masked)
        dropped = sorted(set(state["cohort"]) - set(survivors))
        shares = {site: state["routed"].get(site, {}) for site in survivors}
        answers, errors = self._exchange(UNMASK_TASK, {"shares": shares},
                                         {"round": state["round"], "context": state["context"], "survivors": survivors,
                                          "dropped": dropped}, survivors, state["threshold"] + 1)
        try:
            ring = unmask_sum(masked, state["roster"], state["cohort"], answers, state["threshold"], state["context"].encode())
        except SecAggRefused as exc:
            details = "; ".join(f"{site}: {msg}" for site, msg in sorted(errors.items()))
            raise RoundRejected(f"round {state['round']}: the masks could not be removed: {exc}" + (f". {details}" if details else ""),
                                sorted(errors)) from exc
        total_samples = float(sum(c.num_samples for c in contributions))
        mean = unflatten(dequantize(ring) / total_samples, self.layout, self.shapes)
        mean_update = {key: value.astype(np.asarray(global_model[key]).dtype) if np.issubdtype(np.asarray(global_model[key]).dtype, np.floating)
                       else np.rint(value).astype(np.asarray(global_model[key]).dtype) for key, value in mean.items()}
        received = {site: {"b_shares_of": sorted(a.get("b", {})), "s_shares_of": sorted(a.get("s", {}))} for site, a in answers.items()}
        record = {"round": state["round"], "threshold": state["threshold"], "roster": sorted(state["roster"]),
                  "cohort": state["cohort"], "survivors": survivors, "dropped": dropped,
                  "unmask_answers": sorted(answers), "unmask_errors": errors,
                  "single_site_unmaskable": self._exposed(answers, state["threshold"]), "shares_received": received}
        self.audit.append(record)
        if self.context is not None:
            write_json(Path(self.context.out_dir) / AUDIT_FILE, {"rounds": self.audit})
        report = {"aggregator": "secure_aggregation", "threshold": state["threshold"], "survivors": survivors, "dropped": dropped}
        return mean_update, report

    @staticmethod
    def _exposed(answers: dict, threshold: int) -> list[str]:
        """Sites for which the server now holds t shares of BOTH secrets (must be empty)."""
        b_count, s_count = {}, {}
        for answer in answers.values():
            for site in answer.get("b", {}):
                b_count[site] = b_count.get(site, 0) + 1
            for site in answer.get("s", {}):
                s_count[site] = s_count.get(site, 0) + 1
        return sorted(site for site in b_count if b_count[site] >= threshold and s_count.get(site, 0) >= threshold)

    def _responsible(self, global_model, contributions) -> list[str]:
        return [c.site for c in contributions]  # single updates are masked: no leave-one-out under he


class MaskedOnlyCheck(Filter):
    """Server-side task-result filter of the ``he`` scope: a model update must arrive as one masked
    uint64 vector; a plaintext tensor is dropped with an error naming the site."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: the controller reports it
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        plain = sorted(key for key in dxo.data if key != MASKED_KEY)
        vector = dxo.data.get(MASKED_KEY)
        if plain or not isinstance(vector, np.ndarray) or vector.dtype != np.uint64:
            message = (f"he scope: site {site} sent a model update that is not one masked uint64 vector "
                       f"(tensors {', '.join(plain[:3]) or 'none'}); dropped - check the site's privacy.json he scope")
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)
        return shareable


# ---- sites ---------------------------------------------------------------------------------------

_SESSIONS: dict[tuple[str, str], SiteSession] = {}  # (job id, site) -> this round's session
_PENDING: dict[tuple[str, str], dict] = {}  # (job id, site) -> the train task's secagg meta
_LOCK = threading.Lock()


def _key(fl_ctx: FLContext) -> tuple[str, str]:
    return str(fl_ctx.get_job_id()), fl_ctx.get_identity_name(default="?")


class SecAggPolicy(Filter):
    def __init__(self, min_sites: int = DEFAULT_MIN_SITES):
        """Site task-data filter of the ``he`` / ``dp_he`` scope: this site takes part in secure
        aggregation, with its own floor on the round's cohort (set in its ``local/privacy.json``;
        the job cannot lower it). It hands the policy to :class:`SecAggSiteExecutor` on every task
        and remembers the train task's round meta for :class:`SecAggMasker`.

        Args:
            min_sites: fewest sites this site accepts in a round (>= 3); it also refuses fewer
                than t + 1 and thresholds with 2 t <= n.
        """
        super().__init__()
        if not isinstance(min_sites, int) or isinstance(min_sites, bool) or min_sites < 3:
            raise ValueError(f"SecAggPolicy args.min_sites must be an integer >= 3, got {min_sites!r}: with 2 sites each "
                             "could read the other's update from the aggregate (check local/privacy.json)")
        self.min_sites = min_sites

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        fl_ctx.set_prop(POLICY_PROP, self.min_sites, private=True, sticky=False)
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO
            return shareable
        if dxo.data_kind == DataKind.WEIGHTS and isinstance(dxo.get_meta_prop(ROUND_META_KEY), dict):
            with _LOCK:
                _PENDING[_key(fl_ctx)] = dict(dxo.get_meta_prop(ROUND_META_KEY))
        return shareable


class SecAggSiteExecutor(Executor):
    """Site executor of the protocol tasks (``secagg_keys``, ``secagg_shares``, ``secagg_unmask``).
    Works only under a scope with :class:`SecAggPolicy` (the site's own minimum); every refusal is
    an error reply naming the site and the reason."""

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name(default="?")
        min_sites = fl_ctx.get_prop(POLICY_PROP)
        if not isinstance(min_sites, int):
            return error_reply(f"site {site}: secure aggregation refused: this site's privacy scope has no "
                               "fedmed.flare.he.SecAggPolicy (allow the he scope in local/privacy.json)")
        try:
            dxo = from_shareable(shareable)
            meta = dxo.meta or {}
            data = dxo.data or {}
            context = str(meta.get("context", ""))
            key = _key(fl_ctx)
            if task_name == KEYS_TASK:
                session = SiteSession(site, context.encode(), min_sites=min_sites)
                with _LOCK:
                    _SESSIONS[key] = session
                    _PENDING.pop(key, None)
                answer = session.advertise()
            else:
                with _LOCK:
                    session = _SESSIONS.get(key)
                if session is None or session.context != context.encode():
                    raise SecAggRefused(f"site {site}: {task_name} for a round whose keys this site did not make; refused")
                if task_name == SHARES_TASK:
                    answer = {"shares": session.share_keys(data.get("roster") or {}, meta.get("threshold"))}
                elif task_name == UNMASK_TASK:
                    mine = (data.get("shares") or {}).get(site, {})
                    answer = session.unmask(meta.get("survivors") or [], meta.get("dropped") or [], mine)
                    with _LOCK:
                        _SESSIONS.pop(key, None)  # the round is over: forget its keys
                else:
                    raise SecAggRefused(f"site {site}: unknown secure-aggregation task '{task_name}'")
        except SecAggRefused as exc:
            self.log_error(fl_ctx, str(exc))
            return error_reply(str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            message = f"site {site}: malformed {task_name} request ({type(exc).__name__}: {exc}); refused"
            self.log_error(fl_ctx, message)
            return error_reply(message)
        return DXO(data_kind=PROTOCOL_KIND, data=answer, meta={PROTOCOL_META_KEY: task_name}).to_shareable()


class SecAggMasker(Filter):
    """Site task-result filter of the ``he`` / ``dp_he`` scope (after the release policy, before the
    transfer meter): the only model data that leaves is the masked vector of this round's secure
    aggregation. A weight difference is multiplied by its sample count, quantized and masked; any
    other model result (a full local model for cross-site evaluation, or an update outside a secure
    aggregation round) is refused."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site = fl_ctx.get_identity_name(default="?")
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - the release policy already refused non-DXO results
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable

        def refuse(reason: str) -> Shareable:
            message = f"site {site}: he scope: {reason} (task '{task}'); nothing released"
            self.log_error(fl_ctx, message)
            return error_reply(message, RELEASE_REFUSED)

        key = _key(fl_ctx)
        with _LOCK:
            round_meta = _PENDING.pop(key, None)
            session = _SESSIONS.get(key)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return refuse(f"only a masked weight difference may leave, not {dxo.data_kind}")
        if round_meta is None or session is None or session.context != str(round_meta.get("context", "")).encode():
            return refuse("no secure-aggregation round is open for this update (the job must run the he step)")
        num_samples = dxo.get_meta_prop("num_samples")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or not num_samples > 0:
            return refuse(f"the update's sample count {num_samples!r} is not a positive number")
        try:
            values = flatten(dxo.data, round_meta.get("layout") or [], f"site {site}") * float(num_samples)
            masked = session.mask(values, round_meta.get("cohort") or [])
        except SecAggRefused as exc:
            return refuse(str(exc))
        meta = dict(dxo.meta)
        meta[ROUND_META_KEY] = {"masked": True, "threshold": session.threshold, "cohort_size": len(session.cohort)}
        self.log_info(fl_ctx, f"site {site}: he scope: sent the masked update ({masked.nbytes} bytes) for a cohort of "
                              f"{len(session.cohort)} (t={session.threshold})")
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data={MASKED_KEY: masked}, meta=meta).update_shareable(shareable)
