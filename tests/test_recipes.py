"""Job specs, the one writer and FLARE 2.9 recipes: every jobs/<name>/job.py spec writes exactly the committed job
folder, byte for byte; FLARE's own exporter writes the same for the recipe of every spec; a job.py run writes what
simulate writes."""

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


@pytest.mark.unit
@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=[s.parent.name for s in JOB_SCRIPTS])
def test_job_py_spec_writes_the_committed_job_folder_byte_for_byte(script, tmp_path):
    from fedmed.jobfolder import read_job_spec, write_job_folder

    spec = _load_job_module(script).SPEC
    assert spec.name == script.parent.name
    written = write_job_folder(spec, tmp_path / script.parent.name)
    differences = _differences(_folder_contents(written.path), _folder_contents(script.parent))
    assert differences == [], (
        f"{script.parent.name}: the committed job folder differs from its job.py; change the spec in job.py, then "
        f"python {script.relative_to(REPO)} --export {script.parent.relative_to(REPO)}"
    )
    for path in sorted(p for p in (tmp_path / script.parent.name).rglob("*") if p.is_file()):
        rel = path.relative_to(tmp_path / script.parent.name)
        assert path.read_bytes() == (script.parent / rel).read_bytes(), f"{rel} differs in formatting"
    assert read_job_spec(script.parent) == spec  # reading a job folder gives the spec back


def _flare_export(spec, root):
    from fedmed.flare.recipes import recipe_from_spec

    recipe_from_spec(spec).export(str(root))  # FLARE's own exporter: root/<name>/
    return root / spec.name


def _sorted_tasks(contents):
    for name, config in contents.items():
        if isinstance(config, dict):
            for kind in ("task_data_filters", "task_result_filters"):
                for chain in config.get(kind, []):
                    chain["tasks"] = sorted(chain["tasks"])  # FLARE exports a chain's task set in any order
    return contents


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=[s.parent.name for s in JOB_SCRIPTS])
def test_flares_exporter_writes_what_the_one_writer_writes(script, tmp_path):
    """The recipe (FLARE's Recipe API: components, filters) is the spec as FLARE objects: its export equals our folder,
    for every job and for a job with every variant (privacy filters, HE components, a simulated attack)."""
    from fedmed.jobfolder import write_job_folder
    from fedmed.jobspec import with_attacks, with_he, with_settings
    from fedmed.privacy.simulation import with_privacy_mode

    spec = _load_job_module(script).SPEC
    variants = [spec]
    if script.parent.name == "cxr_pneumonia_fedavg":
        dp, _ = with_privacy_mode(with_settings(spec, {"lr": 0.01}), "dp")
        variants += [with_attacks(dp, [{"site": "site-2", "kind": "scale", "value": -10.0}]), with_he(spec)]
    for i, variant in enumerate(variants):
        ours = _sorted_tasks(_folder_contents(write_job_folder(variant, tmp_path / f"ours{i}").path))
        flare = _sorted_tasks(_folder_contents(_flare_export(variant, tmp_path / f"flare{i}")))
        assert _differences(flare, ours) == [], f"variant {i}"


def test_job_py_command_line_export_keeps_readme_and_job_py(tmp_path):
    job = tmp_path / "cxr_pneumonia_fedavg"
    job.mkdir()
    (job / "README.md").write_text("keep me")
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--export", str(job)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (job / "README.md").read_text() == "keep me"
    assert _folder_contents(job) == _folder_contents(REPO / "jobs/cxr_pneumonia_fedavg")
    # FLARE's own convention writes ROOT/<name>/
    root = tmp_path / "root"
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--export", "--export-dir", str(root)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert JobFolder(root / "cxr_pneumonia_fedavg").load_all() == JobFolder(job).load_all()


def test_recipes_are_flare_recipes_and_check_their_settings(tmp_path):
    from nvflare.recipe.spec import Recipe

    from fedmed.flare.recipes import RecipeError, configured, recipe_from_spec
    from fedmed.jobspec import with_settings

    spec = _load_job_module(REPO / "jobs/cxr_pneumonia_fedavg/job.py").SPEC
    recipe = recipe_from_spec(with_settings(spec, {"num_rounds": 3}))
    assert isinstance(recipe, Recipe)
    recipe.export(str(tmp_path))  # FLARE's Recipe.export: tmp/<name>/
    server = JobFolder(tmp_path / "cxr_pneumonia_fedavg").load_server()
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    assert not (tmp_path / "cxr_pneumonia_fedavg" / "app" / "custom").exists(), "fedmed is pre-installed, never copied"
    with pytest.raises(RecipeError, match=r"unknown argument\(s\) learning_rate; valid: .*\blr\b"):
        configured("fedmed.flare.executor.FedMedExecutor", {"learning_rate": 0.1})
    with pytest.raises(RecipeError, match="num_rounds must be >= 1"):
        recipe_from_spec(with_settings(spec, {"num_rounds": 0}))


@pytest.mark.slow
def test_job_py_runs_in_sim_env_and_writes_what_simulate_writes(tmp_path):
    """python jobs/cxr_pneumonia_fedavg/job.py (FLARE's SimEnv) goes through the runner simulate uses: bundle,
    metrics.json with the external evaluation, report, provenance card, the run's job folder."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "jobs/cxr_pneumonia_fedavg/job.py"), "--sites", "2", "--rounds", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True and [r["contributors"] for r in metrics["rounds"]] == [["site-1", "site-2"]]
    assert metrics["external"], "the external hospitals were evaluated"
    for name in ("bundle/models/model.pt", "bundle/configs/inference.json", "report/report.html", "report/report.md",
                 "provenance.json", "models/global_model.pt", "job/meta.json", "job/app/config/config_fed_server.json"):
        assert (out / name).is_file(), name
    assert not (out / "INCOMPLETE").exists()
    assert JobFolder(out / "job").controller_args()["num_rounds"] == 1
    site_config = json.loads((out / "workspace" / "cxr_pneumonia_fedavg" / "local" / "fedmed_site.json").read_text())
    assert set(site_config["sites"]) == {"site-1", "site-2"}
    assert (out / "workspace" / "cxr_pneumonia_fedavg" / "server" / "simulate_job" / "app_server" / "fedmed").is_dir(), \
        "SimEnv must run in the given workspace (FLARE's default is /tmp/nvflare)"


def test_flare_recipe_filters_and_the_job_names_a_privacy_scope(tmp_path):
    from fedmed.flare.recipes import recipe_from_spec
    from fedmed.jobfolder import write_job_folder
    from fedmed.jobspec import with_filters, with_scope

    spec = _load_job_module(REPO / "jobs/cxr_pneumonia_fedavg/job.py").SPEC
    spec = with_scope(spec.replace(cross_site=None), "compressed")
    spec = with_filters(spec, "client", "task_result_filters", [{"path": "fedmed.flare.filters.Float16CompressFilter", "args": {}}],
                        ["train", "submit_model"])
    spec = with_filters(spec, "server", "task_result_filters", [{"path": "fedmed.flare.filters.Float16DecompressFilter", "args": {}}],
                        ["train", "submit_model"])
    recipe_from_spec(spec)  # every filter constructs
    job = write_job_folder(spec, tmp_path / "job")
    assert job.scope() == "compressed"
    (chain,) = job.load_client()["task_result_filters"]
    assert sorted(chain["tasks"]) == ["submit_model", "train"]
    assert chain["filters"] == [{"path": "fedmed.flare.filters.Float16CompressFilter", "args": {}}]
    assert [w["id"] for w in job.load_server()["workflows"]] == ["fedavg"]  # no cross_site: no cross-site workflow
    (server_chain,) = job.load_server()["task_result_filters"]
    assert server_chain["filters"][0]["path"] == "fedmed.flare.filters.Float16DecompressFilter"
