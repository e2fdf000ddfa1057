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
    "rehearse": ("fedmed.deploy.rehearse", "provision, start and run a real deployment on 127.0.0.1"),
    "report": ("fedmed.report", "build the report from a finished simulate or deployment output"),
    "verify-provenance": ("fedmed.provenance", "verify a model provenance card's hash chain"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedmed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
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
    cmd_parser = argparse.ArgumentParser(prog=f"python -m fedmed {name}", description=help_text)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)
