"""The job specification: one frozen, pure description of a federated job and its variants.

A :class:`JobSpec` says what a FLARE job of this project is made of (the FedAvg controller's args,
the executor at every site, optional cross-site evaluation, components, filter chains, meta), with
no FLARE import. Everything that changes a job returns a *new* spec:

- :func:`with_settings` (``--set KEY=VALUE``, keys declared once in :data:`CONTROLLER_SETTINGS`,
  :data:`EXECUTOR_SETTINGS`, :data:`CLIENT_API_SETTINGS`),
- :func:`for_simulation` (rounds, ``min_clients`` capped at the number of sites),
- :func:`with_scope`, :func:`with_filters`, :func:`with_components` (privacy modes, HE, attacks),
- :func:`with_he` (the ``he`` privacy mode), :func:`with_attacks` (``simulate --attack``);
  ``fedmed.privacy.simulation.with_privacy_mode`` (a scope's filters copied in for the simulator).

Where a spec goes:

- ``jobs/<name>/job.py`` defines its spec with :func:`fedavg_job` in a few lines;
- :func:`fedmed.jobfolder.write_job_folder` is the one writer of job folders (byte-for-byte what
  FLARE's exporter writes) and :func:`fedmed.jobfolder.read_job_spec` reads a folder back into a spec;
- :func:`fedmed.flare.recipes.recipe_from_spec` is the one place a spec becomes FLARE objects
  (FLARE's Recipe API), and :func:`fedmed.flare.recipes.check_spec` builds the real objects'
  checks (controller, executor, network, task, trainer) so a bad ``--set`` fails in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROLLER_PATH = "fedmed.flare.controller.FedAvgController"
EXECUTOR_PATH = "fedmed.flare.executor.FedMedExecutor"
CLIENT_API_EXECUTOR_PATH = "fedmed.flare.client_api.FedMedClientAPIExecutor"
EXECUTOR_PATHS = (EXECUTOR_PATH, CLIENT_API_EXECUTOR_PATH)
CROSS_SITE_PATH = "fedmed.flare.cross_site.CrossSiteEvaluation"
ATTACK_FILTER_PATH = "fedmed.flare.attack_filter.SimulatedAttackFilter"
TB_RECEIVER_PATH = "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"
TB_WRITER_PATH = "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"
TO_FED_EVENT_PATH = "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent"
EXECUTOR_TASKS = ("train", "validate", "submit_model")
CONTROLLER_ID = "fedavg"
CROSS_SITE_ID = "cross_site_evaluation"
DEFAULT_CROSS_SITE = {"model_file": "global_model.pt", "submit_timeout": 60, "validation_timeout": 3600}

# HE (privacy modes "he" / "dp_he": secure aggregation, fedmed.privacy.secagg / fedmed.flare.he):
# the controller's aggregation step (named by aggregation_step_id) and the sites' protocol executor
HE_MODES = ("he", "dp_he")
HE_STEP_ID = "he_step"
HE_STEP_PATH = "fedmed.flare.he.SecureAggregation"
SECAGG_TASKS = ("secagg_keys", "secagg_shares", "secagg_unmask")
SECAGG_EXECUTOR_PATH = "fedmed.flare.he.SecAggSiteExecutor"

# ---- the settable keys, declared once ------------------------------------------------------------
# ``--set KEY=VALUE`` (simulate, rehearse, job.py) may change exactly these. Wiring between
# components (task names, component ids, file names) is not a setting. tests/test_jobspec.py checks
# every key is a real constructor argument of its class.
CONTROLLER_SETTINGS: dict[str, str] = {
    "num_rounds": "federated rounds (also --rounds)",
    "min_clients": "fewest sites whose valid update a round needs",
    "round_timeout": "seconds a round may take before it closes with whoever answered",
    "wait_after_min_clients": "seconds to wait for late sites once min_clients answered",
    "network": 'network spec {"name": ..., "args": {...}} (fedmed.networks)',
    "task": 'task spec {"name": "classification"|"segmentation", "args": {...}} (fedmed.tasks)',
    "seed": "seeds the initial global model (and, for the executor, shuffling)",
    "final_validation": "validate the final global model at every site after the last round",
    "allow_partial_updates": "accept updates lacking some keys (a privacy filter removed them)",
    "aggregation": 'robust aggregation {"name": "fedavg"|"clipped_fedavg"|"trimmed_mean"|"median"|"geometric_median"|"multi_krum", "args": {"f": ..., ...}}',
    "server_optimizer": 'server optimizer {"name": "fedavg"|"fedavgm"|"fedadam"|"fedyogi", "args": {...}}',
    "release_tolerance": "release gate: how far below the best version the final model may score and still be released (default 0.02)",
    "release_on_collapse": "release gate: 'fail' (default) ends a job whose training beat no model; 'initial' releases the initial model, saying so",
}
EXECUTOR_SETTINGS: dict[str, str] = {
    "local_epochs": "epochs over the site's training data per round",
    "lr": "Adam learning rate (> 0)",
    "batch_size": "mini-batch size",
    "fedprox_mu": "FedProx proximal weight (0: plain FedAvg local training)",
    "seed": "seeds shuffling (combined with the round number)",
    "device": '"auto" (CUDA when present), "cpu" or "cuda[:N]"',
    "amp": "mixed precision on CUDA",
    "num_workers": "DataLoader worker processes",
    "lr_schedule": '"cosine" (decay over the rounds) or "constant"',
    "min_local_steps": "fewest optimizer steps per round: a small site trains extra epochs to reach them (0: local_epochs only; not under DP-SGD)",
}
CLIENT_API_SETTINGS: dict[str, str] = {
    "lr": "the script's --lr",
    "local_epochs": "the script's --local_epochs",
    "batch_size": "the script's --batch_size",
    "seed": "the script's --seed",
    "task_script_args": "further arguments for the site's training script",
}
SETTING_ALIASES = {"rounds": ("controller", "num_rounds")}  # same as --rounds


class JobSpecError(ValueError):
    """A job spec, or a change to it, that cannot be used; the message names the job and the key."""


def _frozen_copy(value: Any) -> Any:
    return copy.deepcopy(dict(value)) if isinstance(value, Mapping) else copy.deepcopy(value)


@dataclass(frozen=True)
class Component:
    """A FLARE component / filter: its class ``path``, ``args`` and (components) ``id``."""

    path: str
    args: Mapping = field(default_factory=dict)
    id: str | None = None

    def to_dict(self) -> dict:
        entry = {"id": self.id} if self.id is not None else {}
        return {**entry, "path": self.path, "args": copy.deepcopy(dict(self.args))}

    @classmethod
    def from_dict(cls, entry: Mapping) -> "Component":
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise JobSpecError(f"a component or filter needs a 'path' (and 'args'), got {entry!r}")
        return cls(entry["path"], _frozen_copy(entry.get("args") or {}), entry.get("id"))


@dataclass(frozen=True)
class FilterChain:
    """Filters FLARE runs, in order, for ``tasks`` (FLARE keeps one chain per task)."""

    tasks: tuple[str, ...]
    filters: tuple[Component, ...]


FILTER_KINDS = {
    ("client", "task_data_filters"): "client_data_filters",
    ("client", "task_result_filters"): "client_result_filters",
    ("server", "task_data_filters"): "server_data_filters",
    ("server", "task_result_filters"): "server_result_filters",
}


@dataclass(frozen=True)
class JobSpec:
    """A federated job of this project. Treat it as a value: change it only through the functions here.

    Fields: ``name`` (meta.json name), ``controller`` (FedAvgController args), ``executor`` (the
    executor's args) and ``executor_path``, ``cross_site`` (CrossSiteEvaluation args, ``None``: no
    cross-site workflow), ``min_clients`` (meta.json), ``meta`` (further meta.json properties, e.g.
    ``scope``), ``server_components`` / ``client_components``, the four filter-chain tuples,
    ``server_params`` (top-level server config, e.g. ``task_request_interval``) and ``script``
    (a Client API job's training script, copied into ``app/custom/``).
    """

    name: str
    controller: Mapping
    executor: Mapping
    executor_path: str = EXECUTOR_PATH
    cross_site: Mapping | None = None
    min_clients: int = 1
    meta: Mapping = field(default_factory=dict)
    server_components: tuple[Component, ...] = ()
    client_components: tuple[Component, ...] = ()
    client_data_filters: tuple[FilterChain, ...] = ()
    client_result_filters: tuple[FilterChain, ...] = ()
    server_data_filters: tuple[FilterChain, ...] = ()
    server_result_filters: tuple[FilterChain, ...] = ()
    server_params: Mapping = field(default_factory=lambda: {"task_request_interval": 0.5})
    script: str | None = field(default=None, compare=False)  # where the script is read from, not what the job is
    extra_executors: tuple[tuple[tuple[str, ...], Component], ...] = ()  # (tasks, executor) beside the main one (he: SECAGG_TASKS)

    def controller_args(self) -> dict:
        return copy.deepcopy(dict(self.controller))

    def executor_args(self) -> dict:
        return copy.deepcopy(dict(self.executor))

    @property
    def scope(self) -> str:
        return str(self.meta.get("scope", ""))

    @property
    def num_rounds(self) -> int:
        return int(self.controller.get("num_rounds", 5))

    @property
    def task_spec(self) -> dict:
        return copy.deepcopy(dict(self.controller.get("task") or {"name": "classification"}))

    def client_tasks(self) -> list[str]:
        return list(EXECUTOR_TASKS) + [task for tasks, _ in self.extra_executors for task in tasks]

    def filters(self, side: str, kind: str) -> tuple[FilterChain, ...]:
        return getattr(self, _filter_field(side, kind))

    def replace(self, **changes) -> "JobSpec":
        return dataclasses.replace(self, **{k: _frozen_copy(v) if isinstance(v, Mapping) else v for k, v in changes.items()})


def _filter_field(side: str, kind: str) -> str:
    try:
        return FILTER_KINDS[(side, kind)]
    except KeyError:
        raise JobSpecError(f"filters: side must be client|server and kind task_data_filters|task_result_filters, "
                           f"got {side}, {kind}") from None


def fedavg_job(name: str, *, controller: Mapping, executor: Mapping, cross_site: Mapping | None = DEFAULT_CROSS_SITE,
               executor_path: str = EXECUTOR_PATH, script: str | None = None, min_clients: int | None = None,
               meta: Mapping | None = None, tensorboard: bool = True, task_request_interval: float = 0.5) -> JobSpec:
    """A job of this project: the FedAvg controller (``job_name`` = ``name`` unless given), ``executor``
    at every site, cross-site evaluation (``None`` leaves it out), TensorBoard streaming (the sites'
    TBWriter + ConvertToFedEvent, the server's TBAnalyticsReceiver)."""
    controller = {**dict(controller)}
    controller.setdefault("job_name", name)
    if executor_path == CLIENT_API_EXECUTOR_PATH:
        if not script:
            raise JobSpecError(f"{name}: a Client API job needs its training script")
        executor = {"task_script_path": Path(script).name, **dict(executor)}
    server_components, client_components = (), ()
    if tensorboard:
        server_components = (Component(TB_RECEIVER_PATH, {"events": ["fed.analytix_log_stats"]}, "tb_receiver"),)
        client_components = (Component(TB_WRITER_PATH, {}, "tb_writer"),
                             Component(TO_FED_EVENT_PATH, {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."},
                                       "event_to_fed"))
    return JobSpec(
        name=name, controller=_frozen_copy(controller), executor=_frozen_copy(executor), executor_path=executor_path,
        cross_site=_frozen_copy(cross_site) if cross_site is not None else None,
        min_clients=int(min_clients if min_clients is not None else controller.get("min_clients", 1)),
        meta=_frozen_copy(meta or {}), server_components=server_components, client_components=client_components,
        server_params={"task_request_interval": task_request_interval}, script=script,
    )


# ---- settings -------------------------------------------------------------------------------------

def settable_keys(spec: JobSpec) -> dict[str, list[tuple[str, str]]]:
    """``{--set key: [(component, argument), ...]}`` for this job; a key both take (``seed``) is set in both."""
    executor_keys = CLIENT_API_SETTINGS if spec.executor_path == CLIENT_API_EXECUTOR_PATH else EXECUTOR_SETTINGS
    keys: dict[str, list[tuple[str, str]]] = {}
    for component, declared in (("executor", executor_keys), ("controller", CONTROLLER_SETTINGS)):
        for name in declared:
            keys.setdefault(name, []).append((component, name))
    for alias, target in SETTING_ALIASES.items():
        keys.setdefault(alias, [target])
    return keys


def setting_targets(spec: JobSpec, settings: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Where each key of ``settings`` goes; an unknown key raises listing the valid ones."""
    valid = settable_keys(spec)
    unknown = sorted(key for key in settings if key.split(".", 1)[0] not in valid)
    if unknown:
        raise JobSpecError(
            f"--set: unknown key(s) {', '.join(unknown)} for job {spec.name}; valid keys: {', '.join(sorted(valid))} "
            "(a dotted key such as network.args.width changes one entry of a dict-valued key)")
    return {key: valid[key.split(".", 1)[0]] for key in settings}


def with_settings(spec: JobSpec, settings: Mapping[str, Any]) -> JobSpec:
    """``spec`` with ``settings`` written into the executor / controller args.

    A dotted key changes one entry inside a dict-valued setting, MONAI-``#``-style:
    ``network.args.width=32`` keeps the rest of ``network``. An unknown key raises before anything changes.
    """
    if not settings:
        return spec
    targets = setting_targets(spec, settings)
    args = {"controller": spec.controller_args(), "executor": spec.executor_args()}
    for key, value in settings.items():
        head, *path = key.split(".")
        for component, argument in targets[key]:
            if not path:
                args[component][argument] = copy.deepcopy(value)
                continue
            node = args[component].get(argument)
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise JobSpecError(f"--set {key}: {'.'.join([head, *path[:-1]])} is not a JSON object in the "
                                   f"{component}'s args of job {spec.name}; set the whole {head} instead")
            node[path[-1]] = copy.deepcopy(value)
    return spec.replace(controller=args["controller"], executor=args["executor"])


def for_simulation(spec: JobSpec, num_sites: int, rounds: int | None = None) -> JobSpec:
    """``num_rounds`` set (when given) and ``min_clients`` capped at ``num_sites`` (controller and meta)."""
    if num_sites < 1:
        raise JobSpecError(f"the number of sites must be >= 1, got {num_sites}")
    controller = spec.controller_args()
    if rounds is not None:
        controller["num_rounds"] = rounds
    controller["min_clients"] = min(int(controller.get("min_clients", 1)), num_sites)
    return spec.replace(controller=controller, min_clients=min(int(spec.min_clients), num_sites))


def with_scope(spec: JobSpec, scope: str | None) -> JobSpec:
    """The privacy scope the job asks every site for (meta.json ``scope``); ``None`` / ``""`` removes it."""
    meta = dict(spec.meta)
    if scope:
        meta["scope"] = scope
    else:
        meta.pop("scope", None)
    return spec.replace(meta=meta)


def with_filters(spec: JobSpec, side: str, kind: str, filters: Iterable[Mapping | Component], tasks: Iterable[str],
                 first: bool = True) -> JobSpec:
    """``spec`` with ``filters`` added for ``tasks`` to the ``side`` ("client"/"server") ``kind`` chains.

    FLARE keeps one chain per task: a chain covering some of ``tasks`` is split so those tasks get the
    filters ahead of the chain's own (``first``, the order FLARE applies site scopes in) or after
    them; tasks no chain covers get a new chain.
    """
    name = _filter_field(side, kind)
    added = tuple(f if isinstance(f, Component) else Component.from_dict(f) for f in filters)
    tasks = [t for t in dict.fromkeys(tasks)]
    if not added:
        return spec
    if not tasks:
        raise JobSpecError(f"{spec.name}: filters need the task names they apply to")
    if "*" in tasks:
        raise JobSpecError(f"{spec.name}: name the tasks filters attach to, not '*'")
    chains, covered = [], set()
    for chain in getattr(spec, name):
        hit = tuple(t for t in chain.tasks if t in tasks)
        rest = tuple(t for t in chain.tasks if t not in tasks)
        if not hit:
            chains.append(chain)
            continue
        if rest:
            chains.append(FilterChain(rest, chain.filters))
        chains.append(FilterChain(hit, added + chain.filters if first else chain.filters + added))
        covered.update(hit)
    missing = tuple(t for t in tasks if t not in covered)
    if missing:
        chains.append(FilterChain(missing, added))
    return dataclasses.replace(spec, **{name: tuple(chains)})


def with_components(spec: JobSpec, side: str, components: Iterable[Mapping | Component], replace: bool = False) -> JobSpec:
    """``spec`` with ``components`` (each with an ``id``) added on ``side``; an id already there raises
    unless ``replace`` (then the old one goes)."""
    if side not in ("client", "server"):
        raise JobSpecError(f"components: side must be client or server, got {side}")
    name = f"{side}_components"
    new = tuple(c if isinstance(c, Component) else Component.from_dict(c) for c in components)
    new_ids = {c.id for c in new}
    if None in new_ids:
        raise JobSpecError(f"{spec.name}: every {side} component needs an id")
    existing = getattr(spec, name)
    clash = sorted(c.id for c in existing if c.id in new_ids)
    if clash and not replace:
        raise JobSpecError(f"{spec.name}: component id(s) {', '.join(repr(c) for c in clash)} already in the {side} config")
    return dataclasses.replace(spec, **{name: tuple(c for c in existing if c.id not in new_ids) + new})


def with_he(spec: JobSpec, scope: str = "he", threshold: int = 0) -> JobSpec:
    """The ``he`` (or ``dp_he``) variant: secure aggregation (fedmed.privacy.secagg). Scope ``scope``;
    the controller's ``aggregation_step_id`` names the server step (``fedmed.flare.he.SecureAggregation``,
    which takes over the job's ``server_optimizer``; a robust ``aggregation`` is dropped: the server
    sees only the sum); the sites' executor for the protocol tasks; no cross-site workflow (it would
    ask every site for its plaintext local model). Nothing is provisioned for it. The step and the
    sites refuse rounds with fewer than 3 sites (fedmed.flare.he)."""
    if scope not in HE_MODES:
        raise JobSpecError(f"{spec.name}: with_he scope must be one of {', '.join(HE_MODES)}, got {scope!r}")
    controller = spec.controller_args()
    controller.pop("aggregation", None)
    step_args = {}
    optimizer = controller.pop("server_optimizer", None)
    if optimizer:
        step_args["server_optimizer"] = optimizer
    if threshold:
        step_args["threshold"] = int(threshold)
    controller["aggregation_step_id"] = HE_STEP_ID
    spec = spec.replace(controller=controller, cross_site=None)
    spec = with_components(spec, "server", [Component(HE_STEP_PATH, _frozen_copy(step_args), HE_STEP_ID)], replace=True)
    extra = tuple(e for e in spec.extra_executors if e[1].path != SECAGG_EXECUTOR_PATH)
    spec = dataclasses.replace(spec, extra_executors=extra + ((SECAGG_TASKS, Component(SECAGG_EXECUTOR_PATH, {})),))
    return with_scope(spec, scope)


def with_attacks(spec: JobSpec, attacks: Iterable[Mapping], task_name: str = "train") -> JobSpec:
    """``simulate --attack``: the simulated-attack result filter LAST in the sites' ``task_name`` chain
    (a simulated job copy only; the project's job folders never carry it). ``attacks``: ``Attack.to_dict()``s."""
    attacks = [dict(a) for a in attacks]
    if not attacks:
        return spec
    return with_filters(spec, "client", "task_result_filters", [Component(ATTACK_FILTER_PATH, {"attacks": attacks})],
                        [task_name], first=False)


# ---- the job folder's JSON (fedmed.jobfolder writes and reads it) ---------------------------------

def _chains_json(chains: tuple[FilterChain, ...]) -> list[dict]:
    return [{"tasks": list(c.tasks), "filters": [{"path": f.path, "args": copy.deepcopy(dict(f.args))} for f in c.filters]}
            for c in chains]


def to_configs(spec: JobSpec) -> dict[str, dict]:
    """``{"meta.json": ..., "app/config/config_fed_server.json": ..., "app/config/config_fed_client.json": ...}``:
    what FLARE's exporter writes for this spec (same keys, same order)."""
    meta = {"name": spec.name, "resource_spec": {}, "min_clients": int(spec.min_clients), "deploy_map": {"app": ["@ALL"]}}
    meta.update(copy.deepcopy(dict(spec.meta)))
    workflows = [{"id": CONTROLLER_ID, "path": CONTROLLER_PATH, "args": spec.controller_args()}]
    if spec.cross_site is not None:
        workflows.append({"id": CROSS_SITE_ID, "path": CROSS_SITE_PATH, "args": copy.deepcopy(dict(spec.cross_site))})
    server = {"format_version": 2, "workflows": workflows,
              "components": [c.to_dict() for c in spec.server_components],
              "task_data_filters": _chains_json(spec.server_data_filters),
              "task_result_filters": _chains_json(spec.server_result_filters),
              "server": copy.deepcopy(dict(spec.server_params))}
    if not spec.server_params:
        server.pop("server")
    client = {"format_version": 2,
              "executors": [{"tasks": list(EXECUTOR_TASKS), "executor": {"path": spec.executor_path, "args": spec.executor_args()}}]
              + [{"tasks": list(tasks), "executor": {"path": e.path, "args": copy.deepcopy(dict(e.args))}} for tasks, e in spec.extra_executors],
              "components": [c.to_dict() for c in spec.client_components],
              "task_data_filters": _chains_json(spec.client_data_filters),
              "task_result_filters": _chains_json(spec.client_result_filters)}
    return {"meta.json": meta, "app/config/config_fed_server.json": server, "app/config/config_fed_client.json": client}


def from_configs(meta: Mapping, server: Mapping, client: Mapping, script: str | None = None, where: str = "job") -> JobSpec:
    """The spec a job folder's three JSON files describe; anything this project's jobs do not hold raises naming it."""
    reserved = {"name", "resource_spec", "min_clients", "deploy_map"}
    if not isinstance(meta.get("name"), str):
        raise JobSpecError(f"{where}/meta.json has no 'name'")
    controller = cross_site = None
    for workflow in server.get("workflows", []):
        if workflow.get("path") == CONTROLLER_PATH:
            controller = workflow.get("args") or {}
        elif workflow.get("path") == CROSS_SITE_PATH:
            cross_site = workflow.get("args") or {}
        else:
            raise JobSpecError(f"{where}/app/config/config_fed_server.json: workflow {workflow.get('path')!r} is not one of "
                               f"this project's ({CONTROLLER_PATH}, {CROSS_SITE_PATH})")
    if controller is None:
        raise JobSpecError(f"{where}/app/config/config_fed_server.json: no workflow with path {CONTROLLER_PATH}")
    executors = client.get("executors", [])
    entry = executors[0].get("executor", {}) if executors else {}
    extra = [(tuple(e.get("tasks", [])), Component.from_dict(e.get("executor", {}))) for e in executors[1:]]
    if entry.get("path") not in EXECUTOR_PATHS or any(e.path != SECAGG_EXECUTOR_PATH for _, e in extra):
        raise JobSpecError(f"{where}/app/config/config_fed_client.json: expected one executor with path "
                           f"{' or '.join(EXECUTOR_PATHS)} (and, under he, {SECAGG_EXECUTOR_PATH} for {', '.join(SECAGG_TASKS)})")

    def chains(config: Mapping, kind: str) -> tuple[FilterChain, ...]:
        return tuple(FilterChain(tuple(c.get("tasks", [])), tuple(Component.from_dict(f) for f in c.get("filters", [])))
                     for c in config.get(kind, []) or [])

    return JobSpec(
        name=meta["name"], controller=_frozen_copy(controller), executor=_frozen_copy(entry.get("args") or {}),
        executor_path=entry["path"], cross_site=_frozen_copy(cross_site) if cross_site is not None else None,
        min_clients=int(meta.get("min_clients", 1)), meta={k: copy.deepcopy(v) for k, v in meta.items() if k not in reserved},
        server_components=tuple(Component.from_dict(c) for c in server.get("components", [])),
        client_components=tuple(Component.from_dict(c) for c in client.get("components", [])),
        client_data_filters=chains(client, "task_data_filters"), client_result_filters=chains(client, "task_result_filters"),
        server_data_filters=chains(server, "task_data_filters"), server_result_filters=chains(server, "task_result_filters"),
        server_params=_frozen_copy(server.get("server") or {}), script=script, extra_executors=tuple(extra),
    )
