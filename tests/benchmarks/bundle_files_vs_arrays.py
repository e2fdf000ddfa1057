"""Benchmark: the released bundle run by `python -m monai.bundle run` on image files vs the same model on the
same pixels as arrays (docs/benchmarks.md, "bundle on files vs arrays"; issue 17 item 1).

Takes a finished classification run (`python -m fedmed simulate --data POOL.npz --out RUN`), writes held-out
images as 8-bit PNG and 16-bit DICOM folders (tests/image_files.py: v -> v*257, MONOCHROME2), runs the bundle
on each folder and compares AUC, accuracy at the recorded decision threshold and the largest per-image
probability difference with the in-memory evaluation of the arrays (the path `fedmed.external` uses).
`--legacy` also runs the preprocessing bundles had before the image contract (MONAI LoadImage, per-image
min/max ScaleIntensity) for the "before" figure.

    nice -n 10 python tests/benchmarks/bundle_files_vs_arrays.py --run /tmp/contract_run \
        --pool ../shared/data/pneumoniamnist.npz --legacy --out /tmp/bundle_bench
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import image_files  # noqa: E402

LEGACY_PREPROCESSING = {"_target_": "Compose", "transforms": [  # inference.json before issue 17 (for the "before" row)
    {"_target_": "LoadImaged", "keys": "image", "image_only": True},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
    {"_target_": "Resized", "keys": "image", "spatial_size": "@image_size"},
    {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x.mean(dim=0, keepdim=True) if x.shape[0] == 3 else x[:1]"},
    {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
]}


def bundle_run(bundle: Path, folder: Path, out: Path) -> tuple[np.ndarray, list[str], float]:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                          "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
                          "--dataset_dir", str(folder), "--output_dir", str(out)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"monai.bundle run failed on {folder}:\n{run.stderr[-3000:]}")
    rows = list(csv.reader((out / "predictions.csv").open()))[1:]
    return np.array([[float(v) for v in r[1:]] for r in rows]), [Path(r[0]).name for r in rows], time.perf_counter() - start


def figures(task, probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    from fedmed.threshold import binary_metrics

    chosen = binary_metrics(probs[:, 1], labels, threshold)
    called = probs[:, 1] >= threshold
    return {"auc": round(task._auc(probs, labels), 4), "accuracy": round(chosen["accuracy"], 4),
            "normals_called_pneumonia": f"{int(np.sum(called & (labels == 0)))}/{int(np.sum(labels == 0))}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished simulate output folder (bundle/, external/, run_config.json)")
    parser.add_argument("--pool", help="the pool npz the run was partitioned from: its val split as collected is a second set")
    parser.add_argument("--out", default="/tmp/bundle_bench", help="work folder (replaced)")
    parser.add_argument("--legacy", action="store_true", help="also run the pre-contract preprocessing (the 'before' figures)")
    args = parser.parse_args()

    from fedmed import data, imaging
    from fedmed.networks import build_network
    from fedmed.provenance import load_model_weights
    from fedmed.tasks import build_task

    run, out = Path(args.run), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_config = json.loads((run / "run_config.json").read_text())
    task = build_task(run_config["task"])
    threshold = float((json.loads((run / "metrics.json").read_text()).get("decision_threshold") or {}).get("threshold", 0.5))
    network = build_network(run_config["network"])
    network.load_state_dict(load_model_weights(run / "bundle" / "models" / "model.pt"))
    bundles = {"contract": run / "bundle"}
    if args.legacy:
        legacy = out / "legacy_bundle"
        shutil.copytree(run / "bundle", legacy)
        config = json.loads((legacy / "configs" / "inference.json").read_text())
        config["image_size"] = [task.image_size, task.image_size]
        config["preprocessing"] = LEGACY_PREPROCESSING
        (legacy / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
        bundles["legacy (LoadImage + per-image min/max)"] = legacy

    sets = {"external-val": np.load(run / "external" / "external-val.npz")}
    raw = {"external-val": (sets["external-val"]["images"], sets["external-val"]["labels"].reshape(-1))}
    if args.pool:
        pool = np.load(args.pool)
        raw["pool val as collected"] = (pool["val_images"], pool["val_labels"].reshape(-1))
    results = []
    for set_name, (images, labels) in raw.items():
        labels = labels.astype(np.int64)
        images = images[:, 0] if images.ndim == 4 and images.shape[1] == 1 else images  # save_split keeps (N, 1, H, W)
        arrays = data.ImageSplit(imaging.contract_arrays(images, set_name, task.image_size), labels)
        loader = torch.utils.data.DataLoader(task.to_dataset(arrays), batch_size=256)
        expected, _labels, _loss = task.predict(network, loader, torch.device("cpu"))
        results.append({"set": set_name, "images": len(labels), "path": "arrays (in-memory evaluation)", "format": "npz",
                        **figures(task, expected, labels, threshold), "max_abs_prob_diff": 0.0})
        for fmt, write in (("png", image_files.write_png), ("dcm", image_files.write_dicom)):
            folder = out / set_name.replace(" ", "_") / fmt
            folder.mkdir(parents=True)
            for index, pixels in enumerate(images):
                write(folder / f"{index:05d}.{fmt}", pixels)
            for bundle_name, bundle in bundles.items():
                probs, names, seconds = bundle_run(bundle, folder, out / "pred" / set_name.replace(" ", "_") / fmt / bundle_name.split()[0])
                order = [int(Path(n).stem) for n in names]
                assert order == list(range(len(labels))), "predictions.csv rows out of order"
                results.append({"set": set_name, "images": len(labels), "path": f"bundle, {bundle_name}", "format": fmt,
                                **figures(task, probs, labels, threshold),
                                "max_abs_prob_diff": float(np.abs(probs - expected).max()), "seconds": round(seconds, 1)})
                print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"threshold": threshold, "results": results}, indent=2))
    print(f"\nthreshold {threshold}")
    print("| set | images | path | format | AUC | accuracy at threshold | normals called pneumonia | max abs prob diff vs arrays |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['set']} | {r['images']} | {r['path']} | {r['format']} | {r['auc']:.4f} | {r['accuracy']:.4f} | "
              f"{r['normals_called_pneumonia']} | {r['max_abs_prob_diff']:.2g} |")


if __name__ == "__main__":
    main()
