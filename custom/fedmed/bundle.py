"""Write a trained model as a runnable MONAI bundle.

    BUNDLE/configs/metadata.json         MONAI bundle metadata (network input/output, class names,
                                         versions, decision threshold, provenance pointer)
    BUNDLE/configs/inference.json        runnable inference: MONAI preprocessing, inferer,
                                         postprocessing, a writer; ``run`` executes it
    BUNDLE/configs/metadata_schema.json  the bundle metadata schema, for verify_metadata offline
    BUNDLE/models/model.pt               state dict
    BUNDLE/docs/README.md                what the model is, its input/output, threshold, how to run

Run on a folder of images (classification: ``OUT/predictions.csv`` with an ``image`` column and one
probability column per class; segmentation: one NIfTI mask per volume, ``OUT/<name>_seg.nii.gz``)::

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \
        --bundle_root BUNDLE --dataset_dir DIR --output_dir OUT

Classification preprocessing is the image contract (``fedmed.imaging.ImageContractd``: row-major
orientation, intensity scaled by the file's declared range, one channel, resized to the network's
input), the very definition training, validation and the data check apply to npz arrays and image
files; ``metadata.json`` states it under ``image_contract``. Segmentation uses the task's own
preprocessing (``inference_config``) and writes masks
resampled back to each input volume's grid (``Invertd``). The loop (:func:`run_inference`) is plain
PyTorch, so the bundle needs monai, torch, fire and this package only (no pytorch-ignite).

Pure module. The bundle also loads with ``monai.bundle.load(name, bundle_dir=..., workflow_type="inference")``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

import monai
import torch

import fedmed
from fedmed.imaging import IMAGE_SUFFIXES as CONTRACT_SUFFIXES
from fedmed.imaging import bundle_preprocessing, image_contract
from fedmed.networks import network_target


def write_bundle(
    bundle_dir: str | Path,
    network_spec: dict,
    state_dict: dict,
    network_data_format: dict,
    name: str = "fedmed model",
    description: str = "",
    postprocessing: dict | None = None,
    extra_metadata: dict | None = None,
    inference_config: dict | None = None,
    decision_threshold: dict | None = None,
) -> Path:
    """Write the bundle atomically (built in a temp folder beside it, then renamed into place).

    ``inference_config`` adds or replaces ``inference.json`` entries (a task's ``preprocessing``, ``inferer``).
    ``decision_threshold`` (e.g. ``{"class": "pneumonia", "threshold": 0.37, "chosen_by": "..."}``) goes into
    ``metadata.json`` under ``"decision_threshold"`` and into ``docs/README.md``; None leaves it out.
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        torch.save({key: value.detach().cpu() for key, value in state_dict.items()}, staging / "models" / "model.pt")
        metadata = {
            "schema": MONAI_SCHEMA_URL,
            "version": "0.1.0",
            "changelog": {"0.1.0": "trained by federated learning with NVIDIA FLARE"},
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": __import__("numpy").__version__,
            "required_packages_version": {"fedmed": fedmed.__version__},  # the network class and the inference loop
            "optional_packages_version": {"fedmed": fedmed.__version__},  # both keys: MONAI renames the old one
            "name": name,
            "task": description or name,
            "description": description or name,
            "authors": "fedmed federation",
            "copyright": "the participating hospitals",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "network_data_format": network_data_format,
        }
        if network_data_format["outputs"]["pred"].get("format") == "classes":
            size = network_data_format["inputs"]["image"]["spatial_shape"]
            metadata["image_contract"] = image_contract(int(size[0]))
        metadata.update(extra_metadata or {})
        if decision_threshold is not None:
            metadata["decision_threshold"] = decision_threshold
        network_def = {"_target_": network_target(network_spec), **network_spec.get("args", {})}
        inference = {
            "imports": ["$import torch", "$import fedmed.networks", "$import fedmed.imaging", "$import fedmed.bundle", "$from fedmed import bundle as fedmed_bundle"],
            "bundle_root": ".",
            "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            "network_def": network_def,
            "network": "$@network_def.to(@device)",
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": postprocessing or {"_target_": "Identity"},
        }
        inference.update(runnable_workflow(network_data_format))
        inference.update(inference_config or {})
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        (staging / "configs" / "metadata_schema.json").write_text(json.dumps(METADATA_SCHEMA, indent=2) + "\n")
        (staging / "docs").mkdir()
        (staging / "docs" / "README.md").write_text(bundle_readme(metadata))
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        os.replace(staging, bundle_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return bundle_dir


# ---- the runnable inference workflow ---------------------------------------------------------------

# MONAI's published bundle metadata schema (what `python -m monai.bundle verify_metadata` downloads when
# the network is reachable); configs/metadata_schema.json holds the same required fields for offline use.
MONAI_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
_TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
METADATA_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "MONAI bundle metadata (required fields of the MONAI Bundle Specification), for offline verify_metadata",
    "type": "object",
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                 "optional_packages_version", "task", "description", "authors", "copyright", "network_data_format"],
    "properties": {
        **{key: {"type": "string"} for key in ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                                                  "task", "description", "authors", "copyright")},
        **{key: {"type": "object"} for key in ("changelog", "required_packages_version", "optional_packages_version")},
        "image_contract": {  # classification bundles: how files become the input tensor (fedmed.imaging)
            "type": "object",
            "required": ["version", "implementation", "orientation", "intensity", "channels", "spatial_size", "value_range"],
            "properties": {
                **{key: {"type": "string"} for key in ("implementation", "orientation", "intensity", "channels", "resize", "dtype")},
                "version": {"type": "integer"}, "formats": {"type": "array", "items": {"type": "string"}},
                "spatial_size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                "value_range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            },
        },
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                side: {"type": "object", "additionalProperties": {
                    "type": "object",
                    "required": list(_TENSOR_KEYS),
                    "properties": {
                        "type": {"type": "string"}, "format": {"type": "string"}, "num_channels": {"type": "integer"},
                        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "dtype": {"type": "string"}, "value_range": {"type": "array", "items": {"type": "number"}},
                        "is_patch_data": {"type": "boolean"}, "channel_def": {"type": "object"},
                    },
                }} for side in ("inputs", "outputs")
            },
        },
    },
}
IMAGE_SUFFIXES = {
    "classification": list(CONTRACT_SUFFIXES),
    "segmentation": [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"],
}


def runnable_workflow(network_data_format: dict) -> dict:
    """``inference.json`` entries that make ``monai.bundle run`` work on a folder of images.

    Classification (``outputs.pred.format == "classes"``): the image contract (``fedmed.imaging``) that
    training and evaluation apply, softmax, ``predictions.csv``. Segmentation: NIfTI masks on each
    input's grid; its preprocessing and inferer come from the task (``inference_config``)."""
    image = network_data_format["inputs"]["image"]
    pred = network_data_format["outputs"]["pred"]
    class_names = [pred.get("channel_def", {}).get(str(i), f"class_{i}") for i in range(int(pred["num_channels"]))]
    kind = "classification" if pred.get("format") == "classes" else "segmentation"
    common = {
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "class_names": class_names,
        "image_suffixes": IMAGE_SUFFIXES[kind],
        "datalist": "$fedmed_bundle.list_images(@dataset_dir, @image_suffixes)",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "invert": None,
        "run": ["$fedmed_bundle.run_inference(@network, @ckpt_path, @dataloader, @inferer, @postprocessing, @writer, "
                "@device, @invert)"],
    }
    if kind == "classification":
        size = [int(v) for v in image["spatial_shape"]]
        if len(size) != 2 or size[0] != size[1] or int(image.get("num_channels", 1)) != 1:
            raise ValueError(f"classification bundle input {image.get('num_channels')} x {size}: the image contract "
                             "(fedmed.imaging) gives one channel, square")
        return {
            **common,
            "preprocessing": bundle_preprocessing(size[0]),
            "writer": {"_target_": "fedmed.bundle.PredictionCSVWriter", "output_dir": "@output_dir",
                       "class_names": "@class_names"},
        }
    return {
        **common,
        "invert": {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                   "nearest_interp": True},
        "writer": {"_target_": "fedmed.bundle.MaskWriter", "output_dir": "@output_dir"},
    }


def list_images(folder: str, suffixes: list[str]) -> list[dict]:
    """``[{"image": path}]`` for every file in ``folder`` (not recursive) whose name ends with a suffix."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset_dir {root} is not a folder; pass the folder holding the images")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    if not files:
        raise FileNotFoundError(f"--dataset_dir {root} holds no images ({', '.join(suffixes)})")
    return [{"image": str(p)} for p in files]


def __getattr__(name: str):
    """Bundles written before the image contract call ``fedmed_bundle.to_channels`` after MONAI ``LoadImage``
    (PNGs transposed, each image scaled by its own min/max): refuse them by name rather than run them."""
    if name == "to_channels":
        raise AttributeError(
            "this bundle's inference.json predates the image contract (fedmed.imaging): its preprocessing reads PNGs "
            "transposed and scales each image by its own min/max, unlike training. Re-export the bundle from the run "
            "with this fedmed version (python -m fedmed results / simulate), whose inference.json uses "
            "fedmed.imaging.ImageContractd")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_name(item: dict) -> str:
    image = item.get("image")
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj") or item.get("image_meta_dict", {}).get("filename_or_obj")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


class PredictionCSVWriter:
    """``OUTPUT_DIR/predictions.csv``: ``image`` then one probability column per class name (written atomically)."""

    def __init__(self, output_dir: str, class_names: list[str], filename: str = "predictions.csv"):
        self.path = Path(output_dir) / filename
        self.class_names = list(class_names)
        self.rows: list[list] = []

    def __call__(self, pred, item: dict) -> None:
        values = [float(v) for v in torch.as_tensor(pred).detach().cpu().reshape(-1)]
        if len(values) != len(self.class_names):
            raise ValueError(f"prediction has {len(values)} values for {len(self.class_names)} classes")
        self.rows.append([_image_name(item), *values])

    def close(self) -> Path:
        import csv
        import io

        from fedmed.atomic import atomic_path

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", *self.class_names])
        writer.writerows([[row[0], *(f"{v:.6f}" for v in row[1:])] for row in self.rows])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(buffer.getvalue())
        return self.path


class MaskWriter:
    """One NIfTI label map per input volume: ``OUTPUT_DIR/<input name>_seg.nii.gz`` (MONAI ``SaveImage``)."""

    def __init__(self, output_dir: str, postfix: str = "seg"):
        from monai.transforms import SaveImage

        self.saver = SaveImage(output_dir=output_dir, output_postfix=postfix, output_ext=".nii.gz",
                               separate_folder=False, resample=False, output_dtype=__import__("numpy").uint8,
                               print_log=False)
        self.written = 0

    def __call__(self, pred, item: dict) -> None:
        self.saver(pred)
        self.written += 1

    def close(self) -> int:
        return self.written


def run_inference(network, ckpt_path: str, dataloader, inferer, postprocessing, writer, device, invert=None):
    """Load the weights, run ``inferer`` over every image, apply ``postprocessing`` (and ``invert`` for
    masks), hand each prediction to ``writer``; AMP on CUDA."""
    from monai.data import decollate_batch

    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    network.load_state_dict(state)
    network.eval()
    amp = torch.device(device).type == "cuda"
    with torch.no_grad():
        for batch in dataloader:
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.float16, enabled=amp):
                logits = inferer(batch["image"].to(device), network)
            for item, pred in zip(decollate_batch(batch), decollate_batch(logits)):
                pred = postprocessing(pred.float())
                if invert is not None:
                    pred = invert({**item, "pred": pred})["pred"]
                writer(pred, item)
    return writer.close()


def bundle_readme(metadata: dict) -> str:
    """The bundle's ``docs/README.md``: what the model is, its input and output, the decision threshold."""
    fmt = metadata.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image", {})
    pred = fmt.get("outputs", {}).get("pred", {})
    lines = [f"# {metadata.get('name', 'fedmed model')}", "", metadata.get("description", ""), "",
             "## Input", "",
             f"- {image.get('num_channels', '?')} channel(s), {image.get('modality', '')} {image.get('type', 'image')}, "
             f"network input {image.get('spatial_shape', '?')}, values {image.get('value_range') or 'normalised'}",
             ]
    if image.get("note"):
        lines.append(f"- {image['note']}")
    contract = metadata.get("image_contract")
    if contract:
        lines += ["", "## Preprocessing (the image contract, `configs/metadata.json` key `image_contract`)", "",
                  f"Applied by `{contract.get('implementation')}` in `configs/inference.json`, as in training:", ""]
        lines += [f"- {key}: {contract[key]}" for key in ("formats", "orientation", "intensity", "channels",
                                                           "spatial_size", "resize") if key in contract]
    lines += ["", "## Output", "",
              f"- {pred.get('type', '')} ({pred.get('format', '')}), channels: "
              + ", ".join(f"{k}: {v}" for k, v in pred.get("channel_def", {}).items())]
    if pred.get("note"):
        lines.append(f"- {pred['note']}")
    threshold = metadata.get("decision_threshold")
    lines += ["", "## Decision threshold", ""]
    if threshold is None:
        lines.append("None recorded: the bundle outputs probabilities; choose an operating point on your own validation data.")
    else:
        lines.append("Recorded with the model (`configs/metadata.json` key `decision_threshold`):")
        lines += ["", "```json", json.dumps(threshold, indent=2), "```"]
    lines += ["", "## Run", "",
              "```bash",
              "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
              "    --bundle_root . --dataset_dir /path/to/images --output_dir /path/to/output",
              "```", "",
              "Needs monai, torch, fire and the `fedmed` package (the network class) importable.", ""]
    return "\n".join(lines)


def load_bundle_network(bundle_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load the bundle's network with its weights through MONAI's bundle tooling."""
    from monai.bundle import load

    bundle_dir = Path(bundle_dir)
    return load(name=bundle_dir.name, bundle_dir=str(bundle_dir.parent), workflow_type="inference", device=device)
