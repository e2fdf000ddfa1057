"""Deployment to hospitals: provisioning builder, kit signing and checks, and the operational commands.

FLARE adapters (they import ``nvflare``):

- :mod:`fedmed.deploy.builder`: ``FedMedKitBuilder``, run by the real ``nvflare provision``: writes
  ``workspace_templates/`` into every kit's ``local/``, pre-deploys this package into ``local/custom/``
  and signs every kit's startup files with the root CA.
- :mod:`fedmed.deploy.kit`: what a startup kit is made of, signing and signature/certificate checks.
- :mod:`fedmed.deploy.integrity`: the run-time kit check (start script and in-process guard) that refuses an edited kit.
- :mod:`fedmed.deploy.storage`: a filesystem store rooted in the running server's own workspace.
- :mod:`fedmed.deploy.processes`: start / stop kits as real processes, wait for log lines, list sockets.
- commands ``provision``, ``preflight``, ``rehearse`` (``python -m fedmed COMMAND``).
"""
