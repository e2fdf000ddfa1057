"""``python -m fedmed audit-leakage``: play an honest-but-curious server against each privacy mode.

Runs :func:`fedmed.privacy.leakage.audit` (gradient inversion of a site's round-1 update, and a
loss-threshold membership-inference attack) on synthetic chest X-rays or an npz (``--data``), and
writes into ``--out``:

- ``leakage.json``: per mode, PSNR / SSIM of the reconstructions against the true images (MONAI
  metrics, per image and mean) and the membership-inference AUC, with the attack's settings;
- ``reconstructions.png``: the true images (first row) beside each mode's reconstructions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedmed.atomic import atomic_path, write_json
from fedmed.privacy.leakage import AUDIT_MODES, DPAudit, audit

LEAKAGE_FILE = "leakage.json"
RECONSTRUCTIONS_FILE = "reconstructions.png"


def load_images(data: str | None, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` training images and labels: from an npz (``train_images`` / ``train_labels``,
    MedMNIST layout) or synthetic chest X-rays."""
    from fedmed import data as site_data

    if data:
        pool = site_data.load_npz(data, 2).train
    else:
        pool = site_data.synthetic_site_data(count, 1, seed=seed).train
    if len(pool) < count:
        raise ValueError(f"{data or 'synthetic data'} has {len(pool)} training images; the audit needs {count}")
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return pool.images[order], pool.labels[order]


def write_png(path: Path, originals: np.ndarray, reconstructions: dict, scores: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(reconstructions)
    cols = len(originals)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.2, 1.6 * rows), squeeze=False)
    labelled = [("true images", originals, None)] + [(mode, images, scores[mode]) for mode, images in reconstructions.items()]
    for r, (name, images, score) in enumerate(labelled):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(np.asarray(images[c]).squeeze(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if score is not None:
                ax.set_title(f"PSNR {score['psnr_per_image'][c]:.1f}", fontsize=7)
        label = name if score is None else f"{name}\nSSIM {score['ssim']:.2f}"
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle("Gradient inversion of a round-1 update (honest-but-curious server)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run(out: str | Path, data: str | None = None, modes=AUDIT_MODES, batch_size: int = 2, iterations: int = 200,
        membership_size: int = 64, membership_epochs: int = 6, epsilon: float = 8.0, delta: float = 1e-5, seed: int = 0,
        log=print) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_images(data, batch_size + 2 * membership_size, seed)
    dp = DPAudit(epsilon=epsilon, delta=delta)
    result = audit(images, labels, modes=modes, batch_size=batch_size, iterations=iterations, dp=dp,
                   membership_size=membership_size, membership_epochs=membership_epochs, seed=seed)
    originals, reconstructions = result.pop("originals"), result.pop("reconstructions")
    result["data"] = data or "synthetic chest X-rays"
    write_json(out / LEAKAGE_FILE, result, allow_nan=False)
    write_png(out / RECONSTRUCTIONS_FILE, originals, reconstructions, result["modes"])
    for mode, scores in result["modes"].items():
        log(f"  {mode}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}, membership-inference AUC {scores['membership_auc']:.3f}")
    base = result["no_information_baseline"]
    log(f"  no-information baseline (flat image): PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.3f}")
    log(f"  {out / LEAKAGE_FILE}\n  {out / RECONSTRUCTIONS_FILE}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (leakage.json, reconstructions.png)")
    parser.add_argument("--data", default=None, help="MedMNIST-style npz (default: synthetic chest X-rays)")
    parser.add_argument("--modes", default=",".join(AUDIT_MODES), help=f"comma-separated modes (default {','.join(AUDIT_MODES)})")
    parser.add_argument("--batch", type=int, default=2, help="images in the inverted round-1 batch (default 2)")
    parser.add_argument("--iterations", type=int, default=200, help="inversion optimisation steps (default 200)")
    parser.add_argument("--membership", type=int, default=64, help="members (and as many non-members) for membership inference (default 64)")
    parser.add_argument("--epochs", type=int, default=6, help="training rounds of the membership-inference model (default 6)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the dp site's budget (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5, help="the dp site's delta (default 1e-5)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in AUDIT_MODES]
    if unknown or not modes:
        print(f"error: --modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(AUDIT_MODES)}", file=sys.stderr)
        return 1
    try:
        run(args.out, args.data, modes, args.batch, args.iterations, args.membership, args.epochs, args.epsilon, args.delta, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
