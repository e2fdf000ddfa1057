"""Volumes for segmentation: MSD-style NIfTI datalists and synthetic MRI-like volumes per site.

Pure module: numpy, nibabel and MONAI only, no FLARE.

- :func:`read_datalist` checks an MSD-style datalist ``{"training": [{"image": ..., "label": ...}],
  "validation": [...]}`` and resolves its paths (relative paths against the datalist's folder);
  every problem raises :class:`fedmed.data.DataError` naming the datalist, the key and the file.
- :func:`synthetic_case` draws one labelled volume with MONAI's ``create_test_image_3d`` (or ``_2d``
  for slices) and passes it through a site's :class:`ScannerProfile`: intensity scale and offset
  (MRI has no absolute intensity unit), gamma, a smooth bias field (MONAI ``RandBiasField``), noise,
  voxel spacing (slice thickness) and the orientation the volume is stored in. The task's
  Orientation / Spacing / intensity-normalisation transforms must undo the geometric part; the rest
  is the non-IID scanner shift federated training has to cope with.
- :func:`write_synthetic_site` writes a site's volumes as small NIfTI files plus its datalist.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmed.atomic import atomic_path, write_json
from fedmed.data import DataError

DATALIST_SPLITS = ("training", "validation")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis labels of NIfTI world space


# ---------------------------------------------------------------------------------------------
# datalists


def read_datalist(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None, optional: tuple[str, ...] = ()
) -> dict[str, list[dict]]:
    """Read an MSD-style datalist; return ``{"training": [...], "validation": [...]}`` with absolute paths.

    Each item needs ``image`` (a file, or a list of files for several channels) and ``label``.
    Every referenced file must exist; the error names the datalist, the item and the file.
    Splits named in ``optional`` may be absent (they come back as empty lists).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist; point the site's data config 'data.path' at an MSD-style datalist JSON")
    try:
        datalist = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"datalist {path} is not valid JSON ({exc})") from exc
    if not isinstance(datalist, dict):
        raise DataError(f"datalist {path} must hold a JSON object with 'training' and 'validation' lists")
    root = Path(base_dir) if base_dir else path.parent
    out = {}
    for split in DATALIST_SPLITS:
        items = datalist.get(split)
        if split in optional and not items:
            out[split] = []
            continue
        if not isinstance(items, list) or not items:
            raise DataError(
                f"datalist {path}: key '{split}' must be a non-empty list of {{\"image\": ..., \"label\": ...}} items "
                f"(found {type(items).__name__ if items is not None else 'nothing'})"
            )
        resolved = []
        for index, item in enumerate(items):
            where = f"datalist {path}: {split}[{index}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DataError(f"{where} needs both 'image' and 'label' (a segmentation mask file)")
            entry = {key: _resolve(item[key], root, f"{where} '{key}'") for key in ("image", "label")}
            if isinstance(entry["label"], list):
                raise DataError(f"{where} 'label' must be one mask file, not a list")
            resolved.append(entry)
        out[split] = resolved
    return out


def _resolve(value, root: Path, where: str):
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where} is an empty list")
        return [_resolve(v, root, where) for v in value]
    if not isinstance(value, str) or not value:
        raise DataError(f"{where} must be a file path, got {value!r}")
    file_path = Path(value)
    file_path = file_path if file_path.is_absolute() else (root / file_path)
    if not file_path.is_file():
        raise DataError(f"{where}: file {file_path} does not exist; fix the path or remove the item")
    return str(file_path.resolve())


def write_datalist(path: str | os.PathLike, training: list[dict], validation: list[dict]) -> Path:
    """Write a datalist atomically (temp file, then rename)."""
    return write_json(path, {"training": training, "validation": validation})


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file atomically (a hidden temp name beside it, then rename)."""
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: NIfTI file names end in .nii or .nii.gz")
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(tmp))
    return path


# ---------------------------------------------------------------------------------------------
# synthetic volumes with per-site scanner differences


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner renders the same anatomy."""

    intensity_scale: float = 1000.0  # raw intensity units per unit of tissue contrast
    intensity_offset: float = 0.0
    gamma: float = 1.0
    bias_field_coeff: float = 0.0  # strength of the smooth multiplicative bias field (0 = none)
    noise_max: float = 0.3  # background clutter of create_test_image_3d (uniform, [0, noise_max))
    noise_std: float = 0.02  # Gaussian noise, relative to the tissue contrast
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)  # stored voxel size in mm
    axcodes: str = "RAS"  # orientation the volume is stored in

    def describe(self) -> str:
        return (
            f"spacing {'x'.join(f'{s:g}' for s in self.spacing)} mm, stored {self.axcodes}, intensity x{self.intensity_scale:.0f}"
            f"{self.intensity_offset:+.0f}, gamma {self.gamma:.2f}, bias field {self.bias_field_coeff:.2f}, "
            f"noise {self.noise_max:.2f}/{self.noise_std:.2f}"
        )


_SITE_AXCODES = {3: ("RAS", "LPS", "LAS", "RPI"), 2: ("RA", "LP", "LA", "RP")}
_SITE_SPACING = {3: ((1.0, 1.0, 1.0), (1.0, 1.0, 1.5), (1.25, 1.25, 1.0), (0.8, 0.8, 2.0)), 2: ((1.0, 1.0), (1.25, 1.25), (0.8, 0.8), (1.5, 1.5))}


def scanner_profile(site_index: int, seed: int = 0, spatial_dims: int = 3, strength: float = 1.0) -> ScannerProfile:
    """A seeded scanner profile for site ``site_index`` (0-based). ``strength`` 0 gives identical sites."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if strength == 0:
        return ScannerProfile(spacing=(1.0,) * spatial_dims, axcodes=_SITE_AXCODES[spatial_dims][0])
    rng = np.random.default_rng([seed, site_index, 104729])
    return ScannerProfile(
        intensity_scale=float(rng.uniform(300.0, 2000.0)),
        intensity_offset=float(rng.uniform(-100.0, 200.0)),
        gamma=float(np.exp(rng.uniform(-0.35, 0.35) * strength)),
        bias_field_coeff=float(rng.uniform(0.05, 0.3) * strength),
        noise_max=float(np.clip(0.25 + rng.uniform(-0.1, 0.2) * strength, 0.0, 0.49)),
        noise_std=float(rng.uniform(0.01, 0.06) * strength),
        spacing=_SITE_SPACING[spatial_dims][site_index % len(_SITE_SPACING[spatial_dims])],
        axcodes=_SITE_AXCODES[spatial_dims][site_index % len(_SITE_AXCODES[spatial_dims])],
    )


def synthetic_case(
    size: int = 40,
    profile: ScannerProfile | None = None,
    seed: int = 0,
    spatial_dims: int = 3,
    num_objs: int = 3,
    rad_min: int = 5,
    rad_max: int = 12,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic labelled case as the site's scanner stores it.

    Returns ``(image float32, label uint8, affine 4x4)``: spatial arrays without a channel axis
    (``size`` voxels a side at 1 mm before the scanner's resampling), label 1 inside the "organ"
    blobs and 0 elsewhere, the affine mapping voxels to RAS millimetres.
    """
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms import Orientation, RandBiasField, Spacing

    profile = profile or ScannerProfile(spacing=(1.0,) * spatial_dims, axcodes="RAS"[:spatial_dims])
    if len(profile.spacing) != spatial_dims or len(profile.axcodes) != spatial_dims:
        raise ValueError(f"scanner profile {profile} does not fit spatial_dims={spatial_dims}")
    state = np.random.RandomState(np.random.default_rng([seed, 15485863]).integers(2**31))
    rad_max = min(rad_max, (size - 1) // 2)
    num = int(state.randint(1, num_objs + 1))
    if spatial_dims == 3:
        clean, label = create_test_image_3d(size, size, size, num_objs=num, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=profile.noise_max, num_seg_classes=1, random_state=state)
    else:
        clean, label = create_test_image_2d(size, size, num_objs=num, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=profile.noise_max, num_seg_classes=1, random_state=state)
    image = np.power(np.clip(clean, 0.0, 1.0), profile.gamma)
    if profile.bias_field_coeff > 0:
        c = profile.bias_field_coeff  # every polynomial coefficient is drawn from (-c, c)
        bias = RandBiasField(degree=2, coeff_range=(-c, c), prob=1.0)
        bias.set_random_state(seed=int(state.randint(2**31)))
        image = np.asarray(bias(image[None]))[0]
    image = image + state.normal(0.0, profile.noise_std, size=image.shape)
    image = image * profile.intensity_scale + profile.intensity_offset

    # resample to the scanner's voxel size and reorient to how it stores volumes (MONAI's own transforms)
    canonical = np.eye(4)
    image_t = MetaTensor(image[None].astype(np.float32), affine=canonical)
    label_t = MetaTensor(label[None].astype(np.float32), affine=canonical)
    spacing = Spacing(pixdim=profile.spacing)
    image_t = spacing(image_t, mode="bilinear")
    label_t = spacing(label_t, mode="nearest")
    orient = Orientation(axcodes=profile.axcodes, labels=RAS_LABELS)
    image_t, label_t = orient(image_t), orient(label_t)
    affine = np.asarray(image_t.affine, dtype=np.float64)  # 4x4 for 2D and 3D alike
    return np.asarray(image_t[0], dtype=np.float32), np.rint(np.asarray(label_t[0])).astype(np.uint8), affine


def write_synthetic_site(
    out_dir: str | os.PathLike,
    profile: ScannerProfile,
    num_train: int,
    num_val: int,
    size: int = 40,
    seed: int = 0,
    spatial_dims: int = 3,
) -> Path:
    """Write ``num_train`` + ``num_val`` synthetic cases as NIfTI under ``out_dir`` and its datalist.

    Layout (as in the Medical Segmentation Decathlon): ``imagesTr/case_NNN.nii.gz``,
    ``labelsTr/case_NNN.nii.gz``, ``datalist.json`` with relative paths and ``scanner.json``
    (the profile). Returns the datalist path; it is written last, so a half-written site has none.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"a site needs at least one training and one validation case (got {num_train}, {num_val})")
    out_dir = Path(out_dir)
    items = []
    for index in range(num_train + num_val):
        image, label, affine = synthetic_case(size, profile, seed=seed * 1000003 + index, spatial_dims=spatial_dims)
        name = f"case_{index:03d}.nii.gz"
        write_nifti(out_dir / "imagesTr" / name, image, affine)
        write_nifti(out_dir / "labelsTr" / name, label, affine)
        items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    write_json(out_dir / "scanner.json", asdict(profile))
    return write_datalist(out_dir / "datalist.json", items[:num_train], items[num_train:])
