"""2D image classification (chest X-ray pneumonia by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.metrics import ROCAUCMetric
from torch import nn
from torch.utils.data import TensorDataset

from fedmed import data as site_data


class ClassificationTask:
    key_metric = "val_auc"

    def __init__(
        self,
        num_classes: int = 2,
        image_size: int = 28,
        class_names: list[str] | None = None,
        synthetic_train_per_site: int = 400,
        synthetic_val_per_site: int = 100,
    ):
        """Args:
        num_classes: number of classes (labels 0..num_classes-1).
        image_size: images are square, single channel, this many pixels a side (datalists are resized).
        class_names: names of the classes by index, written into the bundle; default ``class_<i>``.
        synthetic_train_per_site / synthetic_val_per_site: pool size per site when simulating without data.
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

    # ---- data -------------------------------------------------------------------------------

    def load_arrays(self, data_config: dict) -> site_data.SiteData:
        fmt = data_config["format"]
        if fmt == "npz":
            return site_data.load_npz(data_config["path"], self.num_classes)
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
        return self.to_dataset(arrays.train), self.to_dataset(arrays.val)

    @staticmethod
    def to_dataset(split: site_data.ImageSplit) -> TensorDataset:
        return TensorDataset(torch.from_numpy(split.images), torch.from_numpy(split.labels))

    def prepare_simulation(
        self, num_sites: int, out_dir: str | Path, data_path: str | None = None, alpha: float = 0.5, seed: int = 0
    ) -> tuple[dict, list[str]]:
        """Partition a pool (an npz, or synthetic X-rays) into per-site npz files under ``out_dir``.

        Returns (``{site: {"data": {...}}}``, summary lines).
        """
        if data_path:
            pool = site_data.load_npz(data_path, self.num_classes)
            if pool.train.images.shape[-1] != self.image_size:
                raise site_data.DataError(
                    f"{data_path}: images are {pool.train.images.shape[-1]} px; the job's task expects {self.image_size}"
                )
        else:
            pool = site_data.SiteData(
                train=site_data.synthetic_xrays(self.synthetic_train_per_site * num_sites, self.image_size, seed + 101),
                val=site_data.synthetic_xrays(self.synthetic_val_per_site * num_sites, self.image_size, seed + 202),
            )
        sites = site_data.partition_sites(pool, num_sites, alpha=alpha, seed=seed)
        out_dir = Path(out_dir)
        configs, summary = {}, []
        for index, site in enumerate(sites, start=1):
            name = f"site-{index}"
            path = out_dir / f"{name}.npz"
            site_data.save_npz(path, site)
            configs[name] = {"data": {"format": "npz", "path": str(path.resolve())}}
            counts = np.bincount(site.train.labels, minlength=self.num_classes).tolist()
            summary.append(f"{name}: {len(site.train)} train / {len(site.val)} val images, train labels per class {counts}")
        return configs, summary

    # ---- training and evaluation ------------------------------------------------------------

    def loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    @staticmethod
    def batch_to_device(batch, device):
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device, amp: bool = False) -> dict:
        model.eval()
        loss_fn = self.loss()
        auc = ROCAUCMetric(average="macro")
        total_loss, correct, count = 0.0, 0, 0
        for batch in loader:
            images, labels = self.batch_to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                logits = model(images)
            logits = logits.float()
            total_loss += float(loss_fn(logits, labels)) * len(labels)
            probs = torch.softmax(logits, dim=1)
            correct += int((probs.argmax(dim=1) == labels).sum())
            count += len(labels)
            one_hot = nn.functional.one_hot(labels, self.num_classes)
            auc(y_pred=probs if self.num_classes > 2 else probs[:, 1], y=one_hot if self.num_classes > 2 else labels)
        if count == 0:
            raise ValueError("validation set is empty")
        return {
            "val_auc": float(auc.aggregate()),
            "val_accuracy": correct / count,
            "val_loss": total_loss / count,
            "num_val_samples": count,
        }

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
