"""``python -m fedmed preflight KIT``: check a startup kit before starting it; fail fast and say why.

Checks (each prints OK or FAIL with what to do):

- signature: ``startup/`` matches the root CA's signatures (an edited file makes FLARE refuse to
  start) and the pre-deployed ``fedmed`` package in ``local/custom/`` is the signed one;
- certificates: the kit's certificate was issued by the kit's ``rootCA.pem`` and is valid today;
- site config (hospital kits): ``local/fedmed_site.json`` is filled in and its data exists;
- site data (hospital kits): the data read with the job's own loaders, every problem naming the file
  and the entry, counts per split and class (``--job``, ``--sample``; :mod:`fedmed.deploy.data_check`);
- allow-list (server and hospital kits): ``local/resources.json`` admits the fedmed package and the
  server's job store is inside its workspace (not /tmp/nvflare);
- server (hospital and admin kits): a mutual-TLS connection to the server with this kit's
  credentials, within ``--timeout`` seconds. FLARE 2.9's client hangs forever without an error when
  the server's certificate comes from another provisioning run; this check says so in seconds.

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedmed.deploy import kit as kit_files

PACKAGE_PREFIX = "fedmed."


def check_site_config(kit_dir: Path, site: str) -> list[str]:
    from fedmed.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config

    try:
        load_site_config(kit_dir / kit_files.LOCAL / SITE_CONFIG_FILE, site)
    except SiteConfigError as exc:
        return [str(exc)]
    return []


def check_resources(kit_dir: Path, kind: str) -> list[str]:
    path = kit_dir / kit_files.LOCAL / "resources.json"
    if not path.is_file():
        return [f"{path} is missing: FLARE would fall back to resources.json.default, which does not admit the "
                f"fedmed package (and, on the server, keeps jobs in /tmp/nvflare)"]
    try:
        resources = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path} is not valid JSON ({exc})"]
    problems = []
    allow = resources.get("class_allow_list", [])
    if not isinstance(allow, list) or not any(PACKAGE_PREFIX.startswith(entry) or entry == PACKAGE_PREFIX for entry in allow):
        problems.append(f"{path}: class_allow_list does not admit '{PACKAGE_PREFIX}' (jobs would fail with "
                        f"ComponentNotAuthorized)")
    if kind == "server" and any("/tmp/nvflare" in value for value in _config_strings(resources)):
        problems.append(f"{path} keeps server state under /tmp/nvflare (shared by every FLARE run on the machine); "
                        f"use the template's fedmed.deploy.storage.WorkspaceStorage")
    return problems


def _config_strings(value, key: str = ""):
    """Every string value in a JSON config, comments (keys starting with '_') left out."""
    if key.startswith("_"):
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _config_strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _config_strings(v)


def run_checks(kit_dir: str | Path, timeout: float = 5.0, check_server: bool = True) -> list[tuple[str, list[str]]]:
    """[(check name, problems)] for the kit; a check with no problems passed."""
    kit = Path(kit_dir).resolve()
    signature = kit_files.verify_startup_signature(kit)  # first: an edited file may not even parse
    try:
        info = kit_files.read_kit(kit)
    except kit_files.KitError as exc:
        return [("signature", signature), ("startup config", [str(exc)])]
    if info.kind != "admin":
        signature += kit_files.verify_package_signature(kit)
    results = [("signature", signature), ("certificates", kit_files.verify_certificate_chain(kit))]
    if info.kind == "client":
        results.append(("site config", check_site_config(kit, info.name)))
    if info.kind in ("client", "server"):
        results.append(("allow-list", check_resources(kit, info.kind)))
    if info.kind in ("client", "admin") and check_server:
        results.append(("server", kit_files.check_server_connection(kit, timeout)))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kit", help="the startup kit folder (the one holding startup/ and local/)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")
    parser.add_argument("--no-server", action="store_true", help="skip the server connection check (offline check)")
    parser.add_argument("--job", default=None, help="hospital kits: the job folder whose task (classes, image size) the "
                        "site data is checked against (default: the main job, jobs/cxr_pneumonia_fedavg)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="hospital kits: open at most N images per datalist split (every entry's keys, label and "
                        "file are still checked; default: open every image)")


def main(args: argparse.Namespace) -> int:
    started = time.time()
    kit = Path(args.kit).resolve()
    if not (kit / kit_files.STARTUP).is_dir():
        print(f"preflight: {kit} is not a startup kit (no startup/ folder)", file=sys.stderr)
        return 1
    try:
        results = run_checks(kit, args.timeout, not args.no_server)
    except kit_files.KitError as exc:
        print(f"preflight: {exc}", file=sys.stderr)
        return 1
    try:
        info = kit_files.read_kit(kit)
        print(f"preflight {info.kind} kit '{info.name}' ({kit}):")
    except kit_files.KitError:
        print(f"preflight kit {kit}:")
    failed = 0
    for name, problems in results:
        if problems:
            failed += 1
            print(f"  FAIL {name}:")
            for problem in problems:
                print(f"       - {problem}")
        else:
            print(f"  OK   {name}")
    from fedmed.deploy.data_check import preflight_data_check  # the site's data, read with the job's own loaders

    failed += preflight_data_check(kit, results, args.job, args.sample)
    verdict = "ready to start" if not failed else f"{failed} check(s) failed: fix them before starting this kit"
    print(f"  {verdict} ({time.time() - started:.1f} s)")
    return 0 if not failed else 1
