"""The ``he`` privacy mode on the server: FedAvg under homomorphic encryption (TenSEAL CKKS).

Sites encrypt their weight difference, pre-multiplied by their sample count, with FLARE's
``HEModelEncryptor`` (their ``he`` scope). :class:`HEFedAvgRounds` runs the rounds of
:class:`fedmed.flare.controller.FedAvgController` when the job names FLARE's HE components:

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

:func:`he_job` turns a job folder into its ``he`` variant (components, controller args, scope).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from fedmed.aggregation import UpdateError
from fedmed.atomic import atomic_path

ENCRYPTED_MODEL_FILE = "global_model_encrypted.npz"
SHAPES_META_KEY = "tensor_shapes"
HE_AGGREGATOR_ID = "he_aggregator"
HE_GENERATOR_ID = "he_shareable_generator"
HE_COMPONENTS = [
    {
        "id": HE_AGGREGATOR_ID,
        "path": "nvflare.app_opt.he.intime_accumulate_model_aggregator.HEInTimeAccumulateWeightedAggregator",
        "args": {"expected_data_kind": "WEIGHT_DIFF", "weigh_by_local_iter": False},
    },
    {
        "id": HE_GENERATOR_ID,
        "path": "nvflare.app_opt.he.model_shareable_generator.HEModelShareableGenerator",
        "args": {"tenseal_context_file": "server_context.tenseal"},
    },
]


def _is_ciphertext(value) -> bool:
    import tenseal as ts

    return isinstance(value, ts.CKKSVector)


class HEFedAvgRounds:
    """Runs a FedAvgController's rounds through FLARE's HE aggregator and shareable generator."""

    def __init__(self, controller, aggregator_id: str, generator_id: str):
        self.c = controller
        self.aggregator_id = aggregator_id
        self.generator_id = generator_id
        self.aggregator: Aggregator | None = None
        self.generator: ShareableGenerator | None = None
        self.global_model = None
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}

    def start(self, fl_ctx: FLContext) -> None:
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
        weights = {key: np.asarray(value) for key, value in self.c.global_weights.items()}
        non_float = [key for key, value in weights.items() if not np.issubdtype(value.dtype, np.floating)]
        if non_float:
            raise TypeError(f"he aggregation supports floating-point tensors only; the model has integer tensor(s) {non_float[:3]}")
        self.shapes = {key: list(value.shape) for key, value in weights.items()}
        self.dtypes = {key: value.dtype.name for key, value in weights.items()}
        self.global_model = make_model_learnable(weights, {})
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.global_model, private=True, sticky=True)

    def _model_dxo(self, round_num: int | None, model_name: str, fl_ctx: FLContext) -> DXO:
        shareable = self.generator.learnable_to_shareable(self.global_model, fl_ctx)
        dxo = from_shareable(shareable)
        dxo.meta.update({"network": self.c.network, "task": self.c.task_spec, "model_name": model_name,
                         "num_rounds": self.c.num_rounds, SHAPES_META_KEY: self.shapes})
        if round_num is not None:
            dxo.meta["round"] = round_num
        return dxo

    def _save_encrypted(self) -> None:
        arrays, encrypted = {}, {}
        for key, value in self.global_model[ModelLearnableKey.WEIGHTS].items():
            if isinstance(value, (bytes, bytearray)):
                arrays[key], encrypted[key] = np.frombuffer(bytes(value), dtype=np.uint8), True
            elif _is_ciphertext(value):
                arrays[key], encrypted[key] = np.frombuffer(value.serialize(), dtype=np.uint8), True
            else:
                arrays[key], encrypted[key] = np.asarray(value), False
        header = json.dumps({"shapes": self.shapes, "dtypes": self.dtypes, "encrypted": encrypted})
        with atomic_path(self.c.out_dir / ENCRYPTED_MODEL_FILE) as tmp:
            np.savez(tmp, __header__=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)

    def _record_evaluation(self, version: int, site_metrics: dict) -> dict:
        from fedmed.flare.controller import mean_metric

        key = self.c.key_metric
        evaluation = {"model_version": version, "after_round": version - 1, "sites": site_metrics,
                      f"mean_{key}": mean_metric(site_metrics, key)}
        self.c.metrics["evaluations"].append(evaluation)
        score, best = evaluation[f"mean_{key}"], self.c.metrics["best"]
        if score is not None and (best is None or score > best[f"mean_{key}"]):
            # no best_global_model.pt: the server holds the model encrypted only
            self.c.metrics["best"] = {"model_version": version, f"mean_{key}": score}
        return evaluation

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        c = self.c
        c.metrics["aggregation"] = "he: CKKS ciphertext FedAvg (FLARE HEInTimeAccumulateWeightedAggregator)"
        self._save_encrypted()
        for round_num in range(c.num_rounds):
            if abort_signal.triggered:
                return
            started = time.time()
            fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=True)
            answers, errors = c._broadcast(c.train_task_name, self._model_dxo(round_num, "global", fl_ctx), fl_ctx, abort_signal)
            if abort_signal.triggered:
                return
            train_metrics, val_metrics = {}, {}
            for site, dxo in sorted(answers.items()):
                try:
                    if dxo.data_kind != DataKind.WEIGHT_DIFF:
                        raise UpdateError(f"site {site}: sent {dxo.data_kind}, expected WEIGHT_DIFF")
                    num_samples = dxo.get_meta_prop("num_samples")
                    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or num_samples <= 0:
                        raise UpdateError(f"site {site}: sample count must be a positive number, got {num_samples!r}")
                    unknown = sorted(set(dxo.data) - set(self.shapes))
                    if unknown:
                        raise UpdateError(f"site {site}: update has key(s) not in the global model: {', '.join(unknown[:5])}")
                    missing = sorted(set(self.shapes) - set(dxo.data))
                    if missing and not c.allow_partial_updates:
                        raise UpdateError(f"site {site}: update lacks key(s) of the global model: {', '.join(missing[:5])}")
                    plain = sorted(k for k, v in dxo.data.items() if not _is_ciphertext(v))
                    if plain:
                        raise UpdateError(f"site {site}: sent plaintext tensor(s) {', '.join(plain[:3])} under he; not aggregated")
                    wrong = sorted(k for k, v in dxo.data.items() if v.size() != int(np.prod(self.shapes[k])))
                    if wrong:
                        raise UpdateError(f"site {site}: ciphertext of '{wrong[0]}' holds {dxo.data[wrong[0]].size()} values, "
                                          f"the global model's tensor has {int(np.prod(self.shapes[wrong[0]]))}")
                    shareable = dxo.to_shareable()
                    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
                    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
                    if not self.aggregator.accept(shareable, fl_ctx):
                        raise UpdateError(f"site {site}: the HE aggregator refused the update (see the server log)")
                except UpdateError as exc:
                    errors[site] = str(exc)
                    continue
                c._file_site_metrics(site, num_samples, dxo, train_metrics, val_metrics)
            if not c._close_round(round_num, train_metrics, errors, fl_ctx):
                return
            evaluation = self._record_evaluation(round_num, val_metrics)
            aggregated = self.aggregator.aggregate(fl_ctx)
            self.global_model = self.generator.shareable_to_learnable(aggregated, fl_ctx)
            fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.global_model, private=True, sticky=True)
            self._save_encrypted()
            c._save_metrics()
            score = evaluation[f"mean_{c.key_metric}"]
            c.log_info(
                fl_ctx,
                f"[fedmed] round {round_num + 1}/{c.num_rounds}: {len(train_metrics)} sites' encrypted updates aggregated "
                f"({', '.join(sorted(train_metrics))}); mean validation {c.key_metric} of the global model entering the "
                f"round: {score if score is None else round(score, 4)}; {time.time() - started:.1f} s",
            )
        if c.final_validation:
            c._validate_final(self._model_dxo(c.num_rounds, "global", fl_ctx), lambda m: self._record_evaluation(c.num_rounds, m),
                              "final global model (decrypted at the sites)", fl_ctx, abort_signal)
        c.metrics["finished"] = True
        c._save_metrics()
        c.log_info(fl_ctx, f"[fedmed] finished {c.num_rounds} rounds under he; encrypted global model in {c.out_dir / ENCRYPTED_MODEL_FILE}")


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
    """Turn a job folder (in place) into its ``he`` variant: meta scope ``he``, FLARE's HE aggregator
    and shareable generator as server components, the FedAvgController pointed at them, and only
    that workflow (cross-site evaluation needs a plaintext global model, which the server never has)."""
    job_dir = Path(job_dir)
    server_path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(server_path.read_text())
    workflows = [w for w in config.get("workflows", []) if w.get("path") == "fedmed.flare.controller.FedAvgController"]
    if len(workflows) != 1:
        raise ValueError(f"{server_path}: expected one fedmed.flare.controller.FedAvgController workflow for the he variant")
    workflows[0].setdefault("args", {}).update({"he_aggregator_id": HE_AGGREGATOR_ID, "he_shareable_generator_id": HE_GENERATOR_ID})
    config["workflows"] = workflows
    components = [c for c in config.get("components", []) if c.get("id") not in (HE_AGGREGATOR_ID, HE_GENERATOR_ID)]
    config["components"] = components + copy.deepcopy(HE_COMPONENTS)
    server_path.write_text(json.dumps(config, indent=2) + "\n")
    meta_path = job_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["scope"] = "he"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return job_dir


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
