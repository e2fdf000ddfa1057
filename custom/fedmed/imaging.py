"""The image contract: how any 2D image (an npz row or a PNG, JPEG, TIFF, BMP, DICOM or NIfTI file)
becomes the network's input tensor. One definition, used by every path: training from npz and from
datalists, validation, external evaluation, the data check and the bundle's ``inference.json``.

- **Orientation**: row-major, as numpy, PIL and pydicom read pixels: axis 0 runs down the rows, axis 1
  along the columns. NIfTI stores the column (x) axis first (the ITK/MONAI convention that MONAI's
  ``SaveImage`` and SimpleITK write), so a NIfTI array is transposed; its affine is not applied.
  (MONAI's ``LoadImage`` with its default PIL reader returns PNGs transposed; this module never uses it.)
- **Intensity**: scaled to [0, 1] by the range the file declares, never by an image's own min/max:
  8-bit /255, 16-bit /65535; DICOM by its ``BitsStored`` (and ``PixelRepresentation``) range taken through
  ``RescaleSlope`` / ``RescaleIntercept`` (the modality LUT), ``MONOCHROME1`` inverted; NIfTI by
  ``cal_min`` / ``cal_max`` when set, else its unsigned integer type's range (after ``scl_slope`` /
  ``scl_inter``); floating-point pixels are taken as stored and must lie in [0, 1]. Other integer npz
  arrays hold MedMNIST's 8-bit values (0..255).
- **Channels**: one. Colour (RGB, RGBA, palette, YBR DICOM) is averaged over R, G and B after scaling;
  alpha is dropped.
- **Size**: resized to ``image_size`` x ``image_size`` by MONAI ``Resize`` (mode ``area``); an image that
  size already is unchanged.

Result: float32, channel first ``(1, S, S)``, values in [0, 1]. The same pixels in any supported format
give the same tensor (JPEG within its compression loss). Pure module: numpy, PIL, pydicom, nibabel and
MONAI, no FLARE. ``ImageContractd`` is the MONAI dictionary transform the bundle instantiates by ``_target_``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from monai.transforms import MapTransform, Transform

CONTRACT_VERSION = 1
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = (*PIL_SUFFIXES, *DICOM_SUFFIXES, *NIFTI_SUFFIXES)
RESIZE_MODE = "area"


class ImageContractError(ValueError):
    """An image this contract cannot read as declared; the message names the file and what to do."""


def image_contract(image_size: int) -> dict:
    """The contract as data, for the bundle's ``metadata.json`` (``image_contract``) and its README."""
    return {
        "version": CONTRACT_VERSION,
        "implementation": "fedmed.imaging.ImageContractd",
        "formats": list(IMAGE_SUFFIXES),
        "orientation": "row-major as numpy/PIL/pydicom read pixels (axis 0 = rows top to bottom, axis 1 = columns); "
                       "NIfTI voxel axis i is the column (x) axis and is transposed; the NIfTI affine is not applied",
        "intensity": "scaled to [0, 1] by the file's declared range, never per-image min/max: 8-bit /255, 16-bit /65535; "
                     "DICOM: BitsStored/PixelRepresentation range through RescaleSlope/RescaleIntercept, MONOCHROME1 "
                     "inverted, VOI windows not applied; NIfTI: cal_min/cal_max, else its unsigned integer type's range; "
                     "floating-point pixels as stored, must lie in [0, 1]",
        "channels": "1: colour averaged over R, G, B after scaling, alpha dropped",
        "spatial_size": [int(image_size), int(image_size)],
        "resize": f"MONAI Resize, mode '{RESIZE_MODE}'; an image already that size is unchanged",
        "dtype": "float32",
        "value_range": [0, 1],
    }


# ---- reading one file to (H, W) or (H, W, C) float in [0, 1] ------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _scaled_integers(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 /255, uint16 /65535; other integer types hold 8-bit values (MedMNIST's npz convention)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ImageContractError(
            f"{source}: {array.dtype} pixels {int(array.min())}..{int(array.max())} have no declared range; store "
            "8-bit images as uint8 (0..255), 16-bit as uint16 (0..65535) or floats in [0, 1]"
        )
    return array.astype(np.float32) / 255.0


def _checked_float(array: np.ndarray, source: str, hint: str) -> np.ndarray:
    out = array.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ImageContractError(f"{source}: pixels contain NaN or infinite values")
    if out.size and (out.min() < 0.0 or out.max() > 1.0):
        raise ImageContractError(f"{source}: floating-point pixels must lie in [0, 1] "
                                 f"(got {out.min():.4g}..{out.max():.4g}); {hint}")
    return out


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode, fmt = image.mode, image.format
        if mode in ("L", "I;16", "I;16B", "I;16L"):
            pixels = np.asarray(image)
            return _scaled_integers(pixels.astype(np.uint16) if mode.startswith("I;16") else pixels, str(path))
        if mode == "I":  # 32-bit integer mode: PNG uses it for 16-bit grayscale in some Pillow versions
            if fmt != "PNG":
                raise ImageContractError(f"{path}: 32-bit integer {fmt} pixels have no declared range; "
                                         "save it as 8- or 16-bit grayscale")
            return np.asarray(image).astype(np.float32) / 65535.0
        if mode == "F":
            return _checked_float(np.asarray(image), str(path), "save it as 8- or 16-bit grayscale")
        if mode == "1":
            return np.asarray(image.convert("L")).astype(np.float32) / 255.0
        if mode == "LA":
            return np.asarray(image.getchannel("L")).astype(np.float32) / 255.0
        rgb = image.convert("RGB")  # RGB, RGBA (alpha dropped), P (palette), CMYK, YCbCr
        return np.asarray(rgb).astype(np.float32) / 255.0


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for a file that is not DICOM
        raise ImageContractError(f"{path}: not a readable DICOM file ({exc})") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ImageContractError(f"{path}: a multi-frame DICOM ({ds.NumberOfFrames} frames); the task reads 2D images")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise ImageContractError(f"{path}: cannot decode the DICOM pixel data ({exc}); for a compressed transfer "
                                 "syntax install its decoder (e.g. pylibjpeg) or store it uncompressed") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 0) or 8 * stored.dtype.itemsize)
    if np.issubdtype(stored.dtype, np.floating):
        raise ImageContractError(f"{path}: floating-point DICOM pixel data has no declared range; store integers")
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(stored, ds).astype(np.float64)
        ends = apply_modality_lut(np.array([low, high], dtype=np.int64), ds).astype(np.float64)
        lo, hi = float(ends.min()), float(ends.max())
        if hi <= lo:
            raise ImageContractError(f"{path}: RescaleSlope/RescaleIntercept map the stored range to a single value")
        out = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        return (1.0 - out if photometric == "MONOCHROME1" else out).astype(np.float32)
    if photometric.startswith("YBR") or photometric == "RGB" or photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut, convert_color_space

        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(stored, ds)
            return rgb.astype(np.float32) / float(2 ** (8 * rgb.dtype.itemsize) - 1)
        rgb = stored if photometric == "RGB" else convert_color_space(stored, photometric, "RGB")
        return np.clip(rgb.astype(np.float32) / float(high), 0.0, 1.0)
    raise ImageContractError(f"{path}: DICOM PhotometricInterpretation {photometric} is not supported "
                             "(MONOCHROME1, MONOCHROME2, RGB, YBR_*, PALETTE COLOR are)")


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        values = np.asarray(image.dataobj)  # scl_slope / scl_inter applied
    except Exception as exc:
        raise ImageContractError(f"{path}: not a readable NIfTI file ({exc})") from exc
    values = values.reshape(values.shape[:2] + tuple(s for s in values.shape[2:] if s != 1))
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[2] not in (3, 4)):
        raise ImageContractError(f"{path}: NIfTI shape {image.shape} is not a 2D image")
    values = np.swapaxes(values, 0, 1)  # voxel axis i is x (columns): to rows x columns
    header = image.header
    cal_min, cal_max = float(header["cal_min"]), float(header["cal_max"])
    if cal_max > cal_min:
        return np.clip((values.astype(np.float64) - cal_min) / (cal_max - cal_min), 0.0, 1.0).astype(np.float32)
    on_disk = header.get_data_dtype()
    if np.issubdtype(on_disk, np.unsignedinteger) and on_disk.itemsize <= 2:
        slope, inter = header.get_slope_inter()
        slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
        inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        ends = np.array([0.0, float(np.iinfo(on_disk).max)]) * slope + inter
        lo, hi = float(ends.min()), float(ends.max())
        return np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if np.issubdtype(on_disk, np.floating):
        return _checked_float(values, str(path), "or declare the range in the header's cal_min/cal_max")
    raise ImageContractError(
        f"{path}: {on_disk} NIfTI pixels have no declared range; set the header's cal_min/cal_max to the range "
        "(e.g. 0 and 4095 for 12-bit data) or store uint8/uint16"
    )


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """One image file as float32 ``(H, W)`` or ``(H, W, C)``, row-major, scaled by its declared range."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        return _read_dicom(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in PIL_SUFFIXES:
        return _read_pil(path)
    raise ImageContractError(f"{path}: unsupported image type {suffix or '(no suffix)'}; "
                             f"supported: {', '.join(IMAGE_SUFFIXES)}")


# ---- channels and size -----------------------------------------------------------------------------


def to_grayscale(pixels: np.ndarray, source: str = "image") -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` in [0, 1] -> ``(1, H, W)``: colour averaged over R, G, B; alpha dropped."""
    if pixels.ndim == 2:
        return pixels[None].astype(np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 2):  # gray, gray + alpha
        return pixels[None, :, :, 0].astype(np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return pixels[..., :3].mean(axis=-1, dtype=np.float64).astype(np.float32)[None]  # float64: gray RGB stays exact
    raise ImageContractError(f"{source}: pixels shaped {pixels.shape} are not a 2D grayscale or colour image")


def resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """``(C, H, W)`` float32 -> ``(C, S, S)`` with MONAI ``Resize`` (mode ``area``); unchanged when already S x S."""
    if images.shape[-2:] == (image_size, image_size):
        return images.astype(np.float32, copy=False)
    from monai.transforms import Resize

    out = Resize((image_size, image_size), mode=RESIZE_MODE)(images.astype(np.float32))
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One file through the whole contract: float32 ``(1, image_size, image_size)`` in [0, 1]."""
    return resize(to_grayscale(read_pixels(path), str(path)), image_size)


def contract_arrays(images: np.ndarray, source: str, image_size: int | None = None) -> np.ndarray:
    """A stack of images from an npz (``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``) through the contract:
    float32 ``(N, 1, H, W)`` in [0, 1] (resized to ``image_size`` when given). Integer arrays are scaled by
    their type (uint8 /255, uint16 /65535, other integers as 8-bit values); floats must lie in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
        images = np.transpose(images, (0, 2, 3, 1))  # channel first -> channel last
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 2, 3, 4)):
        raise ImageContractError(f"{source}: expected images shaped (N, H, W) or (N, H, W, C), got {images.shape}")
    if np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_:
        scaled = _scaled_integers(images, source)
    else:
        scaled = _checked_float(images, source, "store floats in [0, 1] or integers (uint8, uint16)")
    if scaled.ndim == 3:
        gray = scaled[:, None]
    elif scaled.shape[-1] in (1, 2):
        gray = scaled[:, None, :, :, 0]
    else:
        gray = scaled[..., :3].mean(axis=-1, dtype=np.float64).astype(np.float32)[:, None]
    gray = np.ascontiguousarray(gray, dtype=np.float32)
    if image_size is None or gray.shape[-2:] == (image_size, image_size):
        return gray
    return resize(gray[:, 0], image_size)[:, None]


# ---- MONAI transforms (what the bundle's inference.json instantiates) -----------------------------------


class ImageContract(Transform):
    """MONAI array transform: a file path (or an ``(H, W[, C])`` array read by :func:`read_pixels`) ->
    ``MetaTensor`` ``(1, image_size, image_size)`` float32 in [0, 1], ``meta["filename_or_obj"]`` set."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, image):
        import torch
        from monai.data import MetaTensor

        if isinstance(image, (str, os.PathLike)):
            array, meta = read_image(image, self.image_size), {"filename_or_obj": str(image)}
        else:
            pixels = np.asarray(image)
            array, meta = resize(to_grayscale(pixels.astype(np.float32)), self.image_size), {}
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), meta=meta)


class ImageContractd(MapTransform):
    """Dictionary version of :class:`ImageContract` (``keys`` hold file paths)."""

    def __init__(self, keys, image_size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.contract = ImageContract(image_size)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.contract(d[key])
        return d


def bundle_preprocessing(image_size: int) -> dict:
    """The ``preprocessing`` entry of a classification bundle's ``inference.json``: this contract, by ``_target_``."""
    return {"_target_": "Compose", "transforms": [
        {"_target_": "fedmed.imaging.ImageContractd", "keys": "image", "image_size": int(image_size)},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]}
