"""The network and data handling a plain FLARE user writes for the stock-recipe peer (issue 10, item 3).

A 3-block CNN (conv 32 / 64 / 128 channels, ReLU, 2x2 max-pool, one linear head) and the two lines
that turn a MedMNIST npz array into tensors (uint8 / 255, channel first). Used by the Client API
training script at every site (``stock_flare_peer_client.py``), by the server's initial model and by
the benchmark's external evaluation (``stock_flare_peer.py``). It imports only numpy and torch, so
FLARE can copy it into the job's ``custom/`` folder as it does in its own examples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PeerCNN(nn.Module):
    """conv(32)-ReLU-pool, conv(64)-ReLU-pool, conv(128)-ReLU-pool, linear head.

    The constructor arguments are kept as attributes of the same name: FLARE's job export reads
    them back to write the server's model config.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, image_size: int = 28):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        blocks = []
        channels = in_channels
        for width in (32, 64, 128):
            blocks += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 // 2 // 2
        if side < 1:
            raise ValueError(f"PeerCNN needs images of at least 8x8 pixels, got image_size={image_size}")
        self.head = nn.Linear(128 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8 -> float32 (N, C, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), got {images.shape}")
    scale = 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / scale)


def label_tensor(labels: np.ndarray) -> torch.Tensor:
    """(N,) or (N, 1) class indices -> int64 (N,)."""
    return torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))
