"""Job folders on disk: the one writer (:func:`write_job_folder`) and the reader (:func:`read_job_spec`).

A classic job folder (what ``jobs/<name>/job.py --export`` writes and FLARE runs) is::

    meta.json                          name, min_clients, deploy_map, optional "scope"
    app/config/config_fed_server.json  workflows (our FedAvgController, CrossSiteEvaluation), components, filters
    app/config/config_fed_client.json  executors (our FedMedExecutor or the Client API executor), components, filters
    app/custom/<script>                a Client API job's training script only

A job is a :class:`fedmed.jobspec.JobSpec`; every change to a job (``--set``, rounds, privacy
filters, HE, attacks, scope) is a pure function on the spec, and :func:`write_job_folder` writes
the result, byte for byte what FLARE's exporter writes for the same spec
(``tests/test_recipes.py`` compares them). :class:`JobFolder` reads a folder's files and gives its spec.

Pure module: no ``nvflare`` import.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from fedmed.atomic import atomic_path
from fedmed.jobspec import (CLIENT_API_EXECUTOR_PATH, CONTROLLER_PATH, CROSS_SITE_PATH, EXECUTOR_PATHS, SETTING_ALIASES,
                            JobSpec, JobSpecError, from_configs, to_configs)

META_FILE = "meta.json"
SERVER_CONFIG_FILE = "config_fed_server.json"
CLIENT_CONFIG_FILE = "config_fed_client.json"
CONTROLLER_PATHS = (CONTROLLER_PATH,)
__all__ = ["JobFolder", "JobFolderError", "read_job_spec", "write_job_folder", "parse_assignments", "parse_value",
           "CROSS_SITE_PATH", "EXECUTOR_PATHS", "SETTING_ALIASES", "CONTROLLER_PATHS"]


class JobFolderError(JobSpecError):
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


def write_job_folder(spec: JobSpec, job_dir: str | Path) -> "JobFolder":
    """Write ``spec`` as a job folder *into* ``job_dir``: ``meta.json`` and ``app/`` (replaced whole),
    keeping other files there (``job.py``, ``README.md``). The one writer of job folders.

    The new ``app/`` is built beside the old one and swapped in, so a reader never sees half of it.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    configs = to_configs(spec)
    staging = job_dir / f".app-{uuid.uuid4().hex[:8]}"
    try:
        (staging / "config").mkdir(parents=True)
        for rel, payload in configs.items():
            if rel.startswith("app/"):
                (staging / rel[len("app/"):]).write_text(json.dumps(payload, indent=4))
        if spec.executor_path == CLIENT_API_EXECUTOR_PATH:
            script = Path(spec.script or "")
            if not script.is_file():
                raise JobFolderError(f"{spec.name}: the Client API training script {spec.script} is missing")
            (staging / "custom").mkdir()
            shutil.copy2(script, staging / "custom" / spec.executor["task_script_path"])
        if (job_dir / "app").exists():
            shutil.rmtree(job_dir / "app")
        staging.rename(job_dir / "app")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with atomic_path(job_dir / META_FILE) as tmp:
        tmp.write_text(json.dumps(configs[META_FILE], indent=4))
    return JobFolder(job_dir)


def read_job_spec(job: str | Path) -> JobSpec:
    """The :class:`~fedmed.jobspec.JobSpec` a job folder holds (a path, or relative to the repository root)."""
    return JobFolder.resolve(job).spec()


class JobFolder:
    """A job folder on disk. Loads return fresh dicts; a change is a new spec written with :meth:`write`."""

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

    # ---- reading ------------------------------------------------------------------------------

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

    def load_server(self) -> dict:
        return self._load(self.config_dir / SERVER_CONFIG_FILE)

    def load_client(self) -> dict:
        return self._load(self.config_dir / CLIENT_CONFIG_FILE)

    def load_all(self) -> dict:
        """``{"meta.json": ..., "app/config/config_fed_server.json": ..., ...}``: every JSON file, parsed."""
        return {str(p.relative_to(self.path)): self._load(p) for p in sorted(self.path.rglob("*.json"))}

    def spec(self) -> JobSpec:
        """The :class:`~fedmed.jobspec.JobSpec` this folder holds."""
        meta, server, client = self.load_meta(), self.load_server(), self.load_client()
        script = None
        for entry in client.get("executors", []):
            executor = entry.get("executor", {})
            if executor.get("path") == CLIENT_API_EXECUTOR_PATH:
                script = str(self.path / "app" / "custom" / (executor.get("args") or {}).get("task_script_path", "train.py"))
        try:
            return from_configs(meta, server, client, script=script, where=str(self.path))
        except JobSpecError as exc:
            raise JobFolderError(str(exc)) from exc

    def copy_to(self, dest: str | Path) -> "JobFolder":
        shutil.copytree(self.path, dest)
        return JobFolder(dest)

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

    def scope(self) -> str:
        return self.load_meta().get("scope", "")

    def write(self, spec: JobSpec) -> None:
        """Replace this folder's job with ``spec`` (through :func:`write_job_folder`)."""
        write_job_folder(spec, self.path)
