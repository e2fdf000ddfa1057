"""``simulate --privacy MODE``: run a privacy mode's site filters in FLARE-simulated hospitals.

The FLARE simulator does not enforce site privacy scopes (``local/privacy.json``), so for a
simulation the chosen scope's filters are copied from the sites' privacy policy (the template
``workspace_templates/client/local/privacy.json``, or ``--privacy-file``) into the job copy's
``config_fed_client.json``, ahead of the job's own filters (the order FLARE uses for site scopes),
and the server scope's filters into ``config_fed_server.json``. The job's ``meta.json`` names the
scope, as a job for a real deployment would. Pure module (the job copy through fedmed.jobfolder).
"""

from __future__ import annotations

from pathlib import Path

from fedmed.jobfolder import CLIENT_CONFIG_FILE, JobFolder
from fedmed.privacy.secagg import SECAGG_MODES, apply_he_mode
from fedmed.privacy.scopes import MODES, SIMULATABLE_MODES, ScopeError, get_scope, inject_scope_filters, template_privacy_file


def _client_task_names(client_config: dict, path: Path) -> list[str]:
    tasks = []
    for executor in client_config.get("executors", []):
        for name in executor.get("tasks", []):
            if name == "*":
                raise ScopeError(f"{path}: an executor answers every task ('*'); name the tasks so privacy filters can attach")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise ScopeError(f"{path}: no executor tasks found to attach the privacy filters to")
    return tasks


def apply_privacy_mode(job_dir: str | Path, mode: str, client_privacy_file: str | Path | None = None,
                       server_privacy_file: str | Path | None = None) -> dict:
    """Rewrite a job copy (in place) so its simulated sites run ``mode``'s scope filters.

    Returns a summary: {"mode", "client_privacy_file", "server_privacy_file", "client_filters",
    "server_filters", "tasks"}. Raises :class:`ScopeError` for an unknown mode or a policy that does not allow the mode
    (``he`` / ``dp_he``: the job copy also gets the secure-aggregation step, :func:`fedmed.privacy.secagg.apply_he_mode`).
    """
    if mode not in MODES:
        raise ScopeError(f"unknown privacy mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode not in SIMULATABLE_MODES:
        raise ScopeError(f"privacy mode '{mode}' is not available in the FLARE simulator")
    job_dir = Path(job_dir)
    if mode in SECAGG_MODES:  # the job runs secure aggregation: its server step and the sites' protocol executor
        apply_he_mode(job_dir)
    client_file = Path(client_privacy_file) if client_privacy_file else template_privacy_file("client")
    server_file = Path(server_privacy_file) if server_privacy_file else template_privacy_file("server")
    client_scope = get_scope(client_file, mode)  # raises naming the file when the sites do not allow it
    server_scope = get_scope(server_file, mode)

    job = JobFolder(job_dir)  # fedmed.jobfolder: the one reader/writer of job folders
    client_path = job.config_dir / CLIENT_CONFIG_FILE
    client_config, server_config = job.load_client(), job.load_server()
    tasks = _client_task_names(client_config, client_path)

    client_config = inject_scope_filters(
        client_config, client_scope.get("task_data_filters", []), client_scope.get("task_result_filters", []), tasks
    )
    server_config = inject_scope_filters(
        server_config, server_scope.get("task_data_filters", []), server_scope.get("task_result_filters", []), tasks
    )
    job.save_client(client_config)
    job.save_server(server_config)
    job.set_scope(mode)
    return {
        "mode": mode,
        "client_privacy_file": str(client_file),
        "server_privacy_file": str(server_file),
        "client_filters": [f["path"].rsplit(".", 1)[-1] for f in client_scope.get("task_result_filters", [])],
        "server_filters": [f["path"].rsplit(".", 1)[-1] for f in server_scope.get("task_result_filters", [])],
        "tasks": tasks,
    }
