"""Privacy operating modes as FLARE site scopes (``local/privacy.json``). Pure module (json only).

Used by ``simulate --privacy MODE`` (the FLARE simulator does not enforce site scopes, so the
scope's filters are copied into the simulated job's configs) and by tests and docs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

MODES = ("standard", "dp", "he", "compressed", "compressed_int8", "dp_he")
SIMULATABLE_MODES = MODES  # he / dp_he (secure aggregation) need no provisioned keys
PRIVACY_FILE = "privacy.json"
TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "workspace_templates"


class ScopeError(ValueError):
    """A privacy.json or scope name that cannot be used; the message names the file and the scope."""


def template_privacy_file(role: str) -> Path:
    """``workspace_templates/<role>/local/privacy.json`` (role ``client`` or ``server``)."""
    if role not in ("client", "server"):
        raise ScopeError(f"role must be 'client' or 'server', got {role!r}")
    return TEMPLATES_DIR / role / "local" / PRIVACY_FILE


def load_privacy(path: str | Path) -> dict:
    path = Path(path)
    try:
        policy = json.loads(path.read_text())
    except OSError as exc:
        raise ScopeError(f"privacy policy {path} cannot be read: {exc}") from exc
    except ValueError as exc:
        raise ScopeError(f"privacy policy {path} is not valid JSON: {exc}") from exc
    scopes = policy.get("scopes") if isinstance(policy, dict) else None
    if not isinstance(scopes, list) or not scopes:
        raise ScopeError(f"privacy policy {path} has no 'scopes' list")
    names = []
    for index, scope in enumerate(scopes):
        if not isinstance(scope, dict) or not isinstance(scope.get("name"), str) or not scope["name"]:
            raise ScopeError(f"privacy policy {path}: scopes[{index}] has no 'name'")
        if scope["name"] in names:
            raise ScopeError(f"privacy policy {path}: scope '{scope['name']}' is defined twice")
        names.append(scope["name"])
        for chain in ("task_data_filters", "task_result_filters"):
            filters = scope.get(chain, [])
            if not isinstance(filters, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in filters):
                raise ScopeError(
                    f"privacy policy {path}: scope '{scope['name']}' {chain} must be a list of {{\"path\": ..., \"args\": {{...}}}}"
                )
    default = policy.get("default_scope")
    if default is not None and default not in names:
        raise ScopeError(f"privacy policy {path}: default_scope '{default}' is not one of the scopes ({', '.join(names)})")
    return policy


def scope_names(path: str | Path) -> list[str]:
    return [scope["name"] for scope in load_privacy(path)["scopes"]]


def get_scope(path: str | Path, name: str) -> dict:
    policy = load_privacy(path)
    for scope in policy["scopes"]:
        if scope["name"] == name:
            return copy.deepcopy(scope)
    raise ScopeError(
        f"privacy scope '{name}' is not allowed by {path} (allowed: {', '.join(s['name'] for s in policy['scopes'])})"
    )


def scope_filter_chains(path: str | Path, name: str) -> tuple[list[dict], list[dict]]:
    """(task_data_filters, task_result_filters) of a scope, as FLARE component dicts."""
    scope = get_scope(path, name)
    return copy.deepcopy(scope.get("task_data_filters", [])), copy.deepcopy(scope.get("task_result_filters", []))


def inject_scope_filters(config: dict, data_filters: list[dict], result_filters: list[dict], tasks: list[str]) -> dict:
    """A copy of a job app config (config_fed_client.json / config_fed_server.json) whose task
    filters run the scope's filters FIRST for ``tasks`` (FLARE runs site-scope filters before the
    job's own, so this keeps the deployment order)."""
    if not tasks:
        raise ScopeError("no task names to attach the privacy filters to")
    config = copy.deepcopy(config)
    for chain, filters in (("task_data_filters", data_filters), ("task_result_filters", result_filters)):
        if not filters:
            continue
        existing = config.get(chain, []) or []
        merged = []
        covered = set()
        for entry in existing:
            entry_tasks = entry.get("tasks", [])
            hit = [t for t in entry_tasks if t in tasks]
            if hit:
                # FLARE keys filters by task name: prepend the scope's filters to this chain
                merged.append({**entry, "filters": copy.deepcopy(filters) + list(entry.get("filters", []))})
                covered.update(hit)
            else:
                merged.append(entry)
        rest = [t for t in tasks if t not in covered]
        if rest:
            merged.append({"tasks": rest, "filters": copy.deepcopy(filters)})
        config[chain] = merged
    return config
