"""``python -m fedmed preflight KIT``: check a startup kit before starting it; fail fast and say why.

Checks (each prints OK or FAIL with what to do):

- signature: ``startup/`` matches the root CA's signatures (an edited file makes FLARE refuse to
  start) and the pre-deployed ``fedmed`` package in ``local/custom/`` is the signed one;
- certificates: the kit's certificate was issued by the kit's ``rootCA.pem`` and is valid today;
- bytecode (server and hospital kits): no ``__pycache__`` folder or ``.pyc`` file anywhere in the kit
  (a forged ``.pyc`` would run instead of the signed source);
- package copy (server and hospital kits): ``fedmed`` resolves to the kit's signed copy for
  ``startup/start.sh`` run from this shell, not to a copy ahead of it (``PYTHONPATH``, a pip-installed
  copy, a ``.pth`` file);
- start check (server and hospital kits): ``startup/sub_start.sh`` still runs ``startup/fedmed_check.py``
  and ``local/resources.json`` still loads the in-process guard (:mod:`fedmed.deploy.integrity`);
- site config (hospital kits): ``local/fedmed_site.json`` is filled in and its data exists;
- site data (hospital kits): the data read with the job's own loaders, every problem naming the file
  and the entry, counts per split and class (``--job``, ``--sample``; :mod:`fedmed.deploy.data_check`);
- allow-list (server and hospital kits): ``local/resources.json`` admits the fedmed package and the
  server's job store is inside its workspace (not /tmp/nvflare);
- server (hospital and admin kits): a mutual-TLS connection to the server with this kit's
  credentials, within ``--timeout`` seconds. FLARE 2.9's client hangs forever without an error when
  the server's certificate comes from another provisioning run; this check says so in seconds;
- local policy (server and hospital kits, a warning, not a failure): ``local/authorization.json`` or
  ``local/privacy.json`` grants more than the copy provisioned into the kit (:func:`policy_warnings`).

Exit code 0 when every check passed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedmed.deploy import integrity
from fedmed.deploy import kit as kit_files
from fedmed.deploy.launch_check import WHAT_TO_DO_BYTECODE

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


# ---- local policy weaker than provisioned (warnings) -------------------------------------------
# A hospital may tighten local/authorization.json and local/privacy.json; preflight warns, naming the
# file and the key, where an edited one grants more than the copy signed into the kit's manifest at
# provisioning (fedmed.deploy.kit.kit_manifest), the project's templates.

# breadth of a FLARE authorization condition: none < one user (n:) < one org (o:) < anyone
_CONDITION_RANK = {"none": 0, "no": 0, "n": 1, "name": 1, "o": 2, "org": 2, "any": 3, "all": 3}
# DP filter arguments and the direction that means less privacy
_DP_WEAKER_WHEN = {"noise_multiplier": "smaller", "clip_norm": "bigger", "max_grad_norm": "bigger", "epsilon": "bigger",
                   "epsilon_budget": "bigger", "target_epsilon": "bigger", "delta": "bigger"}
_FILTER_LISTS = ("task_data_filters", "task_result_filters")


def condition_rank(expression) -> int:
    """How many users a FLARE authorization condition admits, as a rank: 0 none ... 3 anyone."""
    if isinstance(expression, bool):
        return 3 if expression else 0
    if isinstance(expression, list):
        allowed = [e for e in expression if not str(e).strip().lower().startswith("not ")]
        return max((condition_rank(e) for e in allowed), default=3)  # only blocks: everyone else is allowed
    text = str(expression).strip().lower()
    if text.startswith("not "):
        return 3
    return _CONDITION_RANK.get(text.split(":")[0], 3)  # unknown: assume the worst


def _right_condition(role_conf, right: str):
    if isinstance(role_conf, (str, list, bool)):  # one condition for every right of the role
        return role_conf
    if isinstance(role_conf, dict):
        return role_conf.get(right, "none")  # FLARE denies a right a role does not list
    return "none"


def authorization_warnings(path: Path, baseline: dict) -> list[str]:
    """Where ``path`` (a FLARE authorization policy) grants a role a right more widely than ``baseline``."""
    try:
        current = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path} cannot be read ({exc}); FLARE will not start with it"]
    now = current.get("permissions") if isinstance(current, dict) else None
    before = baseline.get("permissions") or {}
    if not isinstance(now, dict):
        return [f"{path}: key 'permissions' is missing or not an object"]
    warnings = []
    for role, role_conf in now.items():
        base_conf = before.get(role, "none")
        # a blanket condition (not a dict) covers every right, also those the provisioned policy never
        # granted ("*": compared with the provisioned blanket condition, else with "none")
        rights = sorted(role_conf) if isinstance(role_conf, dict) else ["*"]
        for right in rights:
            new, old = _right_condition(role_conf, right), _right_condition(base_conf, right)
            key = f"permissions.{role}" + ("" if right == "*" or not isinstance(role_conf, dict) else f".{right}")
            if condition_rank(new) > condition_rank(old):
                warnings.append(f"{path}: key '{key}' is {json.dumps(new)}, the provisioned policy has "
                                f"{json.dumps(old)}" + (" (bring-your-own-code jobs allowed)" if right == "byoc" else "")
                                + ("" if role in before else f" (role '{role}' is not in the provisioned policy)"))
            elif condition_rank(new) == condition_rank(old) > 0 and new != old:
                warnings.append(f"{path}: key '{key}' changed from {json.dumps(old)} to {json.dumps(new)}; "
                                f"check it grants no more than before")
    return warnings


def _filters_by_path(scope: dict, key: str) -> dict[str, dict]:
    found = {}
    for item in scope.get(key) or []:
        if isinstance(item, dict) and "path" in item:
            found.setdefault(item["path"], item.get("args") or {})
    return found


def privacy_warnings(path: Path, baseline: dict) -> list[str]:
    """Where ``path`` (site privacy scopes) protects less than ``baseline``: a scope added, the default
    scope changed, a filter removed, a DP argument loosened, another filter argument changed."""
    try:
        current = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path} cannot be read ({exc}); FLARE will not start with it"]
    if not isinstance(current, dict):
        return [f"{path} must hold a JSON object"]
    before = {s.get("name"): s for s in baseline.get("scopes") or [] if isinstance(s, dict)}
    now = {s.get("name"): s for s in current.get("scopes") or [] if isinstance(s, dict)}
    warnings = []
    for name in sorted(set(now) - set(before), key=str):
        warnings.append(f"{path}: scope '{name}' is not in the provisioned policy: jobs may now ask for it "
                        f"(a scope the provisioned policy did not allow, or a removed scope requirement)")
    if current.get("default_scope") != baseline.get("default_scope") and current.get("default_scope") not in (None, ""):
        warnings.append(f"{path}: key 'default_scope' is {current.get('default_scope')!r}, the provisioned policy "
                        f"has {baseline.get('default_scope')!r}")
    for name in sorted(set(now) & set(before), key=str):
        for key in _FILTER_LISTS:
            old_filters, new_filters = _filters_by_path(before[name], key), _filters_by_path(now[name], key)
            for filter_path, old_args in old_filters.items():
                where = f"{path}: scope '{name}' {key}"
                if filter_path not in new_filters:
                    warnings.append(f"{where}: filter {filter_path} was removed (the provisioned policy has it)")
                    continue
                new_args = new_filters[filter_path]
                for arg in sorted(set(old_args) | set(new_args)):
                    old, new = old_args.get(arg), new_args.get(arg)
                    if old == new:
                        continue
                    direction = _DP_WEAKER_WHEN.get(arg)
                    if direction and isinstance(old, (int, float)) and isinstance(new, (int, float)):
                        if (new > old) == (direction == "bigger"):
                            warnings.append(f"{where}: {filter_path} key '{arg}' is {new}, {direction} than the "
                                            f"provisioned {old} (less privacy)")
                    else:
                        warnings.append(f"{where}: {filter_path} key '{arg}' changed from {old!r} to {new!r}")
    return warnings


def policy_warnings(kit_dir: str | Path) -> list[str]:
    """Warnings where the kit's ``local/authorization.json`` or ``local/privacy.json`` is weaker than
    the signed copies provisioned into the kit (the templates). Empty when nothing was loosened."""
    kit = Path(kit_dir)
    manifest, problems = kit_files.read_signed_manifest(kit)
    if manifest is None:
        return [f"cannot compare local policy with the provisioned one: {problems[0]}"]
    baseline = manifest.get("policy_baseline") or {}
    checks = {"authorization.json": authorization_warnings, "privacy.json": privacy_warnings}
    warnings = []
    for name, check in checks.items():
        path = kit / kit_files.LOCAL / name
        if name not in baseline:
            continue
        if not path.is_file():
            warnings.append(f"{path} is missing; FLARE falls back to its own default ({name}.default)")
            continue
        warnings += check(path, baseline[name])
    return warnings


def print_policy_warnings(kit: Path) -> None:
    """Print the local-policy line of a server or hospital kit: OK, or WARN with each warning (never a failure)."""
    try:
        if kit_files.read_kit(kit).kind == "admin":
            return
        warnings = policy_warnings(kit)
    except kit_files.KitError as exc:
        warnings = [str(exc)]
    if warnings:
        print("  WARN local policy weaker than provisioned (allowed, but check it is intended):")
        for warning in warnings:
            print(f"       - {warning}")
    else:
        print("  OK   local policy")


def start_environment(env: dict | None = None) -> dict:
    """The environment the kit's ``startup/start.sh`` would run FLARE with, from this shell:
    ``PYTHONPATH`` as the caller had it (``startup/preflight.sh`` passes it on as
    ``FEDMED_START_PYTHONPATH``) behind FLARE's own ``/local/custom`` entry."""
    env = dict(os.environ if env is None else env)
    caller = env.pop("FEDMED_START_PYTHONPATH", None)
    caller = env.get("PYTHONPATH", "") if caller is None else caller
    env["PYTHONPATH"] = f"{integrity.FLARE_PYTHONPATH_PREFIX}:{caller}"
    return env


def code_checks(kit: Path) -> list[tuple[str, list[str]]]:
    """The checks that the code a server or hospital kit runs is its signed code, each with what to do:
    bytecode in the kit, another ``fedmed`` that would shadow the kit's copy, the kit's own start check."""
    bytecode = integrity.bytecode_problems(kit)
    if bytecode:
        bytecode.append(f"what to do: {WHAT_TO_DO_BYTECODE}")
    python = shutil.which("python3") or sys.executable
    try:
        origin = integrity.resolved_package(kit, start_environment(), os.getcwd(), python)
        shadow = integrity.shadow_problems(kit, origin)
    except (kit_files.KitError, OSError, subprocess.SubprocessError) as exc:
        shadow = [str(exc)]
    if shadow:
        shadow.append(f"(checked for startup/start.sh run from {os.getcwd()} with {python} and this shell's PYTHONPATH)")
        shadow.append(f"what to do: {integrity.WHAT_TO_DO_SHADOW}")
    start_check = integrity.guard_problems(kit)
    if start_check:
        start_check.append("what to do: restore the named file(s) from the kit as the project lead sent it, or ask for "
                           "a fresh kit; the kit checks itself at every start only with both in place")
    return [("bytecode", bytecode), ("package copy", shadow), ("start check", start_check)]


def run_checks(kit_dir: str | Path, timeout: float = 5.0, check_server: bool = True) -> list[tuple[str, list[str]]]:
    """[(check name, problems)] for the kit; a check with no problems passed."""
    kit = Path(kit_dir).resolve()
    signature = kit_files.verify_startup_signature(kit)  # first: an edited file may not even parse
    try:
        info = kit_files.read_kit(kit)
    except kit_files.KitError as exc:
        return [("signature", signature), ("startup config", [str(exc)])]
    if info.kind != "admin":
        signature += kit_files.verify_startup_manifest(kit) + kit_files.verify_package_signature(kit)
    results = [("signature", signature), ("certificates", kit_files.verify_certificate_chain(kit))]
    if info.kind != "admin":
        results += code_checks(kit)
    if info.kind == "client":
        results.append(("site config", check_site_config(kit, info.name)))
    if info.kind in ("client", "server"):
        results.append(("allow-list", check_resources(kit, info.kind)))
    if info.kind in ("client", "admin") and check_server:
        from fedmed.deploy.reachability import check_kit  # server name, server port, server TLS: each named

        results += check_kit(kit, timeout)
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
    print_policy_warnings(kit)
    verdict = "ready to start" if not failed else f"{failed} check(s) failed: fix them before starting this kit"
    print(f"  {verdict} ({time.time() - started:.1f} s)")
    return 0 if not failed else 1
