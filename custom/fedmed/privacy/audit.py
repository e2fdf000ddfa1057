"""``python -m fedmed audit-leakage``: play an honest-but-curious server against each privacy mode.

Attacks the job's own network (``--job``, default the project's default job: ``cxr_cnn``) with
:mod:`fedmed.privacy.leakage`: gradient inversion of a site's round-1 update at batch sizes 1-8,
and a canary test (is one record in the update or not?) that bounds epsilon from below, on
synthetic chest X-rays or an npz (``--data``). ``standard`` is the positive control: it must leak,
or the audit says it is broken. Writes into ``--out``:

- ``leakage.json``: per batch size and mode, PSNR / SSIM of the reconstructions against the true
  images (MONAI metrics) beside the no-information baseline; per mode the canary test's empirical
  epsilon; the verdict;
- ``reconstructions.png``: the true images (first row) beside each mode's reconstructions (largest batch).

Exit code: 0 standard leaks and dp does not; 2 the positive control shows no leakage (the audit
is broken); 3 dp leaks; 1 bad arguments.
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


def job_network(job: str | Path) -> dict:
    """The network the job trains (its controller's ``network``): the audit attacks that one."""
    from fedmed.jobfolder import JobFolder

    network = JobFolder.resolve(job).spec().controller_args().get("network")
    if not isinstance(network, dict) or "name" not in network:
        raise ValueError(f"job {job}: its config_fed_server.json names no network (controller arg 'network')")
    return network


def run(out: str | Path, data: str | None = None, modes=AUDIT_MODES, batch_sizes=(1, 2, 4, 8), iterations: int = 200,
        membership_size: int = 0, membership_epochs: int = 6, epsilon: float = 8.0, delta: float = 1e-5, seed: int = 0,
        job: str | Path | None = None, canary_trials: int = 400, log=print) -> dict:
    """Attack every mode at every batch size; write leakage.json (with the verdict) and the PNG of
    the largest batch's reconstructions. ``result["verdict"]["exit_code"]``: 0 clean, 2 the
    positive control shows no leakage (the audit is broken), 3 dp leaks."""
    import torch

    from fedmed.networks import build_network
    from fedmed.privacy.leakage import LEAK_SSIM_MARGIN, canary_audit, verdict
    from fedmed.runner import DEFAULT_JOB

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job = job or DEFAULT_JOB
    network = job_network(job)
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    largest = batch_sizes[-1]
    images, labels = load_images(data, largest + 2 * membership_size + 1, seed)
    dp = DPAudit(epsilon=epsilon, delta=delta)
    result = {"job": str(job), "network": network, "data": data or "synthetic chest X-rays", "iterations": iterations,
              "leak_rule": f"SSIM >= no-information baseline + {LEAK_SSIM_MARGIN}", "batches": {}, "canary": {}}
    originals = reconstructions = None
    for batch_size in batch_sizes:
        # the inverted batch first, then (once, at the largest batch) the membership sets
        subset = np.concatenate([images[:batch_size], images[largest + 1:]]) if membership_size else images[:batch_size]
        sublabels = np.concatenate([labels[:batch_size], labels[largest + 1:]]) if membership_size else labels[:batch_size]
        one = audit(subset, sublabels, modes=modes, batch_size=batch_size, iterations=iterations, network_spec=network, dp=dp,
                    membership_size=membership_size if batch_size == largest else 0, membership_epochs=membership_epochs, seed=seed)
        originals, reconstructions = one.pop("originals"), one.pop("reconstructions")
        result["dp"] = one.pop("dp")
        result["batches"][str(batch_size)] = {"modes": one["modes"], "no_information_baseline": one["no_information_baseline"]}
        for mode, scores in one["modes"].items():
            log(f"  batch {batch_size} {mode}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}"
                + (f", membership-inference AUC {scores['membership_auc']:.3f}" if "membership_auc" in scores else ""))
        base = one["no_information_baseline"]
        log(f"  batch {batch_size} no-information baseline (flat image): PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.3f}")
    canary_images = torch.as_tensor(images[: max(2, min(8, largest))], dtype=torch.float32)
    canary_labels = torch.as_tensor(labels[: len(canary_images)], dtype=torch.int64)
    for mode in modes:
        model = build_network(network, seed=seed)
        result["canary"][mode] = canary_audit(model, canary_images, canary_labels, mode, dp=dp, trials=canary_trials, seed=seed)
        c = result["canary"][mode]
        log(f"  canary {mode}: empirical epsilon >= {c['epsilon_lower_bound']:.2f} over {c['trials']} trials each way"
            + (f" (one step's accounted epsilon {c['step_epsilon']:.2f})" if c["step_epsilon"] is not None else ""))
    code, findings = verdict(result)
    result["verdict"] = {"exit_code": code, "findings": findings,
                         "meaning": {0: "standard leaks (the attacks work) and dp does not",
                                     2: "the positive control shows no leakage: the audit is broken",
                                     3: "dp leaks"}[code]}
    write_json(out / LEAKAGE_FILE, result, allow_nan=False)
    write_png(out / RECONSTRUCTIONS_FILE, originals, reconstructions, result["batches"][str(largest)]["modes"])
    for finding in findings:
        log(f"  FINDING: {finding}")
    log(f"  verdict: {result['verdict']['meaning']} (exit {code})\n  {out / LEAKAGE_FILE}\n  {out / RECONSTRUCTIONS_FILE}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (leakage.json, reconstructions.png)")
    parser.add_argument("--job", default=None, help="the job whose network is attacked (default the project's default job)")
    parser.add_argument("--data", default=None, help="MedMNIST-style npz (default: synthetic chest X-rays)")
    parser.add_argument("--modes", default=",".join(AUDIT_MODES), help=f"comma-separated modes (default {','.join(AUDIT_MODES)}); "
                                                                     "must include standard, the positive control")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes of the inverted round-1 update (default 1,2,4,8)")
    parser.add_argument("--iterations", type=int, default=200, help="inversion optimisation steps (default 200)")
    parser.add_argument("--canary-trials", type=int, default=400, help="updates with and without the canary each (default 400)")
    parser.add_argument("--membership", type=int, default=0,
                        help="members (and as many non-members) for the loss-threshold membership test (default 0: off)")
    parser.add_argument("--epochs", type=int, default=6, help="training rounds of the membership-inference model (default 6)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the dp site's budget (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5, help="the dp site's delta (default 1e-5)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Exit 0: standard leaks and dp does not; 2: the positive control shows no leakage (the audit is
    broken); 3: dp leaks; 1: bad arguments."""
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in AUDIT_MODES]
    if unknown or not modes:
        print(f"error: --modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(AUDIT_MODES)}", file=sys.stderr)
        return 1
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        result = run(args.out, args.data, modes, batches, args.iterations, args.membership, args.epochs, args.epsilon,
                     args.delta, args.seed, job=args.job, canary_trials=args.canary_trials)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return int(result["verdict"]["exit_code"])
