"""Model provenance card: where a federated model came from, with a hash chain over every round.

The card (``DIR/provenance.json``) says which sites contributed and with how many samples, how
many rounds ran and how updates were aggregated, which privacy scope each site ran under, which
software versions built the model, and it carries a hash chain:

- record 0 (``kind: "initial"``) holds the hash of the initial global model;
- one record per round (``kind: "round"``) holds the hash of that round's aggregated global model
  and the sites that contributed to it with their sample counts;
- the last record (``kind: "release"``) holds the hash of the released model, the index of the
  round record it was released from, the hash of the card's ``summary`` section and, from the
  release gate (:mod:`fedmed.release`), the ``release`` entry: the version released and why
  (``action`` final or rollback, ``reason``, the figures compared).

Every record holds ``prev_record_sha256`` (the previous record's ``record_sha256``; 64 zeros for
record 0) and its own ``record_sha256`` (SHA-256 of the record's canonical JSON without that key).
Changing any record, any model hash or the summary breaks the chain at that record, and
``python -m fedmed verify-provenance PATH`` names the first broken record.

A hash chain shows that a card is internally consistent; it cannot stop someone who rewrites the
whole card. A card written by a deployed server is therefore also **signed** (:class:`CardSigner`):
the server's private key from its startup kit signs the card's canonical JSON, and the card carries
the server's certificate. ``verify-provenance --kit KIT`` (any kit of the project: its
``startup/rootCA.pem``) checks that the certificate was issued by the project's root CA and that the
signature matches, so a chain rewritten from the start fails unless it was re-signed with a key the
project's root CA certified. A simulator run has no kit and no key: its card is unsigned, and
``verify-provenance`` says so ("UNSIGNED") instead of "VERIFIED". The bundle's ``metadata.json`` also
records the chain head (``provenance.head_sha256``); publishing that value (or the bundle) pins the lineage.

Pure module: numpy, ``cryptography`` (signatures) and (for loading model files) torch; never imports ``nvflare``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from fedmed.atomic import write_json

CARD_FORMAT = "fedmed-provenance/1"
CARD_FILENAME = "provenance.json"
GENESIS_SHA256 = "0" * 64
SOFTWARE_PACKAGES = ("fedmed", "nvflare", "monai", "torch", "numpy")


class ProvenanceError(ValueError):
    """A provenance card or a recording call is malformed; the message says what and where."""


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def weights_sha256(weights: Mapping[str, Any]) -> str:
    """SHA-256 over a model's weights, independent of how they were serialised.

    Hashes, for every parameter name in sorted order: the name, the dtype, the shape and the raw
    little-endian C-order bytes. Accepts numpy arrays or torch tensors (anything ``np.asarray``
    takes, after ``.detach().cpu()`` for tensors).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ProvenanceError("weights_sha256 needs a non-empty mapping of parameter name -> array")
    digest = hashlib.sha256()
    for name in sorted(weights):
        value = weights[name]
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        array = np.ascontiguousarray(np.asarray(value))
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        header = f"{name}|{array.dtype.str}|{list(array.shape)}|".encode("utf-8")
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()


def record_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 of a chain record's canonical JSON, leaving out its own ``record_sha256``."""
    body = {key: value for key, value in record.items() if key != "record_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def summary_sha256(summary: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(summary)).hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the packages that built the model (read from package metadata, nothing imported)."""
    versions = {"python": platform.python_version()}
    for package in SOFTWARE_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["platform"] = platform.platform()
    return versions


def load_model_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Load a saved model's weights (a state_dict, or a dict holding one under ``model``/``state_dict``)."""
    import torch  # local import: the rest of the module works without torch

    path = Path(path)
    if not path.is_file():
        raise ProvenanceError(f"model file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any load failure with the file name
        raise ProvenanceError(f"model file {path} could not be loaded with torch.load: {exc}") from exc
    for key in ("model", "state_dict", "weights"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ProvenanceError(f"model file {path} does not hold a state_dict (a mapping of name -> tensor)")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------
def _now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _numpy_to_python(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy scalars/arrays converted); raises on NaN/Infinity or objects."""
    try:
        return json.loads(json.dumps(value, default=_numpy_to_python, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ProvenanceError(f"{where} is not JSON-serialisable (or holds NaN/Infinity): {exc}") from exc


class ProvenanceRecorder:
    """Builds a provenance card while a federation runs.

    Call :meth:`record_initial_model` once, :meth:`record_round` after each round's aggregation,
    :meth:`set_site` whenever a site's counts or privacy scope are known, then :meth:`write`.
    Each ``record_round`` appends a chained record immediately, so the chain can be written after
    every round (a crashed run still leaves a verifiable card of the rounds that finished).
    """

    def __init__(self, job: str, network: Mapping[str, Any] | None = None, aggregation: Mapping[str, Any] | None = None):
        self.job = str(job)
        self.network = _jsonable(dict(network or {}), "network spec")
        self.aggregation = _jsonable(
            dict(aggregation or {"method": "fedavg", "weighting": "num_samples"}), "aggregation description"
        )
        self.created_utc = _now_utc()
        self.sites: dict[str, dict[str, Any]] = {}
        self.chain: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.signer: CardSigner | None = None  # a deployed server's key: write() signs the card

    # -- chain ---------------------------------------------------------------------------
    def _append(self, body: dict[str, Any]) -> dict[str, Any]:
        record = {
            "index": len(self.chain),
            "prev_record_sha256": self.chain[-1]["record_sha256"] if self.chain else GENESIS_SHA256,
            **body,
            "timestamp_utc": _now_utc(),
        }
        record = _jsonable(record, f"provenance record {record['index']}")
        record["record_sha256"] = record_sha256(record)
        self.chain.append(record)
        return record

    def record_initial_model(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        if self.chain:
            raise ProvenanceError("the initial model must be the first provenance record")
        return self._append({"kind": "initial", "round": None, "model_sha256": weights_sha256(weights)})

    def record_round(
        self,
        round_num: int,
        weights: Mapping[str, Any],
        contributors: Iterable[Mapping[str, Any]],
        metrics: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Chain the global model produced by ``round_num`` from ``contributors`` ({site, num_samples})."""
        if not self.chain:
            raise ProvenanceError("record the initial model before the first round")
        if self.chain[-1]["kind"] == "release":
            raise ProvenanceError("the card is already released; no more rounds can be recorded")
        contributors = [dict(c) for c in contributors]
        for entry in contributors:
            if "site" not in entry or "num_samples" not in entry:
                raise ProvenanceError(f"round {round_num}: each contributor needs 'site' and 'num_samples', got {entry}")
            if int(entry["num_samples"]) <= 0:
                raise ProvenanceError(
                    f"round {round_num}: site {entry['site']} reported num_samples={entry['num_samples']}; must be > 0"
                )
            site = self.sites.setdefault(str(entry["site"]), {"site": str(entry["site"])})
            site.setdefault("rounds_contributed", []).append(int(round_num))
            site["num_train_samples"] = int(entry["num_samples"])
        body = {
            "kind": "round",
            "round": int(round_num),
            "model_sha256": weights_sha256(weights),
            "aggregation": self.aggregation.get("method", "fedavg"),
            "contributors": sorted(
                ({**c, "site": str(c["site"]), "num_samples": int(c["num_samples"])} for c in contributors),
                key=lambda c: c["site"],
            ),
        }
        if metrics:
            body["metrics"] = _jsonable(dict(metrics), f"round {round_num} metrics")
        return self._append(body)

    def record_federated_round(
        self,
        round_num: int,
        weights: Mapping[str, Any],
        site_reports: Mapping[str, Mapping[str, Any]],
        val_metrics: Mapping[str, Mapping[str, Any]] | None = None,
        requested_scope: str | None = None,
    ) -> dict[str, Any]:
        """Chain one FedAvg round from what the contributing sites reported.

        ``site_reports``: site -> the meta of its accepted update (``num_samples``; optionally
        ``privacy_scope``, the scope the site itself applied, and ``privacy``, e.g. a DP ledger).
        ``val_metrics``: site -> its validation metrics (``num_val_samples`` is kept).
        ``requested_scope``: the privacy scope the job asked for (its meta.json ``scope``).
        """
        contributors = []
        for site, meta in site_reports.items():
            privacy = meta.get("privacy") if isinstance(meta.get("privacy"), Mapping) else None
            reported = meta.get("privacy_scope")
            if not reported and privacy and privacy.get("scope"):
                reported = privacy["scope"]
            entry = {"site": site, "num_samples": meta.get("num_samples", 0)}
            if reported is not None:
                entry["privacy_scope"] = reported
            if privacy:
                entry["privacy"] = privacy  # e.g. this round's DP ledger state: chained with the model
            contributors.append(entry)
            self.set_site(
                site,
                privacy_scope=reported if reported is not None else (requested_scope or ""),
                privacy_scope_source="site" if reported is not None else "job (the site did not report one)",
                requested_scope=requested_scope or "",
                privacy=privacy,
            )
        for site, metrics in (val_metrics or {}).items():
            if isinstance(metrics, Mapping) and metrics.get("num_val_samples") is not None:
                self.set_site(site, num_val_samples=int(metrics["num_val_samples"]))
        return self.record_round(round_num, weights, contributors)

    def set_site(self, site: str, **fields: Any) -> None:
        """Record what is known about a site: ``num_train_samples``, ``num_val_samples``,
        ``privacy_scope``, ``privacy`` (e.g. a DP ledger) ..."""
        entry = self.sites.setdefault(str(site), {"site": str(site)})
        for key, value in fields.items():
            if value is not None:
                entry[key] = _jsonable(value, f"site {site} field {key}")

    # -- card ----------------------------------------------------------------------------
    def summary(self, released_model_file: str | None = None) -> dict[str, Any]:
        rounds = [r for r in self.chain if r["kind"] == "round"]
        return {
            "job": self.job,
            "created_utc": self.created_utc,
            "network": self.network,
            "aggregation": self.aggregation,
            "num_rounds": len(rounds),
            "rounds": [r["round"] for r in rounds],
            "sites": [self.sites[name] for name in sorted(self.sites)],
            "software": software_versions(),
            "released_model_file": released_model_file,
            **self.extra,
        }

    def card(self, released_weights: Mapping[str, Any] | None = None, released_model_file: str | None = None,
             release: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The card with a release record appended (the recorder's own chain is left untouched).

        ``released_weights`` defaults to the last round's global model; when given, they must equal
        one of the chained models (e.g. the best round's), else the release would not be in the lineage.
        ``release``: the release gate's decision (``metrics.json``'s ``release`` block), chained in the
        release record.
        """
        rounds = [r for r in self.chain if r["kind"] in ("initial", "round")]
        if not rounds:
            raise ProvenanceError("no model recorded yet; nothing to release")
        if released_weights is None:
            source = rounds[-1]
        else:
            digest = weights_sha256(released_weights)
            matches = [r for r in rounds if r["model_sha256"] == digest]
            if not matches:
                raise ProvenanceError(
                    "the released model's weights match no recorded round's global model; "
                    "release a model that the federation produced"
                )
            source = matches[-1]
        summary = self.summary(released_model_file)
        record = {
            "index": len(self.chain),
            "prev_record_sha256": self.chain[-1]["record_sha256"],
            "kind": "release",
            "round": source["round"],
            "released_from_record": source["index"],
            "model_sha256": source["model_sha256"],
            "summary_sha256": summary_sha256(summary),
            "timestamp_utc": _now_utc(),
        }
        if release is not None:
            record["release"] = _jsonable(dict(release), "release decision")
        record["record_sha256"] = record_sha256(record)
        chain = [dict(r) for r in self.chain] + [record]
        return {"format": CARD_FORMAT, "summary": summary, "chain": chain, "head_sha256": record["record_sha256"]}

    def write(self, path: str | os.PathLike, **card_kwargs: Any) -> dict[str, Any]:
        card = self.card(**card_kwargs)
        if self.signer is not None:
            card = self.signer.sign(card)
        write_card(card, path)
        # record-level DP (privacy scope dp): every site's ledger, recomputable, beside the card
        from fedmed.privacy.dp import LEDGER_FILE, ledger_file_payload

        ledger = ledger_file_payload({name: site.get("privacy") for name, site in self.sites.items()})
        if ledger is not None:
            write_json(Path(path).parent / LEDGER_FILE, ledger, allow_nan=False)
        return card


def write_card(card: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a card atomically (temp file in the same folder, then rename); NaN is refused."""
    return write_json(path, card, allow_nan=False)


def load_card(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILENAME
    if not path.is_file():
        raise ProvenanceError(f"provenance card {path} does not exist (pass the card file or the run folder holding {CARD_FILENAME})")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProvenanceError(f"provenance card {path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ProvenanceError(f"provenance card {path} must be a JSON object")
    return card


def bundle_metadata(card_path: str | os.PathLike, card_ref: str = "../provenance.json") -> dict[str, Any]:
    """The block a MONAI bundle's ``metadata.json`` carries to point at the card (empty without a card).

    ``card_ref`` is the card's path relative to the bundle folder.
    """
    card_path = Path(card_path)
    if not card_path.is_file():
        return {}
    card = load_card(card_path)
    release = card["chain"][-1]
    return {
        "provenance": {
            "card": card_ref,
            "format": card.get("format"),
            "head_sha256": card.get("head_sha256"),
            "model_sha256": release.get("model_sha256"),
            "released_from_round": release.get("round"),
            **({"release": {k: release["release"].get(k) for k in ("action", "version", "reason")}}
               if isinstance(release.get("release"), Mapping) else {}),
            "verify": f"python -m fedmed verify-provenance {card_ref} --head {card.get('head_sha256')}",
        }
    }


# --------------------------------------------------------------------------------------------
# signing: a key of the project's PKI (the server's, from its startup kit)
# --------------------------------------------------------------------------------------------
SIGNATURE_KEY = "signature"
SIGNATURE_SCHEME = "fedmed-card-signature/1"
SIGNATURE_ALGORITHM = "RSA-PSS-SHA256"


def card_payload(card: Mapping[str, Any]) -> bytes:
    """The bytes a card's signature covers: the card's canonical JSON without its ``signature`` entry."""
    return canonical_json({key: value for key, value in card.items() if key != SIGNATURE_KEY})


def _pss():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256()


def _common_name(cert) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _fingerprint(cert) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


class CardSigner:
    """Signs provenance cards with a private key whose certificate the project's root CA issued."""

    def __init__(self, private_key_pem: bytes, certificate_pem: bytes, root_ca_pem: bytes | None = None):
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        self._key = load_pem_private_key(private_key_pem, password=None)
        self.certificate_pem = certificate_pem
        self.certificate = x509.load_pem_x509_certificate(certificate_pem)
        self.root_ca = x509.load_pem_x509_certificate(root_ca_pem) if root_ca_pem else None

    @classmethod
    def from_startup_kit(cls, startup_dir: str | os.PathLike | None,
                         cert_name: str = "server.crt", key_name: str = "server.key") -> "CardSigner | None":
        """The signer of a deployed server: ``startup/server.crt`` and ``server.key`` of its kit; None
        where there are none (the FLARE simulator has no kit)."""
        if not startup_dir:
            return None
        startup = Path(startup_dir)
        cert, key, root = startup / cert_name, startup / key_name, startup / "rootCA.pem"
        if not (cert.is_file() and key.is_file()):
            return None
        return cls(key.read_bytes(), cert.read_bytes(), root.read_bytes() if root.is_file() else None)

    def sign(self, card: Mapping[str, Any]) -> dict[str, Any]:
        """``card`` with a ``signature`` entry over :func:`card_payload` (any previous one replaced)."""
        pss, digest = _pss()
        value = self._key.sign(card_payload(card), pss, digest)
        block = {
            "scheme": SIGNATURE_SCHEME,
            "algorithm": SIGNATURE_ALGORITHM,
            "covers": "the card's canonical JSON without this 'signature' entry (fedmed.provenance.card_payload)",
            "signer": _common_name(self.certificate),
            "certificate": self.certificate_pem.decode("ascii"),
            "value": base64.b64encode(value).decode("ascii"),
        }
        if self.root_ca is not None:
            block["root_ca_sha256"] = _fingerprint(self.root_ca)
        return {**{key: value for key, value in card.items() if key != SIGNATURE_KEY}, SIGNATURE_KEY: block}


def signing_note(card_path: str | os.PathLike) -> str:
    """One line for the commands that write a card: who signed it, or plainly that it is unsigned."""
    try:
        block = load_card(card_path).get(SIGNATURE_KEY)
    except ProvenanceError:
        return "no provenance card"
    if not isinstance(block, Mapping):
        return "UNSIGNED: no kit signed it (a simulator run); its hash chain shows internal consistency only"
    return f"signed by '{block.get('signer')}'; check it against your project with --kit YOUR_KIT"


@dataclass
class SignatureCheck:
    """``status``: "verified" (signed with a certificate of the given root CA), "signed" (the signature
    matches its certificate, no root CA given to check it), "unsigned", or "invalid"."""

    status: str
    message: str
    signer: str | None = None


def verify_signature(card: Mapping[str, Any], root_ca_pem: bytes | None = None) -> SignatureCheck:
    """Check a card's signature, and with ``root_ca_pem`` (the project's ``rootCA.pem``) that the
    signing certificate was issued by that root CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import padding

    block = card.get(SIGNATURE_KEY)
    if block is None:
        return SignatureCheck("unsigned", "UNSIGNED: the card carries no signature (a simulator run has no kit to sign "
                                          "with, or the signature was removed); the hash chain shows internal "
                                          "consistency only, not who wrote the card")
    if not isinstance(block, Mapping) or block.get("scheme") != SIGNATURE_SCHEME or block.get("algorithm") != SIGNATURE_ALGORITHM:
        return SignatureCheck("invalid", f"the card's 'signature' is not a {SIGNATURE_SCHEME} {SIGNATURE_ALGORITHM} signature")
    try:
        cert = x509.load_pem_x509_certificate(str(block.get("certificate", "")).encode("ascii"))
        value = base64.b64decode(str(block.get("value", "")), validate=True)
    except (ValueError, TypeError) as exc:
        return SignatureCheck("invalid", f"the card's signature block cannot be read ({exc})")
    signer = _common_name(cert)
    pss, digest = _pss()
    try:
        cert.public_key().verify(value, card_payload(card), pss, digest)
    except (InvalidSignature, TypeError, ValueError):
        return SignatureCheck("invalid", f"the signature of '{signer}' does not match the card's content (the card was "
                                         f"changed after it was signed)", signer)
    if root_ca_pem is None:
        return SignatureCheck("signed", f"signed by '{signer}' (the signature matches the certificate in the card; its "
                                        f"root CA has SHA-256 {block.get('root_ca_sha256', '?')}, not checked: pass "
                                        f"--kit KIT or --root-ca rootCA.pem to check it is your project's)", signer)
    try:
        root = x509.load_pem_x509_certificate(root_ca_pem)
    except ValueError as exc:
        return SignatureCheck("invalid", f"the root CA given cannot be read ({exc})", signer)
    try:
        root.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        issued = cert.issuer == root.subject
    except (InvalidSignature, TypeError, ValueError):
        issued = False
    if not issued:
        return SignatureCheck("invalid", f"the card was signed by '{signer}' with a certificate the project's root CA "
                                         f"(SHA-256 {_fingerprint(root)}) did not issue: not this project's key", signer)
    return SignatureCheck("verified", f"VERIFIED: signed by '{signer}' with a certificate issued by the project's root "
                                      f"CA (SHA-256 {_fingerprint(root)[:16]}...)", signer)


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------
@dataclass
class Verification:
    ok: bool
    message: str
    broken_record: int | None = None
    records: int = 0

    def __bool__(self) -> bool:
        return self.ok


def _describe(record: Mapping[str, Any], index: int) -> str:
    kind = record.get("kind", "?") if isinstance(record, Mapping) else "?"
    rnd = record.get("round") if isinstance(record, Mapping) else None
    return f"record {index} ({kind}{'' if rnd is None else f', round {rnd}'})"


def verify_card(card: Mapping[str, Any], model_weights: Mapping[str, Any] | None = None) -> Verification:
    """Check a card's hash chain (and, optionally, that ``model_weights`` are the released model)."""
    if card.get("format") != CARD_FORMAT:
        return Verification(False, f"not a fedmed provenance card: format is {card.get('format')!r}, expected {CARD_FORMAT!r}")
    chain = card.get("chain")
    if not isinstance(chain, list) or not chain:
        return Verification(False, "the card has no 'chain' of records")
    summary = card.get("summary")
    if not isinstance(summary, Mapping):
        return Verification(False, "the card has no 'summary' section", records=len(chain))
    prev = GENESIS_SHA256
    for index, record in enumerate(chain):
        where = _describe(record, index)
        if not isinstance(record, Mapping):
            return Verification(False, f"{where}: not a JSON object", index, len(chain))
        if record.get("index") != index:
            return Verification(False, f"{where}: index is {record.get('index')!r}, expected {index} (records reordered, removed or inserted)", index, len(chain))
        if record.get("prev_record_sha256") != prev:
            return Verification(False, f"{where}: prev_record_sha256 does not match record {index - 1}'s hash (the chain is broken before this record)" if index else f"{where}: prev_record_sha256 must be the genesis value", index, len(chain))
        try:
            actual = record_sha256(record)
        except (TypeError, ValueError) as exc:
            return Verification(False, f"{where}: cannot be hashed: {exc}", index, len(chain))
        if record.get("record_sha256") != actual:
            return Verification(False, f"{where}: record_sha256 does not match the record's content (the record was altered)", index, len(chain))
        kind = record.get("kind")
        expected_kind = "initial" if index == 0 else ("release" if index == len(chain) - 1 else "round")
        if kind != expected_kind:
            return Verification(False, f"{where}: kind is {kind!r}, expected {expected_kind!r}", index, len(chain))
        if not isinstance(record.get("model_sha256"), str) or len(record["model_sha256"]) != 64:
            return Verification(False, f"{where}: model_sha256 is missing or malformed", index, len(chain))
        prev = actual
    release = chain[-1]
    last = len(chain) - 1
    source = release.get("released_from_record")
    if not isinstance(source, int) or not 0 <= source < last or chain[source].get("model_sha256") != release.get("model_sha256"):
        return Verification(False, f"{_describe(release, last)}: the released model is not one of the chained global models", last, len(chain))
    try:
        actual_summary = summary_sha256(summary)
    except (TypeError, ValueError) as exc:
        return Verification(False, f"summary cannot be hashed: {exc}", last, len(chain))
    if release.get("summary_sha256") != actual_summary:
        return Verification(False, f"{_describe(release, last)}: summary_sha256 does not match the card's summary (the summary was altered)", last, len(chain))
    if card.get("head_sha256") != release["record_sha256"]:
        return Verification(False, "head_sha256 does not match the last record's hash", last, len(chain))
    if model_weights is not None and weights_sha256(model_weights) != release["model_sha256"]:
        return Verification(False, f"{_describe(release, last)}: the model file's weights do not match the released model_sha256 (the model was changed after release)", last, len(chain))
    return Verification(True, f"provenance chain intact: {len(chain)} records, head {release['record_sha256'][:16]}...", None, len(chain))


# --------------------------------------------------------------------------------------------
# CLI: python -m fedmed verify-provenance PATH
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("path", help=f"a provenance card, or a run folder holding {CARD_FILENAME}")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a released model file (state_dict .pt) that must match the card's released model; "
        "repeatable. Without it, the card's released_model_file is checked when it exists next to the card",
    )
    parser.add_argument("--head", help="the expected chain head hash (e.g. from the bundle's metadata.json)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--kit", help="a startup kit of the project (yours: admin, hospital or server); its "
                       "startup/rootCA.pem must have issued the certificate that signed the card. With it (or "
                       "--root-ca) an unsigned or foreign-signed card fails")
    trust.add_argument("--root-ca", help="the project's rootCA.pem (instead of --kit)")


def _trusted_root_ca(args) -> bytes | None:
    """The root CA the signature must chain to: ``--root-ca FILE`` or ``--kit KIT``'s ``startup/rootCA.pem``."""
    kit, root = getattr(args, "kit", None), getattr(args, "root_ca", None)
    if kit:
        root = Path(kit) / "startup" / "rootCA.pem"
        if not root.is_file():
            raise ProvenanceError(f"{root} does not exist: --kit must be a startup kit of the project (the folder holding startup/)")
    if not root:
        return None
    root = Path(root)
    if not root.is_file():
        raise ProvenanceError(f"root CA {root} does not exist")
    return root.read_bytes()


def main(args) -> int:
    try:
        card_path = Path(args.path)
        card = load_card(card_path)
        base = card_path if card_path.is_dir() else card_path.parent
        result = verify_card(card)
        if not result:
            print(f"TAMPERED: {card_path}: {result.message}", file=sys.stderr)
            return 1
        root_ca_pem = _trusted_root_ca(args)
        signature = verify_signature(card, root_ca_pem)
        if signature.status == "invalid":
            print(f"TAMPERED: {card_path}: {signature.message}", file=sys.stderr)
            return 1
        if root_ca_pem is not None and signature.status != "verified":
            print(f"NOT VERIFIED: {card_path}: {signature.message}; a card from a deployment is signed by its server",
                  file=sys.stderr)
            return 1
        if args.head and args.head != card["head_sha256"]:
            print(f"TAMPERED: {card_path}: head_sha256 {card['head_sha256']} differs from the expected head {args.head}", file=sys.stderr)
            return 1
        bundle_meta = base / "bundle" / "configs" / "metadata.json"
        if bundle_meta.is_file():
            try:
                pinned = json.loads(bundle_meta.read_text(encoding="utf-8")).get("provenance", {}).get("head_sha256")
            except (OSError, json.JSONDecodeError) as exc:
                raise ProvenanceError(f"{bundle_meta} could not be read as JSON: {exc}") from exc
            if pinned and pinned != card["head_sha256"]:
                print(f"TAMPERED: {card_path}: head_sha256 differs from the one pinned in {bundle_meta} ({pinned})", file=sys.stderr)
                return 1
            if pinned:
                print(f"chain head matches the one pinned in {bundle_meta}")
        model_files = [Path(m) for m in args.model]
        released = card["summary"].get("released_model_file")
        if not model_files and released:
            # the server's folder (app_server/fedmed/), a simulate/rehearse output folder, and its bundle
            candidates = [base / released, base / "models" / released, base / "bundle" / "models" / "model.pt"]
            model_files = [path for path in candidates if path.is_file()]
        if not model_files:
            print("no model file checked against the card (pass --model FILE)")
        for model_file in model_files:
            check = verify_card(card, load_model_weights(model_file))
            if not check:
                print(f"TAMPERED: {model_file}: {check.message}", file=sys.stderr)
                return 1
            print(f"model {model_file} matches the released model_sha256")
        print(f"OK: {card_path}: {result.message}")
        print(signature.message if signature.status != "signed" else f"SIGNED (root CA not checked): {signature.message}")
        return 0
    except ProvenanceError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
