"""The first code a server or hospital kit runs: ``startup/fedmed_check.py``, before FLARE starts.

The provisioning builder copies this file, unchanged, into every server and hospital kit as
``startup/fedmed_check.py``, where ``startup/signature.json`` covers it. The kit's
``startup/sub_start.sh`` (and :func:`fedmed.deploy.processes.start_kit`) runs it as

    python3 -I KIT/startup/fedmed_check.py KIT

``-I`` (isolated mode): ``PYTHONPATH``, the user's site-packages and the script's folder are not on
``sys.path``, so no other ``fedmed`` can stand in for the checking code. Before it imports anything
from the kit, with the standard library only, it refuses a kit that holds bytecode (``__pycache__``
folders or ``.pyc`` files: Python would run a forged ``.pyc`` instead of the signed source). Then it
puts the kit's own ``local/custom`` first on ``sys.path``, makes sure ``fedmed`` resolves there,
and runs :func:`fedmed.deploy.integrity.launch_main`: signatures, the signed manifest, the in-process
guard still configured, the bytecode location, and where ``fedmed`` would resolve in the processes
FLARE is about to start (a ``PYTHONPATH`` entry, a pip-installed copy, a ``.pth``).

Exit code 0: the kit may start; 3: refused (the message names the files or paths and what to do).
Nothing here may import a module of the kit before the bytecode scan. Standard library only.
"""

import os
import sys

REFUSED_EXIT = 3
BYTECODE_SUFFIXES = (".pyc", ".pyo")
WHAT_TO_DO_BYTECODE = ("Delete the named folders/files: a kit never ships bytecode, and the kit's start scripts keep "
                       "Python's bytecode outside the kit (PYTHONPYCACHEPREFIX). If you did not put them there, ask the "
                       "project lead for a fresh kit")


def bytecode_in(kit):
    """Every ``__pycache__`` folder and ``.pyc``/``.pyo`` file under ``kit`` (sorted paths)."""
    found = []
    for root, dirs, files in os.walk(kit):
        for name in dirs:
            if name == "__pycache__":
                found.append(os.path.join(root, name))
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # named once, as a folder
        found += [os.path.join(root, name) for name in files if name.endswith(BYTECODE_SUFFIXES)]
    return sorted(found)


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _refuse(kit, problems, what_to_do):
    lines = [f"fedmed: this kit is not the signed one; refusing to start ({kit}):"] + [f"  - {p}" for p in problems]
    lines.append(f"  What to do: {what_to_do}; then check it with 'python -m fedmed preflight {kit}' before starting it again.")
    message = "\n".join(lines)
    print(message, file=sys.stderr, flush=True)
    try:
        with open(os.path.join(kit, "log.txt"), "a") as log:
            log.write(message + "\n")
    except OSError:
        pass
    return REFUSED_EXIT


def main(argv):
    if len(argv) != 1:
        print("usage: python3 -I startup/fedmed_check.py KIT_FOLDER", file=sys.stderr)
        return 2
    kit = os.path.realpath(argv[0])
    if not sys.flags.isolated:
        return _refuse(kit, [f"{__file__} must run in isolated mode (python3 -I), so that PYTHONPATH cannot "
                             f"replace the checking code"], "start the kit with its startup/start.sh")
    found = bytecode_in(kit)
    if found:
        shown = found[:20] + ([f"... and {len(found) - 20} more"] if len(found) > 20 else [])
        return _refuse(kit, [f"{path} is Python bytecode inside the kit (it would run instead of the signed source)"
                             for path in shown], WHAT_TO_DO_BYTECODE)
    # -I ignores PYTHON* variables: use the start script's bytecode folder (outside the kit) explicitly
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    if prefix and not _inside(prefix, kit):
        sys.pycache_prefix = prefix
    else:
        sys.dont_write_bytecode = True
    custom = os.path.join(kit, "local", "custom")
    expected = os.path.join(custom, "fedmed", "__init__.py")
    sys.path.insert(0, custom)
    import importlib.util

    spec = importlib.util.find_spec("fedmed")
    origin = os.path.realpath(spec.origin) if spec is not None and spec.origin else None
    if origin != expected:
        return _refuse(kit, [f"the checking code would come from {origin or 'nowhere'}, not from the kit's signed copy "
                             f"{expected}"], "restore local/custom/fedmed/ from the kit as the project lead sent it")
    from fedmed.deploy import integrity

    if not _inside(integrity.__file__, custom):
        return _refuse(kit, [f"fedmed.deploy.integrity was loaded from {integrity.__file__}, not from {custom}"],
                       "remove the other fedmed from this Python environment")
    return integrity.launch_main(kit)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
