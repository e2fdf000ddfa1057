"""Atomic writes: the target is the old file or the complete new one, and no temp file is left."""

import json

import pytest

from fedmed.atomic import atomic_path, write_json

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def test_write_json_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"round": 1})
    write_json(target, {"round": 2, "auc": 0.9})
    assert json.loads(target.read_text()) == {"round": 2, "auc": 0.9}
    assert target.read_text().endswith("\n")
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "card.json"
    write_json(target, {"intact": True})
    with pytest.raises(ValueError):
        write_json(target, {"auc": float("nan")}, allow_nan=False)
    assert json.loads(target.read_text()) == {"intact": True}
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_atomic_path_keeps_the_suffix_and_hides_partial_output(tmp_path):
    target = tmp_path / "image.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"half a volume")
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []
