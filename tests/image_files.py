"""Write one 8-bit image in every format the image contract reads (tests and tests/benchmarks use it).

Each writer stores the same pixels as that format declares them, so the contract (fedmed.imaging) must
give back the same tensor: 16-bit files hold ``v * 257`` (v / 255 == v * 257 / 65535), 12-bit files
``round(v * 4095 / 255)``, MONOCHROME1 the inverted values, rescaled DICOMs stored values that their
RescaleSlope / RescaleIntercept map back onto the plain file's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def asymmetric_image(size: int = 28, seed: int = 0) -> np.ndarray:
    """uint8 (size, size) holding every gray level 0..255 (when size*size >= 256), with a bright bar along
    the top rows and a dark column on the right: a transposed or flipped read cannot match it."""
    rng = np.random.default_rng(seed)
    image = (np.arange(size * size) % 256).reshape(size, size)
    image = np.asarray(image, dtype=np.int64)
    rows = max(2, size // 7)
    image[1:rows, 1:size - 2] = 250
    image[:, size - 2] = 3
    lower = image[size // 2:, : size - 2]  # every level again, scrambled, in the lower half
    image[size // 2:, : size - 2] = np.resize(rng.permutation(256), lower.size).reshape(lower.shape)
    return image.astype(np.uint8)


def write_png(path: Path, image: np.ndarray, bits: int = 8, rgb: bool = False) -> Path:
    from PIL import Image

    if bits == 16:
        Image.fromarray(image.astype(np.uint16) * 257).save(path)
    elif rgb:
        Image.fromarray(np.stack([image] * 3, axis=-1)).save(path)
    else:
        Image.fromarray(image).save(path)
    return path


def write_jpeg(path: Path, image: np.ndarray, quality: int = 95) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path, quality=quality)
    return path


def write_nifti(path: Path, image: np.ndarray, dtype=np.uint8) -> Path:
    """NIfTI stores the column (x) axis first (ITK / MONAI SaveImage convention): the array is written transposed."""
    import nibabel as nib

    values = image.astype(np.uint16) * 257 if dtype == np.uint16 else image
    nib.save(nib.Nifti1Image(np.ascontiguousarray(values.T).astype(dtype), np.eye(4)), str(path))
    return path


def write_dicom(path: Path, image: np.ndarray, variant: str = "plain") -> Path:
    """A DX DICOM of ``image`` (uint8). Variants: ``plain`` (16-bit MONOCHROME2), ``monochrome1`` (inverted
    stored values), ``negative_slope`` (RescaleSlope -1, RescaleIntercept 65535), ``slope_intercept``
    (slope 0.5, intercept -1024), ``bits12`` (12 bits stored of 16), ``signed`` (int16 with intercept 32768)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    v = image.astype(np.int64)
    photometric, bits, slope, intercept = "MONOCHROME2", 16, None, None
    if variant == "plain":
        stored = (v * 257).astype(np.uint16)
    elif variant == "monochrome1":
        stored, photometric = (65535 - v * 257).astype(np.uint16), "MONOCHROME1"
    elif variant == "negative_slope":
        stored, slope, intercept = (65535 - v * 257).astype(np.uint16), -1.0, 65535.0
    elif variant == "slope_intercept":
        stored, slope, intercept = (v * 257).astype(np.uint16), 0.5, -1024.0
    elif variant == "bits12":
        stored, bits = np.rint(v * 4095 / 255).astype(np.uint16), 12
    elif variant == "signed":
        stored, slope, intercept = (v * 257 - 32768).astype(np.int16), 1.0, 32768.0
    else:
        raise ValueError(variant)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(stored, photometric, bits, generate_instance_uid=False)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A MedMNIST-layout npz whose train and val splits both hold ``images`` (uint8, (N, H, W))."""
    labels = np.asarray(labels).reshape(-1, 1).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=labels, val_images=images, val_labels=labels)
    return path
