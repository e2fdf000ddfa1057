"""One image contract (issue 17 item 1): the same pixels as an npz row, a PNG (8/16-bit, RGB), a JPEG, a
NIfTI and 16-bit DICOMs (MONOCHROME1, rescale slope/intercept, 12 bits stored, signed) reach the network as
the same tensor in training, evaluation and the bundle; nothing is transposed or scaled per image."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed import data, imaging
from fedmed.bundle import write_bundle
from fedmed.networks import build_network
from fedmed.tasks import build_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image_files as files  # noqa: E402

SIZE = 28
TASK = {"name": "classification", "args": {"num_classes": 2, "image_size": SIZE, "class_names": ["normal", "pneumonia"]}}
NET = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}
DICOM_VARIANTS = ("plain", "monochrome1", "negative_slope", "slope_intercept", "signed")
JPEG_TOLERANCE = 0.05  # quality 95: measured max 0.024 (6 gray levels) on this image; a transposed read is ~0.37 off on average


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return files.asymmetric_image(SIZE)


@pytest.fixture(scope="module")
def written(tmp_path_factory, image) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    out = {
        "png": files.write_png(folder / "gray8.png", image),
        "png16": files.write_png(folder / "gray16.png", image, bits=16),
        "png_rgb": files.write_png(folder / "rgb.png", image, rgb=True),
        "nifti": files.write_nifti(folder / "gray.nii.gz", image),
        "nifti16": files.write_nifti(folder / "gray16.nii", image, dtype=np.uint16),
        "jpeg": files.write_jpeg(folder / "gray.jpg", image),
        "dicom_bits12": files.write_dicom(folder / "bits12.dcm", image, "bits12"),
    }
    for variant in DICOM_VARIANTS:
        out[f"dicom_{variant}"] = files.write_dicom(folder / f"{variant}.dcm", image, variant)
    files.write_npz(folder / "rows.npz", np.stack([image, image[::-1]]), [0, 1])
    out["npz"] = folder / "rows.npz"
    return out


EXACT = ["png", "png16", "png_rgb", "nifti", "nifti16", *(f"dicom_{v}" for v in DICOM_VARIANTS)]


def _npz_row(written) -> np.ndarray:
    return data.load_npz(written["npz"], image_size=SIZE).train.images[0]


@pytest.mark.unit
@pytest.mark.parametrize("fmt", EXACT)
def test_every_lossless_format_gives_the_npz_rows_tensor_exactly(written, image, fmt):
    row = _npz_row(written)
    assert row.shape == (1, SIZE, SIZE) and row.dtype == np.float32
    np.testing.assert_array_equal(row[0], image.astype(np.float32) / 255.0)  # the npz row: uint8 / 255, as stored
    np.testing.assert_array_equal(imaging.read_image(written[fmt], SIZE), row)


@pytest.mark.unit
def test_lossy_and_12_bit_files_match_within_their_quantisation_and_not_transposed(written, image):
    row = _npz_row(written)[0]
    jpeg = imaging.read_image(written["jpeg"], SIZE)[0]
    assert np.abs(jpeg - row).max() < JPEG_TOLERANCE
    bits12 = imaging.read_image(written["dicom_bits12"], SIZE)[0]
    assert np.abs(bits12 - row).max() <= 0.5 / 4095 + 1e-6  # 12 bits stored, scaled by BitsStored (not by 65535)
    for read in (jpeg, bits12):
        assert np.abs(read - row.T).mean() > 5 * JPEG_TOLERANCE  # a transposed read is far outside the tolerance


@pytest.mark.unit
def test_a_transposed_or_min_max_scaled_read_fails_the_check(written, image):
    """The check itself can fail: MONAI's default LoadImage chain (PNG transposed, per-image min/max) does not
    give the contract's tensor; the contract's does, for the asymmetric image and for a dim image."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, ScaleIntensity

    legacy = np.asarray(Compose([LoadImage(image_only=True), EnsureChannelFirst(), ScaleIntensity(0.0, 1.0)])(str(written["png"])))
    row = _npz_row(written)
    assert not np.allclose(legacy, row, atol=0.05) and np.allclose(legacy[0].T, row[0], atol=0.01)
    ours = imaging.read_image(written["png"], SIZE)
    assert ours[0, 2, SIZE // 2] == pytest.approx(250 / 255) and ours[0, SIZE // 2, 2] != ours[0, 2, SIZE // 2]
    dim = files.write_png(written["png"].parent / "dim.png", (image // 3).astype(np.uint8))
    read = imaging.read_image(dim, SIZE)
    assert read.max() == pytest.approx((image // 3).max() / 255.0)  # not stretched to 1 by its own maximum


@pytest.mark.unit
def test_monochrome1_and_a_negative_slope_are_honoured_not_ignored(written):
    """Both files store inverted values: reading the stored values as MONOCHROME2 without the modality LUT
    would give 1 - image."""
    import pydicom

    row = _npz_row(written)[0]
    for variant in ("monochrome1", "negative_slope"):
        stored = pydicom.dcmread(written[f"dicom_{variant}"]).pixel_array.astype(np.float64) / 65535
        np.testing.assert_allclose(stored, 1.0 - row, atol=1e-6)
        np.testing.assert_array_equal(imaging.read_image(written[f"dicom_{variant}"], SIZE)[0], row)


@pytest.mark.unit
def test_training_evaluation_and_the_bundles_preprocessing_give_the_same_tensor(tmp_path, written):
    """PNG, 16-bit DICOM, NIfTI and the npz row: training data (datalist and npz site configs), the external
    (evaluation) set and the bundle's own inference.json preprocessing (parsed by MONAI) agree exactly."""
    from monai.bundle import ConfigParser

    task = build_task(TASK)
    row = _npz_row(written)
    train_npz, val_npz = task.load_site_data({"format": "npz", "path": str(written["npz"])}, "site-1")
    assert torch.equal(train_npz[0][0], torch.from_numpy(row)) and torch.equal(val_npz[0][0], torch.from_numpy(row))
    data.save_split(tmp_path / "external.npz", data.ImageSplit(row[None], np.array([0])))
    assert torch.equal(task.load_external(tmp_path / "external.npz")[0][0], torch.from_numpy(row))

    entries = [{"image": str(written[f]), "label": 0} for f in ("png", "dicom_plain", "dicom_monochrome1", "nifti")]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": entries, "validation": entries}))
    train, val = task.load_site_data({"format": "datalist", "path": str(datalist), "allow_absolute_paths": True}, "site-1")
    for dataset in (train, val):
        for index in range(len(entries)):
            assert torch.equal(dataset[index][0], torch.from_numpy(row)), entries[index]

    bundle = write_bundle(tmp_path / "bundle", NET, build_network(NET, seed=0).state_dict(),
                          task.network_data_format(NET), postprocessing=task.inference_postprocessing())
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    for item in entries:
        tensor = preprocessing({"image": item["image"]})["image"]
        assert tensor.dtype == torch.float32 and torch.equal(tensor.as_tensor(), torch.from_numpy(row)), item
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    contract = metadata["image_contract"]
    assert contract["implementation"] == "fedmed.imaging.ImageContractd" and contract["spatial_size"] == [SIZE, SIZE]
    assert "MONOCHROME1" in contract["intensity"] and "row-major" in contract["orientation"]


@pytest.mark.unit
def test_the_metadata_schema_accepts_the_contract_and_refuses_an_incomplete_one(tmp_path):
    from monai.bundle import verify_metadata

    task = build_task(TASK)
    bundle = write_bundle(tmp_path / "bundle", NET, build_network(NET, seed=0).state_dict(),
                          task.network_data_format(NET), postprocessing=task.inference_postprocessing())
    schema = str(bundle / "configs" / "metadata_schema.json")
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=schema)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    del metadata["image_contract"]["orientation"]
    (tmp_path / "bad.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="orientation"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=schema)


@pytest.mark.unit
def test_files_and_arrays_of_another_size_are_resized_alike(tmp_path):
    big = files.asymmetric_image(56, seed=3)
    png = files.write_png(tmp_path / "big.png", big)
    dcm = files.write_dicom(tmp_path / "big.dcm", big)
    files.write_npz(tmp_path / "big.npz", np.stack([big, big]), [0, 1])
    row = data.load_npz(tmp_path / "big.npz", image_size=SIZE).train.images[0]
    assert row.shape == (1, SIZE, SIZE)
    np.testing.assert_array_equal(imaging.read_image(png, SIZE), row)
    np.testing.assert_array_equal(imaging.read_image(dcm, SIZE), row)
    np.testing.assert_allclose(row[0, 0, 0], big[:2, :2].mean() / 255.0, atol=1e-6)  # area: 2x2 mean, row-major


@pytest.mark.unit
def test_images_without_a_declared_range_are_refused_naming_the_file(tmp_path, image):
    import nibabel as nib

    signed = tmp_path / "signed.nii.gz"
    nib.save(nib.Nifti1Image(image.T.astype(np.int16) * 16, np.eye(4)), str(signed))
    with pytest.raises(imaging.ImageContractError, match=r"signed\.nii\.gz: int16 .*cal_min/cal_max"):
        imaging.read_image(signed, SIZE)
    declared = nib.Nifti1Image(image.T.astype(np.int16) * 16, np.eye(4))
    declared.header["cal_min"], declared.header["cal_max"] = 0, 255 * 16
    nib.save(declared, str(tmp_path / "declared.nii.gz"))
    np.testing.assert_allclose(imaging.read_image(tmp_path / "declared.nii.gz", SIZE)[0], image / 255.0, atol=1e-6)
    floats = tmp_path / "float.nii"
    nib.save(nib.Nifti1Image(image.T.astype(np.float32), np.eye(4)), str(floats))
    with pytest.raises(imaging.ImageContractError, match=r"float\.nii: floating-point pixels must lie in \[0, 1\]"):
        imaging.read_image(floats, SIZE)
    (tmp_path / "scan.gif").write_bytes(b"GIF89a")
    with pytest.raises(imaging.ImageContractError, match=r"scan\.gif: unsupported image type \.gif"):
        imaging.read_image(tmp_path / "scan.gif", SIZE)
    (tmp_path / "x.dcm").write_bytes(b"not dicom")
    entries = [{"image": "x.dcm", "label": 0}]
    (tmp_path / "d.json").write_text(json.dumps({"training": entries, "validation": entries}))
    with pytest.raises(data.DataError, match=r"training\[0\]: cannot read image .*x\.dcm: not a readable DICOM"):
        data.load_datalist(tmp_path / "d.json", image_size=SIZE)
    with pytest.raises(data.DataError, match="int32 pixels 0..4080 have no declared range"):
        data.load_npz(files.write_npz(tmp_path / "wide.npz", np.stack([image, image]).astype(np.int32) * 16, [0, 1]))


# ---- monai.bundle run on files vs the in-memory evaluation of the same pixels ------------------------------


@pytest.mark.slow
def test_monai_bundle_run_on_png_and_dicom_folders_matches_the_in_memory_evaluation(tmp_path):
    task = build_task(TASK)
    images = np.stack([files.asymmetric_image(SIZE, seed=s) for s in range(3)] + [files.asymmetric_image(SIZE, seed=9).T])
    net = build_network(NET, seed=1)
    bundle = write_bundle(tmp_path / "bundle", NET, net.state_dict(), task.network_data_format(NET),
                          postprocessing=task.inference_postprocessing())
    files.write_npz(tmp_path / "pool.npz", images, [0, 1, 0, 1])
    arrays = data.load_npz(tmp_path / "pool.npz", image_size=SIZE).val
    loader = torch.utils.data.DataLoader(task.to_dataset(arrays), batch_size=8)
    expected, _labels, _loss = task.predict(net, loader, torch.device("cpu"))
    for kind, write in (("png", files.write_png), ("dcm", files.write_dicom)):
        folder = tmp_path / kind
        folder.mkdir()
        for index, pixels in enumerate(images):
            write(folder / f"img{index}.{kind}", pixels)
        run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                              "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
                              "--dataset_dir", str(folder), "--output_dir", str(tmp_path / f"out_{kind}")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # CPU like the reference (no fp16 autocast)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = list(csv.reader((tmp_path / f"out_{kind}" / "predictions.csv").open()))
        assert [Path(r[0]).name for r in rows[1:]] == [f"img{i}.{kind}" for i in range(len(images))]
        got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=kind)  # the CSV keeps 6 decimals


@pytest.mark.unit
def test_a_bundle_written_before_the_contract_is_refused_by_name():
    import fedmed.bundle

    with pytest.raises(AttributeError, match="predates the image contract"):
        fedmed.bundle.to_channels  # what pre-contract inference.json files call after LoadImage
