"""Networks chosen by configuration, and conversion between torch state dicts and numpy.

Pure module. A network spec is ``{"name": "small_cnn", "args": {...}}``; the name maps to a class
path, so the same spec becomes a MONAI bundle's ``network_def``.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import nn

NETWORKS = {
    "small_cnn": "fedmed.networks.SmallCNN",
    "cxr_cnn": "fedmed.networks.CXRNet",
    "densenet121": "monai.networks.nets.DenseNet121",
    "resnet18": "monai.networks.nets.resnet18",
    "efficientnet-b0": "monai.networks.nets.EfficientNetBN",
    "unet": "monai.networks.nets.UNet",
    "basic_unet": "monai.networks.nets.BasicUNet",
}


class SmallCNN(nn.Module):
    """A small CNN for 28x28 (and larger) single-channel images; fast on CPU.

    Three conv blocks with GroupNorm (no batch statistics to disagree across non-IID sites),
    global average pooling and a linear classifier producing class logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16, dropout: float = 0.2):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width), nn.MaxPool2d(2),
            block(width, width * 2), nn.MaxPool2d(2),
            block(width * 2, width * 4), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CXRNet(nn.Module):
    """Conv blocks (3x3 conv, GroupNorm, ReLU, 2x2 max-pool) and a flattened spatial head.

    Unlike :class:`SmallCNN`'s global average pooling, the head keeps *where* in the image a
    feature fired (which lung, upper or lower field), and each block is one convolution, so the
    default ``channels=(32, 64, 128)`` costs about what ``SmallCNN(width=16)`` does on 28x28 images
    with more parameters (about 95k). GroupNorm keeps it Opacus-compatible (no batch statistics).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels=(32, 64, 128), image_size: int = 28,
                 dropout: float = 0.3, groups: int = 8):
        super().__init__()
        layers, c_in, size = [], in_channels, image_size
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(groups, c_out), c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, size = c_out, size // 2
        if size < 1:
            raise ValueError(f"CXRNet: image_size {image_size} is too small for {len(channels)} pooling blocks")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * size * size, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def network_target(spec: dict) -> str:
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in NETWORKS:
        raise ValueError(f"network spec {spec!r}: 'name' must be one of {', '.join(NETWORKS)}")
    return NETWORKS[name]


def build_network(spec: dict, seed: int | None = None) -> nn.Module:
    """Instantiate the network a spec names (seeded when ``seed`` is given)."""
    module_name, _, class_name = network_target(spec).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return cls(**spec.get("args", {}))
    except TypeError as exc:
        raise ValueError(f"network spec {spec!r}: bad 'args' for {class_name} ({exc})") from exc


def state_to_numpy(model_or_state) -> dict[str, np.ndarray]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {key: value.detach().cpu().numpy().copy() for key, value in state.items()}


def numpy_to_state(weights: dict[str, np.ndarray], reference: dict[str, torch.Tensor] | None = None) -> dict:
    """numpy weights -> torch tensors, cast to the reference state's dtypes (int buffers stay int)."""
    state = {}
    for key, value in weights.items():
        tensor = torch.as_tensor(np.asarray(value))
        if reference is not None and key in reference:
            tensor = tensor.to(reference[key].dtype)
        state[key] = tensor
    return state
