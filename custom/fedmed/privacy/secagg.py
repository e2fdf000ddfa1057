"""Secure aggregation: pairwise masks and t-of-n secret sharing (after Bonawitz et al., CCS 2017).

Pure module (numpy and ``cryptography`` only; never imports ``nvflare``). The FLARE glue that runs
it as tasks is :mod:`fedmed.flare.he` (the ``he`` privacy mode).

What it guarantees, and its bound
---------------------------------
Every site's update leaves the site as ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv)`` in the ring of
integers modulo 2**64, where ``x_u`` is the site's weighted update in fixed point, ``b_u`` a fresh
random self-mask seed and ``s_uv`` a seed agreed with each peer ``v`` by X25519 key agreement (the
two signs cancel in the sum over the round's cohort). The seeds ``b_u`` and the mask private key
of every site are Shamir-shared with threshold ``t`` among the cohort; each share travels encrypted
for its recipient (X25519 + HKDF + ChaCha20-Poly1305), through the server.

- **No single party holds a key that unmasks one site's update.** The server sees only masked
  vectors, public keys and encrypted shares. To remove a site's masks it needs that site's ``b_u``
  (recovered from ``t`` peers' shares, asked for only when the site's masked update arrived)
  **and** its mask key (recovered from ``t`` peers' shares, asked for only when it did not). An
  honest site answers one of the two per peer, never both, only once per round, and never reveals
  a share of its own secrets.
- **Collusion bound** (``n`` sites in the cohort, ``c`` colluding hospitals). A server that follows
  the protocol learns nothing about an honest hospital's update beyond the sum of the honest
  contributors' updates while ``c < t``. A server that also lies about who dropped out (telling some
  sites a hospital survived and others that it dropped) needs ``t`` shares of each kind from the
  ``n - 1`` peers, so it fails while ``n - 1 + c < 2 t``. Sites refuse ``2 t <= n`` and ``t < 2``:
  at the default ``t = n // 2 + 1`` this tolerates one colluding hospital (odd ``n``) or two (even
  ``n``); a job that needs more sets a higher ``t`` (at most ``n - 1``). Tested one step past it.
- **Minimum contributions, enforced at the sites.** A site refuses to send its masked update when
  the round's cohort is smaller than ``max(t + 1, min_sites)`` (its own policy, default 3), and
  refuses to send unmasking shares when fewer survivors are named: the server cannot make a round
  whose aggregate is one hospital's update.
- **Dropouts.** Sites that drop after sharing keys are recovered from ``t`` survivors' shares of
  their mask keys; every survivor's self mask needs ``t`` other survivors, so a round needs
  ``t + 1`` survivors (``n - t - 1`` dropouts tolerated); with fewer it produces no aggregate.

Not covered: the aggregate itself (the server learns the sum, hence the new global model; with the
server, ``c`` colluding hospitals learn the sum of the remaining honest updates, which for a cohort
of ``c + 1`` is one hospital's update — hence ``min_sites``, default 3); the sample counts (sent in
plaintext with each update); an actively malicious server that forges sites' public keys (the
keys are not signed here); robust aggregation (the server cannot see single updates to bound them).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmed.jobspec import HE_MODES, HE_STEP_ID, SECAGG_TASKS, with_he  # noqa: F401 - HE_STEP_ID re-exported

PRIME = 2**521 - 1  # Shamir field (a Mersenne prime above every 32-byte secret)
FRACTION_BITS = 20  # fixed point: x -> round(x * 2**20) in Z_(2**64)
SCALE = float(2**FRACTION_BITS)
DEFAULT_MIN_SITES = 3  # a site's own floor on the cohort (see the module docstring)
SEED_BYTES = 32
_NONCE_BYTES = 12
_INFO = b"fedmed-secagg/1"
KEYS_TASK, SHARES_TASK, UNMASK_TASK = SECAGG_TASKS
PROTOCOL_TASKS = SECAGG_TASKS
MASKED_KEY = "secagg_masked"  # the one tensor of a masked update (uint64, the flat model layout)
PROTOCOL_KIND = "COLLECTION"  # data kind of the protocol messages (FLARE DataKind.COLLECTION)
PROTOCOL_META_KEY = "secagg_step"  # meta of a protocol message: which step
_MAX_SHARE_BLOB = 512
_MAX_SHARE_HEX = 140


def check_protocol_message(step: str, data) -> None:
    """What a site may send in a protocol step, checked by its release policy (raises ValueError):
    ``secagg_keys``: two 32-byte public keys; ``secagg_shares``: per peer one encrypted share (at
    most 512 bytes); ``secagg_unmask``: per peer one share as a hex string (at most 140 characters).
    Nothing else: no array, no number, no text besides site names."""
    if not isinstance(data, dict):
        raise ValueError(f"a {step} message must be a mapping")
    if step == "secagg_keys":
        if set(data) != {"cipher_pk", "mask_pk"} or not all(isinstance(v, bytes) and len(v) == 32 for v in data.values()):
            raise ValueError("a secagg_keys message holds exactly two 32-byte public keys")
    elif step == "secagg_shares":
        shares = data.get("shares")
        if set(data) != {"shares"} or not isinstance(shares, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) and len(v) <= _MAX_SHARE_BLOB for k, v in shares.items()):
            raise ValueError(f"a secagg_shares message holds only {{'shares': {{site: ciphertext of <= {_MAX_SHARE_BLOB} bytes}}}}")
    elif step == "secagg_unmask":
        if set(data) - {"b", "s"} or not all(
                isinstance(part, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) <= _MAX_SHARE_HEX
                                               and v.startswith("0x") for k, v in part.items())
                for part in data.values()):
            raise ValueError("a secagg_unmask message holds only {'b': {site: hex share}, 's': {site: hex share}}")
    else:
        raise ValueError(f"unknown secure-aggregation step {step!r}")


class SecAggRefused(RuntimeError):
    """A site (or the server) refuses a protocol step; the message names the site and why."""


def default_threshold(n: int) -> int:
    """The threshold a cohort of ``n`` uses unless a job sets one: a strict majority (>= 2)."""
    return max(2, n // 2 + 1)


def min_cohort(threshold: int, min_sites: int) -> int:
    """Fewest sites a round may mask and unmask with: ``t + 1`` (each self mask needs ``t`` other
    survivors) and the site's own ``min_sites``."""
    return max(threshold + 1, min_sites)


def check_threshold(threshold: int, roster_size: int, who: str) -> None:
    """Refuse a threshold that lets one party (t < 2) or a lying server (2 t <= n) unmask a site."""
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2:
        raise SecAggRefused(f"{who}: threshold t={threshold!r} refused: t must be an integer >= 2 "
                            "(t=1 lets a single party rebuild every secret)")
    if 2 * threshold <= roster_size:
        raise SecAggRefused(f"{who}: threshold t={threshold} refused for a cohort of {roster_size}: t must be more than "
                            f"half the cohort (>= {roster_size // 2 + 1}), or a server that lies about dropouts could "
                            "collect both kinds of shares of one site")
    if threshold > roster_size - 1:
        raise SecAggRefused(f"{who}: threshold t={threshold} refused for a cohort of {roster_size}: a site's self mask is "
                            f"rebuilt from t of its {roster_size - 1} peers' shares, so t must be at most {roster_size - 1}")


def check_cohort(size: int, threshold: int, min_sites: int, who: str, what: str) -> None:
    """Refuse a step whose cohort has fewer than :func:`min_cohort` sites."""
    need = min_cohort(threshold, min_sites)
    if size < need:
        raise SecAggRefused(f"{who}: refused to send {what}: only {size} site(s) in the round, this site requires at "
                            f"least {need} (threshold t={threshold} + 1, the site's min_sites={min_sites}); with fewer "
                            "the aggregate could reveal a single hospital's update")


# ---- primitives ---------------------------------------------------------------------------------

def _kdf(shared: bytes, label: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + b"|" + label + b"|" + context).derive(shared)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 values: the ChaCha20 keystream under ``seed`` (32 bytes)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * length)), dtype="<u8").astype(np.uint64)


def pair_seed(private_key: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The mask seed two sites agree on (X25519, then HKDF bound to the round's ``context``)."""
    return _kdf(private_key.exchange(X25519PublicKey.from_public_bytes(peer_public)), b"mask", context)


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` (<= 65 bytes) with a random polynomial of degree t-1 over GF(PRIME)."""
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the Shamir field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share point {x} must be a positive field element")
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[int(x)] = y
    return shares


def shamir_combine(shares: Mapping[int, int], length: int = SEED_BYTES) -> bytes:
    """The secret from shares (Lagrange at 0). With fewer than ``t`` shares the result is unrelated
    to the secret (and may not fit ``length`` bytes: then a random-looking value is returned)."""
    points = list(shares.items())
    if not points:
        raise ValueError("no shares")
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return (total % (1 << (8 * length))).to_bytes(length, "big")


def quantize(values: np.ndarray, cohort_size: int, who: str) -> np.ndarray:
    """Float values -> fixed point in Z_(2**64); refuses non-finite values and values so large that
    the cohort's sum could wrap around (|x| * 2**20 * n must stay below 2**63)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise SecAggRefused(f"{who}: the update holds NaN/Inf; not masked, not sent")
    limit = 2.0**63 / SCALE / max(cohort_size, 1)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak >= limit:
        raise SecAggRefused(f"{who}: an update value of magnitude {peak:.3g} exceeds the fixed-point range "
                            f"({limit:.3g} for {cohort_size} sites); not masked, not sent")
    return np.round(values * SCALE).astype(np.int64).view(np.uint64)


def dequantize(ring: np.ndarray) -> np.ndarray:
    """Z_(2**64) (two's complement) -> float64."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / SCALE


def flatten(update: Mapping[str, np.ndarray], layout: Sequence[Sequence], who: str) -> np.ndarray:
    """One float64 vector of ``update`` in ``layout`` order (``[[name, size], ...]``); refuses a
    missing, extra or wrongly sized tensor."""
    names = [name for name, _ in layout]
    extra = sorted(set(update) - set(names))
    missing = [name for name in names if name not in update]
    if extra or missing:
        raise SecAggRefused(f"{who}: the update's tensors do not match the round's layout "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    parts = []
    for name, size in layout:
        array = np.asarray(update[name], dtype=np.float64).ravel()
        if array.size != int(size):
            raise SecAggRefused(f"{who}: tensor '{name}' has {array.size} values, the layout says {size}")
        parts.append(array)
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, layout: Sequence[Sequence], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, size in layout:
        out[name] = np.asarray(vector[offset:offset + int(size)]).reshape(shapes[name])
        offset += int(size)
    return out


def _sign(site: str, peer: str) -> int:
    return 1 if site < peer else -1


def _aad(sender: str, recipient: str, context: bytes) -> bytes:
    return json.dumps([sender, recipient]).encode() + b"|" + context


# ---- a site's side of one round ----------------------------------------------------------------

@dataclass
class SiteSession:
    """One site's state in one round: fresh key pairs, its self-mask seed, the shares it received.

    Steps: :meth:`advertise` -> :meth:`share_keys` -> :meth:`mask` -> :meth:`unmask`; each refuses
    (:class:`SecAggRefused`) when the cohort is below ``max(t, min_sites)`` or the request is
    inconsistent with what the site saw earlier in the round.
    """

    site: str
    context: bytes  # binds keys and ciphertexts to one job and round
    min_sites: int = DEFAULT_MIN_SITES
    cipher_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    roster: dict = field(default_factory=dict)  # {site: {"cipher_pk": bytes, "mask_pk": bytes}}
    threshold: int = 0
    cohort: list = field(default_factory=list)  # U2: the sites whose shares went out
    masked: bool = False
    unmasked: bool = False

    def __post_init__(self):
        if self.min_sites < 2:
            raise ValueError(f"site {self.site}: min_sites must be >= 2, got {self.min_sites}")

    def advertise(self) -> dict:
        """The site's two public keys for this round (key agreement for shares and for masks)."""
        return {"cipher_pk": self.cipher_key.public_key().public_bytes_raw(),
                "mask_pk": self.mask_key.public_key().public_bytes_raw()}

    def share_keys(self, roster: Mapping[str, Mapping[str, bytes]], threshold: int) -> dict[str, bytes]:
        """Shamir-share the self-mask seed and the mask private key among the other sites of
        ``roster`` (threshold ``t``); return each share encrypted for its recipient: {recipient: ciphertext}."""
        who = f"site {self.site}"
        if self.roster:
            raise SecAggRefused(f"{who}: keys were already shared this round; refused to share again")
        mine = roster.get(self.site)
        if mine is None or bytes(mine["cipher_pk"]) != self.advertise()["cipher_pk"] or bytes(mine["mask_pk"]) != self.advertise()["mask_pk"]:
            raise SecAggRefused(f"{who}: the roster does not carry this site's own public keys; refused")
        check_threshold(threshold, len(roster), who)
        check_cohort(len(roster), threshold, self.min_sites, who, "key shares")
        self.roster = {name: {"cipher_pk": bytes(keys["cipher_pk"]), "mask_pk": bytes(keys["mask_pk"])} for name, keys in roster.items()}
        self.threshold = threshold
        names = sorted(self.roster)
        xs = {name: index + 1 for index, name in enumerate(names)}
        seed_shares = shamir_split(self.self_seed, threshold, list(xs.values()))
        key_shares = shamir_split(self.mask_key.private_bytes_raw(), threshold, list(xs.values()))
        out = {}
        for name in names:
            if name == self.site:
                continue  # no share of its own secrets: the server could ask the site for it
            payload = json.dumps({"b": hex(seed_shares[xs[name]]), "s": hex(key_shares[xs[name]])}).encode()
            key = _kdf(self.cipher_key.exchange(X25519PublicKey.from_public_bytes(self.roster[name]["cipher_pk"])), b"share", self.context)
            nonce = os.urandom(_NONCE_BYTES)
            out[name] = nonce + ChaCha20Poly1305(key).encrypt(nonce, payload, _aad(self.site, name, self.context))
        return out

    def mask(self, values: np.ndarray, cohort: Sequence[str]) -> np.ndarray:
        """Quantize ``values`` (the weighted update, flat) and mask it for the ``cohort`` (the sites
        whose key shares were delivered). Refuses below ``max(t, min_sites)``, and a second time."""
        who = f"site {self.site}"
        cohort = sorted(set(cohort))
        if not self.roster:
            raise SecAggRefused(f"{who}: no keys were shared this round; refused to send an update")
        if self.masked:
            raise SecAggRefused(f"{who}: already sent its masked update this round; refused to mask again")
        if self.site not in cohort or not set(cohort) <= set(self.roster):
            raise SecAggRefused(f"{who}: the round's cohort {cohort} is not a subset of the key roster containing this site")
        check_cohort(len(cohort), self.threshold, self.min_sites, who, "its masked update")
        y = quantize(values, len(cohort), who)
        y = y + prg(self.self_seed, y.size)
        for peer in cohort:
            if peer == self.site:
                continue
            mask = prg(pair_seed(self.mask_key, self.roster[peer]["mask_pk"], self.context), y.size)
            y = y + mask if _sign(self.site, peer) > 0 else y - mask
        self.cohort, self.masked = cohort, True
        return y

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str], ciphertexts: Mapping[str, bytes]) -> dict:
        """The shares the server needs: of the self-mask seed for every survivor, of the mask key for
        every dropped site ({"b": {site: hex}, "s": {site: hex}}). ``ciphertexts``: the shares
        addressed to this site, by sender. Refuses a survivor list below ``max(t, min_sites)``, a
        site named both survivor and dropped, lists that are not this round's cohort, and a second call."""
        who = f"site {self.site}"
        survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
        if not self.masked:
            raise SecAggRefused(f"{who}: sent no masked update this round; refused to reveal shares")
        if self.unmasked:
            raise SecAggRefused(f"{who}: already revealed its shares this round; refused to answer a second request")
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise SecAggRefused(f"{who}: site(s) {both} named both survivor and dropped: revealing both shares would "
                                "unmask their update; refused")
        if sorted(survivors + dropped) != self.cohort:
            raise SecAggRefused(f"{who}: survivors {survivors} + dropped {dropped} is not the round's cohort {self.cohort}; refused")
        if self.site not in survivors:
            raise SecAggRefused(f"{who}: this site is named as dropped; refused")
        check_cohort(len(survivors), self.threshold, self.min_sites, who, "unmasking shares")
        self.unmasked = True
        answer = {"b": {}, "s": {}}
        for peer in survivors + dropped:
            if peer == self.site:
                continue
            if peer not in ciphertexts:
                raise SecAggRefused(f"{who}: no key share from {peer} was delivered; refused")
            share = self._open(peer, bytes(ciphertexts[peer]))
            if peer in survivors:
                answer["b"][peer] = share["b"]
            else:
                answer["s"][peer] = share["s"]
        return answer

    def _open(self, sender: str, blob: bytes) -> dict:
        key = _kdf(self.cipher_key.exchange(X25519PublicKey.from_public_bytes(self.roster[sender]["cipher_pk"])), b"share", self.context)
        try:
            plain = ChaCha20Poly1305(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(sender, self.site, self.context))
        except Exception as exc:  # noqa: BLE001 - cryptography raises InvalidTag
            raise SecAggRefused(f"site {self.site}: the key share from {sender} does not authenticate ({type(exc).__name__}); refused") from exc
        return json.loads(plain)


# ---- the server's side of one round ------------------------------------------------------------

def route_shares(outgoing: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """{sender: {recipient: ct}} -> {recipient: {sender: ct}} (the server only forwards ciphertext)."""
    routed: dict[str, dict[str, bytes]] = {}
    for sender, by_recipient in outgoing.items():
        for recipient, blob in by_recipient.items():
            routed.setdefault(recipient, {})[sender] = blob
    return routed


def unmask_sum(masked: Mapping[str, np.ndarray], roster: Mapping[str, Mapping[str, bytes]], cohort: Sequence[str],
               answers: Mapping[str, Mapping[str, Mapping[str, str]]], threshold: int, context: bytes) -> np.ndarray:
    """The sum (in Z_(2**64)) of the survivors' updates from their masked vectors and the unmasking
    answers of at least ``t`` survivors. Raises :class:`SecAggRefused` naming what is missing."""
    survivors = sorted(masked)
    dropped = sorted(set(cohort) - set(survivors))
    if len(answers) < threshold + 1:
        raise SecAggRefused(f"server: only {len(answers)} site(s) sent unmasking shares, t + 1 = {threshold + 1} are needed "
                            f"(threshold t={threshold}): the round's masks cannot be removed")
    xs = {name: index + 1 for index, name in enumerate(sorted(roster))}
    length = next(iter(masked.values())).size
    total = np.zeros(length, dtype=np.uint64)
    for site in survivors:
        total = total + np.asarray(masked[site], dtype=np.uint64)

    def recover(kind: str, owner: str) -> bytes:
        shares = {xs[holder]: int(answer[kind][owner], 16) for holder, answer in answers.items() if owner in answer.get(kind, {})}
        if len(shares) < threshold:
            raise SecAggRefused(f"server: only {len(shares)} share(s) of {owner}'s {'self-mask seed' if kind == 'b' else 'mask key'}, "
                                f"threshold t={threshold}")
        return shamir_combine(dict(list(shares.items())[:threshold]))

    for site in survivors:
        total = total - prg(recover("b", site), length)
    for gone in dropped:
        key = X25519PrivateKey.from_private_bytes(recover("s", gone))
        if key.public_key().public_bytes_raw() != bytes(roster[gone]["mask_pk"]):
            raise SecAggRefused(f"server: the mask key rebuilt for dropped site {gone} does not match its public key")
        for site in survivors:
            mask = prg(pair_seed(key, roster[site]["mask_pk"], context), length)
            # site added sign(site, gone) * mask; remove it
            total = total - mask if _sign(site, gone) > 0 else total + mask
    return total


# ---- the job variant ------------------------------------------------------------------------------

SECAGG_MODES = HE_MODES  # privacy modes (site scopes) that run secure aggregation


def apply_he_mode(job_dir: str | os.PathLike, threshold: int = 0, scope: str = "he") -> Path:
    """:func:`fedmed.jobspec.with_he` on a job folder, in place (the one writer rewrites it)."""
    from fedmed.jobfolder import JobFolder

    job = JobFolder(job_dir)
    job.write(with_he(job.spec(), scope=scope, threshold=threshold))
    return job.path


def he_job(job_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a job folder to ``dest`` and make the copy its ``he`` variant (:func:`apply_he_mode`)."""
    import shutil

    shutil.copytree(Path(job_dir), Path(dest))
    return apply_he_mode(dest)
