"""``python -m fedmed <command>``: one entry point for the data scientist, the project lead and hospital IT.

Each command lives in its own module, imported only when that command runs, and exposes
``add_arguments(parser)`` and ``main(args) -> int``.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "simulate": ("fedmed.simulate", "run a simulated federation of hospitals on this machine (FLARE simulator)"),
    "provision": ("fedmed.deploy.provision", "provision signed startup kits for the server, hospitals and admins"),
    "preflight": ("fedmed.deploy.preflight", "check a startup kit before starting it"),
    "rehearse": ("fedmed.deploy.rehearse", "provision, start and run a real deployment on 127.0.0.1 or on separate network hosts"),
    "watch": ("fedmed.deploy.watch", "follow a deployed job's rounds live with an admin kit, to its final status"),
    "results": ("fedmed.results_cli", "turn a downloaded deployment job result into bundle, metrics and report"),
    "stop": ("fedmed.deploy.stop", "stop a deployment's server or sites with an admin kit, saying what happened"),
    "report": ("fedmed.report", "build the report from a finished simulate or deployment output"),
    "verify-provenance": ("fedmed.provenance", "verify a model provenance card's hash chain"),
    "audit-leakage": ("fedmed.privacy.audit", "gradient-inversion and membership-inference attacks on each privacy mode"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedmed", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    cmd_parser = argparse.ArgumentParser(prog=f"python -m fedmed {name}", description=help_text, allow_abbrev=False)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    if name in RUN_FOLDER_COMMANDS:
        try:
            args = _resolve_run_folder(args)
        except RuntimeError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: the command's own cleanup has run (its finally blocks); no traceback
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130


# commands whose `path` may be an output folder or a downloaded job result (any folder in it)
RUN_FOLDER_COMMANDS = ("report", "verify-provenance")


def _resolve_run_folder(args: argparse.Namespace) -> argparse.Namespace:
    """Point ``args.path`` at the folder holding the run files (``fedmed.results.resolve_run_folder``);
    a report of a downloaded job still lands in ``<given folder>/report`` by default."""
    from pathlib import Path

    from fedmed.results import resolve_run_folder

    given = Path(args.path)
    resolved = resolve_run_folder(given)
    if resolved != given and hasattr(args, "out") and args.out is None:
        args.out = str(given / "report")
    args.path = str(resolved)
    return args
