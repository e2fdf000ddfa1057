"""The one place a job spec becomes FLARE objects: FLARE 2.9's ``nvflare.recipe.spec.Recipe``.

:func:`recipe_from_spec` turns a :class:`fedmed.jobspec.JobSpec` into a :class:`FedMedRecipe`: a
``FedJob`` holding our controller (:class:`fedmed.flare.controller.FedAvgController`), optional
cross-site evaluation, our executor at every site (:class:`fedmed.flare.executor.FedMedExecutor`,
or the Client API bridge with a training script), the spec's components, and its filter chains
through the Recipe API's own filter methods (``add_client_input_filter``, ``add_client_output_filter``,
``add_server_input_filter``, ``add_server_output_filter``). Everything FLARE documents then works::

    recipe = recipe_from_spec(read_job_spec("jobs/cxr_pneumonia_fedavg"))
    recipe.export("out")                                    # FLARE's exporter: out/<name>/
    recipe.execute(SimEnv(clients=[...], workspace_root="runs/x"))   # or ProdEnv(startup_kit_location=KIT)

:func:`check_spec` builds the real objects' checks (controller, executor, cross-site evaluation,
components and filters through the recipe; the network, the task and the local trainer with the
job's settings) without starting FLARE, so a bad ``--set`` fails in seconds naming key and reason.
:func:`run_job_script` is the command line of every ``jobs/<name>/job.py``.

Component arguments are written exactly as given: FLARE's exporter would drop arguments equal to
a constructor default and reads them back from instance attributes (ours keep some under other
names), so each component is added as a :func:`configured` stand-in of its real class that FLARE
serialises as ``{"path": <real class>, "args": <the given args>}``. Its constructor runs the real
one with those args, so a bad argument fails when the recipe is built, naming the class.
No code is copied into the job (``fedmed`` is an app package, pre-installed at every site), except a
Client API job's training script, which is the point of that route.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from fedmed.jobfolder import JobFolder, write_job_folder
from fedmed.jobspec import (CLIENT_API_EXECUTOR_PATH, CONTROLLER_ID, CONTROLLER_PATH, CROSS_SITE_ID, CROSS_SITE_PATH,
                            EXECUTOR_PATH, EXECUTOR_TASKS, JobSpec, JobSpecError, setting_targets)

APP_PACKAGES = ["fedmed"]


class RecipeError(JobSpecError):
    """A spec's settings do not fit the component they configure; the message names it."""


def _load_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"component {path} cannot be imported: {exc}") from exc


def configured(path: str, args: dict | None = None):
    """The component ``path`` with ``args``, as FLARE's job exporter should write it: exactly those args.

    Returns an instance of a stand-in subclass (same module and name, so the same ``path``) whose
    constructor runs the real one (bad args raise, unknown ones listing the valid ones) and whose
    signature is just ``args``; FLARE's ``FedJob`` adds it like the real thing (executor,
    controller, filter or component) and exports every given arg. It only ever exists in the
    process building the job: FLARE instantiates the real class at the sites and the server.
    """
    args = dict(args or {})
    cls = _load_class(path)
    valid = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise RecipeError(f"{path}: unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}")

    def __init__(self, **kwargs):
        cls.__init__(self, **kwargs)  # the real constructor checks the args and sets up what FedJob uses
        self.__dict__.update(kwargs)  # what FLARE's exporter reads back, under the argument names

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in args]
    )
    stand_in = type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__init__": __init__,
        "_always_serialize_args": tuple(args), "__doc__": f"{path} as configured for a job export",
    })
    try:
        return stand_in(**args)
    except Exception as exc:
        raise RecipeError(f"{path}: {type(exc).__name__}: {exc}") from exc


class FedMedRecipe(Recipe):
    """A federated job of this project as FLARE's Recipe, built from a :class:`~fedmed.jobspec.JobSpec`."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        job = FedJob(name=spec.name, min_clients=int(spec.min_clients), meta_props=dict(spec.meta) or None)
        job.set_app_packages(APP_PACKAGES)
        job.to_server(configured(CONTROLLER_PATH, spec.controller_args()), id=CONTROLLER_ID)
        if spec.server_params:  # top-level server config (e.g. task_request_interval), not a component
            job.to_server({"server": dict(spec.server_params)})
        if spec.cross_site is not None:
            job.to_server(configured(CROSS_SITE_PATH, dict(spec.cross_site)), id=CROSS_SITE_ID)
        for component in spec.server_components:
            job.to_server(configured(component.path, dict(component.args)), id=component.id)
        job.to_clients(configured(spec.executor_path, spec.executor_args()), tasks=list(EXECUTOR_TASKS))
        for tasks, executor in spec.extra_executors:  # he: the sites' secure-aggregation protocol executor
            job.to_clients(configured(executor.path, dict(executor.args)), tasks=list(tasks))
        for component in spec.client_components:
            job.to_clients(configured(component.path, dict(component.args)), id=component.id)
        super().__init__(job)
        if spec.executor_path == CLIENT_API_EXECUTOR_PATH:
            if not spec.script or not Path(spec.script).is_file():
                raise RecipeError(f"{spec.name}: training script {spec.script} not found")
            self._job.add_file_to_clients(str(Path(spec.script).resolve()))  # FLARE copies it to app/custom/
        # filters through the Recipe API: one add per filter, in chain order, for the chain's task set
        adders = ((spec.client_data_filters, self.add_client_input_filter),
                  (spec.client_result_filters, self.add_client_output_filter),
                  (spec.server_data_filters, self.add_server_output_filter),
                  (spec.server_result_filters, self.add_server_input_filter))
        for chains, add in adders:
            for chain in chains:
                for flt in chain.filters:
                    add(configured(flt.path, dict(flt.args)), tasks=list(chain.tasks))

    @property
    def job(self) -> FedJob:
        return self._job


def recipe_from_spec(spec: JobSpec) -> FedMedRecipe:
    """The FLARE recipe of ``spec`` (every component constructed once: a bad argument raises naming its class)."""
    return FedMedRecipe(spec)


def check_spec(spec: JobSpec, settings: dict | None = None) -> None:
    """Build the real objects' checks for ``spec`` without starting FLARE: every component of the
    recipe (controller, executor, cross-site evaluation, components, filters), the network and the
    task the controller names, and the local trainer with the executor's settings.

    A refusal raises :class:`RecipeError` naming the component and its reason, and, when
    ``settings`` (the ``--set`` values) led to it, the keys and values that did.
    """
    targets = setting_targets(spec, settings) if settings else {}

    def blame(component: str, exc: Exception) -> RecipeError:
        import json

        reason = str(exc) if isinstance(exc, RecipeError) else f"{type(exc).__name__}: {exc}"
        if component in ("network", "task"):  # built from the controller's arg of the same name
            keys = [k for k in targets if k.split(".")[0] == component]
        else:
            keys = [k for k, where in targets.items() if any(c == component for c, _ in where)]
        if keys:
            assigned = " ".join(f"{k}={json.dumps(settings[k])}" for k in keys)
            return RecipeError(f"--set {assigned}: the {component} of job {spec.name} refuses it: {reason}")
        return RecipeError(f"job {spec.name}: the {component} refuses its args: {reason}")

    controller, executor = spec.controller_args(), spec.executor_args()
    for component, path, args in (("controller", CONTROLLER_PATH, controller), ("executor", spec.executor_path, executor)):
        try:
            configured(path, args)
        except Exception as exc:
            raise blame(component, exc) from exc
    try:
        if "network" in controller:
            from fedmed.networks import build_network

            build_network(controller["network"])
    except Exception as exc:
        raise blame("network", exc) from exc
    try:
        from fedmed.tasks import build_task

        task = build_task(spec.task_spec)
    except Exception as exc:
        raise blame("task", exc) from exc
    if spec.executor_path == EXECUTOR_PATH:
        try:
            from fedmed.training import TrainerSettings

            TrainerSettings.from_mapping({k: v for k, v in executor.items() if k in TrainerSettings.keys()}, "executor args")
        except Exception as exc:
            raise blame("executor", exc) from exc
    try:
        recipe_from_spec(spec)  # the rest: cross-site evaluation, components, filters, the script
    except Exception as exc:
        raise blame("job", exc) from exc


def export_job_folder(recipe_or_spec, job_dir: str | Path) -> JobFolder:
    """Write a spec's (or a :class:`FedMedRecipe`'s) job folder into ``job_dir`` through the one writer."""
    spec = recipe_or_spec.spec if isinstance(recipe_or_spec, FedMedRecipe) else recipe_or_spec
    return write_job_folder(spec, job_dir)


def run_job_script(spec: JobSpec, argv: list[str], description: str = "") -> int:
    """The command line of every ``jobs/<name>/job.py``.

    ``--export DIR``: write the job folder into DIR through the one writer (``--export jobs/<name>``
    regenerates the committed folder; with ``--set`` / ``--rounds`` a changed job, checked first, e.g.
    a deployed job with other settings); ``--export --export-dir ROOT``: FLARE's own exporter and
    convention, ROOT/<name>/. ``--env prod --startup-kit KIT``: submit to a running FLARE system
    (ProdEnv) and wait. Otherwise (``--env sim``, the default) run the job in FLARE's ``SimEnv``
    through the same runner as ``python -m fedmed simulate`` (:mod:`fedmed.runner`): the same
    options (``--sites``, ``--rounds``, ``--set``, ``--data``, ``--privacy``, ``--attack``,
    ``--baselines``, ``--out``, ...) and the same outputs (bundle, ``metrics.json`` with the external
    evaluation, report, provenance card). ``PocEnv`` is left out on purpose: FLARE's POC server
    listens on every interface (docs/deployment.md's rehearsal is the local deployment here).
    """
    import argparse

    from fedmed import simulate as simulate_cli

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                        help="write the job folder into DIR (meta.json, app/) and exit; without DIR use --export-dir")
    parser.add_argument("--export-dir", default=None, help="FLARE's convention: with --export, write ROOT/<job name>/")
    parser.add_argument("--env", choices=["sim", "prod"], default="sim",
                        help="where to run: sim (FLARE's SimEnv, default; as simulate) or prod (ProdEnv: submit with --startup-kit)")
    parser.add_argument("--startup-kit", default=None, help="--env prod: the admin startup kit to submit with")
    parser.add_argument("--username", default=None,
                        help="--env prod: the admin user (default: the startup kit's folder name, as provisioning names it)")
    simulate_cli.add_run_arguments(parser, sites_default=2)
    args = parser.parse_args(argv)

    if args.export is not None:  # --set / --rounds change the exported job (checked first); nothing else applies
        from fedmed.jobfolder import parse_assignments
        from fedmed.jobspec import with_settings

        settings = {**parse_assignments(args.settings), **({"num_rounds": args.rounds} if args.rounds else {})}
        spec = with_settings(spec, settings)
        if settings:
            check_spec(spec, settings)
        if args.export:
            folder = export_job_folder(spec, args.export)
            print(f"job folder written: {folder.path}")
        elif args.export_dir:
            recipe_from_spec(spec).export(args.export_dir)
            print(f"job exported to: {Path(args.export_dir) / spec.name}")
        else:
            parser.error("--export needs a DIR (the job folder) or --export-dir ROOT")
        return 0
    if args.env == "prod":
        from nvflare.recipe import ProdEnv

        from fedmed.jobfolder import parse_assignments
        from fedmed.jobspec import with_settings

        if not args.startup_kit:
            parser.error("--env prod needs --startup-kit (an admin's startup kit folder)")
        prod_spec = with_settings(spec, {**parse_assignments(args.settings), **({"num_rounds": args.rounds} if args.rounds else {})})
        check_spec(prod_spec)
        username = args.username or Path(args.startup_kit).resolve().name
        run = recipe_from_spec(prod_spec).execute(ProdEnv(startup_kit_location=args.startup_kit, username=username))
        print(f"submitted job {run.get_job_id()} as {username}; waiting for it to finish", flush=True)
        print(f"result: {run.get_result()}")
        return 0
    return simulate_cli.main(args, spec=spec, engine="simenv")


def run_in_sim_env(recipe: FedMedRecipe, site_names: list[str], workspace_root: str | Path, threads: int | None = None) -> Path:
    """Execute ``recipe`` in FLARE's ``SimEnv`` with ``site_names`` under ``workspace_root`` (never
    /tmp/nvflare); return the server app folder of the run. The sites' ``local/`` files must already
    be in ``workspace_root/<job name>/local`` (the runner writes them)."""
    from nvflare.recipe import SimEnv

    workspace_root = Path(workspace_root).resolve()
    env = SimEnv(clients=list(site_names), num_threads=threads or len(site_names), workspace_root=str(workspace_root))
    recipe.execute(env)
    return workspace_root / recipe.name / "server" / "simulate_job" / "app_server"
