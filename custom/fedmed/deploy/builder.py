"""``FedMedKitBuilder``: this project's step in the real ``nvflare provision`` run.

Listed in ``provisioning/project.yml`` after FLARE's CertBuilder (which makes the root CA) and before
its SignatureBuilder. For every participant it

1. writes ``workspace_templates/<client|server>/local/*`` into the kit's ``local/`` (every file in
   the folder, so files other engineers add ship automatically), filling ``"@fedmed:NAME"`` values;
2. pre-deploys the ``fedmed`` package into the kit's ``local/custom/`` (FLARE puts that folder on
   ``sys.path`` of every server/client process), so jobs need no bring-your-own-code;
3. makes every server and hospital kit's ``startup/sub_start.sh`` keep Python's bytecode outside the
   kit and run ``startup/fedmed_check.py`` (:mod:`fedmed.deploy.launch_check`) before it starts FLARE;
   the templates' ``resources.json`` check the kit again in-process (:mod:`fedmed.deploy.integrity`);
4. signs every kit's ``startup/`` with the root CA (``startup/signature.json``) and the package plus
   the kit's manifest (``local/fedmed_package.signature.json``); see :mod:`fedmed.deploy.kit`.

Stock FLARE 2.9 signs only HE and confidential-computing kits; without ``signature.json`` an edited
``fed_client.json`` is accepted silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nvflare.lighter.constants import CtxKey
from nvflare.lighter.spec import Builder, Project, ProvisionContext

import fedmed
from fedmed.deploy import kit as kit_files
from fedmed.deploy import launch_check
from fedmed.deploy.integrity import CHECK_SCRIPT, PYCACHE_DEFAULT
from fedmed.deploy.preflight_entry import write_preflight_script

TOKEN_PREFIX = "@fedmed:"


def repo_root() -> Path:
    return Path(fedmed.__file__).resolve().parents[2]


def package_source() -> Path:
    return Path(fedmed.__file__).resolve().parent


def resolve_templates_dir(templates_dir: str | None) -> Path:
    """``templates_dir`` as given (absolute, or relative to the current folder), else under the repository."""
    if templates_dir:
        given = Path(templates_dir)
        for candidate in (given, repo_root() / given) if not given.is_absolute() else (given,):
            if candidate.is_dir():
                return candidate.resolve()
        raise ValueError(f"FedMedKitBuilder: templates_dir '{templates_dir}' not found (looked in {Path.cwd()} "
                         f"and {repo_root()})")
    return repo_root() / "workspace_templates"


def template_values(participant) -> dict:
    """Values for ``"@fedmed:NAME"`` placeholders in template JSON files."""
    from fedmed.flare.allow_list import class_allow_list

    return {
        "class_allow_list": class_allow_list(),
        "num_gpus": _auto_or_number(participant, "num_gpus", int),
        "mem_per_gpu_in_GiB": _auto_or_number(participant, "mem_per_gpu_in_GiB", float),
        "site_name": participant.name,
        "org": participant.org,
    }


def _auto_or_number(participant, key: str, kind):
    value = participant.get_prop(key, "auto")
    if value == "auto":
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"project.yml: participant '{participant.name}' has {key}: {value!r}; use a number or auto") from None


def fill_tokens(value, values: dict, where: str):
    if isinstance(value, str) and value.startswith(TOKEN_PREFIX):
        name = value[len(TOKEN_PREFIX):]
        if name not in values:
            raise ValueError(f"{where}: unknown template value '{value}' (known: "
                             f"{', '.join(TOKEN_PREFIX + k for k in sorted(values))})")
        return values[name]
    if isinstance(value, dict):
        return {k: fill_tokens(v, values, where) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_tokens(v, values, where) for v in value]
    return value


START_CHECK_ANCHOR = "SECONDS=0\n"  # FLARE's sub_start.sh: every export done, the restart loop not yet entered
START_CHECK = """# fedmed: the code that runs is the code that was signed (fedmed.deploy.integrity). Python keeps its bytecode
# outside the kit (FLARE's job processes inherit PYTHONPYCACHEPREFIX); startup/fedmed_check.py, run isolated from
# PYTHONPATH (-I), refuses a kit holding bytecode, an edited file, or another fedmed ahead of the kit's own.
export PYTHONPYCACHEPREFIX="%s"
python3 -I "$KIT_WORKSPACE/startup/%s" "$KIT_WORKSPACE"
if [[ $? -ne 0 ]]; then
  echo "fedmed: kit integrity check failed; not starting (see the message above)"
  exit 1
fi
""" % (PYCACHE_DEFAULT, CHECK_SCRIPT)


def add_start_check(kit_dir: Path) -> None:
    """Make a server or client kit's ``startup/sub_start.sh`` keep bytecode outside the kit and run
    ``startup/fedmed_check.py`` (written here, a copy of :mod:`fedmed.deploy.launch_check`) before it
    starts FLARE."""
    startup = Path(kit_dir) / kit_files.STARTUP
    check = startup / CHECK_SCRIPT
    check.write_text(Path(launch_check.__file__).read_text())
    script = startup / "sub_start.sh"
    text = script.read_text()
    if CHECK_SCRIPT in text:
        return
    if START_CHECK_ANCHOR not in text:
        raise RuntimeError(f"FedMedKitBuilder: {script} has no line '{START_CHECK_ANCHOR.strip()}' to put the kit check "
                           f"before (FLARE's start script changed); update fedmed.deploy.builder.add_start_check")
    script.write_text(text.replace(START_CHECK_ANCHOR, START_CHECK + START_CHECK_ANCHOR, 1))


def add_server_settings(kit_dir: Path) -> None:
    """Pass :data:`fedmed.deploy.kit.SERVER_SETTINGS` on the server's command line in ``startup/sub_start.sh``."""
    script = Path(kit_dir) / kit_files.STARTUP / "sub_start.sh"
    text = script.read_text()
    anchor = "--set secure_train=true"
    if "server_train" not in text or anchor not in text:
        raise RuntimeError(f"FedMedKitBuilder: {script} does not start server_train with '{anchor}' (FLARE's start "
                           f"script changed); update fedmed.deploy.builder.add_server_settings")
    settings = " ".join(f"{key}={value}" for key, value in kit_files.SERVER_SETTINGS.items())
    if settings not in text:
        script.write_text(text.replace(anchor, f"{anchor} {settings}", 1))


class FedMedKitBuilder(Builder):
    def __init__(self, templates_dir: str = "workspace_templates", deploy_package: bool = True, sign: bool = True):
        """Write site templates and the fedmed package into every kit and sign the kits.

        Args:
            templates_dir: folder with ``client/`` and ``server/`` (each with ``local/``) templates;
                relative paths resolve against the current folder, then the repository root.
            deploy_package: copy the ``fedmed`` package into every kit's ``local/custom/`` (default True).
            sign: sign every kit's ``startup/`` and the deployed package with the root CA (default True).
        """
        super().__init__()
        self.templates_dir = templates_dir
        self.deploy_package = deploy_package
        self.sign = sign
        self._templates: Path | None = None

    def initialize(self, project: Project, ctx: ProvisionContext):
        self._templates = resolve_templates_dir(self.templates_dir)
        for side in ("client", "server"):
            if not (self._templates / side / "local").is_dir():
                raise ValueError(f"FedMedKitBuilder: {self._templates / side / 'local'} is missing")

    def build(self, project: Project, ctx: ProvisionContext):
        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        if self.sign and not root_key:
            raise RuntimeError("FedMedKitBuilder must come after nvflare.lighter.impl.cert.CertBuilder in project.yml "
                               "(it signs kits with the root CA's private key)")
        participants = []
        server = project.get_server()
        if server:
            participants.append((server, "server"))
        participants += [(c, "client") for c in project.get_clients()]
        participants += [(a, "admin") for a in project.get_admins()]
        for participant, side in participants:
            ws_dir = Path(ctx.get_ws_dir(participant))
            local_dir = Path(ctx.get_local_dir(participant))
            if side in ("server", "client"):
                self._write_templates(self._templates / side / "local", local_dir, template_values(participant))
                sample = local_dir / "privacy.json.sample"  # FLARE's sample does not load; ours replaces it
                if (local_dir / "privacy.json").is_file() and sample.is_file():
                    sample.unlink()
                if self.deploy_package:
                    self._deploy_package(local_dir)
                    write_preflight_script(ws_dir)  # startup/preflight.sh: preflight with the kit's package; signed below
            if side in ("server", "client") and self.deploy_package:
                add_start_check(ws_dir)
            if side == "server":
                add_server_settings(ws_dir)
            if self.sign:
                kit_files.sign_startup(ws_dir, root_key)
                if self.deploy_package and side != "admin":
                    kit_files.sign_package(ws_dir, root_key)
        ctx.info(f"fedmed: templates from {self._templates}, package {'deployed' if self.deploy_package else 'not deployed'}, "
                 f"kits {'signed' if self.sign else 'NOT signed'} for {len(participants)} participants")

    @staticmethod
    def _write_templates(src: Path, dest: Path, values: dict) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".json":
                try:
                    content = json.loads(path.read_text())
                except json.JSONDecodeError as exc:
                    raise ValueError(f"template {path} is not valid JSON ({exc})") from exc
                target.write_text(json.dumps(fill_tokens(content, values, str(path)), indent=2) + "\n")
            else:
                shutil.copy2(path, target)

    @staticmethod
    def _deploy_package(local_dir: Path) -> None:
        dest = local_dir / kit_files.PACKAGE_DIR / kit_files.PACKAGE_NAME
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(package_source(), dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
