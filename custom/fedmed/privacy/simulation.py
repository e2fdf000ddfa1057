"""``simulate --privacy MODE``: run a privacy mode's site filters in FLARE-simulated hospitals.

The FLARE simulator does not enforce site privacy scopes (``local/privacy.json``), so for a
simulation the chosen scope's filters are copied from the sites' privacy policy (the template
``workspace_templates/client/local/privacy.json``, or ``--privacy-file``) into the job copy's
``config_fed_client.json``, ahead of the job's own filters (the order FLARE uses for site scopes),
and the server scope's filters into ``config_fed_server.json``. The job's ``meta.json`` names the
scope, as a job for a real deployment would. Pure module: a variant of the job spec (fedmed.jobspec).
"""

from __future__ import annotations

from pathlib import Path

from fedmed.jobfolder import JobFolder
from fedmed.jobspec import HE_MODES, JobSpec, with_filters, with_he, with_scope
from fedmed.privacy.scopes import MODES, SIMULATABLE_MODES, ScopeError, get_scope, template_privacy_file


def with_privacy_mode(spec: JobSpec, mode: str, client_privacy_file: str | Path | None = None,
                      server_privacy_file: str | Path | None = None) -> tuple[JobSpec, dict]:
    """``spec`` whose simulated sites run ``mode``'s scope filters (ahead of the job's own), the
    server scope's filters on the server, and meta scope ``mode``; with a summary
    ``{"mode", "client_privacy_file", "server_privacy_file", "client_filters", "server_filters", "tasks"}``.

    ``he`` / ``dp_he`` also get the secure-aggregation step and the sites' protocol executor
    (:func:`fedmed.jobspec.with_he`; nothing is provisioned for them). Raises :class:`ScopeError`
    for an unknown mode or a policy that does not allow the mode.
    """
    if mode not in MODES:
        raise ScopeError(f"unknown privacy mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode not in SIMULATABLE_MODES:
        raise ScopeError(f"privacy mode '{mode}' is not available in the FLARE simulator")
    client_file = Path(client_privacy_file) if client_privacy_file else template_privacy_file("client")
    server_file = Path(server_privacy_file) if server_privacy_file else template_privacy_file("server")
    client_scope = get_scope(client_file, mode)  # raises naming the file when the sites do not allow it
    server_scope = get_scope(server_file, mode)
    if mode in HE_MODES:
        spec = with_he(spec, scope=mode)
    tasks = spec.client_tasks()
    for side, scope in (("client", client_scope), ("server", server_scope)):
        for kind in ("task_data_filters", "task_result_filters"):
            spec = with_filters(spec, side, kind, scope.get(kind, []), tasks, first=True)
    spec = with_scope(spec, mode)
    return spec, {
        "mode": mode,
        "client_privacy_file": str(client_file),
        "server_privacy_file": str(server_file),
        "client_filters": [f["path"].rsplit(".", 1)[-1] for f in client_scope.get("task_result_filters", [])],
        "server_filters": [f["path"].rsplit(".", 1)[-1] for f in server_scope.get("task_result_filters", [])],
        "tasks": tasks,
    }


def apply_privacy_mode(job_dir: str | Path, mode: str, client_privacy_file: str | Path | None = None,
                       server_privacy_file: str | Path | None = None) -> dict:
    """:func:`with_privacy_mode` on a job folder, in place (kept for callers written before fedmed.jobspec)."""
    job = JobFolder(job_dir)
    spec, summary = with_privacy_mode(job.spec(), mode, client_privacy_file, server_privacy_file)
    job.write(spec)
    return summary
