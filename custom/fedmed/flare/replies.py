"""Task replies between sites and the server: how a site reports an error, how the server reads answers.

A site that cannot do a task answers with a non-OK return code and a human-readable message in the
``fedmed_error`` header (:func:`error_reply`); the server's workflows turn a finished task into
``({site: DXO}, {site: error message})`` with :func:`collect_replies`, so a failing or silent site
becomes a named error in the log and in ``metrics.json`` rather than a failed round.
"""

from __future__ import annotations

from collections.abc import Iterable

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.impl.controller import Task
from nvflare.apis.shareable import Shareable, make_reply

ERROR_HEADER = "fedmed_error"  # reply header carrying a site's error message to the server


def error_reply(message: str, rc: str = ReturnCode.EXECUTION_EXCEPTION) -> Shareable:
    """A reply with return code ``rc`` whose ``fedmed_error`` header says what went wrong and where."""
    reply = make_reply(rc)
    reply.set_header(ERROR_HEADER, message)
    return reply


def collect_replies(task: Task, expected: Iterable) -> tuple[dict[str, DXO], dict[str, str]]:
    """Split a finished task's results into DXOs and error messages, one entry per expected site.

    ``expected`` holds the sites (client objects or names) the task was sent to; one that neither
    answered nor failed is reported as not reached. Results are dropped from the task once read.
    """
    answers: dict[str, DXO] = {}
    errors: dict[str, str] = {}
    for client_task in task.client_tasks:
        site = client_task.client.name
        result: Shareable | None = client_task.result
        if result is None:
            errors[site] = "no answer before the task closed (timed out or disconnected)"
            continue
        rc = result.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            errors[site] = result.get_header(ERROR_HEADER) or f"returned {rc}"
            continue
        try:
            answers[site] = from_shareable(result)
        except Exception as exc:  # a malformed reply is this site's error, not the workflow's
            errors[site] = f"sent a result that is not a DXO ({exc})"
        client_task.result = None  # free memory
    for site in expected:
        name = getattr(site, "name", site)
        if name not in answers and name not in errors:
            errors[name] = "was not reached before the task closed"
    return answers, errors
