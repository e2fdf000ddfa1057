"""External validation: the run's models on hospitals that took no part in training or selection.

Pure module (no FLARE). ``simulate`` keeps the pool's held-out splits as external hospitals
(``OUT/external/<name>.npz``, see :func:`fedmed.data.partition_sites`); no site's config names
them and the server never sees them, so neither training, the best-model choice nor the decision
threshold can depend on them. A run on an npz pool has two proxies built from the pool's val split:
``external-val`` (a scanner profile of its own: an exposure curve like the sites', saturated near
0.99 AUC) and ``external-val-acq`` (an acquisition gap no site has: lower resolution, another
exposure curve, quantum noise and positioning, :func:`fedmed.data.acquisition_hospital`); both are
reported. After the run, this module evaluates on them

- the released federated model (``models/global_model.pt``, the bundle's model) at the decision
  threshold chosen on the sites' validation data (``fedmed.threshold``, in ``metrics.json``),
- the best-on-site-validation global model (``models/best_global_model.pt``),
- with ``--baselines``: every local-only model and the pooled model (``baselines.json``'s
  ``external`` block, each at a threshold chosen on its own validation data),

and writes the figures into ``OUT/metrics.json`` under ``external``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

from fedmed.atomic import write_json

EXTERNAL_DIR = "external"
FEDERATED = "global_model"
BEST_FEDERATED = "best_global_model"
# what each external set simulate writes is (metrics.json external.sets[name].what)
SET_DESCRIPTIONS = {
    "external-val": "the pool's val split with a scanner exposure curve of its own (the sites differ the same way)",
    "external-val-acq": "the pool's val split re-acquired with a gap no site has: lower resolution, another exposure "
                        "curve, heel effect, quantum noise, positioning (fedmed.data.AcquisitionProfile)",
    "external-test": "the pool's test split as collected",
}


def external_sets(out_dir: str | Path) -> dict[str, Path]:
    """``{name: path}`` of the external sets ``simulate`` wrote into ``out_dir/external``."""
    folder = Path(out_dir) / EXTERNAL_DIR
    return {path.stem: path for path in sorted(folder.glob("*.npz"))} if folder.is_dir() else {}


def evaluate_run(out_dir: str | Path, log: Callable[[str], None] = print) -> dict | None:
    """Evaluate a finished run's models on its external sets; update ``metrics.json``; return the block."""
    import torch

    from fedmed.networks import build_network
    from fedmed.provenance import load_model_weights
    from fedmed.tasks import ExternalEvaluation, build_task

    out_dir = Path(out_dir)
    sets = external_sets(out_dir)
    if not sets:
        return None
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    run_config = json.loads((out_dir / "run_config.json").read_text())
    task = build_task(run_config["task"])
    if not isinstance(task, ExternalEvaluation):
        return None
    threshold = (metrics.get("decision_threshold") or {}).get("threshold")
    datasets = {name: task.load_external(path) for name, path in sets.items()}
    network = build_network(run_config["network"])
    results: dict[str, dict] = {}
    for name, file in ((FEDERATED, "global_model.pt"), (BEST_FEDERATED, "best_global_model.pt")):
        path = out_dir / "models" / file
        if not path.is_file():
            continue
        network.load_state_dict(load_model_weights(path))
        for set_name, dataset in datasets.items():
            results.setdefault(set_name, {})[name] = task.external_metrics(network, dataset, torch.device("cpu"), threshold)
    baselines_path = out_dir / "baselines.json"
    if baselines_path.is_file():
        for set_name, by_model in json.loads(baselines_path.read_text()).get("external", {}).items():
            results.setdefault(set_name, {}).update(by_model)
    block = {
        "what": "models evaluated on hospitals no site trained on, validated on or selected with",
        "decision_threshold": threshold,
        "sets": {name: {"file": f"{EXTERNAL_DIR}/{path.name}", "num_images": len(datasets[name]),
                        **({"what": SET_DESCRIPTIONS[name]} if name in SET_DESCRIPTIONS else {})}
                 for name, path in sets.items()},
        "results": results,
    }
    metrics["external"] = block
    write_json(metrics_path, metrics)
    for line in summary_lines(block):
        log(line)
    return block


def summary_lines(block: Mapping) -> list[str]:
    """One line per (external set, model): AUC and accuracy at the model's threshold."""
    lines = []
    for set_name, by_model in block.get("results", {}).items():
        lines.append(f"external hospital {set_name} ({block['sets'].get(set_name, {}).get('num_images', '?')} images):")
        for model, figures in by_model.items():
            lines.append(
                f"  {model}: AUC {figures['auc']:.4f}, accuracy {figures['accuracy']:.4f}"
                + (f" at threshold {figures['threshold']:.2f}" if "threshold" in figures else "")
            )
    return lines
