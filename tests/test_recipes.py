"""FLARE 2.9 recipes: every jobs/<name>/job.py exports exactly the committed job folder; a recipe runs in SimEnv."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.jobfolder import JobFolder

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPTS = sorted(REPO.glob("jobs/*/job.py"))


def _load_job_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"job_{script.parent.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder_contents(path: Path) -> dict:
    """Every file FLARE reads in a job folder: JSON parsed (formatting aside), other app files as text."""
    contents = {name: value for name, value in JobFolder(path).load_all().items()}
    for file in sorted((path / "app").rglob("*")):
        if file.is_file() and file.suffix != ".json" and "__pycache__" not in file.parts:
            contents[str(file.relative_to(path))] = file.read_text()
    return contents


def _differences(exported, committed, path="") -> list[str]:
    if isinstance(exported, dict) and isinstance(committed, dict):
        out = []
        for key in sorted(set(exported) | set(committed)):
            if key not in committed:
                out.append(f"{path}/{key}: only in the export")
            elif key not in exported:
                out.append(f"{path}/{key}: only in the committed folder")
            else:
                out += _differences(exported[key], committed[key], f"{path}/{key}")
        return out
    if isinstance(exported, list) and isinstance(committed, list) and len(exported) == len(committed):
        return [d for i, (a, b) in enumerate(zip(exported, committed)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if exported == committed else [f"{path}: export {exported!r} != committed {committed!r}"]


def test_every_job_folder_has_a_job_py():
    folders = sorted(p.parent for p in REPO.glob("jobs/*/meta.json"))
    assert folders and [s.parent for s in JOB_SCRIPTS] == folders


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=[s.parent.name for s in JOB_SCRIPTS])
def test_job_py_exports_the_committed_job_folder(script, tmp_path):
    from fedmed.flare.recipes import export_job_folder

    recipe = _load_job_module(script).build_recipe()
    assert recipe.name == script.parent.name
    exported = export_job_folder(recipe, tmp_path / script.parent.name)
    committed = _folder_contents(script.parent)
    differences = _differences(_folder_contents(exported.path), committed)
    assert differences == [], (
        f"{script.parent.name}: the committed job folder differs from its job.py; change the settings in job.py, then "
        f"python {script.relative_to(REPO)} --export {script.parent.relative_to(REPO)}"
    )


def test_job_py_command_line_export_keeps_readme_and_job_py(tmp_path):
    job = tmp_path / "cxr_pneumonia_fedavg"
    job.mkdir()
    (job / "README.md").write_text("keep me")
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--export", str(job)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (job / "README.md").read_text() == "keep me"
    from fedmed.flare.recipes import export_job_folder

    in_process = export_job_folder(_load_job_module(REPO / "jobs/cxr_pneumonia_fedavg/job.py").build_recipe(), tmp_path / "in_process")
    assert _folder_contents(job) == _folder_contents(in_process.path)
    # FLARE's own convention writes ROOT/<name>/
    root = tmp_path / "root"
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--export", "--export-dir", str(root)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert JobFolder(root / "cxr_pneumonia_fedavg").load_all() == JobFolder(job).load_all()


def test_recipes_are_flare_recipes_and_check_their_settings(tmp_path):
    from nvflare.recipe.spec import Recipe

    from fedmed.flare.recipes import ClassificationFedAvgRecipe, RecipeError, SegmentationFedProxRecipe, configured

    module = _load_job_module(REPO / "jobs/cxr_pneumonia_fedavg/job.py")
    recipe = module.build_recipe({"num_rounds": 3})
    assert isinstance(recipe, Recipe) and isinstance(recipe, ClassificationFedAvgRecipe)
    recipe.export(str(tmp_path))  # FLARE's Recipe.export: tmp/<name>/
    server = JobFolder(tmp_path / "cxr_pneumonia_fedavg").load_server()
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    assert not (tmp_path / "cxr_pneumonia_fedavg" / "app" / "custom").exists(), "fedmed is pre-installed, never copied"
    with pytest.raises(RecipeError, match=r"unknown argument\(s\) learning_rate; valid: .*\blr\b"):
        configured("fedmed.flare.executor.FedMedExecutor", {"learning_rate": 0.1})
    with pytest.raises(RecipeError, match="num_rounds must be >= 1"):
        module.build_recipe({"num_rounds": 0})
    seg = _load_job_module(REPO / "jobs/prostate_seg_fedprox/job.py")
    with pytest.raises(RecipeError, match="fedprox_mu"):
        SegmentationFedProxRecipe(name="x", controller_args=seg.CONTROLLER_ARGS, executor_args={**seg.EXECUTOR_ARGS, "fedprox_mu": 0.0})
    with pytest.raises(RecipeError, match="expected 'classification'"):
        ClassificationFedAvgRecipe(name="x", controller_args=seg.CONTROLLER_ARGS, executor_args={})


@pytest.mark.slow
def test_a_recipe_runs_in_sim_env_with_two_sites_one_round(tmp_path):
    workspace = tmp_path / "ws"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--sites", "2", "--rounds", "1",
                             "--workspace", str(workspace)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((workspace / "outputs" / "metrics.json").read_text())
    assert metrics["finished"] is True and [r["contributors"] for r in metrics["rounds"]] == [["site-1", "site-2"]]
    assert (workspace / "outputs" / "bundle" / "models" / "model.pt").is_file()
    site_config = json.loads((workspace / "cxr_pneumonia_fedavg" / "local" / "fedmed_site.json").read_text())
    assert set(site_config["sites"]) == {"site-1", "site-2"}
    assert (workspace / "cxr_pneumonia_fedavg" / "server" / "simulate_job" / "app_server" / "fedmed").is_dir(), \
        "SimEnv must run in the given workspace (FLARE's default is /tmp/nvflare)"


def test_flare_recipe_helpers_add_filters_and_the_job_names_a_privacy_scope(tmp_path):
    from fedmed.flare.recipes import ClassificationFedAvgRecipe, configured

    module = _load_job_module(REPO / "jobs/cxr_pneumonia_fedavg/job.py")
    recipe = ClassificationFedAvgRecipe(name="cxr_compressed", controller_args=module.CONTROLLER_ARGS,
                                        executor_args=module.EXECUTOR_ARGS, meta={"scope": "compressed"})
    recipe.add_client_output_filter(configured("fedmed.flare.filters.Float16CompressFilter", {}), tasks=["train", "submit_model"])
    recipe.add_server_input_filter(configured("fedmed.flare.filters.Float16DecompressFilter", {}), tasks=["train", "submit_model"])
    from fedmed.flare.recipes import export_job_folder

    job = export_job_folder(recipe, tmp_path / "job")
    assert job.scope() == "compressed"
    (chain,) = job.load_client()["task_result_filters"]
    assert sorted(chain["tasks"]) == ["submit_model", "train"]
    assert chain["filters"] == [{"path": "fedmed.flare.filters.Float16CompressFilter", "args": {}}]
    assert [w["id"] for w in job.load_server()["workflows"]] == ["fedavg"]  # no cross_site_args: no cross-site workflow
    (server_chain,) = job.load_server()["task_result_filters"]
    assert server_chain["filters"][0]["path"] == "fedmed.flare.filters.Float16DecompressFilter"
