"""``startup/preflight.sh``: the preflight entry every server and hospital kit carries.

Hospitals install ``requirements.txt`` without its ``-e ./custom`` line (README "Deploying to
hospitals"): the ``fedmed`` package comes with the kit, in ``local/custom/``, which FLARE puts on
``sys.path`` of the processes it starts but which a plain ``python -m fedmed`` does not see. The
script puts the kit's own package first on ``PYTHONPATH`` and runs ``python -m fedmed preflight`` on
the kit with the first ``python3`` on ``PATH`` (the one ``start.sh`` uses). Like ``start.sh`` it
keeps Python's bytecode outside the kit (``PYTHONPYCACHEPREFIX``), and it tells preflight the
``PYTHONPATH`` it was called with, so the shadowing check sees what ``start.sh`` would. Written by the
provisioning builder before the kit's ``startup/`` is signed, so it is covered by the signature.
"""

from __future__ import annotations

from pathlib import Path

from fedmed.deploy.integrity import PYCACHE_DEFAULT

SCRIPT_NAME = "preflight.sh"
SCRIPT = """#!/usr/bin/env bash
# fedmed: check this kit before starting it, with the fedmed package that came with the kit (local/custom)
# and the first python3 on PATH (the one start.sh uses). Arguments go to `python -m fedmed preflight`:
#   startup/preflight.sh [--sample N] [--job JOB_FOLDER] [--no-server] [--timeout SECONDS]
DIR="$( cd "$( dirname "${BASH_SOURCE[0]}" )" >/dev/null 2>&1 && pwd )"
KIT="$( cd "$DIR/.." >/dev/null 2>&1 && pwd )"
# Python's bytecode goes outside the kit, as in start.sh (a kit holding bytecode is refused)
export PYTHONPYCACHEPREFIX="%s"
export FEDMED_START_PYTHONPATH="${PYTHONPATH:-}"  # what start.sh would see: preflight checks where fedmed resolves
export PYTHONPATH="$KIT/local/custom${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m fedmed preflight "$KIT" "$@"
""" % PYCACHE_DEFAULT


def write_preflight_script(kit_dir: str | Path) -> Path:
    """Write ``KIT/startup/preflight.sh`` (executable)."""
    path = Path(kit_dir) / "startup" / SCRIPT_NAME
    path.write_text(SCRIPT)
    path.chmod(0o755)
    return path
