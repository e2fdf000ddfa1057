"""Kit integrity at run time: a hospital's client refuses to start from a kit that is not the signed one.

FLARE 2.9 checks only ``fed_client.json``, the certificate, the key and ``rootCA.pem`` against
``startup/signature.json`` when a client starts, and skips even that when ``signature.json`` is
missing. This module checks the whole kit against the root CA's signatures (written by
:class:`fedmed.deploy.builder.FedMedKitBuilder`):

- ``startup/signature.json`` must exist, and every startup file (``fed_client.json``, certificates,
  ``start.sh``, ``sub_start.sh``, ``stop_fl.sh``, ...) must match it;
- the pre-deployed ``fedmed`` package in ``local/custom/`` must match
  ``local/fedmed_package.signature.json`` file by file, and the signed manifest (which files the
  package and ``startup/`` hold) must be intact;
- ``local/resources.json`` must still load :class:`KitIntegrityGuard`.

It runs twice at every client start, before the client registers with the server:

1. ``startup/sub_start.sh`` (as the builder writes it) runs ``python3 -m fedmed.deploy.integrity KIT``
   with the kit's own package and stops with exit code 1 before starting FLARE;
2. inside the client process: FLARE builds the components of ``local/resources.json`` before it
   connects, and :class:`KitIntegrityGuard`'s constructor runs the same check and ends the process
   (exit code 3) when it fails. This also covers a client started without ``sub_start.sh``.

Each layer checks what would switch off the other one (the guard checks ``sub_start.sh``; the start
script checks that ``resources.json`` still loads the guard). What this does not stop, see
docs/deployment.md "Integrity at run time": whoever controls the hospital's machine can edit the
checking code itself, start FLARE by hand, or use another Python package path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nvflare.apis.fl_component import FLComponent

from fedmed.deploy import kit as kit_files

GUARD_PATH = "fedmed.deploy.integrity.KitIntegrityGuard"
GUARD_ID = "fedmed_kit_integrity"
REFUSED = "fedmed: this kit is not the signed one; refusing to start"
GUARD_EXIT_CODE = 3
LOG_FILE = "log.txt"  # the client's own log in the kit, where hospital IT looks first


def verify_kit(kit_dir: str | Path) -> list[str]:
    """Problems that must stop a client kit from starting, each naming the file; empty when intact."""
    kit = Path(kit_dir)
    signature = kit / kit_files.STARTUP / kit_files.SIGNATURE_FILE
    if not signature.is_file():
        return [f"{signature} is missing, so FLARE would skip its own start-up check of this kit"]
    try:
        problems = kit_files.verify_startup_signature(kit)
        problems += kit_files.verify_startup_manifest(kit)
        problems += kit_files.verify_package_signature(kit)
    except kit_files.KitError as exc:
        return [str(exc)]
    problems += _guard_problems(kit)
    return list(dict.fromkeys(problems))


def _guard_problems(kit: Path) -> list[str]:
    path = kit / kit_files.LOCAL / "resources.json"
    try:
        resources = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path} cannot be read ({exc}); it must load {GUARD_PATH}"]
    components = resources.get("components") if isinstance(resources, dict) else None
    if not any(isinstance(c, dict) and c.get("path") == GUARD_PATH for c in components or []):
        return [f"{path} no longer loads {GUARD_PATH} (component id '{GUARD_ID}'), the client's own kit check"]
    return []


def refusal(kit_dir: str | Path, problems: list[str]) -> str:
    kit = Path(kit_dir)
    lines = [f"{REFUSED} ({kit}):"] + [f"  - {p}" for p in problems]
    lines.append(
        "  What to do: do not edit startup/ or local/custom/ of a kit. Restore the named file(s) from the kit as "
        "the project lead sent it, or ask the project lead for a fresh kit; then check it with "
        f"'python -m fedmed preflight {kit}' before starting it again."
    )
    return "\n".join(lines)


def _report(kit: Path, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    try:  # FLARE's logging is not configured yet when the guard runs; log.txt is where IT looks
        with open(kit / LOG_FILE, "a") as log:
            log.write(message + "\n")
    except OSError:
        pass


class KitIntegrityGuard(FLComponent):
    def __init__(self, kit_dir: str = ""):
        """Check the kit when FLARE builds ``local/resources.json``'s components, before registration.

        Args:
            kit_dir: the kit folder; "" (default) is the client's workspace, FLARE's working folder
                when it builds these components.
        """
        super().__init__()
        kit = Path(kit_dir or ".").resolve()
        problems = verify_kit(kit)
        if problems:
            _report(kit, refusal(kit, problems))
            # SystemExit, not an exception FLARE would log and carry on after: the client must not register
            raise SystemExit(GUARD_EXIT_CODE)
        self.kit = kit


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmed.deploy.integrity KIT``: exit 0 when the kit is intact, else print why and exit 1."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedmed.deploy.integrity KIT_FOLDER", file=sys.stderr)
        return 2
    kit = Path(args[0]).resolve()
    problems = verify_kit(kit)
    if problems:
        _report(kit, refusal(kit, problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
