"""What a startup kit is made of, how this project signs it, and the checks ``preflight`` runs.

A kit (one per server, hospital and admin) is a folder with ``startup/`` (FLARE config, certificate,
private key, ``rootCA.pem``), ``local/`` (site configuration, the pre-deployed ``fedmed`` package in
``local/custom/``) and ``transfer/``.

Signing: every file in ``startup/`` is signed with the root CA's private key into
``startup/signature.json`` (FLARE's own format, ``nvflare.lighter.utils.sign_folders``). FLARE's
server, client and admin console verify it at start and refuse an edited file ("The following files
are not secure content"). The pre-deployed package is signed file by file into
``local/fedmed_package.signature.json``; FLARE does not check that one, ``preflight`` does.
``local/`` config files stay editable: a hospital must fill in its data config.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding

from nvflare.lighter.utils import load_crt, sign_content, sign_folders, verify_content

STARTUP = "startup"
LOCAL = "local"
SIGNATURE_FILE = "signature.json"  # FLARE's name; SecurityContentService looks for it in startup/
ROOT_CA = "rootCA.pem"
PACKAGE_DIR = "custom"  # local/custom/: FLARE adds it to sys.path of every site process
PACKAGE_NAME = "fedmed"
PACKAGE_SIGNATURE_FILE = "fedmed_package.signature.json"  # in local/
SKIPPED_PARTS = {"__pycache__"}
# FLARE settings for the server process, passed as `--set KEY=VALUE` by the server kit's sub_start.sh (the
# builder adds them) and by fedmed.deploy.processes. client_outcome_wait_timeout: after a job's server
# process ended, how long FLARE 2.9 waits for every hospital's job outcome before it finalizes the job's
# status; its default, 900 s, kept a finished job RUNNING for 15 minutes after a hospital died.
SERVER_SETTINGS = {"client_outcome_wait_timeout": 30}


class KitError(RuntimeError):
    """A kit that cannot be used; the message names the kit and the file."""


@dataclass
class KitInfo:
    """What kind of participant a kit is for, read from its startup config."""

    path: Path
    kind: str  # "server" | "client" | "admin"
    name: str
    host: str = ""
    port: int = 0
    cert: str = ""
    key: str = ""


def read_kit(kit_dir: str | Path) -> KitInfo:
    kit = Path(kit_dir)
    startup = kit / STARTUP
    if not startup.is_dir():
        raise KitError(f"{kit} is not a startup kit: it has no startup/ folder")
    if (startup / "fed_server.json").is_file():
        config = _load_json(startup / "fed_server.json")
        server = config["servers"][0]
        host, port = _split_target(server["service"]["target"], startup / "fed_server.json")
        return KitInfo(kit, "server", server.get("identity") or host, host, port,
                       server.get("ssl_cert", "server.crt"), server.get("ssl_private_key", "server.key"))
    if (startup / "fed_client.json").is_file():
        config = _load_json(startup / "fed_client.json")
        host, port = _split_target(config["servers"][0]["service"]["target"], startup / "fed_client.json")
        client = config["client"]
        return KitInfo(kit, "client", client.get("fqsn") or kit.name, host, port,
                       client.get("ssl_cert", "client.crt"), client.get("ssl_private_key", "client.key"))
    if (startup / "fed_admin.json").is_file():
        admin = _load_json(startup / "fed_admin.json")["admin"]
        return KitInfo(kit, "admin", admin["username"], admin["host"], int(admin["port"]),
                       admin.get("client_cert", "client.crt"), admin.get("client_key", "client.key"))
    raise KitError(f"{startup} holds none of fed_server.json, fed_client.json, fed_admin.json")


def read_admin_kit(kit_dir: str | Path, whose: str = "e.g. the lead researcher's") -> KitInfo:
    """:func:`read_kit` for the commands that need an admin kit (``stop``, ``watch``); another kit is a ``KitError``."""
    info = read_kit(kit_dir)
    if info.kind != "admin":
        raise KitError(f"{kit_dir} is a {info.kind} kit; use an admin kit ({whose})")
    return info


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KitError(f"{path} cannot be read as JSON ({exc})") from exc


def _split_target(target: str, where: Path) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise KitError(f"{where}: server target '{target}' is not host:port")
    return host, int(port)


# ---- signing (run by the provisioning builder, which holds the root CA's private key) -----------------


def sign_startup(kit_dir: str | Path, root_private_key) -> Path:
    """Sign every file in ``kit/startup`` into ``startup/signature.json`` (FLARE's format)."""
    startup = Path(kit_dir) / STARTUP
    sign_folders(str(startup), root_private_key, signature_file=SIGNATURE_FILE)
    return startup / SIGNATURE_FILE


def package_files(kit_dir: str | Path) -> list[str]:
    """Paths (relative to ``local/custom``) of the pre-deployed package's files, caches left out."""
    root = Path(kit_dir) / LOCAL / PACKAGE_DIR
    files = []
    for path in sorted((root / PACKAGE_NAME).rglob("*")):
        if (path.is_file() and not SKIPPED_PARTS.intersection(path.relative_to(root).parts) and path.suffix != ".pyc"
                and path.name != SIGNATURE_FILE):  # FLARE's SignatureBuilder signs local/ of HE kits folder by folder
            files.append(path.relative_to(root).as_posix())
    return files


POLICY_FILES = ("authorization.json", "privacy.json")  # local/ policy files a site may tighten, never loosen


def kit_manifest(kit_dir: str | Path) -> dict:
    """What the signed kit holds: package file names, startup file names, and the site policy files
    (``local/authorization.json``, ``local/privacy.json``) as provisioned, the baseline ``preflight``
    compares the edited ones against. Signed as a whole, so a file removed together with its
    signature entry, or a loosened policy, is still noticed."""
    kit = Path(kit_dir)
    baseline = {}
    for name in POLICY_FILES:
        path = kit / LOCAL / name
        if path.is_file():
            baseline[name] = json.loads(path.read_text())
    return {
        "package_files": package_files(kit),
        "startup_files": sorted(p.name for p in (kit / STARTUP).iterdir() if p.name != SIGNATURE_FILE),
        "policy_baseline": baseline,
    }


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sign_package(kit_dir: str | Path, root_private_key) -> Path:
    """Sign the pre-deployed package file by file and the kit's manifest (:func:`kit_manifest`) into
    ``local/fedmed_package.signature.json``. Call after ``startup/`` is complete."""
    root = Path(kit_dir) / LOCAL / PACKAGE_DIR
    signatures = {rel: sign_content((root / rel).read_bytes(), root_private_key) for rel in package_files(kit_dir)}
    manifest = kit_manifest(kit_dir)
    out = Path(kit_dir) / LOCAL / PACKAGE_SIGNATURE_FILE
    out.write_text(json.dumps({"signed_by": "project root CA (startup/rootCA.pem)", "files": signatures,
                               "manifest": manifest, "manifest_signature": sign_content(_canonical(manifest), root_private_key)},
                              indent=1) + "\n")
    return out


def read_signed_manifest(kit_dir: str | Path) -> tuple[dict | None, list[str]]:
    """(the kit's manifest, problems): None with a problem when it is missing, unreadable or not signed
    by this kit's root CA."""
    kit = Path(kit_dir)
    sig_path = kit / LOCAL / PACKAGE_SIGNATURE_FILE
    if not sig_path.is_file():
        return None, [f"{sig_path} is missing: the kit's package and manifest are not signed"]
    try:
        doc = json.loads(sig_path.read_text())
    except json.JSONDecodeError as exc:
        return None, [f"{sig_path} is not valid JSON ({exc})"]
    manifest, signature = doc.get("manifest"), doc.get("manifest_signature")
    if not isinstance(manifest, dict) or not isinstance(signature, str):
        return None, [f"{sig_path} holds no signed manifest (a kit from an older provisioning run); provision new kits"]
    if not _verifies(_canonical(manifest), signature, _root_public_key(kit)):
        return None, [f"{sig_path}: the manifest does not match its signature (edited after provisioning)"]
    return manifest, []


# ---- checks (preflight) -----------------------------------------------------------------------------


def _root_public_key(kit: Path):
    root_ca = kit / STARTUP / ROOT_CA
    if not root_ca.is_file():
        raise KitError(f"{root_ca} is missing: the kit cannot check signatures or certificates")
    return load_crt(str(root_ca)).public_key()


def verify_startup_signature(kit_dir: str | Path) -> list[str]:
    """Problems with ``startup/signature.json``: missing, unsigned, edited or missing files. Empty = valid."""
    kit = Path(kit_dir)
    startup = kit / STARTUP
    sig_path = startup / SIGNATURE_FILE
    if not sig_path.is_file():
        return [f"{sig_path} is missing: this kit is not signed (provision it with python -m fedmed provision)"]
    public_key = _root_public_key(kit)
    try:
        signatures = json.loads(sig_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{sig_path} is not valid JSON ({exc})"]
    problems = []
    for path in sorted(startup.iterdir()):
        if path.name == SIGNATURE_FILE:
            continue
        if path.name not in signatures:
            problems.append(f"{path} is not signed (added after provisioning)")
            continue
        content = path.read_bytes() if path.is_file() else path.name
        if not _verifies(content, signatures[path.name], public_key):
            problems.append(f"{path} does not match its signature (edited after provisioning)")
    for name in sorted(set(signatures) - {p.name for p in startup.iterdir()}):
        problems.append(f"{startup / name} is signed but missing")
    return problems


def verify_package_signature(kit_dir: str | Path) -> list[str]:
    kit = Path(kit_dir)
    sig_path = kit / LOCAL / PACKAGE_SIGNATURE_FILE
    root = kit / LOCAL / PACKAGE_DIR
    if not (root / PACKAGE_NAME / "__init__.py").is_file():
        return [f"{root / PACKAGE_NAME} is missing: the kit has no pre-deployed fedmed package"]
    if not sig_path.is_file():
        return [f"{sig_path} is missing: the pre-deployed package is not signed"]
    public_key = _root_public_key(kit)
    try:
        signatures = json.loads(sig_path.read_text()).get("files", {})
    except json.JSONDecodeError as exc:
        return [f"{sig_path} is not valid JSON ({exc})"]
    manifest, problems = read_signed_manifest(kit)
    # the signed manifest says which files the package has: a file dropped together with its
    # signature entry is still missed (without a manifest, the signature entries are all we have)
    expected = set(manifest["package_files"]) if manifest is not None else set(signatures)
    present = package_files(kit)
    for rel in present:
        if rel not in expected:
            problems.append(f"{root / rel} is not part of the signed package (added after provisioning)")
        elif not _verifies((root / rel).read_bytes(), signatures.get(rel, ""), public_key):
            problems.append(f"{root / rel} does not match its signature (edited after provisioning)")
    for rel in sorted(expected - set(present)):
        problems.append(f"{root / rel} is signed but missing")
    return problems


def verify_startup_manifest(kit_dir: str | Path) -> list[str]:
    """Startup files the signed manifest lists but ``startup/`` lacks (a file removed together with
    its ``signature.json`` entry)."""
    manifest, problems = read_signed_manifest(kit_dir)
    if manifest is None:
        return problems
    startup = Path(kit_dir) / STARTUP
    return [f"{startup / name} is part of the signed kit but missing" for name in manifest["startup_files"]
            if not (startup / name).exists()]


def _verifies(content, signature: str, public_key) -> bool:
    try:
        verify_content(content, signature, public_key)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify_certificate_chain(kit_dir: str | Path) -> list[str]:
    """The kit's own certificate must be issued by the kit's rootCA and be valid now."""
    info = read_kit(kit_dir)
    kit = Path(kit_dir)
    root_ca_path = kit / STARTUP / ROOT_CA
    cert_path = kit / STARTUP / info.cert
    if not cert_path.is_file():
        return [f"{cert_path} is missing"]
    root_ca = load_crt(str(root_ca_path))
    cert = load_crt(str(cert_path))
    problems = []
    try:
        root_ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, asym_padding.PKCS1v15(),
                                    cert.signature_hash_algorithm)
    except InvalidSignature:
        problems.append(f"{cert_path} was not issued by this kit's {root_ca_path} (certificates from different "
                        f"provisioning runs were mixed)")
    if cert.issuer != root_ca.subject:
        problems.append(f"{cert_path} names issuer '{cert.issuer.rfc4514_string()}', but {root_ca_path} is "
                        f"'{root_ca.subject.rfc4514_string()}'")
    now = datetime.datetime.now(datetime.timezone.utc)
    for label, c, p in (("certificate", cert, cert_path), ("root CA", root_ca, root_ca_path)):
        if now < c.not_valid_before_utc or now > c.not_valid_after_utc:
            problems.append(f"{p}: {label} is valid only from {c.not_valid_before_utc:%Y-%m-%d} to "
                            f"{c.not_valid_after_utc:%Y-%m-%d}; provision new kits")
    return problems


def check_server_connection(kit_dir: str | Path, timeout: float = 5.0) -> list[str]:
    """Problems reaching the server with the kit's name, port and credentials (``fedmed.deploy.reachability``).

    FLARE 2.9's client hangs forever (no error) when the server's certificate comes from a different
    root CA; this check answers within ``timeout`` seconds."""
    from fedmed.deploy.reachability import check_kit

    return [p for _, problems in check_kit(kit_dir, timeout) for p in problems if not p.startswith("not attempted")]
