"""A FLARE filesystem store that lives inside the running site's own workspace.

FLARE's server keeps its job store and snapshots in ``/tmp/nvflare/...`` by default, shared by every
FLARE run on the machine. ``FilesystemStorage`` needs an absolute ``root_dir``, but a startup kit is
provisioned on one machine and started on another, so the absolute path is unknown at provisioning.
FLARE's server processes (``server_train`` and each job's ``runner_process``) change into their
workspace before they build components, so this store resolves ``folder`` against the current
folder and refuses to run anywhere that is not a FLARE server workspace.
"""

from __future__ import annotations

import os

from nvflare.app_common.storages.filesystem_storage import FilesystemStorage


class WorkspaceStorage(FilesystemStorage):
    def __init__(self, folder: str = "", uri_root: str = "/"):
        """Store objects under ``<server workspace>/<folder>``.

        Args:
            folder: folder inside the server's workspace ("" = the workspace itself); must be relative.
            uri_root: as in ``FilesystemStorage``.
        """
        if os.path.isabs(folder) or ".." in folder.split("/"):
            raise ValueError(f"WorkspaceStorage folder '{folder}' must be a relative path inside the workspace")
        workspace = os.getcwd()
        if not os.path.isfile(os.path.join(workspace, "startup", "fed_server.json")):
            raise ValueError(
                f"WorkspaceStorage: the current folder {workspace} is not a FLARE server workspace "
                f"(no startup/fed_server.json); start the server from its kit (startup/start.sh or "
                f"server_train -m <kit>), which runs in the kit's folder"
            )
        super().__init__(root_dir=os.path.join(workspace, folder) if folder else workspace, uri_root=uri_root)
        self.folder = folder
