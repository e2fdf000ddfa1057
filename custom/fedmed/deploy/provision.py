"""``python -m fedmed provision``: signed startup kits for the server, the hospitals and the admins.

Wraps the real ``nvflare provision`` with this project's ``provisioning/project.yml``, its builder
(:class:`fedmed.deploy.builder.FedMedKitBuilder`) and ``workspace_templates/``. Options change a
copy of the project file (server host name, port, first N hospitals, HE); the copy is kept next to
the kits as ``<out>/<project name>.project.yml``. Output defaults to ``provisioning/workspace/`` (git-ignored: it holds
the root CA's private key in ``<project>/state/``).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedmed.atomic import write_json
from fedmed.deploy.builder import repo_root

DEFAULT_PROJECT = "provisioning/project.yml"
DEFAULT_OUT = "provisioning/workspace"
BUILDER_PATH = "fedmed.deploy.builder.FedMedKitBuilder"
CERT_BUILDER_PATH = "nvflare.lighter.impl.cert.CertBuilder"
HE_BUILDER_PATH = "nvflare.lighter.impl.he.HEBuilder"
ORG_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
STATE_DIR = "state"  # <out>/<project>/state/cert.json: the root CA's private key


def secure_state(state_dir: str | Path) -> None:
    """Make the provisioning state private: folders 0700, files 0600 (owner only).

    ``nvflare provision`` writes ``state/cert.json`` (the root CA's private key: whoever reads it can
    issue kits the federation trusts) with the umask's mode, 0644 under the usual 0022.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ProvisionError(f"{state_dir} is missing after nvflare provision: the root CA's state was not written")
    for root, dirs, files in os.walk(state_dir):
        os.chmod(root, stat.S_IRWXU)
        for name in files:
            os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IWUSR)


class ProvisionError(RuntimeError):
    pass


def load_project(path: str | Path = DEFAULT_PROJECT) -> dict:
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (repo_root() / path).is_file():
        path = repo_root() / path
    if not path.is_file():
        raise ProvisionError(f"project file {path} not found")
    project = yaml.safe_load(path.read_text())
    check_project(project, path)
    return project


def check_project(project: dict, where) -> None:
    if project.get("api_version") != 3:
        raise ProvisionError(f"{where}: api_version must be 3 (FLARE 2.9), got {project.get('api_version')!r}")
    participants = project.get("participants") or []
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1:
        raise ProvisionError(f"{where}: needs exactly one participant of type server, found {len(servers)}")
    for p in participants:
        if not ORG_PATTERN.match(str(p.get("org", ""))):
            raise ProvisionError(f"{where}: participant '{p.get('name')}' has org '{p.get('org')}'; org names may "
                                 f"hold only letters, digits and underscores (FLARE rule ^[A-Za-z0-9_]+$)")
    paths = [b.get("path") for b in project.get("builders", [])]
    if BUILDER_PATH not in paths:
        raise ProvisionError(f"{where}: builders must include {BUILDER_PATH}")
    if CERT_BUILDER_PATH not in paths or paths.index(BUILDER_PATH) < paths.index(CERT_BUILDER_PATH):
        raise ProvisionError(f"{where}: {BUILDER_PATH} must come after {CERT_BUILDER_PATH} (it signs with the root CA)")


def customize_project(
    project: dict,
    server_name: str | None = None,
    port: int | None = None,
    hospitals: int | None = None,
    he: bool = False,
    templates_dir: str | Path | None = None,
    name: str | None = None,
) -> dict:
    """A copy of ``project`` with the server's host name / port, the first ``hospitals`` hospitals
    (and only their org admins), HE contexts, an absolute templates folder."""
    project = copy.deepcopy(project)
    if name:
        project["name"] = name
    participants = project["participants"]
    server = next(p for p in participants if p["type"] == "server")
    if server_name:
        server["name"] = server_name
    if port:
        server["fed_learn_port"] = int(port)
        server["admin_port"] = int(port)
    if hospitals is not None:
        clients = [p for p in participants if p["type"] == "client"]
        if not 1 <= hospitals <= len(clients):
            raise ProvisionError(f"--hospitals must be between 1 and {len(clients)} (the project's hospitals), got {hospitals}")
        keep_orgs = {c["org"] for c in clients[:hospitals]}
        drop = {c["name"] for c in clients[hospitals:]}
        participants[:] = [
            p for p in participants
            if p["name"] not in drop
            and not (p["type"] == "admin" and p.get("role") == "org_admin" and p["org"] not in keep_orgs)
        ]
    builders = project["builders"]
    for builder in builders:
        if builder["path"] == BUILDER_PATH:
            args = builder.setdefault("args", {})
            tdir = templates_dir or args.get("templates_dir") or "workspace_templates"
            tpath = Path(tdir)
            if not tpath.is_absolute():
                tpath = tpath.resolve() if tpath.is_dir() else (repo_root() / tpath)
            args["templates_dir"] = str(tpath)
    if he and HE_BUILDER_PATH not in [b["path"] for b in builders]:
        index = [b["path"] for b in builders].index(BUILDER_PATH)
        builders.insert(index, {"path": HE_BUILDER_PATH, "args": {}})
    return project


def server_of(project: dict) -> dict:
    return next(p for p in project["participants"] if p["type"] == "server")


def provision(project: dict, out_dir: str | Path, log=print) -> Path:
    """Run the real ``nvflare provision`` on ``project``; return the new kits folder (``.../prod_NN``)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    project_file = out_dir / f"{project['name']}.project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    package_parent = Path(__import__("fedmed").__file__).resolve().parents[1]
    command = [sys.executable, "-c", "import sys; from nvflare.cli import main; sys.exit(main())",
               "provision", "-p", str(project_file), "-w", str(out_dir), "-c", str(package_parent), "--force"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=out_dir)
    output = result.stdout + result.stderr
    prod_dirs = sorted((out_dir / project["name"]).glob("prod_*"), key=lambda p: int(p.name.split("_")[-1]))
    if result.returncode != 0 or "Exception" in output or not prod_dirs:
        raise ProvisionError(f"nvflare provision failed (exit {result.returncode}) for {project_file}:\n{output[-4000:]}")
    prod = prod_dirs[-1]
    secure_state(out_dir / project["name"] / STATE_DIR)
    missing = [p["name"] for p in project["participants"] if not (prod / p["name"] / "startup").is_dir()]
    if missing:
        raise ProvisionError(f"nvflare provision left no kit for {', '.join(missing)} in {prod}:\n{output[-4000:]}")
    log(f"  nvflare provision: {len(project['participants'])} kits in {prod} ({time.time() - started:.1f} s)")
    return prod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default=DEFAULT_PROJECT, help=f"FLARE project file (default {DEFAULT_PROJECT})")
    parser.add_argument("--out", default=None,
                        help=f"provisioning output folder (default {DEFAULT_OUT} in the repository, git-ignored)")
    parser.add_argument("--server-name", default=None,
                        help="the server's fully qualified host name as clients reach it (default: the project file's)")
    parser.add_argument("--port", type=int, default=None, help="server port for clients and admins (default: the project file's)")
    parser.add_argument("--hospitals", type=int, default=None, help="provision only the first N hospitals (default: all)")
    parser.add_argument("--he", action="store_true", help="add homomorphic-encryption contexts (FLARE HEBuilder) to the kits")
    parser.add_argument("--templates", default=None, help="site templates folder (default workspace_templates/)")


def main(args: argparse.Namespace) -> int:
    try:
        project = customize_project(load_project(args.project), args.server_name, args.port, args.hospitals, args.he,
                                    args.templates)
        server = server_of(project)
        clients = [p["name"] for p in project["participants"] if p["type"] == "client"]
        admins = [f"{p['name']} ({p.get('role')})" for p in project["participants"] if p["type"] == "admin"]
        print(f"[1/2] project '{project['name']}': server {server['name']}:{server.get('fed_learn_port', 8002)}, "
              f"{len(clients)} hospitals, {len(admins)} admins{', HE contexts' if args.he else ''}", flush=True)
        prod = provision(project, args.out or repo_root() / DEFAULT_OUT)
    except (ProvisionError, ValueError) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    print(f"[2/2] kits in {prod}:", flush=True)
    print(f"  server: {prod / server['name']}  (start: startup/start.sh)")
    print(f"  hospitals: {', '.join(clients)}  (each fills local/fedmed_site.json, then "
          f"python -m fedmed preflight <kit>, then startup/start.sh)")
    print(f"  admins: {', '.join(admins)}")
    print(f"  root CA private key: {prod.parent / 'state'} (keep it safe; never commit it)")
    summary = {"prod_dir": str(prod), "server": server["name"], "hospitals": clients}
    write_json(prod / "fedmed_provision.json", summary)
    return 0
