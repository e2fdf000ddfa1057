"""Preflight's data check: read a hospital's data with the job's own loaders before the site starts.

A datalist naming a missing image, a label of 5 for a 2-class job or an npz with the wrong keys
would otherwise pass preflight and stop the site only when the lead's job runs. This check uses the
loaders the job uses (``fedmed.tasks.build_task(task).load_arrays`` / ``load_site_data``, which call
``fedmed.data.load_datalist``, ``fedmed.data.load_npz`` and the segmentation task's MONAI transforms):

- npz: the whole file, through the job's loader (keys, shapes, label range, image size);
- datalist / msd: the top-level keys, every entry's keys, label and file (each problem names the
  datalist and the entry, e.g. ``training[12]``), and every image opened through the job's loader
  (one entry at a time, so every bad entry is reported, not only the first); ``--sample N`` opens
  at most N images per split (chosen evenly over the split) and still checks every entry's keys,
  label and file;
- counts per split and per class.

Which job: ``--job JOB_FOLDER`` (the folder the lead submits; its server config names the task),
else the main job for the data format (``jobs/cxr_pneumonia_fedavg``; ``jobs/prostate_seg_fedavg`` for
``msd``) when it is found beside the package or in the current folder, else that job's task as
shipped in this package (:data:`MAIN_TASKS`: a hospital kit carries no job folders); the output
names which.

Pure module (no FLARE import).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

MAIN_JOB = "jobs/cxr_pneumonia_fedavg"
SEGMENTATION_JOB = "jobs/prostate_seg_fedavg"
MAX_LISTED = 25  # problems printed per check; the count of the rest is given
SPLITS = ("training", "validation", "test")


# The main jobs' tasks, for a hospital kit that has no job folder (tests/test_data_check.py keeps them equal
# to the committed jobs' server configs).
MAIN_TASKS = {
    "classification": {"name": "classification",
                       "args": {"num_classes": 2, "image_size": 28, "class_names": ["normal", "pneumonia"]}},
    "segmentation": {"name": "segmentation",
                     "args": {"spatial_dims": 3, "in_channels": 1, "num_classes": 2, "class_names": ["background", "prostate"],
                              "roi_size": [32, 32, 32], "pixdim": [1.0, 1.0, 1.0], "orientation": "RAS", "crop_samples": 2,
                              "sw_batch_size": 4, "sw_overlap": 0.25, "modality": "MR"}},
}


# task args that change training, not how a site's data is read: left out of MAIN_TASKS
TRAINING_ONLY_ARGS = ("augmentation", "seed")


def data_spec(task_spec: dict) -> dict:
    """``task_spec`` without :data:`TRAINING_ONLY_ARGS` (what reading and checking the data depends on)."""
    args = {k: v for k, v in (task_spec.get("args") or {}).items() if k not in TRAINING_ONLY_ARGS}
    return {**task_spec, "args": args}


class DataCheckError(ValueError):
    pass


# ---- which task ---------------------------------------------------------------------------------


def _repo_job(name: str) -> Path | None:
    import fedmed

    for root in (Path.cwd(), Path(fedmed.__file__).resolve().parents[2]):
        if (root / name / "meta.json").is_file():
            return root / name
    return None


def task_spec_from_job(job_dir: str | Path) -> dict:
    """The task spec (``{"name": ..., "args": ...}``) a job folder's server config gives its workflow."""
    job = Path(job_dir)
    configs = sorted(job.glob("*/config/config_fed_server.json"))
    if not configs:
        raise DataCheckError(f"--job {job}: no */config/config_fed_server.json in it; pass a job folder (e.g. {MAIN_JOB})")
    for config in configs:
        try:
            server = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataCheckError(f"--job {job}: {config} is not valid JSON ({exc})") from exc
        for workflow in server.get("workflows", []):
            task = (workflow.get("args") or {}).get("task")
            if isinstance(task, dict) and "name" in task:
                return task
    raise DataCheckError(f"--job {job}: no workflow in {configs[0]} names a 'task'")


def choose_task(job: str | None, data_format: str) -> tuple[dict, str]:
    """(task spec, where it came from) for ``--job`` or the default."""
    if job:
        return task_spec_from_job(job), f"job {job}"
    default = SEGMENTATION_JOB if data_format == "msd" else MAIN_JOB
    found = _repo_job(default)
    if found:
        return task_spec_from_job(found), f"job {found} (default; pass --job for another)"
    name = "segmentation" if data_format == "msd" else "classification"
    return MAIN_TASKS[name], f"{default}'s task as shipped with this package (no job folder here; pass --job JOB_FOLDER)"


def describe_task(task) -> str:
    size = getattr(task, "image_size", None) or list(getattr(task, "roi_size", []))
    return (f"{type(task).__name__}: {task.num_classes} classes ({', '.join(task.class_names)}), "
            f"{'image size' if hasattr(task, 'image_size') else 'roi'} {size}")


# ---- the checks ----------------------------------------------------------------------------------


def _sample_indices(n: int, sample: int | None) -> list[int]:
    if sample is None or sample >= n:
        return list(range(n))
    if sample <= 0:
        return []
    step = n / sample
    return sorted({int(i * step) for i in range(sample)})


def _clean(message: str, temp: str, real: str, split: str, index: int) -> str:
    """A loader message about the one-entry temp datalist, told about the real file and entry."""
    message = message.replace(f"datalist {temp}", f"datalist {real}").replace(temp, real)
    for name in ("training", "validation"):
        message = message.replace(f"{name}[0]", f"{split}[{index}]").replace(f"{real}:{name}:", f"{real}: {split}[{index}]:")
    return message


class SiteDataCheck:
    """Run with :meth:`check`; ``problems`` (each naming the file and entry) and ``summary`` lines after."""

    def __init__(self, data_config: dict, site: str, task_spec: dict, sample: int | None = None):
        from fedmed.tasks import build_task

        self.data = data_config
        self.site = site
        self.task_spec = task_spec
        self.task = build_task(task_spec)
        self.kind = task_spec["name"]
        self.sample = sample
        self.problems: list[str] = []
        self.summary: list[str] = []

    def check(self) -> "SiteDataCheck":
        fmt = self.data.get("format")
        if fmt == "npz":
            self._check_npz()
        elif fmt in ("datalist", "msd"):
            self._check_datalist()
        elif fmt == "synthetic":
            self.summary.append("synthetic data (test data only): nothing to read")
        else:
            self.problems.append(f"site '{self.site}': data.format {fmt!r} is not one this check knows")
        return self

    # npz: the job's loader reads the whole file
    def _check_npz(self) -> None:
        from fedmed.data import DataError

        path = self.data["path"]
        if self.kind != "classification":
            self.problems.append(f"npz {path}: the job's task is {self.kind}; npz files hold classification data "
                                 f"(use format 'msd' with an MSD-style datalist)")
            return
        try:
            arrays = self.task.load_arrays(self.data)
            self.task.load_site_data(self.data, self.site)  # also checks the image size against the job
        except (DataError, ValueError, KeyError) as exc:
            self.problems.append(str(exc))
            return
        for split, part in (("train", arrays.train), ("val", arrays.val), ("test", arrays.test)):
            if part is not None:
                self.summary.append(f"{split}: {len(part)} images; {self._class_counts(part.labels.tolist())}")

    def _class_counts(self, labels) -> str:
        counts = Counter(int(v) for v in labels)
        names = self.task.class_names
        return "per class " + ", ".join(f"{names[c] if 0 <= c < len(names) else c} {counts.get(c, 0)}"
                                        for c in sorted(set(range(len(names))) | set(counts)))

    # datalist / msd: every entry's keys, label and file; the sampled entries through the job's loader
    def _check_datalist(self) -> None:
        path = Path(self.data["path"])
        try:
            datalist = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.problems.append(f"datalist {path} cannot be read as JSON ({exc})")
            return
        if not isinstance(datalist, dict):
            self.problems.append(f"datalist {path} must hold a JSON object with 'training' and 'validation' lists "
                                 f"(found a {type(datalist).__name__})")
            return
        keys = ", ".join(sorted(map(str, datalist))) or "none"
        for required in ("training", "validation"):
            if not isinstance(datalist.get(required), list) or not datalist[required]:
                self.problems.append(f"datalist {path}: top-level key '{required}' must be a non-empty list of "
                                     f"{{\"image\": ..., \"label\": ...}} entries (top-level keys found: {keys})")
        if self.problems:
            return
        root = Path(self.data.get("base_dir") or path.parent)
        for split in SPLITS:
            entries = datalist.get(split)
            if split == "test" and (not entries or self.kind != "classification"):  # segmentation reads no test split
                continue
            if not isinstance(entries, list):
                self.problems.append(f"datalist {path}: top-level key '{split}' must be a list")
                continue
            self._check_split(path, root, split, entries)

    def _check_split(self, path: Path, root: Path, split: str, entries: list) -> None:
        labels, opened, failed_before = [], 0, len(self.problems)
        wanted = set(_sample_indices(len(entries), self.sample))
        per_class = Counter()
        for index, entry in enumerate(entries):
            where = f"datalist {path}: {split}[{index}]"
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                found = ", ".join(sorted(map(str, entry))) if isinstance(entry, dict) else type(entry).__name__
                self.problems.append(f"{where} needs keys 'image' and 'label' (found: {found})")
                continue
            if self.kind == "classification":
                label = entry["label"]
                if isinstance(label, bool) or not isinstance(label, (int, float)) or label != int(label) \
                        or not 0 <= int(label) < self.task.num_classes:
                    self.problems.append(f"{where} ({entry['image']}): label {label!r} is not a class of this job "
                                         f"(0..{self.task.num_classes - 1}: {', '.join(self.task.class_names)})")
                    continue
                labels.append(int(label))
            missing = [f for f in self._files(entry) if not self._resolve(f, root).exists()]
            if missing:
                self.problems.append(f"{where}: file {self._resolve(missing[0], root)} does not exist")
                continue
            if index in wanted:
                opened += 1
                problem, classes = self._load_entry(path, root, split, index, entry)
                if problem:
                    self.problems.append(problem)
                else:
                    per_class.update(classes)
        bad = len(self.problems) - failed_before
        text = f"{split}: {len(entries)} entries, {opened} opened"
        if opened < len(entries):
            text += f" (--sample {self.sample})" if self.sample is not None else ""
        if self.kind == "classification":
            text += f"; {self._class_counts(labels)}"
        else:
            names = self.task.class_names
            text += "; opened volumes containing " + ", ".join(f"{names[c]} {per_class.get(c, 0)}" for c in range(len(names)))
        self.summary.append(text + (f"; {bad} problem(s)" if bad else ""))

    @staticmethod
    def _files(entry: dict) -> list[str]:
        files = []
        for key in ("image", "label"):
            value = entry.get(key)
            if isinstance(value, str):
                files.append(value)
            elif isinstance(value, list):
                files += [v for v in value if isinstance(v, str)]
        return files

    @staticmethod
    def _resolve(name: str, root: Path) -> Path:
        given = Path(name)
        return given if given.is_absolute() else root / given

    def _load_entry(self, path: Path, root: Path, split: str, index: int, entry: dict) -> tuple[str | None, list[int]]:
        """Load one entry through the job's own loader (a one-entry datalist, paths resolved as the job does)."""
        from fedmed.data import DataError

        with tempfile.TemporaryDirectory(prefix="fedmed-preflight-") as tmp:
            one = Path(tmp) / "datalist.json"
            one.write_text(json.dumps({"training": [entry], "validation": [entry]}))
            config = {**self.data, "path": str(one), "base_dir": str(root)}
            try:
                if self.kind == "classification":
                    arrays = self.task.load_arrays(config)
                    if arrays.train.images.shape[1:] != (1, self.task.image_size, self.task.image_size):
                        return (f"datalist {path}: {split}[{index}] ({entry['image']}): image loads as "
                                f"{arrays.train.images.shape[1:]}, the job expects (1, {self.task.image_size}, "
                                f"{self.task.image_size})"), []
                    return None, []
                _train, val = self.task.load_site_data(config, self.site)
                import torch

                return None, [int(v) for v in torch.unique(val.data[0]["label"]).tolist()]
            except (DataError, ValueError, KeyError, OSError) as exc:
                message = _clean(str(exc), str(one), str(path), split, index)
                if f"{split}[{index}]" not in message:
                    message = f"datalist {path}: {split}[{index}] ({entry.get('image')}): " + message.removeprefix(f"datalist {path}: ")
                return message, []


def check_site_data(data_config: dict, site: str, task_spec: dict, sample: int | None = None) -> SiteDataCheck:
    return SiteDataCheck(data_config, site, task_spec, sample).check()


# ---- preflight's hook ----------------------------------------------------------------------------


def preflight_data_check(kit_dir: str | Path, results: list[tuple[str, list[str]]], job: str | None = None,
                         sample: int | None = None, out=print) -> int:
    """Preflight's "site data" check for a hospital kit whose site config passed; prints OK/FAIL with the
    problems and the counts per split and class. Returns the number of failed checks (0 or 1)."""
    from fedmed.deploy import kit as kit_files
    from fedmed.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config

    kit = Path(kit_dir)
    try:
        info = kit_files.read_kit(kit)
    except kit_files.KitError:
        return 0
    if info.kind != "client" or any(name == "site config" and problems for name, problems in results):
        return 0
    try:
        config = load_site_config(kit / kit_files.LOCAL / SITE_CONFIG_FILE, info.name)
        if config["data"]["format"] == "synthetic":  # nothing to read (and no torch/MONAI import to wait for)
            out("  OK   site data (synthetic test data: nothing to read)")
            return 0
        spec, source = choose_task(job, config["data"]["format"])
        check = check_site_data(config["data"], info.name, spec, sample)
    except (SiteConfigError, DataCheckError, ValueError) as exc:
        out(f"  FAIL site data:\n       - {exc}")
        return 1
    package = Path(__import__("fedmed").__file__).resolve().parent
    header = f"site data ({config['data']['format']} {config['data'].get('path', '')}; task from {source}: " \
             f"{describe_task(check.task)}; read with the fedmed package at {package})"
    if check.problems:
        out(f"  FAIL {header}:")
        for problem in check.problems[:MAX_LISTED]:
            out(f"       - {problem}")
        if len(check.problems) > MAX_LISTED:
            out(f"       - ... and {len(check.problems) - MAX_LISTED} more problem(s)")
    else:
        out(f"  OK   {header}")
    for line in check.summary:
        out(f"         {line}")
    return 1 if check.problems else 0
