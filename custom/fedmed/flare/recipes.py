"""FLARE 2.9 recipes for this project's jobs, built on FLARE's own ``nvflare.recipe.spec.Recipe``.

A recipe wraps a ``FedJob`` holding our controller (:class:`fedmed.flare.controller.FedAvgController`),
optional cross-site evaluation, our executor (:class:`fedmed.flare.executor.FedMedExecutor`, or the
Client API bridge :class:`fedmed.flare.client_api.FedMedClientAPIExecutor` with a training script) and
the TensorBoard streaming components. Everything FLARE documents then works::

    recipe = ClassificationFedAvgRecipe(name="cxr", controller_args={...}, executor_args={...})
    recipe.export("out")                                   # FLARE's: out/cxr/ (meta.json, app/config/...)
    recipe.execute(SimEnv(num_clients=3, workspace_root="runs/x"))   # or ProdEnv(startup_kit_location=KIT), PocEnv(...)

Each ``jobs/<name>/job.py`` builds its recipe; ``python jobs/<name>/job.py --export DIR`` writes the
classic job folder into ``DIR`` (:func:`export_job_folder`), which is what is committed under ``jobs/``.

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
import shutil
import tempfile
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from fedmed.jobfolder import JobFolder, JobFolderError

CONTROLLER_PATH = "fedmed.flare.controller.FedAvgController"
CROSS_SITE_PATH = "fedmed.flare.cross_site.CrossSiteEvaluation"
EXECUTOR_PATH = "fedmed.flare.executor.FedMedExecutor"
CLIENT_API_EXECUTOR_PATH = "fedmed.flare.client_api.FedMedClientAPIExecutor"
TB_RECEIVER_PATH = "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"
TB_WRITER_PATH = "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"
TO_FED_EVENT_PATH = "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent"
EXECUTOR_TASKS = ("train", "validate", "submit_model")
APP_PACKAGES = ["fedmed"]


class RecipeError(ValueError):
    """A recipe's settings do not fit the component they configure; the message names it."""


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
        raise RecipeError(f"{path} with args {args}: {type(exc).__name__}: {exc}") from exc


class FedMedRecipe(Recipe):
    """A federated job of this project: our FedAvg controller, our executor at every site.

    Args:
        name: the job name (meta.json ``name``, the folder FLARE exports).
        controller_args: :class:`~fedmed.flare.controller.FedAvgController` args (``num_rounds``,
            ``min_clients``, ``network``, ``task``, aggregation settings, ...).
        executor_args: the executor's args (``FedMedExecutor``: ``local_epochs``, ``lr``, ``batch_size``, ...).
        cross_site_args: :class:`~fedmed.flare.cross_site.CrossSiteEvaluation` args; ``None`` leaves
            cross-site evaluation out of the job.
        min_clients: meta.json ``min_clients`` (default: the controller's).
        tensorboard: stream every site's metrics to the server's TensorBoard (TBWriter + ConvertToFedEvent
            at the sites, TBAnalyticsReceiver on the server).
        executor_path: the executor class.
        meta: further meta.json properties (e.g. ``{"scope": "dp"}``, the privacy scope the job asks for).
        task_request_interval: seconds a site waits before asking the server again when it has no task
            for it (FLARE's ``server.task_request_interval``, default 2 s there): the time a site idles
            between finishing one round and starting the next; 0.5 s cuts FLARE's per-round overhead.
    """

    def __init__(
        self,
        *,
        name: str,
        controller_args: dict,
        executor_args: dict,
        cross_site_args: dict | None = None,
        min_clients: int | None = None,
        tensorboard: bool = True,
        executor_path: str = EXECUTOR_PATH,
        meta: dict | None = None,
        task_request_interval: float = 0.5,
    ):
        controller_args = dict(controller_args)
        controller_args.setdefault("job_name", name)
        self.controller_args, self.executor_args, self.cross_site_args = controller_args, dict(executor_args), cross_site_args
        min_clients = int(min_clients if min_clients is not None else controller_args.get("min_clients", 1))
        job = FedJob(name=name, min_clients=min_clients, meta_props=dict(meta) if meta else None)
        job.set_app_packages(APP_PACKAGES)
        job.to_server(configured(CONTROLLER_PATH, controller_args), id="fedavg")
        job.to_server({"server": {"task_request_interval": task_request_interval}})  # a system parameter, not a component
        if cross_site_args is not None:
            job.to_server(configured(CROSS_SITE_PATH, cross_site_args), id="cross_site_evaluation")
        if tensorboard:
            job.to_server(configured(TB_RECEIVER_PATH, {"events": ["fed.analytix_log_stats"]}), id="tb_receiver")
        job.to_clients(configured(executor_path, self.executor_args), tasks=list(EXECUTOR_TASKS))
        if tensorboard:
            job.to_clients(configured(TB_WRITER_PATH, {}), id="tb_writer")
            job.to_clients(configured(TO_FED_EVENT_PATH, {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."}),
                           id="event_to_fed")
        super().__init__(job)

    @property
    def job(self) -> FedJob:
        return self._job


class ClassificationFedAvgRecipe(FedMedRecipe):
    """2D image classification (chest X-rays), FedAvg over sample counts, cross-site evaluation."""

    def __init__(self, *, name: str, controller_args: dict, executor_args: dict, cross_site_args: dict | None = None, **kwargs):
        task = controller_args.get("task", {}).get("name", "classification")
        if task != "classification":
            raise RecipeError(f"{type(self).__name__}: the controller's task is {task!r}, expected 'classification'")
        super().__init__(name=name, controller_args=controller_args, executor_args=executor_args,
                         cross_site_args=cross_site_args, **kwargs)


class SegmentationFedAvgRecipe(FedMedRecipe):
    """3D segmentation (MONAI UNet, Dice); FedProx at the sites when ``executor_args['fedprox_mu'] > 0``."""

    def __init__(self, *, name: str, controller_args: dict, executor_args: dict, cross_site_args: dict | None = None, **kwargs):
        task = controller_args.get("task", {}).get("name")
        if task != "segmentation":
            raise RecipeError(f"{type(self).__name__}: the controller's task is {task!r}, expected 'segmentation'")
        super().__init__(name=name, controller_args=controller_args, executor_args=executor_args,
                         cross_site_args=cross_site_args, **kwargs)


class SegmentationFedProxRecipe(SegmentationFedAvgRecipe):
    """Segmentation with FedProx at the sites: ``executor_args['fedprox_mu']`` must be > 0."""

    def __init__(self, *, name: str, controller_args: dict, executor_args: dict, **kwargs):
        if not float(executor_args.get("fedprox_mu", 0.0)) > 0:
            raise RecipeError(f"{type(self).__name__}: executor_args['fedprox_mu'] must be > 0 (FedProx), got {executor_args.get('fedprox_mu')}")
        super().__init__(name=name, controller_args=controller_args, executor_args=executor_args, **kwargs)


class ClientAPIFedAvgRecipe(FedMedRecipe):
    """Each site runs a plain PyTorch training script through FLARE's Client API, under our FedAvg controller.

    Args:
        script: the training script (copied into the job's ``app/custom/``).
        executor_args: :class:`~fedmed.flare.client_api.FedMedClientAPIExecutor` args other than
            ``task_script_path`` (``lr``, ``local_epochs``, ``batch_size``, ``seed``, ``task_script_args``).
    """

    def __init__(self, *, name: str, script: str, controller_args: dict, executor_args: dict, **kwargs):
        script_path = Path(script)
        if not script_path.is_file():
            raise RecipeError(f"{type(self).__name__}: training script {script} not found")
        executor_args = {"task_script_path": script_path.name, **executor_args}
        super().__init__(name=name, controller_args=controller_args, executor_args=executor_args,
                         executor_path=CLIENT_API_EXECUTOR_PATH, **kwargs)
        self.script = str(script_path.resolve())
        self._job.add_file_to_clients(self.script)  # FLARE copies it to app/custom/<script name>


def export_job_folder(recipe: Recipe, job_dir: str | Path) -> JobFolder:
    """Write ``recipe``'s classic job folder *into* ``job_dir`` (``meta.json``, ``app/``), keeping other
    files there (``job.py``, ``README.md``): the form committed under ``jobs/``.

    FLARE's ``Recipe.export(root)`` writes ``root/<name>/`` and replaces that whole folder; this
    exports to a temporary root first and then replaces only ``meta.json`` and ``app/``.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=job_dir.parent, prefix=".export-") as tmp:
        recipe.export(tmp)
        exported = Path(tmp) / recipe.name
        if not (exported / "meta.json").is_file():
            raise JobFolderError(f"FLARE exported no meta.json for job {recipe.name} into {tmp}")
        if (job_dir / "app").exists():
            shutil.rmtree(job_dir / "app")
        shutil.copytree(exported / "app", job_dir / "app")
        shutil.copy2(exported / "meta.json", job_dir / "meta.json")
    return JobFolder(job_dir)


def run_job_script(build_recipe, argv: list[str], description: str = "") -> int:
    """The command line of every ``jobs/<name>/job.py``.

    ``--export DIR``: write the job folder into DIR (``--export jobs/<name>`` regenerates the committed
    folder); ``--export --export-dir ROOT``: FLARE's convention, ROOT/<name>/. Otherwise run the
    recipe: in ``SimEnv`` (default; the simulated sites' data and ``local/fedmed_site.json`` prepared as
    ``simulate`` does, workspace under ``runs/``, never /tmp/nvflare), or ``--env prod --startup-kit KIT``
    (an admin's startup kit) on a running FLARE system. ``PocEnv`` is left out on purpose: FLARE's POC
    server listens on every interface (docs/deployment.md's rehearsal is the local deployment here).

    ``build_recipe(controller_overrides: dict) -> Recipe``; ``argv`` is read before FLARE's recipe
    module is imported (it strips ``--export`` from ``sys.argv`` on import).
    """
    import argparse
    import time

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                        help="write the job folder into DIR (meta.json, app/) and exit; without DIR use --export-dir")
    parser.add_argument("--export-dir", default=None, help="FLARE's convention: with --export, write ROOT/<job name>/")
    parser.add_argument("--env", choices=["sim", "prod"], default="sim",
                        help="where to run: sim (FLARE's SimEnv, default) or prod (ProdEnv: submit with --startup-kit)")
    parser.add_argument("--startup-kit", default=None, help="--env prod: the admin startup kit to submit with")
    parser.add_argument("--username", default=None,
                        help="--env prod: the admin user (default: the startup kit's folder name, as provisioning names it)")
    parser.add_argument("--sites", type=int, default=2, help="SimEnv: simulated hospitals (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="SimEnv threads (default: one per site)")
    parser.add_argument("--data", default=None, help="SimEnv: data pool to partition (default synthetic), as simulate --data")
    parser.add_argument("--alpha", type=float, default=0.5, help="SimEnv: Dirichlet label-skew alpha (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="SimEnv: partition / synthetic-data seed (default 0)")
    parser.add_argument("--workspace", default=None, help="SimEnv workspace root (default runs/<job>-recipe-<timestamp>)")
    args = parser.parse_args(argv)

    if args.export is not None:
        recipe = build_recipe({})
        if args.export:
            folder = export_job_folder(recipe, args.export)
            print(f"job folder written: {folder.path}")
        elif args.export_dir:
            recipe.export(args.export_dir)
            print(f"job exported to: {Path(args.export_dir) / recipe.name}")
        else:
            parser.error("--export needs a DIR (the job folder) or --export-dir ROOT")
        return 0

    overrides = {"num_rounds": args.rounds} if args.rounds else {}
    if args.env == "prod":
        from nvflare.recipe import ProdEnv

        if not args.startup_kit:
            parser.error("--env prod needs --startup-kit (an admin's startup kit folder)")
        username = args.username or Path(args.startup_kit).resolve().name
        run = build_recipe(overrides).execute(ProdEnv(startup_kit_location=args.startup_kit, username=username))
        print(f"submitted job {run.get_job_id()} as {username}; waiting for it to finish", flush=True)
        print(f"result: {run.get_result()}")
        return 0
    return run_in_sim_env(build_recipe, args.sites, overrides, args.workspace or
                          f"runs/{build_recipe({}).name}-recipe-{time.strftime('%Y%m%d-%H%M%S')}",
                          threads=args.threads, data=args.data, alpha=args.alpha, seed=args.seed)


def run_in_sim_env(build_recipe, num_sites: int, overrides: dict, workspace_root: str | Path, threads: int | None = None,
                   data: str | None = None, alpha: float = 0.5, seed: int = 0) -> int:
    """Run a recipe in FLARE's ``SimEnv``: prepare the simulated sites (data, ``local/fedmed_site.json``,
    ``local/resources.json`` with the allow-list), execute, then export the run's outputs (bundle,
    metrics, report inputs) into ``workspace_root/outputs`` as ``simulate`` does. Returns 0 on success."""
    import json

    from nvflare.recipe import SimEnv

    from fedmed.atomic import write_json
    from fedmed.flare.allow_list import class_allow_list
    from fedmed.results import export_run_outputs
    from fedmed.site_config import SITE_CONFIG_FILE
    from fedmed.tasks import build_task

    workspace_root = Path(workspace_root).resolve()
    probe = build_recipe({})
    controller_args = probe.controller_args
    overrides = {**overrides, "min_clients": min(int(controller_args.get("min_clients", 1)), num_sites)}
    recipe = build_recipe(overrides)
    task = build_task(recipe.controller_args.get("task", {"name": "classification"}))
    site_configs, summary = task.prepare_simulation(num_sites, workspace_root / "sites", data, alpha, seed)
    for line in summary:
        print("  " + line, flush=True)
    local = workspace_root / recipe.name / "local"  # SimEnv's workspace is workspace_root/<job name>
    write_json(local / SITE_CONFIG_FILE, {"sites": site_configs})
    write_json(local / "resources.json", {"format_version": 2, "class_allow_list": class_allow_list()})
    env = SimEnv(clients=list(site_configs), num_threads=threads or num_sites, workspace_root=str(workspace_root))
    print(f"SimEnv: {num_sites} sites, workspace {workspace_root / recipe.name}", flush=True)
    recipe.execute(env)
    server_app = workspace_root / recipe.name / "server" / "simulate_job" / "app_server"
    metrics = export_run_outputs(server_app, workspace_root / "outputs")
    print(json.dumps({"outputs": str(workspace_root / "outputs"), "finished": metrics.get("finished"),
                      "rounds": len(metrics.get("rounds", []))}), flush=True)
    return 0 if metrics.get("finished") else 1
