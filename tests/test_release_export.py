"""`fedmed.results.export_run_outputs` exports the released model, for a run from before the release gate too."""

import json

import pytest
import torch

from fedmed.networks import build_network
from fedmed.provenance import weights_sha256
from fedmed.results import ResultsError, export_run_outputs

NETWORK = {"name": "small_cnn", "args": {"in_channels": 1, "num_classes": 2, "width": 8}}


def _server_folder(root, medians, release=None):
    """A finished run's app_server/ with global_model.pt (final) and best_global_model.pt, no release block
    unless given (a result downloaded from a deployment that ran before the gate existed)."""
    source = root / "app_server" / "fedmed"
    source.mkdir(parents=True)
    (source / "run_config.json").write_text(json.dumps({
        "job_name": "cxr", "network": NETWORK, "task": {"name": "classification", "args": {"num_classes": 2, "image_size": 28}}}))
    evaluations = [{"model_version": v, "sites": {"site-1": {"val_auc": m}}, "median_val_auc": m, "mean_val_auc": m}
                   for v, m in enumerate(medians)]
    best = max(range(len(medians)), key=lambda v: (medians[v], -v))
    metrics = {"key_metric": "val_auc", "num_rounds": len(medians) - 1, "sites": ["site-1"], "rounds": [],
               "evaluations": evaluations, "best": {"model_version": best}, "finished": True}
    if release:
        metrics["release"] = release
    (source / "metrics.json").write_text(json.dumps(metrics))
    final, best_model = build_network(NETWORK, seed=1).state_dict(), build_network(NETWORK, seed=2).state_dict()
    torch.save(final, source / "global_model.pt")
    torch.save(best_model, source / "best_global_model.pt")
    return root / "app_server", weights_sha256(final), weights_sha256(best_model)


def _sha(path):
    return weights_sha256(torch.load(path, map_location="cpu", weights_only=True))


def test_a_run_from_before_the_gate_exports_its_best_version_when_the_final_one_fell_back(tmp_path):
    app, final_sha, best_sha = _server_folder(tmp_path / "run", [0.5, 0.9, 0.7])
    metrics = export_run_outputs(app, tmp_path / "out")
    assert metrics["release"]["action"] == "rollback" and metrics["release"]["version"] == 1
    assert "at export" in metrics["release"]["decided"]
    assert _sha(tmp_path / "out" / "models" / "global_model.pt") == best_sha
    assert _sha(tmp_path / "out" / "models" / "final_global_model.pt") == final_sha
    assert _sha(tmp_path / "out" / "bundle" / "models" / "model.pt") == best_sha
    bundle_meta = json.loads((tmp_path / "out" / "bundle" / "configs" / "metadata.json").read_text())
    assert bundle_meta["fedmed"]["release"]["version"] == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["release"]["version"] == 1


def test_a_gated_run_exports_global_model_pt_as_the_release(tmp_path):
    release = {"action": "final", "version": 2, "reason": "within", "model_file": "global_model.pt"}
    app, final_sha, _ = _server_folder(tmp_path / "run", [0.5, 0.9, 0.89], release=release)
    metrics = export_run_outputs(app, tmp_path / "out")
    assert metrics["release"] == release
    assert _sha(tmp_path / "out" / "bundle" / "models" / "model.pt") == final_sha
    assert not (tmp_path / "out" / "models" / "final_global_model.pt").exists()


def test_a_collapsed_run_from_before_the_gate_is_not_exported(tmp_path):
    app, _, _ = _server_folder(tmp_path / "run", [0.8, 0.5, 0.6])
    with pytest.raises(ResultsError, match="release gate: collapse: no trained version beats the initial model"):
        export_run_outputs(app, tmp_path / "out")
    assert not (tmp_path / "out" / "bundle").exists()
