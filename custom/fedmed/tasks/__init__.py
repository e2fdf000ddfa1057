"""What differs per learning task, chosen by configuration: ``{"name": ..., "args": {...}}``.

Every task offers the same small interface used by the shared trainer, executor, controller and
``simulate``:

- ``key_metric``: the validation metric the federation maximises (``val_auc``, ``val_dice``);
- ``load_site_data(data_config, site_name)`` -> ``(train_dataset, val_dataset)`` from a site's
  ``local/fedmed_site.json`` ``data`` object;
- ``loss()``, ``batch_to_device(batch, device)`` -> ``(inputs, targets)``;
- ``evaluate(model, loader, device, amp)`` -> metrics dict (``num_val_samples`` included);
- ``prepare_simulation(num_sites, out_dir, data_path, alpha, seed)`` -> per-site data configs;
- ``network_data_format(network_spec)`` -> the MONAI bundle metadata block.
"""

from __future__ import annotations

import importlib

TASKS = {
    "classification": "fedmed.tasks.classification.ClassificationTask",
    "segmentation": "fedmed.tasks.segmentation.SegmentationTask",
}


def build_task(spec: dict):
    """Instantiate the task a spec names."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in TASKS:
        raise ValueError(f"task spec {spec!r}: 'name' must be one of {', '.join(TASKS)}")
    module_name, _, class_name = TASKS[name].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return cls(**spec.get("args", {}))
    except TypeError as exc:
        raise ValueError(f"task spec {spec!r}: bad 'args' for {class_name} ({exc})") from exc
