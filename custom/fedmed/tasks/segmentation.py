"""3D (or 2D slice) segmentation of NIfTI volumes: prostate MRI by default.

Data: an MSD-style datalist per site (``{"data": {"format": "msd", "path": "/abs/datalist.json"}}``,
``datalist`` is accepted as a synonym), or ``{"format": "synthetic", ...}`` volumes made in memory.
Every volume goes through MONAI dictionary transforms: ``LoadImaged``, ``EnsureChannelFirstd``,
``Orientationd`` (``orientation``), ``Spacingd`` (``pixdim``), ``NormalizeIntensityd`` (z-score
per volume and channel; MRI has no absolute intensity unit) and ``SpatialPadd`` to at least one
``roi_size`` patch. These deterministic steps run once, when the site loads its data, so a missing,
corrupt or badly labelled file stops the site at start with a message naming the datalist and file.
Training draws ``crop_samples`` random ``roi_size`` patches per volume (``RandCropByPosNegLabeld``,
half centred on foreground) with random flips; validation runs MONAI's ``sliding_window_inference``
over each whole volume, one volume at a time.

Loss: ``DiceCELoss``; metric: ``DiceMetric`` over the foreground classes (``val_dice``, the key
metric, plus ``val_dice_<class>`` per class and ``val_loss``).

Pure module: no FLARE import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmed.data import DataError
from fedmed import volumes

KEYS = ("image", "label")


def _tuple(value, length: int, name: str, kind=float) -> tuple:
    values = tuple(kind(v) for v in (value if isinstance(value, (list, tuple)) else [value] * length))
    if len(values) != length:
        raise ValueError(f"{name} needs {length} values for spatial_dims={length}, got {list(values)}")
    return values


class SegmentationTask:
    key_metric = "val_dice"

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        roi_size: list[int] | int = 32,
        pixdim: list[float] | float = 1.0,
        orientation: str | None = None,
        crop_samples: int = 2,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        modality: str = "MR",
        synthetic_train_per_site: int = 6,
        synthetic_val_per_site: int = 4,
        synthetic_size: int = 40,
        synthetic_shift: float = 1.0,
    ):
        """Args:
        spatial_dims: 3 for volumes, 2 for slices (the network spec must use the same).
        in_channels: image channels (MSD prostate: 2, T2 and ADC); a datalist item may list one file per channel.
        num_classes: label values 0..num_classes-1, background included (network ``out_channels``).
        class_names: names by label value, written into metrics (``val_dice_<name>``) and the bundle;
            default ``background``, ``class_1``, ...
        roi_size: training patch and sliding-window size in voxels (one number or one per axis).
        pixdim: voxel size in mm every volume is resampled to (one number or one per axis).
        orientation: axis codes every volume is reoriented to (default ``RAS`` / ``RA`` for 2D).
        crop_samples: random patches per volume per training step (half centred on foreground).
        sw_batch_size / sw_overlap: sliding-window inference settings for validation and the bundle.
        modality: written into the bundle metadata.
        synthetic_train_per_site / synthetic_val_per_site / synthetic_size / synthetic_shift: synthetic
            cases per site when simulating without data, their size in voxels a side (at 1 mm),
            and how different the sites' scanners are (0 = identical).
        """
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one structure), got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.class_names = list(class_names or ["background"] + [f"class_{i}" for i in range(1, num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {num_classes} classes")
        self.roi_size = _tuple(roi_size, spatial_dims, "roi_size", int)
        self.pixdim = _tuple(pixdim, spatial_dims, "pixdim", float)
        self.orientation = orientation or "RAS"[:spatial_dims]
        if len(self.orientation) != spatial_dims:
            raise ValueError(f"orientation {self.orientation!r} needs {spatial_dims} axis codes")
        if crop_samples < 1:
            raise ValueError(f"crop_samples must be >= 1, got {crop_samples}")
        self.crop_samples = crop_samples
        self.sw_batch_size = sw_batch_size
        self.sw_overlap = sw_overlap
        self.modality = modality
        self.synthetic_train_per_site = synthetic_train_per_site
        self.synthetic_val_per_site = synthetic_val_per_site
        self.synthetic_size = synthetic_size
        self.synthetic_shift = synthetic_shift

    # ---- transforms -------------------------------------------------------------------------

    def preprocessing(self, load: bool = True):
        """The deterministic MONAI transforms every volume goes through (loading included when ``load``)."""
        from monai.transforms import (
            Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd, Orientationd, SpatialPadd, Spacingd,
        )

        steps = [LoadImaged(keys=KEYS, image_only=True), EnsureChannelFirstd(keys=KEYS)] if load else []
        steps += [
            Orientationd(keys=KEYS, axcodes=self.orientation, labels=volumes.RAS_LABELS),
            Spacingd(keys=KEYS, pixdim=self.pixdim, mode=("bilinear", "nearest")),
            NormalizeIntensityd(keys="image", nonzero=False, channel_wise=True),
            SpatialPadd(keys=KEYS, spatial_size=self.roi_size),
            EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
        ]
        return Compose(steps)

    def train_augmentation(self, seed: int = 0):
        """Random patches (half centred on foreground) and flips, applied to preprocessed volumes."""
        from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, RandFlipd

        transform = Compose(
            [
                RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=self.roi_size, pos=1, neg=1,
                                       num_samples=self.crop_samples, allow_smaller=False),
                *[RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(self.spatial_dims)],
                EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
            ]
        )
        transform.set_random_state(seed=seed)
        return transform

    def inference_config(self) -> dict:
        """Bundle ``inference.json`` entries: MONAI preprocessing of a NIfTI volume and the sliding-window inferer."""
        return {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                    {"_target_": "Orientationd", "keys": "image", "axcodes": self.orientation,
                     "labels": [list(pair) for pair in volumes.RAS_LABELS]},
                    {"_target_": "Spacingd", "keys": "image", "pixdim": list(self.pixdim), "mode": "bilinear"},
                    {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True},
                    {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                ],
            },
            "inferer": {
                "_target_": "SlidingWindowInferer",
                "roi_size": list(self.roi_size),
                "sw_batch_size": self.sw_batch_size,
                "overlap": self.sw_overlap,
            },
        }

    # ---- data -------------------------------------------------------------------------------

    def load_site_data(self, data_config: dict, site_name: str = "?"):
        """(train dataset of random patches, validation dataset of whole volumes) for one site."""
        from monai.data import Dataset

        fmt = data_config.get("format")
        if fmt in ("msd", "datalist"):
            datalist = volumes.read_datalist(data_config["path"], data_config.get("base_dir"))
            source = f"datalist {data_config['path']}"
            train = self._preprocess_items(datalist["training"], source, "training", site_name)
            val = self._preprocess_items(datalist["validation"], source, "validation", site_name)
        elif fmt == "synthetic":
            train, val = self._synthetic_items(data_config, site_name)
        else:
            raise DataError(
                f"site '{site_name}': data format {fmt!r} is not supported by the segmentation task; "
                f"use 'msd' (an MSD-style datalist of NIfTI volumes) or 'synthetic'"
            )
        seed = int(data_config.get("seed", 0)) * 7919 + sum(map(ord, site_name))
        return Dataset(data=train, transform=self.train_augmentation(seed)), Dataset(data=val)

    def _preprocess_items(self, items: list[dict], source: str, split: str, site_name: str, load: bool = True) -> list[dict]:
        transform = self.preprocessing(load=load)
        out = []
        for index, item in enumerate(items):
            files = {key: item[key] for key in KEYS if isinstance(item[key], (str, list))}
            where = f"site '{site_name}': {source}: {split}[{index}] ({files.get('image', 'in memory')})"
            try:
                loaded = transform(dict(item))
            except Exception as exc:  # MONAI wraps reader errors; name the file and what to do
                cause = exc
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                raise DataError(
                    f"{where}: cannot load or preprocess image/label {files or ''} "
                    f"({type(cause).__name__}: {str(cause)[:300]}); replace the file or remove the item"
                ) from exc
            out.append({"image": loaded["image"], "label": self._check_label(loaded, where, files.get("label"))})
        return out

    def _check_label(self, loaded: dict, where: str, label_file) -> torch.Tensor:
        image, label = loaded["image"], loaded["label"]
        if image.shape[0] != self.in_channels:
            raise DataError(f"{where}: image has {image.shape[0]} channel(s), the task expects in_channels={self.in_channels}")
        if image.ndim != self.spatial_dims + 1:
            raise DataError(f"{where}: image has {image.ndim - 1} spatial dimensions, the task expects {self.spatial_dims}")
        if not torch.isfinite(image).all():
            raise DataError(f"{where}: image contains NaN or infinite values")
        what = f"label {label_file}" if label_file else "label"
        if label.shape[0] != 1:
            raise DataError(f"{where}: {what} has {label.shape[0]} channels; a mask holds one label value per voxel")
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise DataError(
                f"{where}: {what} has shape {tuple(label.shape[1:])} after resampling, the image {tuple(image.shape[1:])}; "
                f"image and mask must cover the same voxels (same shape and affine)"
            )
        values = torch.unique(label)
        bad = [float(v) for v in values if float(v) != round(float(v)) or not 0 <= float(v) < self.num_classes]
        if bad:
            raise DataError(
                f"{where}: {what} holds values {bad[:5]}; masks must hold integer class labels 0..{self.num_classes - 1} "
                f"(num_classes={self.num_classes})"
            )
        return label

    def _synthetic_items(self, data_config: dict, site_name: str) -> tuple[list[dict], list[dict]]:
        from monai.data.meta_tensor import MetaTensor

        seed = int(data_config.get("seed", 0))
        site_index = int(data_config.get("site_index", 0))
        profile = volumes.scanner_profile(site_index, seed, self.spatial_dims, float(data_config.get("shift", self.synthetic_shift)))
        num_train = int(data_config.get("num_train", self.synthetic_train_per_site))
        num_val = int(data_config.get("num_val", self.synthetic_val_per_site))
        cases = []
        for index in range(num_train + num_val):
            image, label, affine = volumes.synthetic_case(
                int(data_config.get("size", self.synthetic_size)), profile, seed=(seed * 1009 + site_index) * 1000003 + index,
                spatial_dims=self.spatial_dims,
            )
            cases.append({"image": MetaTensor(image[None], affine=affine), "label": MetaTensor(label[None].astype(np.float32), affine=affine)})
        source = f"synthetic data (seed {seed}, site_index {site_index})"
        return (
            self._preprocess_items(cases[:num_train], source, "training", site_name, load=False),
            self._preprocess_items(cases[num_train:], source, "validation", site_name, load=False),
        )

    def prepare_simulation(
        self, num_sites: int, out_dir: str | Path, data_path: str | None = None, alpha: float = 0.5, seed: int = 0,
        external_dir: str | Path | None = None,
    ) -> tuple[dict, list[str]]:
        """Give every simulated site its own NIfTI volumes and MSD-style datalist under ``out_dir``.

        Without ``data_path``: synthetic volumes, each site with its own scanner profile (spacing,
        orientation, intensity scale, gamma, bias field, noise). With ``data_path`` (an MSD-style
        datalist, e.g. a Decathlon ``dataset.json`` whose ``validation`` may be absent): its cases
        are shuffled (seeded) and dealt out to the sites; each site keeps a fifth for validation.
        ``alpha`` (label skew) does not apply to segmentation cases. ``external_dir`` is accepted for the
        shared interface; segmentation keeps no external hospital yet. Returns (``{site: {"data": {...}}}``, summary lines).
        """
        out_dir = Path(out_dir)
        configs, summary = {}, []
        if data_path:
            return self._split_datalist(num_sites, out_dir, Path(data_path), seed)
        for index in range(num_sites):
            name = f"site-{index + 1}"
            profile = volumes.scanner_profile(index, seed, self.spatial_dims, self.synthetic_shift)
            datalist = volumes.write_synthetic_site(
                out_dir / name, profile, self.synthetic_train_per_site, self.synthetic_val_per_site,
                size=self.synthetic_size, seed=seed * 1009 + index, spatial_dims=self.spatial_dims,
            )
            configs[name] = {"data": {"format": "msd", "path": str(datalist.resolve())}}
            summary.append(
                f"{name}: {self.synthetic_train_per_site} train / {self.synthetic_val_per_site} val synthetic "
                f"{'volumes' if self.spatial_dims == 3 else 'slices'}; scanner {profile.describe()}"
            )
        return configs, summary

    def _split_datalist(self, num_sites: int, out_dir: Path, data_path: Path, seed: int) -> tuple[dict, list[str]]:
        pool = volumes.read_datalist(data_path, optional=("validation",))  # every file checked once
        checked = pool["training"] + pool["validation"]
        if len(checked) < 2 * num_sites:
            raise DataError(f"datalist {data_path}: {len(checked)} labelled cases cannot give {num_sites} sites a training and a validation case each")
        order = np.random.default_rng(seed).permutation(len(checked))
        configs, summary = {}, []
        for index in range(num_sites):
            name = f"site-{index + 1}"
            share = [checked[i] for i in order[index::num_sites]]
            num_val = max(1, len(share) // 5)
            path = volumes.write_datalist(out_dir / name / "datalist.json", share[num_val:], share[:num_val])
            configs[name] = {"data": {"format": "msd", "path": str(path.resolve())}}
            summary.append(f"{name}: {len(share) - num_val} train / {num_val} val cases from {data_path}")
        return configs, summary

    # ---- training and evaluation ------------------------------------------------------------

    def loss(self) -> nn.Module:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)

    @staticmethod
    def batch_to_device(batch, device):
        """(images, labels) from a batch dict, or a list of them (several random patches per volume)."""
        if isinstance(batch, (list, tuple)):
            images = torch.cat([part["image"] for part in batch])
            labels = torch.cat([part["label"] for part in batch])
        else:
            images, labels = batch["image"], batch["label"]
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device, amp: bool = False) -> dict:
        """Dice of ``model`` on every whole validation volume (sliding window, one volume at a time)."""
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot
        from torch.utils.data import DataLoader

        dims = getattr(model, "dimensions", None) or getattr(model, "spatial_dims", None)
        if isinstance(dims, int) and dims != self.spatial_dims:
            raise ValueError(f"the network is {dims}D but the task's spatial_dims is {self.spatial_dims}; make them agree in the job config")
        model.eval()
        loss_fn = self.loss()
        dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
        # volumes differ in shape, so go one volume at a time whatever the loader's batch size
        volumes_loader = DataLoader(loader.dataset, batch_size=1, shuffle=False, num_workers=getattr(loader, "num_workers", 0))
        total_loss, count = 0.0, 0
        for batch in volumes_loader:
            images, labels = self.batch_to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                logits = sliding_window_inference(images, self.roi_size, self.sw_batch_size, model, overlap=self.sw_overlap)
            logits = torch.as_tensor(logits).float()
            total_loss += float(loss_fn(logits, labels))
            prediction = one_hot(logits.argmax(dim=1, keepdim=True), self.num_classes)
            dice(y_pred=prediction, y=one_hot(labels.long(), self.num_classes))
            count += 1
        if count == 0:
            raise ValueError("validation set is empty")
        per_class = dice.aggregate().cpu().numpy().astype(float)
        metrics = {"val_dice": float(np.mean(per_class)), "val_loss": total_loss / count, "num_val_samples": count}
        for name, value in zip(self.class_names[1:], per_class):
            metrics[f"val_dice_{name}"] = float(value)
        return metrics

    # ---- bundle -----------------------------------------------------------------------------

    def network_data_format(self, network_spec: dict) -> dict:
        args = network_spec.get("args", {})
        out_channels = args.get("out_channels", self.num_classes)
        if out_channels != self.num_classes or args.get("in_channels", self.in_channels) != self.in_channels:
            raise ValueError(
                f"network spec {network_spec}: in_channels/out_channels must equal the task's in_channels "
                f"{self.in_channels} and num_classes {self.num_classes}"
            )
        return {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": self.modality,
                    "num_channels": self.in_channels,
                    "spatial_shape": list(self.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): f"channel_{i}" if self.in_channels > 1 else "image" for i in range(self.in_channels)},
                    "note": f"z-score normalised per volume, {self.orientation} orientation, {list(self.pixdim)} mm voxels "
                    "(the bundle's 'preprocessing'); whole volumes go through the sliding-window 'inferer'",
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": self.num_classes,
                    "spatial_shape": list(self.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(self.class_names)},
                    "note": "network outputs logits per class; the bundle's 'postprocessing' takes the argmax label map",
                }
            },
        }

    def inference_postprocessing(self) -> dict:
        return {"_target_": "AsDiscrete", "argmax": True}
