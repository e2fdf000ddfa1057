"""Turn a finished job's server output into the user-facing output folder.

Used by ``simulate`` (on the simulator workspace) and ``rehearse`` (on a job result downloaded
from a real deployment), so both produce the same layout:

    OUT/bundle/            MONAI bundle of the final global model
    OUT/models/            global_model.pt (final) and best_global_model.pt
    OUT/metrics.json       per-round, per-site metrics
    OUT/tb_events/<site>/  TensorBoard event files
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fedmed.atomic import write_json
from fedmed.bundle import write_bundle
from fedmed.provenance import CARD_FILENAME, bundle_metadata
from fedmed.tasks import build_task

SERVER_OUTPUT_DIR = "fedmed"  # inside the server's app folder
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_global_model.pt"


class ResultsError(RuntimeError):
    pass


def find_server_app_dir(root: str | Path) -> Path:
    """Find the folder holding ``fedmed/run_config.json`` below ``root`` (a workspace or a download)."""
    root = Path(root)
    if (root / SERVER_OUTPUT_DIR / RUN_CONFIG_FILE).is_file():
        return root
    matches = sorted(p.parent.parent for p in root.rglob(f"{SERVER_OUTPUT_DIR}/{RUN_CONFIG_FILE}"))
    if not matches:
        raise ResultsError(
            f"no {SERVER_OUTPUT_DIR}/{RUN_CONFIG_FILE} under {root}: the job did not run to its first round "
            f"(see the server log)"
        )
    return matches[0]


def export_run_outputs(server_app_dir: str | Path, out_dir: str | Path, tb_events_dir: str | Path | None = None) -> dict:
    """Write bundle, models, metrics and TensorBoard events from a finished run into ``out_dir``.

    Returns the metrics dict.
    """
    server_app_dir = Path(server_app_dir)
    source = server_app_dir / SERVER_OUTPUT_DIR
    out_dir = Path(out_dir)
    for required in (RUN_CONFIG_FILE, METRICS_FILE, GLOBAL_MODEL_FILE):
        if not (source / required).is_file():
            raise ResultsError(f"{source / required} is missing: the job did not finish; see the server log")
    run_config = json.loads((source / RUN_CONFIG_FILE).read_text())
    metrics = json.loads((source / METRICS_FILE).read_text())
    if not metrics.get("finished"):
        raise ResultsError(f"{source / METRICS_FILE} says the run did not finish; see the server log")
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = out_dir / "models"
    models_dir.mkdir(exist_ok=True)
    for name in (GLOBAL_MODEL_FILE, BEST_MODEL_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, models_dir / name)
    for extra in sorted(source.glob("*.json")):
        if extra.name not in (METRICS_FILE,):
            shutil.copy2(extra, out_dir / extra.name)

    task = build_task(run_config["task"])
    state = torch.load(source / GLOBAL_MODEL_FILE, map_location="cpu", weights_only=True)
    final = metrics.get("evaluations", [{}])[-1]
    write_bundle(
        out_dir / "bundle",
        run_config["network"],
        state,
        task.network_data_format(run_config["network"]),
        name=run_config.get("job_name", "fedmed model"),
        description=f"{run_config['task']['name']} model trained by federated averaging over "
        f"{len(metrics.get('sites', []))} sites for {metrics.get('num_rounds')} rounds",
        postprocessing=task.inference_postprocessing(),
        inference_config=task.inference_config() if hasattr(task, "inference_config") else None,  # e.g. sliding window
        extra_metadata={"fedmed": {"rounds": metrics.get("num_rounds"), "sites": metrics.get("sites", []),
                                   "final_validation": {k: v for k, v in final.items() if k != "sites"}},
                        **bundle_metadata(source / CARD_FILENAME)},  # points to OUT/provenance.json
    )
    tb_events_dir = Path(tb_events_dir) if tb_events_dir else server_app_dir.parent / "tb_events"
    if tb_events_dir.is_dir():
        shutil.copytree(tb_events_dir, out_dir / "tb_events", dirs_exist_ok=True)
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics
