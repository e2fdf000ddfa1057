"""Resume after a server crash: a server component (in the server's ``local/resources.json``).

FLARE 2.9 does not resume a job whose server died: its component snapshots are a no-op
(``ServerEngine.persist_components``) and nothing restores or closes the jobs that were running, so
after a restart such a job stays ``RUNNING`` in the job store with no process behind it.

:class:`ResumeInterruptedJobs` runs when the restarted server starts (``SYSTEM_START``). For every
job the store still calls ``RUNNING`` / ``DISPATCHED`` (nothing can be running: the server has just
started), it

1. marks the job ``FINISHED:ABNORMAL`` (so none is left ``RUNNING`` with nothing behind it);
2. when the job ran this project's controller (its server app config names
   ``fedmed.flare.controller.FedAvgController``), submits a clone of it whose meta carries
   ``fedmed_resume_of: <old job id>`` (and FLARE's ``cloned_from``). The clone is scheduled as any
   job; its controller loads the interrupted job's ``fedmed/resume_state.npz`` (written after every
   completed round) and goes on from the first round that had not completed.

   The interrupted job's meta gets ``fedmed_resumed_as: <new job id>``, so whoever watched the old
   job (``rehearse``, the admin API's ``get_job_meta``) can follow the run to its end.

Jobs of other kinds are only marked. The clone's id is also logged (``resumed job OLD as NEW``).
"""

from __future__ import annotations

import os

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus

from fedmed.flare.controller import RESUME_META_KEY

CONTROLLER_PATH = "fedmed.flare.controller.FedAvgController"
RESUMED_AS_META_KEY = "fedmed_resumed_as"  # on the interrupted job's meta: the id of the job that resumes it
# what a clone keeps of the interrupted job's meta (FLARE's own clone keeps a subset of these, and not the scope)
_KEPT_META = ("name", "job_folder_name", "deploy_map", "resource_spec", "content_location", "approvals", "min_clients",
              "mandatory_clients", "data_storage_format", "study", "scope", "submitter_name", "submitter_org",
              "submitter_role", "byoc")


class ResumeInterruptedJobs(FLComponent):
    def __init__(self, resume: bool = True):
        """Args:
        resume: clone interrupted fedmed jobs so they resume (default True); False only marks them
            ``FINISHED:ABNORMAL``.
        """
        super().__init__()
        self.resume = resume

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.SYSTEM_START:
            return
        try:
            self._recover(fl_ctx)
        except Exception as exc:  # noqa: BLE001 - never stop the server from starting
            self.log_exception(fl_ctx, f"[fedmed] resume: could not recover interrupted jobs: {exc}")

    def _recover(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or engine.get_workspace()
        if job_manager is None:
            return
        for job in job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            old_id = job.job_id
            try:  # the pointer to the resuming job is set before the status, so whoever sees the status sees it
                if self.resume and self._is_fedmed_job(workspace, old_id):
                    meta = {key: job.meta[key] for key in _KEPT_META if key in job.meta}
                    meta[JobMetaKey.CLONED_FROM.value] = old_id
                    meta[RESUME_META_KEY] = old_id
                    new_id = job_manager.clone(from_jid=old_id, meta=meta, fl_ctx=fl_ctx).get(JobMetaKey.JOB_ID.value)
                    job_manager.update_meta(old_id, {RESUMED_AS_META_KEY: new_id}, fl_ctx)
                    self.log_info(fl_ctx, f"[fedmed] resume: resumed job {old_id} as {new_id} "
                                          f"(it continues after the last round {old_id} completed)")
            finally:
                job_manager.set_status(old_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
                self.log_warning(fl_ctx, f"[fedmed] resume: job {old_id} was running when the server stopped; marked FINISHED:ABNORMAL")

    @staticmethod
    def _is_fedmed_job(workspace, job_id: str) -> bool:
        config = os.path.join(workspace.get_app_dir(job_id), "config", "config_fed_server.json")
        try:
            with open(config) as handle:
                return CONTROLLER_PATH in handle.read()
        except OSError:
            return False
