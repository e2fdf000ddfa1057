"""A JSON datalist given where an .npz pool is read gets a message naming the file and the format (issue 18)."""

import json

import pytest

from fedmed.data import DataError, load_npz
from fedmed.tasks import build_task

pytestmark = pytest.mark.unit


def test_a_json_datalist_passed_as_classification_data_is_named_not_called_pickled(tmp_path):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.png", "label": 0}], "validation": [{"image": "b.png", "label": 1}]}))
    task = build_task({"name": "classification", "args": {}})
    with pytest.raises(DataError) as info:
        task.prepare_simulation(2, tmp_path / "sites", data_path=str(datalist))
    message = str(info.value)
    assert "pickled" not in message
    assert f"data file {datalist} is JSON (a datalist?)" in message and "train_images" in message
    assert '"format": "datalist"' in message and "--job jobs/prostate_seg_fedavg" in message


def test_a_file_that_is_neither_json_nor_npz_says_what_was_expected(tmp_path):
    bogus = tmp_path / "pool.npz"
    bogus.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match=r"pool.npz is not a readable .npz archive \(not a zip file\); expected a MedMNIST-style .npz with train_images"):
        load_npz(bogus)
