"""Reading and writing FLARE job folders: the one place that knows their layout.

A classic job folder (what ``jobs/<name>/job.py --export`` writes and FLARE runs) is::

    meta.json                          name, min_clients, deploy_map, optional "scope"
    app/config/config_fed_server.json  workflows (our FedAvgController, CrossSiteEvaluation), components, filters
    app/config/config_fed_client.json  executors (our FedMedExecutor or the Client API executor), components, filters

:class:`JobFolder` loads and saves these files (atomically, through :mod:`fedmed.atomic`), finds
this project's controller and executor and their ``args``, and applies the changes other commands
make to a job *copy*: rounds and ``min_clients`` (``simulate``), filters and components (privacy
modes, HE), the privacy scope, and ``simulate --set KEY=VALUE`` overrides (:meth:`JobFolder.apply_settings`).

Pure module: no ``nvflare`` import; the valid ``--set`` keys come from the constructor signatures
of the classes a job names (imported only when asked).
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from fedmed.atomic import write_json

META_FILE = "meta.json"
SERVER_CONFIG_FILE = "config_fed_server.json"
CLIENT_CONFIG_FILE = "config_fed_client.json"
CONTROLLER_PATHS = ("fedmed.flare.controller.FedAvgController",)
EXECUTOR_PATHS = ("fedmed.flare.executor.FedMedExecutor", "fedmed.flare.client_api.FedMedClientAPIExecutor")
CROSS_SITE_PATH = "fedmed.flare.cross_site.CrossSiteEvaluation"

# --set keys that are not constructor arguments of the same name
SETTING_ALIASES = {"rounds": ("controller", "num_rounds")}  # same as simulate --rounds
# arguments a user must not override: wiring between components, not training or aggregation settings
_NOT_SETTINGS = {"job_name", "train_task_name", "validate_task_name", "submit_model_task_name", "tb_writer_id",
                 "site_config_file", "aggregation_step_id", "execution_mode",
                 "task_script_path", "command"}


class JobFolderError(ValueError):
    """A job folder is missing a file or a component; the message names the file and what to do."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (``3``, ``0.01``, ``true``, ``{"name": ...}``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["lr=0.01", "network={...}"]`` -> ``{"lr": 0.01, "network": {...}}``; a malformed item raises."""
    settings: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise JobFolderError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.01")
        settings[key] = parse_value(value)
    return settings


def constructor_parameters(class_path: str) -> list[str]:
    """Keyword arguments of the class ``class_path`` names (its configuration, see STYLE habit 3)."""
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class JobFolder:
    """A job folder on disk. Loads return fresh dicts; saves write the whole file atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for rel in (META_FILE, f"app/config/{SERVER_CONFIG_FILE}"):
            if not (self.path / rel).is_file():
                raise JobFolderError(f"job folder {self.path} needs meta.json and app/config/{SERVER_CONFIG_FILE} (missing {rel})")

    @classmethod
    def resolve(cls, job: str | Path) -> "JobFolder":
        """A job given as a path, or relative to the repository root (``jobs/cxr_pneumonia_fedavg``)."""
        path = Path(job)
        if not path.is_dir() and not path.is_absolute() and (repo_root() / path).is_dir():
            path = repo_root() / path
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_dir(self) -> Path:
        return self.path / "app" / "config"

    # ---- files --------------------------------------------------------------------------------

    def _load(self, path: Path) -> dict:
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobFolderError(f"{path} could not be read as JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise JobFolderError(f"{path} must hold a JSON object")
        return value

    def load_meta(self) -> dict:
        return self._load(self.path / META_FILE)

    def save_meta(self, meta: dict) -> None:
        write_json(self.path / META_FILE, meta)

    def load_server(self) -> dict:
        return self._load(self.config_dir / SERVER_CONFIG_FILE)

    def save_server(self, config: dict) -> None:
        write_json(self.config_dir / SERVER_CONFIG_FILE, config)

    def load_client(self) -> dict:
        return self._load(self.config_dir / CLIENT_CONFIG_FILE)

    def save_client(self, config: dict) -> None:
        write_json(self.config_dir / CLIENT_CONFIG_FILE, config)

    def load_all(self) -> dict:
        """``{"meta.json": ..., "app/config/config_fed_server.json": ..., ...}``: every JSON file, parsed."""
        return {str(p.relative_to(self.path)): self._load(p) for p in sorted(self.path.rglob("*.json"))}

    def copy_to(self, dest: str | Path) -> "JobFolder":
        shutil.copytree(self.path, dest)
        return JobFolder(dest)

    # ---- components ---------------------------------------------------------------------------

    def controller(self, server_config: dict | None = None) -> dict:
        """This project's FedAvg workflow entry (``{"id", "path", "args"}``) in the server config."""
        config = self.load_server() if server_config is None else server_config
        for workflow in config.get("workflows", []):
            if workflow.get("path") in CONTROLLER_PATHS:
                workflow.setdefault("args", {})
                return workflow
        raise JobFolderError(f"{self.config_dir / SERVER_CONFIG_FILE}: no workflow with path {CONTROLLER_PATHS[0]}")

    def controller_args(self, server_config: dict | None = None) -> dict:
        return self.controller(server_config)["args"]

    def executor(self, client_config: dict | None = None) -> dict:
        """This project's executor entry (``{"path", "args"}``) in the client config."""
        config = self.load_client() if client_config is None else client_config
        for entry in config.get("executors", []):
            executor = entry.get("executor", {})
            if executor.get("path") in EXECUTOR_PATHS:
                executor.setdefault("args", {})
                return executor
        raise JobFolderError(f"{self.config_dir / CLIENT_CONFIG_FILE}: no executor with path {' or '.join(EXECUTOR_PATHS)}")

    def executor_args(self, client_config: dict | None = None) -> dict:
        return self.executor(client_config)["args"]

    def client_tasks(self, client_config: dict | None = None) -> list[str]:
        config = self.load_client() if client_config is None else client_config
        return sorted({task for entry in config.get("executors", []) for task in entry.get("tasks", [])})

    # ---- changes to a job copy ----------------------------------------------------------------

    def fit_to_simulation(self, num_sites: int, rounds: int | None = None) -> dict:
        """Set ``num_rounds`` (when given) and cap ``min_clients`` at ``num_sites``; return the controller args."""
        server = self.load_server()
        args = self.controller_args(server)
        if rounds is not None:
            args["num_rounds"] = rounds
        args["min_clients"] = min(int(args.get("min_clients", 1)), num_sites)
        self.save_server(server)
        meta = self.load_meta()
        meta["min_clients"] = min(int(meta.get("min_clients", 1)), num_sites)
        self.save_meta(meta)
        return args

    def set_scope(self, scope: str | None) -> None:
        """The privacy scope the job asks every site for (``meta.json`` ``"scope"``); ``None`` removes it."""
        meta = self.load_meta()
        if scope:
            meta["scope"] = scope
        else:
            meta.pop("scope", None)
        self.save_meta(meta)

    def scope(self) -> str:
        return self.load_meta().get("scope", "")

    def settable_keys(self) -> dict[str, list[tuple[str, str]]]:
        """``{--set key: [(component, argument), ...]}``: the executor's and controller's configuration arguments.

        Derived from the constructor signatures of the executor and controller this job names, so a
        new argument (an aggregation rule, a server optimizer) becomes settable without touching this
        module. A name both take (``seed``) is set in both.
        """
        keys: dict[str, list[tuple[str, str]]] = {}
        for component, path in (("executor", self.executor()["path"]), ("controller", self.controller()["path"])):
            for name in constructor_parameters(path):
                if name not in _NOT_SETTINGS:
                    keys.setdefault(name, []).append((component, name))
        for alias, target in SETTING_ALIASES.items():
            keys.setdefault(alias, [target])
        return keys

    def apply_settings(self, settings: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
        """Write ``settings`` into the executor / controller args; an unknown key raises listing the valid ones.

        A dotted key changes one entry inside a dict-valued setting, MONAI-``#``-style:
        ``network.args.width=32`` keeps the rest of ``network``. Returns ``{key: [(component, argument), ...]}``.
        """
        if not settings:
            return {}
        valid = self.settable_keys()
        unknown = sorted(key for key in settings if key.split(".", 1)[0] not in valid)
        if unknown:
            raise JobFolderError(
                f"--set: unknown key(s) {', '.join(unknown)} for job {self.name}; valid keys: {', '.join(sorted(valid))} "
                "(a dotted key such as network.args.width changes one entry of a dict-valued key)"
            )
        server, client = self.load_server(), self.load_client()
        targets = {"controller": self.controller_args(server), "executor": self.executor_args(client)}
        for key, value in settings.items():
            head, *path = key.split(".")
            for component, argument in valid[head]:
                if not path:
                    targets[component][argument] = value
                    continue
                node = targets[component].get(argument)
                for i, part in enumerate(path[:-1]):
                    node = node.get(part) if isinstance(node, dict) else None
                if not isinstance(node, dict):
                    raise JobFolderError(f"--set {key}: {'.'.join([head, *path[:-1]])} is not a JSON object in the "
                                         f"{component}'s args of job {self.name}; set the whole {head} instead")
                node[path[-1]] = value
        self.save_server(server)
        self.save_client(client)
        return {key: valid[key.split(".", 1)[0]] for key in settings}

    def check_components(self) -> None:
        """Instantiate the executor and controller with this folder's args, and build the network and
        task they name, so a bad setting fails now, naming the setting, not minutes into a run."""
        checks = [("executor", self.executor()), ("controller", self.controller())]
        for role, entry in checks:
            module_name, _, class_name = entry["path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), class_name)
            try:
                cls(**entry["args"])
            except Exception as exc:
                raise JobFolderError(f"{self.name}: the {role} {class_name} refuses its args: {type(exc).__name__}: {exc}") from exc
        args = self.controller_args()
        try:
            if "network" in args:
                from fedmed.networks import build_network

                build_network(args["network"])
            if "task" in args:
                from fedmed.tasks import build_task

                build_task(args["task"])
        except Exception as exc:
            raise JobFolderError(f"{self.name}: the network or task spec does not build: {type(exc).__name__}: {exc}") from exc

    def add_filters(self, side: str, kind: str, filters: list[dict], tasks: list[str], first: bool = True) -> None:
        """Add ``filters`` (``{"path", "args"}``) for ``tasks`` to the ``side`` ("client"/"server") config.

        ``kind`` is ``task_data_filters`` or ``task_result_filters``. FLARE keeps one filter chain per
        task, so a chain that already covers one of ``tasks`` gets the filters inside it: ahead of its
        own (``first``, the order FLARE applies site scopes in) or after them; tasks no chain covers get
        a new chain.
        """
        if side not in ("client", "server") or kind not in ("task_data_filters", "task_result_filters"):
            raise JobFolderError(f"add_filters: side must be client|server and kind task_data_filters|task_result_filters, got {side}, {kind}")
        if not filters:
            return
        if not tasks:
            raise JobFolderError(f"{self.name}: add_filters needs the task names the filters apply to")
        config = self.load_client() if side == "client" else self.load_server()
        added = [dict(f) for f in filters]
        chains, covered = [], set()
        for chain in config.get(kind, []) or []:
            hit = [t for t in chain.get("tasks", []) if t in tasks]
            if hit:
                own = list(chain.get("filters", []))
                chain = {**chain, "filters": added + own if first else own + added}
                covered.update(hit)
            chains.append(chain)
        rest = [t for t in tasks if t not in covered]
        if rest:
            chains.append({"tasks": rest, "filters": added})
        config[kind] = chains
        (self.save_client if side == "client" else self.save_server)(config)

    def add_components(self, side: str, components: list[dict]) -> None:
        """Add ``components`` (``{"id", "path", "args"}``) to the ``side`` config; an id already there raises."""
        config = self.load_client() if side == "client" else self.load_server()
        existing = config.setdefault("components", [])
        ids = {c.get("id") for c in existing}
        for component in components:
            if component.get("id") in ids:
                raise JobFolderError(f"{self.config_dir}: component id {component.get('id')!r} already in the {side} config")
            existing.append(dict(component))
        (self.save_client if side == "client" else self.save_server)(config)
