"""Write a trained model as a MONAI bundle: configs/metadata.json, configs/inference.json, models/model.pt.

Pure module. The bundle loads with MONAI's bundle tooling (``monai.bundle.load(name, bundle_dir=...,
workflow_type="inference")``) in a process that has only monai, torch and this package.
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
            "version": "0.1.0",
            "changelog": {"0.1.0": "trained by federated learning with NVIDIA FLARE"},
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": __import__("numpy").__version__,
            "optional_packages_version": {"fedmed": fedmed.__version__},
            "name": name,
            "task": description or name,
            "description": description or name,
            "authors": "fedmed federation",
            "copyright": "the participating hospitals",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "network_data_format": network_data_format,
        }
        metadata.update(extra_metadata or {})
        if decision_threshold is not None:
            metadata["decision_threshold"] = decision_threshold
        network_def = {"_target_": network_target(network_spec), **network_spec.get("args", {})}
        inference = {
            "imports": ["$import torch", "$import fedmed.networks"],
            "bundle_root": ".",
            "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            "network_def": network_def,
            "network": "$@network_def.to(@device)",
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": postprocessing or {"_target_": "Identity"},
        }
        inference.update(inference_config or {})
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        (staging / "docs").mkdir()
        (staging / "docs" / "README.md").write_text(bundle_readme(metadata))
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        os.replace(staging, bundle_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return bundle_dir


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
