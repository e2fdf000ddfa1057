"""2D image classification (chest X-ray pneumonia by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from monai.metrics import ROCAUCMetric
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedmed import data as site_data
from fedmed.threshold import HISTOGRAM_KEY, binary_metrics, score_histogram

# train-time augmentation keys (see BatchAugmentation) and what each does
AUGMENTATION_KEYS = {
    "prob": "probability that each random operation is applied to an image (default 0.5)",
    "rotate_degrees": "rotation range, +/- degrees",
    "scale": "zoom range, +/- fraction",
    "translate": "shift range, +/- fraction of the image side",
    "gamma": "gamma (contrast) range [low, high], as MONAI RandAdjustContrast",
    "intensity_scale": "intensity factor range, +/- fraction, as MONAI RandScaleIntensity",
    "intensity_shift": "intensity offset range, +/- (images are in [0, 1]), as MONAI RandShiftIntensity",
    "noise_std": "Gaussian noise standard deviation, as MONAI RandGaussianNoise",
    "flip": "left-right flip (true/false)",
}


class BatchAugmentation:
    """Random spatial and intensity augmentation of a batch of channel-first images in [0, 1].

    Every image draws its own rotation / zoom / shift (applied together by MONAI's
    ``AffineTransform`` layer with border padding), then its own gamma, intensity scale and shift
    and Gaussian noise, each with probability ``prob``; the result is clipped to [0, 1].
    Batched on purpose: MONAI's per-image ``Rand*`` dictionary of the same operations measured
    about 4.5 ms per 28x28 image on 2 CPU cores (20 s per epoch of PneumoniaMNIST), this takes
    well under 1 ms per batch. Seeded (``seed``); validation and inference never use it.
    """

    def __init__(self, spec: Mapping, image_size: int, seed: int = 0):
        unknown = sorted(set(spec) - set(AUGMENTATION_KEYS))
        if unknown:
            raise ValueError(f"task augmentation: unknown key(s) {', '.join(unknown)}; known: {', '.join(AUGMENTATION_KEYS)}")
        self.prob = float(spec.get("prob", 0.5))
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"task augmentation: prob must be in [0, 1], got {self.prob}")
        self.rotate = float(np.deg2rad(float(spec.get("rotate_degrees", 0.0))))
        self.scale = float(spec.get("scale", 0.0))
        self.translate = float(spec.get("translate", 0.0)) * 2.0  # normalised coordinates span [-1, 1]
        self.flip = bool(spec.get("flip", False))
        gamma = spec.get("gamma") or (1.0, 1.0)
        if len(gamma) != 2 or not 0 < float(gamma[0]) <= float(gamma[1]):
            raise ValueError(f"task augmentation: gamma must be [low, high] with 0 < low <= high, got {gamma}")
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.intensity_scale = float(spec.get("intensity_scale", 0.0))
        self.intensity_shift = float(spec.get("intensity_shift", 0.0))
        self.noise_std = float(spec.get("noise_std", 0.0))
        for key in ("rotate_degrees", "scale", "translate", "intensity_scale", "intensity_shift", "noise_std"):
            if float(spec.get(key, 0.0)) < 0:
                raise ValueError(f"task augmentation: {key} must be >= 0, got {spec[key]}")
        self.generator = torch.Generator().manual_seed(seed)
        self._affine = None

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _applied(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < self.prob

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n == 0:
            return images
        out = images.to(torch.float32)
        if self.rotate or self.scale or self.translate or self.flip:
            from monai.networks.layers import AffineTransform

            if self._affine is None:
                self._affine = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False)
            spatial = self._applied(n).float()
            angle = self._uniform(n, -self.rotate, self.rotate) * spatial
            zoom = 1.0 + self._uniform(n, -self.scale, self.scale) * spatial
            shift = (torch.stack([self._uniform(n, -self.translate, self.translate) for _ in range(2)], dim=1)
                     * spatial[:, None] / 2.0)
            flip = torch.where(self._applied(n) & self.flip, -1.0, 1.0)
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
                                 torch.stack([sin * flip, cos, shift[:, 1]], dim=1)], dim=1)
            out = self._affine(out, theta.to(out.device))
        if self.gamma != (1.0, 1.0):
            gamma = torch.where(self._applied(n), self._uniform(n, *self.gamma), torch.ones(n)).to(out.device)
            out = out.clamp(0.0, 1.0) ** gamma.view(-1, 1, 1, 1)
        if self.intensity_scale:
            factor = 1.0 + self._uniform(n, -self.intensity_scale, self.intensity_scale) * self._applied(n)
            out = out * factor.view(-1, 1, 1, 1).to(out.device)
        if self.intensity_shift:
            offset = self._uniform(n, -self.intensity_shift, self.intensity_shift) * self._applied(n)
            out = out + offset.view(-1, 1, 1, 1).to(out.device)
        if self.noise_std:
            noisy = self._applied(n).view(-1, 1, 1, 1).to(out.device)
            noise = torch.randn(out.shape, generator=self.generator).to(out.device) * self.noise_std
            out = out + noise * noisy
        return out.clamp(0.0, 1.0)


def build_augmentation(spec: Mapping | None, image_size: int, seed: int = 0) -> BatchAugmentation | None:
    """The task's training augmentation (None when ``spec`` is empty: train on images as they are)."""
    return BatchAugmentation(spec, image_size, seed) if spec else None


class AugmentedImages(Dataset):
    """Training images augmented afresh every epoch; the DataLoader fetches a batch at a time
    (``__getitems__``), so the batch is augmented in one vectorised call."""

    def __init__(self, split: site_data.ImageSplit, augmentation: BatchAugmentation):
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices):
        index = torch.as_tensor(list(indices), dtype=torch.long)
        images = self.augmentation(self.images[index])
        return list(zip(images, self.labels[index]))

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


class ClassificationTask:
    key_metric = "val_auc"

    def __init__(
        self,
        num_classes: int = 2,
        image_size: int = 28,
        class_names: list[str] | None = None,
        synthetic_train_per_site: int = 150,
        synthetic_val_per_site: int = 40,
        synthetic_opacity: float = 0.3,
        synthetic_noise: float = 0.1,
        augmentation: dict | None = None,
        seed: int = 0,
    ):
        """Args:
        num_classes: number of classes (labels 0..num_classes-1).
        image_size: images are square, single channel, this many pixels a side (files and arrays of another
            size are resized by the image contract, ``fedmed.imaging``).
        class_names: names of the classes by index, written into the bundle; default ``class_<i>``.
        synthetic_train_per_site / synthetic_val_per_site: pool size per site when simulating without data
            (small on purpose: a hospital alone then has too few images, as small hospitals do, and the
            quick start shows what the federation adds); the external hospital gets
            ``synthetic_val_per_site`` images per site.
        synthetic_opacity / synthetic_noise: the simulated pneumonia signal's brightness and the pixel noise
            of those synthetic images (``fedmed.data.synthetic_xrays``).
        augmentation: train-time MONAI augmentation at the sites (keys: ``AUGMENTATION_KEYS``, e.g.
            ``{"rotate_degrees": 10, "gamma": [0.7, 1.5]}``); None trains on the images as they are.
            Validation, external evaluation and inference never augment.
        seed: seeds the augmentation's random draws.
        """
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.class_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {num_classes} classes")
        self.synthetic_train_per_site = synthetic_train_per_site
        self.synthetic_val_per_site = synthetic_val_per_site
        self.synthetic_opacity = synthetic_opacity
        self.synthetic_noise = synthetic_noise
        self.augmentation = dict(augmentation) if augmentation else None
        self.seed = seed
        build_augmentation(self.augmentation, image_size)  # bad keys fail when the job starts

    # ---- data -------------------------------------------------------------------------------

    def load_arrays(self, data_config: dict) -> site_data.SiteData:
        fmt = data_config["format"]
        if fmt == "npz":
            return site_data.load_npz(data_config["path"], self.num_classes, self.image_size)
        if fmt == "datalist":
            return site_data.load_datalist(
                data_config["path"], self.image_size, self.num_classes, data_config.get("base_dir"),
                bool(data_config.get("allow_absolute_paths", False)),
            )
        if fmt == "synthetic":
            return site_data.synthetic_site_data(
                int(data_config.get("num_train", self.synthetic_train_per_site)),
                int(data_config.get("num_val", self.synthetic_val_per_site)),
                self.image_size,
                seed=int(data_config.get("seed", 0)),
            )
        raise site_data.DataError(f"data format {fmt!r} is not supported by the classification task")

    def load_site_data(self, data_config: dict, site_name: str = "?"):
        arrays = self.load_arrays(data_config)
        for split_name, split in (("train", arrays.train), ("val", arrays.val)):
            if split.images.shape[1:] != (1, self.image_size, self.image_size):
                raise site_data.DataError(
                    f"site '{site_name}': {split_name} images are {split.images.shape[1:]}, the job expects "
                    f"(1, {self.image_size}, {self.image_size}); resize the data or set the task's image_size"
                )
        return self.to_dataset(arrays.train, train=True), self.to_dataset(arrays.val)

    def to_dataset(self, split: site_data.ImageSplit, train: bool = False) -> Dataset:
        """A torch dataset of ``split``; training data gets the task's augmentation."""
        transform = build_augmentation(self.augmentation, self.image_size, self.seed) if train else None
        if transform is not None:
            return AugmentedImages(split, transform)
        return TensorDataset(torch.from_numpy(split.images), torch.from_numpy(split.labels))

    def prepare_simulation(
        self, num_sites: int, out_dir: str | Path, data_path: str | None = None, alpha: float = 0.5, seed: int = 0,
        external_dir: str | Path | None = None,
    ) -> tuple[dict, list[str]]:
        """Partition a pool (an npz, or synthetic X-rays) into per-site npz files under ``out_dir``.

        Sites get the pool's train split only (each carves its validation from its share); the
        pool's val split (and test split, when present) become external hospitals, written to
        ``external_dir`` when given (never into a site's config). Returns
        (``{site: {"data": {...}}}``, summary lines).
        """
        if data_path:
            pool = site_data.load_npz(data_path, self.num_classes, self.image_size)  # the image contract resizes
        else:
            signal = {"opacity": self.synthetic_opacity, "noise": self.synthetic_noise}
            pool = site_data.SiteData(
                train=site_data.synthetic_xrays(
                    (self.synthetic_train_per_site + self.synthetic_val_per_site) * num_sites, self.image_size, seed + 101,
                    **signal,
                ),
                val=site_data.synthetic_xrays(self.synthetic_val_per_site * num_sites, self.image_size, seed + 202, **signal),
            )
        federation = site_data.partition_sites(pool, num_sites, alpha=alpha, seed=seed, source=str(data_path or "synthetic pool"))
        out_dir = Path(out_dir)
        configs, summary = {}, []
        for index, site in enumerate(federation.sites, start=1):
            name = f"site-{index}"
            path = out_dir / f"{name}.npz"
            site_data.save_npz(path, site)
            configs[name] = {"data": {"format": "npz", "path": str(path.resolve())}}
            counts = np.bincount(site.train.labels, minlength=self.num_classes).tolist()
            summary.append(f"{name}: {len(site.train)} train / {len(site.val)} val images, train labels per class {counts}")
        if external_dir is not None:
            for name, split in federation.external.items():
                site_data.save_split(Path(external_dir) / f"{name}.npz", split)
                counts = np.bincount(split.labels, minlength=self.num_classes).tolist()
                summary.append(f"{name} (external hospital, no site holds it): {len(split)} images, labels per class {counts}")
        return configs, summary

    def load_external(self, path: str | Path) -> Dataset:
        """An external set written by :meth:`prepare_simulation`, as an un-augmented dataset."""
        return self.to_dataset(site_data.load_split(path, self.num_classes, self.image_size))

    # ---- training and evaluation ------------------------------------------------------------

    def loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    @staticmethod
    def batch_to_device(batch, device):
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, device, amp: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """(class probabilities (N, C), labels (N,), mean cross-entropy) of ``model`` on ``loader``."""
        model.eval()
        loss_fn = self.loss()
        probs, labels, total_loss = [], [], 0.0
        for batch in loader:
            images, targets = self.batch_to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                logits = model(images)
            logits = logits.float()
            total_loss += float(loss_fn(logits, targets)) * len(targets)
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            labels.append(targets.cpu().numpy())
        if not labels:
            raise ValueError("validation set is empty")
        labels = np.concatenate(labels)
        return np.concatenate(probs), labels, total_loss / len(labels)

    def _auc(self, probs: np.ndarray, labels: np.ndarray) -> float:
        auc = ROCAUCMetric(average="macro")
        y_pred, y = torch.from_numpy(probs), torch.from_numpy(labels)
        if self.num_classes > 2:
            auc(y_pred=y_pred, y=nn.functional.one_hot(y, self.num_classes))
        else:
            auc(y_pred=y_pred[:, 1], y=y)
        return float(auc.aggregate())

    def evaluate(self, model: nn.Module, loader, device, amp: bool = False) -> dict:
        """Validation metrics: MONAI ROC AUC, accuracy at argmax, loss, count; for two classes also
        the per-class histogram of positive-class probabilities (used to choose the decision threshold)."""
        probs, labels, loss = self.predict(model, loader, device, amp)
        metrics = {
            "val_auc": self._auc(probs, labels),
            "val_accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
            "val_loss": loss,
            "num_val_samples": int(len(labels)),
        }
        if self.num_classes == 2:
            metrics[HISTOGRAM_KEY] = score_histogram(probs[:, 1], labels)
        return metrics

    def external_metrics(self, model: nn.Module, dataset: Dataset, device, threshold: float | None = None) -> dict:
        """AUC and accuracy on an external set: at the chosen ``threshold`` (two classes) and at argmax."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
        probs, labels, loss = self.predict(model, loader, device)
        out = {
            "auc": self._auc(probs, labels),
            "accuracy_argmax": float(np.mean(probs.argmax(axis=1) == labels)),
            "loss": loss,
            "num_images": int(len(labels)),
            "images_per_class": np.bincount(labels, minlength=self.num_classes).tolist(),
        }
        if self.num_classes == 2:
            chosen = binary_metrics(probs[:, 1], labels, 0.5 if threshold is None else threshold)
            out.update(accuracy=chosen["accuracy"], sensitivity=chosen["sensitivity"],
                       specificity=chosen["specificity"], threshold=chosen["threshold"])
        else:
            out["accuracy"] = out["accuracy_argmax"]
        return out

    # ---- bundle -----------------------------------------------------------------------------

    def network_data_format(self, network_spec: dict) -> dict:
        return {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "xray",
                    "num_channels": 1,
                    "spatial_shape": [self.image_size, self.image_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": self.num_classes,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": True,
                    "channel_def": {str(i): name for i, name in enumerate(self.class_names)},
                    "note": "network outputs logits; apply softmax over channels for class probabilities",
                }
            },
        }

    def inference_postprocessing(self) -> dict:
        return {"_target_": "Activations", "softmax": True}
