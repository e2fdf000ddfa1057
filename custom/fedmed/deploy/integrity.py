"""Kit integrity at run time: a server or hospital kit refuses to start unless the code that runs is the signed code.

FLARE 2.9 checks only its startup config, the certificate, the key and ``rootCA.pem`` against
``startup/signature.json`` when a process starts, and skips even that when ``signature.json`` is
missing. This module checks the whole kit against the root CA's signatures (written by
:class:`fedmed.deploy.builder.FedMedKitBuilder`), for server kits as for hospital kits:

- ``startup/signature.json`` must exist, and every startup file (``fed_client.json`` /
  ``fed_server.json``, certificates, ``start.sh``, ``sub_start.sh``, ``fedmed_check.py``, ...) must match it;
- the pre-deployed ``fedmed`` package in ``local/custom/`` must match
  ``local/fedmed_package.signature.json`` file by file, and the signed manifest (which files the
  package and ``startup/`` hold) must be intact;
- ``local/resources.json`` must still load :class:`KitIntegrityGuard`;
- no bytecode anywhere in the kit (``__pycache__``, ``.pyc``): Python runs a ``.pyc`` whose header
  matches the source instead of the source, so a forged one would run unsigned code;
- the processes FLARE starts keep their bytecode outside the kit (``PYTHONPYCACHEPREFIX``, set by
  the kit's start script and inherited by FLARE's job processes);
- ``fedmed`` resolves to the kit's signed copy in those processes, not to a copy ahead of it on
  ``PYTHONPATH``, in site-packages (a ``pip install``) or added by a ``.pth`` file.

It runs at every server and client start, before the process registers or binds a port:

1. ``startup/sub_start.sh`` runs ``python3 -I startup/fedmed_check.py KIT``
   (:mod:`fedmed.deploy.launch_check`, a signed startup file): isolated from ``PYTHONPATH``, it scans
   for bytecode with the standard library before importing anything, loads this module from the
   kit's own ``local/custom`` only, and runs :func:`launch_main`; the script exits 1 instead of
   starting FLARE. :func:`fedmed.deploy.processes.start_kit` (``rehearse``, the tests) runs the same
   file the same way;
2. inside the FLARE process: FLARE builds the components of ``local/resources.json`` before it
   connects (clients) or binds its ports (server), and :class:`KitIntegrityGuard`'s constructor
   checks the kit again, that every loaded ``fedmed`` module comes from the kit, and that bytecode is
   kept outside the kit; it ends the process (exit code 3) when not.

Each layer checks what would switch off the other one (the guard checks ``sub_start.sh`` and
``fedmed_check.py``; the check script checks that ``resources.json`` still loads the guard). What
this does not stop, see docs/deployment.md "Integrity at run time": whoever controls the machine can
edit the checking code and the files it checks, or start FLARE by hand with another Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nvflare.apis.fl_component import FLComponent

from fedmed.deploy import kit as kit_files
from fedmed.deploy.launch_check import bytecode_in

GUARD_PATH = "fedmed.deploy.integrity.KitIntegrityGuard"
GUARD_ID = "fedmed_kit_integrity"
REFUSED = "fedmed: this kit is not the signed one; refusing to start"
GUARD_EXIT_CODE = 3
LOG_FILE = "log.txt"  # the process's own log in the kit, where IT looks first
CHECK_SCRIPT = "fedmed_check.py"  # startup/fedmed_check.py: fedmed.deploy.launch_check, copied by the builder
PYCACHE_ENV = "PYTHONPYCACHEPREFIX"
# where the start scripts keep bytecode (outside the kit): $FEDMED_PYCACHE, else the user's cache folder
PYCACHE_DEFAULT = "${FEDMED_PYCACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedmed/pycache}"
WHAT_TO_DO = ("do not edit startup/ or local/custom/ of a kit. Restore the named file(s) from the kit as the project "
              "lead sent it, or ask the project lead for a fresh kit")
WHAT_TO_DO_SHADOW = ("remove the other copy from this Python environment (pip uninstall fedmed, drop it from "
                     "PYTHONPATH, or delete the .pth file that adds it) and start the kit with its startup/start.sh; "
                     "a kit always runs its own signed copy")
# FLARE's sub_start.sh: `export PYTHONPATH=/local/custom:$PYTHONPATH`; fl_conf then appends the kit's local/custom
FLARE_PYTHONPATH_PREFIX = "/local/custom"
# where `fedmed` resolves in a FLARE process started with this environment; find_spec runs no package code
_PROBE = ("import importlib.util, sys\n"
          "sys.path.append(sys.argv[1])  # FLARE appends the kit's local/custom (nvflare.private.fed.app.fl_conf)\n"
          "spec = importlib.util.find_spec('fedmed')\n"
          "print(spec.origin if spec is not None and spec.origin else '')\n")


def default_pycache(env: dict | None = None) -> str:
    """The bytecode folder the kit's start scripts use (:data:`PYCACHE_DEFAULT`), for ``env``."""
    env = os.environ if env is None else env
    if env.get("FEDMED_PYCACHE"):
        return env["FEDMED_PYCACHE"]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fedmed", "pycache")


def _inside(path: str | Path, folder: str | Path) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def package_dir(kit_dir: str | Path) -> Path:
    """The kit's signed copy of the package: ``KIT/local/custom``."""
    return Path(kit_dir) / kit_files.LOCAL / kit_files.PACKAGE_DIR


def verify_kit(kit_dir: str | Path) -> list[str]:
    """Problems that must stop a server or client kit from starting, each naming the file; empty when intact."""
    kit = Path(kit_dir)
    problems = bytecode_problems(kit)
    # FLARE's processes run in the kit's folder with '' (the working folder) on sys.path: a fedmed there wins
    problems += [f"{kit / name} would be imported as fedmed instead of the kit's signed copy in local/custom (FLARE runs "
                 f"in the kit's folder, which is on sys.path)" for name in (kit_files.PACKAGE_NAME, kit_files.PACKAGE_NAME + ".py")
                 if (kit / name).exists()]
    signature = kit / kit_files.STARTUP / kit_files.SIGNATURE_FILE
    if not signature.is_file():
        return problems + [f"{signature} is missing, so FLARE would skip its own start-up check of this kit"]
    try:
        problems += kit_files.verify_startup_signature(kit)
        problems += kit_files.verify_startup_manifest(kit)
        problems += kit_files.verify_package_signature(kit)
    except kit_files.KitError as exc:
        return problems + [str(exc)]
    problems += guard_problems(kit)
    return list(dict.fromkeys(problems))


def bytecode_problems(kit_dir: str | Path) -> list[str]:
    """Every ``__pycache__`` folder or ``.pyc`` file in the kit, named (a kit never holds bytecode)."""
    found = bytecode_in(str(kit_dir))
    shown = found[:20]
    problems = [f"{path} is Python bytecode inside the kit (it would run instead of the signed source)" for path in shown]
    if len(found) > len(shown):
        problems.append(f"... and {len(found) - len(shown)} more bytecode files/folders in {kit_dir}")
    return problems


def guard_problems(kit: Path) -> list[str]:
    """``local/resources.json`` must load :class:`KitIntegrityGuard`; ``sub_start.sh`` must run the check script."""
    path = kit / kit_files.LOCAL / "resources.json"
    problems = []
    try:
        resources = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path} cannot be read ({exc}); it must load {GUARD_PATH}"]
    components = resources.get("components") if isinstance(resources, dict) else None
    if not any(isinstance(c, dict) and c.get("path") == GUARD_PATH for c in components or []):
        problems.append(f"{path} no longer loads {GUARD_PATH} (component id '{GUARD_ID}'), the kit's own check in the "
                        f"FLARE process")
    script = kit / kit_files.STARTUP / "sub_start.sh"
    if script.is_file() and CHECK_SCRIPT not in script.read_text(errors="replace"):
        problems.append(f"{script} no longer runs startup/{CHECK_SCRIPT} before it starts FLARE")
    return problems



def pycache_problems(kit_dir: str | Path, prefix: str | None) -> list[str]:
    """Bytecode must be kept outside the kit: ``prefix`` (``PYTHONPYCACHEPREFIX`` / ``sys.pycache_prefix``)
    set and not inside it."""
    kit = Path(kit_dir)
    if not prefix:
        return [f"{PYCACHE_ENV} is not set: Python would read and write bytecode inside the kit ({kit / 'local' / 'custom'}"
                f"/**/__pycache__). Start the kit with its startup/start.sh, which keeps bytecode in {PYCACHE_DEFAULT}"]
    if _inside(prefix, kit):
        return [f"{PYCACHE_ENV}={prefix} is inside the kit {kit}: bytecode must be kept outside it"]
    return []


def resolved_package(kit_dir: str | Path, env: dict | None = None, cwd: str | Path | None = None,
                     python: str | None = None) -> str | None:
    """Where ``import fedmed`` resolves in a FLARE process of this kit started with ``env`` from ``cwd``
    (``python -m`` puts the working folder first on ``sys.path``; FLARE appends ``local/custom``).
    Asked of a fresh ``python`` through ``importlib.util.find_spec``, which runs no code of the package."""
    env = dict(os.environ if env is None else env)
    run = subprocess.run([python or sys.executable, "-c", _PROBE, str(package_dir(kit_dir))], env=env,
                         cwd=str(cwd) if cwd else None, capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise kit_files.KitError(f"cannot ask {python or sys.executable} where fedmed resolves: {run.stderr.strip()[-500:]}")
    origin = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    return os.path.realpath(origin) if origin else None


def shadow_problems(kit_dir: str | Path, origin: str | None) -> list[str]:
    """A problem naming both paths when ``fedmed`` resolves (``origin``) anywhere but the kit's signed copy."""
    expected = package_dir(kit_dir).resolve() / kit_files.PACKAGE_NAME / "__init__.py"
    if origin and Path(origin) == expected:
        return []
    return [f"fedmed resolves to {origin or 'nothing (no fedmed package found)'}, not to the kit's signed copy {expected}: "
            f"that other copy would run in this kit's processes (a PYTHONPATH entry, a pip-installed fedmed or a .pth "
            f"file ahead of the kit)"]


def loaded_package_problems(kit_dir: str | Path) -> list[str]:
    """Every ``fedmed`` module this process loaded from outside the kit's ``local/custom``, with both paths."""
    custom = package_dir(kit_dir).resolve()
    problems = []
    for name, module in sorted(sys.modules.items()):
        if name != kit_files.PACKAGE_NAME and not name.startswith(kit_files.PACKAGE_NAME + "."):
            continue
        origin = getattr(module, "__file__", None)
        if origin and not _inside(origin, custom):
            problems.append(f"module {name} was loaded from {origin}, not from the kit's signed copy in {custom}")
    return problems


def refusal(kit_dir: str | Path, problems: list[str], what_to_do: str = WHAT_TO_DO) -> str:
    kit = Path(kit_dir)
    lines = [f"{REFUSED} ({kit}):"] + [f"  - {p}" for p in problems]
    lines.append(f"  What to do: {what_to_do}; then check it with 'python -m fedmed preflight {kit}' before starting it "
                 f"again.")
    return "\n".join(lines)


def _what_to_do(problems: list[str]) -> str:
    if any("resolves to" in p or "was loaded from" in p for p in problems):
        return f"{WHAT_TO_DO_SHADOW}. Otherwise {WHAT_TO_DO}"
    return WHAT_TO_DO


def _report(kit: Path, message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    try:  # FLARE's logging is not configured yet when the guard runs; log.txt is where IT looks
        with open(kit / LOG_FILE, "a") as log:
            log.write(message + "\n")
    except OSError:
        pass


def launch_problems(kit_dir: str | Path, env: dict | None = None, cwd: str | Path | None = None) -> list[str]:
    """What :func:`launch_main` refuses: the kit (:func:`verify_kit`), the bytecode folder of ``env``
    and where ``fedmed`` resolves for a FLARE process started with ``env`` from ``cwd``."""
    env = dict(os.environ if env is None else env)
    problems = verify_kit(kit_dir)
    problems += pycache_problems(kit_dir, env.get(PYCACHE_ENV))
    try:
        problems += shadow_problems(kit_dir, resolved_package(kit_dir, env, cwd))
    except (kit_files.KitError, OSError, subprocess.SubprocessError) as exc:
        problems.append(str(exc))
    return problems


class KitIntegrityGuard(FLComponent):
    def __init__(self, kit_dir: str = ""):
        """Check the kit when FLARE builds ``local/resources.json``'s components, before the process
        registers with the server (client) or binds its ports (server).

        Args:
            kit_dir: the kit folder; "" (default) is the process's workspace, FLARE's working folder
                when it builds these components.
        """
        super().__init__()
        kit = Path(kit_dir or ".").resolve()
        problems = verify_kit(kit) + loaded_package_problems(kit) + pycache_problems(kit, sys.pycache_prefix)
        if problems:
            _report(kit, refusal(kit, problems, _what_to_do(problems)))
            # SystemExit, not an exception FLARE would log and carry on after: the process must not go on
            raise SystemExit(GUARD_EXIT_CODE)
        self.kit = kit


def launch_main(kit_dir: str | Path) -> int:
    """Run by ``startup/fedmed_check.py`` (in ``python3 -I``, from the kit's own copy): 0 when the kit
    may start, else print why, append it to the kit's ``log.txt`` and return 3."""
    kit = Path(kit_dir).resolve()
    problems = loaded_package_problems(kit) + launch_problems(kit, os.environ, os.getcwd())
    if problems:
        _report(kit, refusal(kit, problems, _what_to_do(problems)))
        return GUARD_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmed.deploy.integrity KIT``: exit 0 when the kit's files are intact, else print why and exit 1.

    Checks the files only; the start scripts run ``startup/fedmed_check.py``, which also checks
    where ``fedmed`` resolves and where bytecode goes."""
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
