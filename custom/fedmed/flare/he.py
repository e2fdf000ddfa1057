"""The ``he`` privacy mode on the server: FedAvg under homomorphic encryption (TenSEAL CKKS).

Sites encrypt their weight difference, pre-multiplied by their sample count, with FLARE's
``HEModelEncryptor`` (their ``he`` scope). :class:`HEAggregation` is the aggregation step the
controller (:class:`fedmed.flare.controller.FedAvgController`) hands to the round engine
(:mod:`fedmed.rounds`) when the job names FLARE's HE components:

- ``HEInTimeAccumulateWeightedAggregator`` (id ``he_aggregator_id``) sums the sites' ciphertexts
  and divides by the total sample count: the server holds only ciphertext per site, never a
  site's update in plaintext;
- ``HEModelShareableGenerator`` (id ``he_shareable_generator_id``) adds the encrypted mean
  difference to the global model, which therefore stays encrypted on the server from round 1 on.

Sites decrypt the global model with their ``HEModelDecryptor`` and restore tensor shapes with
:class:`DecryptedModelReshaper` (the task meta ``tensor_shapes`` carries them). The server keeps
the encrypted global model in ``fedmed/global_model_encrypted.npz``; a hospital decrypts it with
:func:`decrypt_global_model` and its ``client_context.tenseal``. The server has no plaintext global
model, so no ``global_model.pt`` / best-model files and no cross-site evaluation of the global model
are written in this mode; validation metrics come from the sites, which decrypt the model.

:func:`fedmed.jobspec.with_he` is a job's ``he`` variant (components, controller args, scope); :func:`he_job` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from fedmed.aggregation import UpdateError, validate_keys
from fedmed.atomic import atomic_path
from fedmed.jobspec import HE_AGGREGATOR_ID, HE_GENERATOR_ID, HE_STEP_ID  # the he variant of a job spec: fedmed.jobspec.with_he
from fedmed.jobspec import HE_COMPONENTS as _HE_COMPONENTS
from fedmed.results import GLOBAL_MODEL_FILE
from fedmed.rounds import RoundFailed, SiteReply, StepContext

ENCRYPTED_MODEL_FILE = "global_model_encrypted.npz"
SHAPES_META_KEY = "tensor_shapes"
HE_COMPONENTS = [dict(c) for c in _HE_COMPONENTS]


def _is_ciphertext(value) -> bool:
    import tenseal as ts

    return isinstance(value, ts.CKKSVector)


HE_MIN_SITES = 3
HE_MIN_SITES_REASON = (
    "he needs at least 3 contributing sites per round: every hospital holds the same CKKS secret key, so with "
    "2 sites each hospital can decrypt the aggregate and subtract its own update to read the other hospital's "
    "exact update. Run he with 3 or more hospitals (and min_clients >= 3), or use another privacy mode"
)


class HEAggregation(FLComponent):
    """The aggregation step (:class:`fedmed.rounds.ServerStep`, a server component named by the
    controller's ``aggregation_step_id``) for the ``he`` mode: FLARE's HE aggregator sums the sites'
    ciphertexts, its shareable generator adds the encrypted mean to the encrypted global model. The
    round engine (checks, bookkeeping, selection) is the same as in the plaintext modes; this step
    refuses rounds with fewer than ``HE_MIN_SITES`` contributors."""

    min_sites = HE_MIN_SITES
    min_sites_reason = HE_MIN_SITES_REASON
    description = "he: CKKS ciphertext FedAvg (FLARE HEInTimeAccumulateWeightedAggregator)"

    def __init__(self, aggregator_id: str = HE_AGGREGATOR_ID, generator_id: str = HE_GENERATOR_ID, allow_partial: bool = False):
        super().__init__()
        self.aggregator_id = aggregator_id
        self.generator_id = generator_id
        self.out_dir = Path(".")
        self.allow_partial = allow_partial
        self.aggregator: Aggregator | None = None
        self.generator: ShareableGenerator | None = None
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}
        self.fl_ctx: FLContext | None = None
        self.round_num = 0

    def create(self, weights: dict, context: StepContext):
        """Resolve FLARE's HE components; return the initial global model as a ModelLearnable."""
        fl_ctx = context.platform
        self.out_dir = Path(context.out_dir)
        engine = fl_ctx.get_engine()
        for attr, cid, kind in (("aggregator", self.aggregator_id, Aggregator), ("generator", self.generator_id, ShareableGenerator)):
            component = engine.get_component(cid)
            if not isinstance(component, kind):
                raise TypeError(
                    f"he aggregation: component '{cid}' must be a {kind.__name__} (e.g. FLARE's HE "
                    f"{'HEInTimeAccumulateWeightedAggregator' if kind is Aggregator else 'HEModelShareableGenerator'}), "
                    f"got {type(component).__name__}; check the server config's components"
                )
            setattr(self, attr, component)
        weights = {key: np.asarray(value) for key, value in weights.items()}
        non_float = [key for key, value in weights.items() if not np.issubdtype(value.dtype, np.floating)]
        if non_float:
            raise TypeError(f"he aggregation supports floating-point tensors only; the model has integer tensor(s) {non_float[:3]}")
        self.shapes = {key: list(value.shape) for key, value in weights.items()}
        self.dtypes = {key: value.dtype.name for key, value in weights.items()}
        model = make_model_learnable(weights, {})
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=True)
        return model

    def check_federation(self, num_connected: int) -> None:
        """Refuse to start (before any model leaves the server) with fewer than 3 connected sites."""
        if num_connected < HE_MIN_SITES:
            raise RoundFailed(f"only {num_connected} site(s) connected; refused: {HE_MIN_SITES_REASON}")

    def open_round(self, round_num: int, context: StepContext) -> dict:
        """Bind the FLARE context and round the next ``check_update`` / ``aggregate`` calls belong to;
        refuse (before any model leaves the server) with fewer than 3 connected sites."""
        self.check_federation(len(context.sites()))
        self.fl_ctx, self.round_num = context.platform, round_num
        return {}

    def send(self, model, meta):
        dxo = from_shareable(self.generator.learnable_to_shareable(model, self.fl_ctx))
        return dxo.data_kind, dxo.data, {**dxo.meta, **meta, SHAPES_META_KEY: self.shapes}

    def receive(self, site, kind, data, meta) -> SiteReply:
        return SiteReply(kind, data, meta)

    def save(self, model, path, context) -> bool:
        """No plaintext on the server: the encrypted global model only, no best-model file."""
        if Path(path).name != GLOBAL_MODEL_FILE:
            return False
        self.save_encrypted(model)
        return True

    def plaintext(self, model):
        return None

    def restore(self, arrays, context):
        raise NotImplementedError("the he mode keeps no resumable state")

    def settings(self) -> dict:
        return {"aggregation": None, "server_optimizer": None, "step": "he", "min_sites": HE_MIN_SITES}

    def save_encrypted(self, model) -> None:
        arrays, encrypted = {}, {}
        for key, value in model[ModelLearnableKey.WEIGHTS].items():
            if isinstance(value, (bytes, bytearray)):
                arrays[key], encrypted[key] = np.frombuffer(bytes(value), dtype=np.uint8), True
            elif _is_ciphertext(value):
                arrays[key], encrypted[key] = np.frombuffer(value.serialize(), dtype=np.uint8), True
            else:
                arrays[key], encrypted[key] = np.asarray(value), False
        header = json.dumps({"shapes": self.shapes, "dtypes": self.dtypes, "encrypted": encrypted})
        with atomic_path(self.out_dir / ENCRYPTED_MODEL_FILE) as tmp:
            np.savez(tmp, __header__=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)

    def check_update(self, site: str, update, num_samples, global_model, meta=None) -> None:
        validate_keys(update, self.shapes, site, self.allow_partial)
        plain = sorted(k for k, v in update.items() if not _is_ciphertext(v))
        if plain:
            raise UpdateError(f"site {site}: sent plaintext tensor(s) {', '.join(plain[:3])} under he; not aggregated")
        wrong = sorted(k for k, v in update.items() if v.size() != int(np.prod(self.shapes[k])))
        if wrong:
            raise UpdateError(f"site {site}: ciphertext of '{wrong[0]}' holds {update[wrong[0]].size()} values, "
                              f"the global model's tensor has {int(np.prod(self.shapes[wrong[0]]))}")
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=dict(update), meta=dict(meta or {}))  # the site's meta: the encryptor's keys
        shareable = dxo.to_shareable()
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, self.round_num)
        if not self.aggregator.accept(shareable, self.fl_ctx):
            raise UpdateError(f"site {site}: the HE aggregator refused the update (see the server log)")

    def aggregate(self, global_model, contributions, round_num: int):
        aggregated = self.aggregator.aggregate(self.fl_ctx)
        model = self.generator.shareable_to_learnable(aggregated, self.fl_ctx)
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=True)
        return model, {"aggregator": "he", "encrypted_updates": len(contributions)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass


class DecryptedModelReshaper(Filter):
    """Site task-data filter (``he`` scope, right after ``HEModelDecryptor``): give the decrypted
    (flat) tensors their shapes from the task meta ``tensor_shapes``, as float32 arrays."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a model task
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return shareable
        shapes = dxo.get_meta_prop(SHAPES_META_KEY)
        if shapes is None:
            if any(not isinstance(v, np.ndarray) for v in dxo.data.values()):
                raise ValueError("he scope: the received model has flat tensors but the task has no 'tensor_shapes' meta")
            return shareable
        data = {}
        for key, value in dxo.data.items():
            if key not in shapes:
                raise ValueError(f"he scope: tensor '{key}' has no shape in the task's 'tensor_shapes'")
            if _is_ciphertext(value) or isinstance(value, (bytes, bytearray)):
                raise ValueError(f"he scope: tensor '{key}' is still encrypted; HEModelDecryptor must come first")
            array = np.asarray(value, dtype=np.float32)
            if array.size != int(np.prod(shapes[key])):
                raise ValueError(f"he scope: tensor '{key}' has {array.size} values, its shape {shapes[key]} needs {int(np.prod(shapes[key]))}")
            data[key] = array.reshape(shapes[key])
        dxo.data = data
        return dxo.update_shareable(shareable)


def decrypt_global_model(path: str | os.PathLike, context_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decrypt ``global_model_encrypted.npz`` with a hospital's TenSEAL context (which holds the secret key)."""
    import tenseal as ts

    context = ts.context_from(Path(context_file).read_bytes())
    if not context.is_private():
        raise ValueError(f"{context_file} holds no secret key (the server's context cannot decrypt); use a hospital's client_context.tenseal")
    with np.load(path) as npz:
        header = json.loads(bytes(npz["__header__"]).decode())
        weights = {}
        for key, shape in header["shapes"].items():
            if header["encrypted"][key]:
                vector = ts.ckks_vector_from(context, bytes(npz[key]))
                values = np.asarray(vector.decrypt(), dtype=np.float64)
            else:
                values = np.asarray(npz[key], dtype=np.float64)
            weights[key] = values.reshape(shape).astype(header["dtypes"][key])
    return weights


def apply_he_mode(job_dir: str | os.PathLike) -> Path:
    """:func:`fedmed.jobspec.with_he` on a job folder, in place: meta scope ``he``, FLARE's HE aggregator
    and shareable generator as server components, the FedAvgController pointed at them (its plaintext
    ``aggregation`` / ``server_optimizer`` removed), and only that workflow (cross-site evaluation
    needs a plaintext global model, which the server never has). The controller refuses to run
    ``he`` with fewer than 3 sites (see :data:`HE_MIN_SITES_REASON`)."""
    from fedmed.jobfolder import JobFolder
    from fedmed.jobspec import with_he

    job = JobFolder(job_dir)
    job.write(with_he(job.spec()))
    return job.path


def he_job(job_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a job folder to ``dest`` and make the copy its ``he`` variant (:func:`apply_he_mode`)."""
    import shutil

    shutil.copytree(Path(job_dir), Path(dest))
    return apply_he_mode(dest)


def decrypt_for_hospital(server_app_dir: str | os.PathLike, context_file: str | os.PathLike) -> Path:
    """What a hospital does with the result of an ``he`` job: decrypt the encrypted global model
    with its own ``client_context.tenseal`` and write ``fedmed/global_model.pt`` beside it (so the
    usual outputs and bundle can be built). Runs where the hospital's key is, never on the server."""
    import torch

    from fedmed.results import GLOBAL_MODEL_FILE, SERVER_OUTPUT_DIR

    out = Path(server_app_dir) / SERVER_OUTPUT_DIR
    source = out / ENCRYPTED_MODEL_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: the he job did not write its encrypted global model")
    weights = decrypt_global_model(source, context_file)
    with atomic_path(out / GLOBAL_MODEL_FILE) as tmp:
        torch.save({key: torch.as_tensor(value) for key, value in weights.items()}, tmp)
    return out / GLOBAL_MODEL_FILE
