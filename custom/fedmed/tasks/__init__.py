"""What differs per learning task, chosen by configuration: ``{"name": ..., "args": {...}}``.

Every task implements :class:`Task` (a ``typing.Protocol``), the interface used by the shared
trainer, executor, controller and the runner:

- ``key_metric``: the validation metric the federation maximises (``val_auc``, ``val_dice``);
- ``load_site_data(data_config, site_name)`` -> ``(train_dataset, val_dataset)`` from a site's
  ``local/fedmed_site.json`` ``data`` object;
- ``loss()``, ``batch_to_device(batch, device)`` -> ``(inputs, targets)``;
- ``evaluate(model, loader, device, amp)`` -> metrics dict (``num_val_samples`` included);
- ``prepare_simulation(num_sites, out_dir, data_path, alpha, seed)`` -> per-site data configs;
- ``network_data_format(network_spec)`` -> the MONAI bundle metadata block;
  ``inference_postprocessing()`` -> the bundle's postprocessing.

Optional capabilities are protocols of their own, checked with ``isinstance``:
:class:`ExternalEvaluation` (held-out external hospitals: ``load_external``, ``external_metrics``)
and :class:`WindowedInference` (``inference_config()``, e.g. sliding-window inference).
:func:`build_task` refuses a class that does not implement :class:`Task`, naming what it lacks.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """The task contract (see the module docstring)."""

    key_metric: str

    def load_site_data(self, data_config: dict, site_name: str = "?") -> tuple[Any, Any]: ...

    def prepare_simulation(self, num_sites: int, out_dir, data_path=None, alpha: float = 0.5, seed: int = 0): ...

    def loss(self) -> Any: ...

    def batch_to_device(self, batch, device) -> tuple[Any, Any]: ...

    def evaluate(self, model, loader, device, amp: bool = False) -> dict: ...

    def network_data_format(self, network_spec: dict) -> dict: ...

    def inference_postprocessing(self) -> dict: ...


TASK_MEMBERS = ("key_metric", "load_site_data", "prepare_simulation", "loss", "batch_to_device", "evaluate",
                "network_data_format", "inference_postprocessing")


@runtime_checkable
class ExternalEvaluation(Protocol):
    """A task whose models can be scored on held-out external hospitals (``fedmed.external``)."""

    def load_external(self, path) -> Any: ...

    def external_metrics(self, model, dataset, device, threshold: float | None = None) -> dict: ...


@runtime_checkable
class WindowedInference(Protocol):
    """A task whose bundle declares its own inference (e.g. sliding window over volumes)."""

    def inference_config(self) -> dict: ...

TASKS = {
    "classification": "fedmed.tasks.classification.ClassificationTask",
    "segmentation": "fedmed.tasks.segmentation.SegmentationTask",
}


def build_task(spec: dict) -> Task:
    """Instantiate the task a spec names (a :class:`Task`)."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in TASKS:
        raise ValueError(f"task spec {spec!r}: 'name' must be one of {', '.join(TASKS)}")
    module_name, _, class_name = TASKS[name].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        task = cls(**spec.get("args", {}))
    except TypeError as exc:
        raise ValueError(f"task spec {spec!r}: bad 'args' for {class_name} ({exc})") from exc
    if not isinstance(task, Task):
        missing = [member for member in TASK_MEMBERS if not hasattr(task, member)]
        raise TypeError(f"task {TASKS[name]} does not implement fedmed.tasks.Task (lacks {', '.join(missing)})")
    return task
