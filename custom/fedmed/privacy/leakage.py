"""Measured leakage per privacy mode: what an honest-but-curious server can learn from an update.

Pure module (torch + MONAI metrics; never imports ``nvflare``). Two attacks:

1. **Gradient inversion** (Geiping et al. 2020, "Inverting Gradients", the cosine-similarity
   variant of DLG): the server receives a site's round-1 update for a small batch of B images and
   optimises B dummy images until the gradient they produce matches the update. The site's update
   is modelled as one local SGD step (``update = -lr * gradient``, the most exposed setting), and
   transformed as each mode transforms it before it leaves:

   - ``standard``: the exact update;
   - ``compressed`` / ``compressed_int8``: float16 / 8-bit quantized, then restored by the server;
   - ``dp``: a DP-SGD step — each record's gradient clipped to C, Gaussian noise of std z*C on the
     sum, z derived from the site's budget exactly as a ``dp`` site derives it.

   The attacker knows the network, the global weights, the batch size and the labels (a strong
   attacker); dropout is off. Reconstructions are scored against the true images with MONAI's
   ``PSNRMetric`` and ``SSIMMetric`` after matching each true image to its best reconstruction.

2. **Membership inference** (loss threshold, Yeom et al. 2018): a model is trained on a member set in
   the mode (plain, with the mode's update compression, or with DP-SGD); the attacker scores each
   record by its loss and the AUC says how well it tells members from non-members (0.5: no better
   than chance).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmed.networks import build_network, numpy_to_state, state_to_numpy
from fedmed.privacy.compression import compress_float16, decompress_float16, dequantize_int8, quantize_int8
from fedmed.privacy.dp import noise_multiplier_for_budget, poisson_sampling

AUDIT_MODES = ("standard", "compressed", "compressed_int8", "dp")
MAX_PSNR = 100.0  # dB


@dataclass(frozen=True)
class DPAudit:
    """The dp site the audit models: its budget and the training its noise is planned for."""

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    site_size: int = 400  # training records at the site
    rounds: int = 20
    local_epochs: int = 1

    def noise_multiplier(self, batch_size: int) -> float:
        return _planned_noise(self, batch_size)


@functools.lru_cache(maxsize=64)
def _planned_noise(dp: DPAudit, batch_size: int) -> float:
    rate, steps = poisson_sampling(dp.site_size, batch_size)
    return noise_multiplier_for_budget(dp.epsilon, dp.delta, rate, dp.rounds * dp.local_epochs * steps)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters()}


def per_sample_gradients(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name: [B, *shape]} gradients of each record's loss (torch.func)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in _params(model).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, images, labels)


def site_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, lr: float = 0.1,
                dp: DPAudit | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The round-1 update (weight difference) one local SGD step on this batch makes, as it reaches
    the server in ``mode``."""
    if mode not in AUDIT_MODES:
        raise ValueError(f"mode must be one of {', '.join(AUDIT_MODES)}, got {mode!r}")
    loss_fn = nn.CrossEntropyLoss()
    if mode == "dp":
        dp = dp or DPAudit()
        z = dp.noise_multiplier(len(images))
        grads = per_sample_gradients(model, loss_fn, images, labels)
        norms = torch.sqrt(sum(g.reshape(len(images), -1).pow(2).sum(1) for g in grads.values()))
        factor = (dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        update = {}
        for name, g in grads.items():
            clipped = (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0)
            noise = torch.normal(0.0, z * dp.max_grad_norm, size=clipped.shape, generator=generator)
            update[name] = -lr * (clipped + noise) / len(images)
        return update
    model.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()
    update = {name: (-lr * p.grad).detach() for name, p in _params(model).items()}
    if mode in ("compressed", "compressed_int8"):
        arrays = {k: v.numpy().astype(np.float32) for k, v in update.items()}
        if mode == "compressed":
            restored = decompress_float16(*compress_float16(arrays))
        else:
            restored = dequantize_int8(*quantize_int8(arrays))
        update = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in restored.items()}
    return update


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_update(model: nn.Module, update: dict[str, torch.Tensor], labels: torch.Tensor, image_shape: tuple[int, ...],
                  iterations: int = 300, lr: float = 0.1, tv_weight: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Reconstruct the batch from an update: dummy images whose gradient is most cosine-similar to
    the (negated) update, with a total-variation prior, in [0, 1] (sigmoid parametrisation)."""
    torch.manual_seed(seed)
    params = list(_params(model).values())
    target = [-update[name].detach() for name in _params(model)]
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target)) + 1e-12
    latent = torch.randn((len(labels), *image_shape), requires_grad=True)
    optimizer = torch.optim.Adam([latent], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(iterations):
        optimizer.zero_grad()
        dummy = torch.sigmoid(latent)
        grads = torch.autograd.grad(loss_fn(model(dummy), labels), params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-12
        objective = 1 - dot / (norm * target_norm) + tv_weight * _total_variation(dummy)
        objective.backward()
        optimizer.step()
    return torch.sigmoid(latent).detach()


def image_scores(reconstructed: torch.Tensor, original: torch.Tensor) -> dict:
    """PSNR / SSIM (MONAI) of each true image against its best-matching reconstruction (the best
    assignment over permutations of the batch); means and per-image values (PSNR capped at 100 dB)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr_metric, ssim_metric = PSNRMetric(max_val=1.0, reduction="none"), SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none", win_size=7)
    n = len(original)
    psnr = np.zeros((n, n))
    ssim = np.zeros((n, n))
    for i in range(n):
        rep = original[i : i + 1].expand(n, *original.shape[1:])
        psnr[i] = psnr_metric(reconstructed, rep).reshape(-1).numpy()
        ssim[i] = ssim_metric(reconstructed, rep).reshape(-1).numpy()
    psnr = np.minimum(psnr, MAX_PSNR)  # identical images: infinite PSNR, capped so sums and JSON stay finite
    if n <= 7:
        best = max(itertools.permutations(range(n)), key=lambda perm: sum(psnr[i, perm[i]] for i in range(n)))
    else:  # greedy for large batches
        best, free = [], set(range(n))
        for i in range(n):
            j = max(free, key=lambda k: psnr[i, k])
            best.append(j)
            free.remove(j)
    order = list(best)
    return {
        "psnr": float(np.mean([psnr[i, order[i]] for i in range(n)])),
        "ssim": float(np.mean([ssim[i, order[i]] for i in range(n)])),
        "psnr_per_image": [float(psnr[i, order[i]]) for i in range(n)],
        "ssim_per_image": [float(ssim[i, order[i]]) for i in range(n)],
        "matching": order,
    }


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold attack: P(a member's loss < a non-member's), ties counted half."""
    members, others = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if not len(members) or not len(others):
        raise ValueError("membership inference needs members and non-members")
    less = (members[:, None] < others[None, :]).mean()
    ties = (members[:, None] == others[None, :]).mean()
    return float(less + 0.5 * ties)


def per_record_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(images), labels, reduction="none").numpy()


def train_in_mode(network_spec: dict, images: torch.Tensor, labels: torch.Tensor, mode: str, epochs: int = 10,
                  batch_size: int = 16, lr: float = 3e-3, dp: DPAudit | None = None, seed: int = 0) -> nn.Module:
    """A site's model after ``epochs`` rounds of one local epoch each, as the server would hold it in
    ``mode``: plain training, each round's update compressed, or DP-SGD (Opacus, through
    :class:`fedmed.training.LocalTrainer`) with the noise derived from the budget for these rounds."""
    from torch.utils.data import TensorDataset

    from fedmed.tasks.classification import ClassificationTask
    from fedmed.training import DPSGD, LocalTrainer

    task = ClassificationTask()
    dataset = TensorDataset(images, labels)
    trainer = LocalTrainer(task, dataset, dataset, lr=lr, batch_size=batch_size, seed=seed, device="cpu", lr_schedule="constant")
    weights = state_to_numpy(build_network(network_spec, seed=seed))
    dp_round = None
    if mode == "dp":
        dp = dp or DPAudit()
        rate, steps = poisson_sampling(len(images), batch_size)
        z = noise_multiplier_for_budget(dp.epsilon, dp.delta, rate, epochs * steps)
        dp_round = DPSGD(z, dp.max_grad_norm)
    for round_num in range(epochs):
        local = trainer.train(network_spec, weights, round_num, dp=dp_round).weights
        if mode in ("compressed", "compressed_int8"):
            diff = {k: local[k] - weights[k] for k in weights}
            diff = decompress_float16(*compress_float16(diff)) if mode == "compressed" else dequantize_int8(*quantize_int8(diff))
            local = {k: (weights[k] + diff[k]).astype(weights[k].dtype) for k in weights}
        weights = local
    model = build_network(network_spec)
    model.load_state_dict(numpy_to_state(weights, model.state_dict()))
    return model


def _clipped(grads: dict[str, torch.Tensor], max_norm: float | None) -> dict[str, torch.Tensor]:
    """Per-record gradients clipped to ``max_norm`` (None: unclipped)."""
    if max_norm is None:
        return grads
    count = next(iter(grads.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(count, -1).pow(2).sum(1) for g in grads.values()))
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: g * factor.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) confidence interval of a binomial proportion."""
    from scipy.stats import beta

    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def empirical_epsilon(scores_in: np.ndarray, scores_out: np.ndarray, delta: float, alpha: float = 0.05) -> float:
    """A (1 - alpha)-confidence lower bound on epsilon from a distinguishing test (Jagielski et al.
    2020, Nasr et al. 2021): for the best threshold t, log((TPR_low - delta) / FPR_high) with
    Clopper-Pearson bounds, TPR = P(score >= t | canary in), FPR = P(score >= t | canary out)."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    best = 0.0
    for t in np.unique(np.concatenate([scores_in, scores_out])):
        tpr_low, _ = clopper_pearson(int(np.sum(scores_in >= t)), len(scores_in), alpha)
        _, fpr_high = clopper_pearson(int(np.sum(scores_out >= t)), len(scores_out), alpha)
        if tpr_low - delta > 0 and fpr_high > 0:
            best = max(best, float(np.log((tpr_low - delta) / fpr_high)))
    return best


def canary_audit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, dp: DPAudit | None = None,
                 trials: int = 400, seed: int = 0) -> dict:
    """Membership with power: is the canary (``images[0]``) in the batch (the other images plus it)
    or not? The server scores each update by its projection on the canary's gradient; over
    ``trials`` updates each way, :func:`empirical_epsilon` bounds the epsilon of one update from
    below. Without noise (``standard``) the two cases are told apart every time (the bound is then
    limited only by the number of trials); under ``dp`` the bound must stay below the epsilon the
    accountant gives one such step (the Gaussian mechanism at noise multiplier z, no subsampling):
    a bound above it means the noise is not what the ledger charges."""
    from fedmed.privacy.dp import accountant_epsilon

    dp = dp or DPAudit()
    loss_fn = nn.CrossEntropyLoss()
    model.eval()
    grads = per_sample_gradients(model, loss_fn, images, labels)
    clip = dp.max_grad_norm if mode == "dp" else None
    clipped = _clipped(grads, clip)
    with_canary = {k: g.sum(0) for k, g in clipped.items()}
    without = {k: g[1:].sum(0) for k, g in clipped.items()}
    direction = {k: g[0] for k, g in clipped.items()}
    scale = torch.sqrt(sum(d.pow(2).sum() for d in direction.values())) + 1e-12
    z = dp.noise_multiplier(len(images)) if mode == "dp" else 0.0
    rng = np.random.default_rng(seed + 7)

    def projection(total: dict) -> float:
        return float(sum((total[k] * direction[k]).sum() for k in total) / scale)

    # the update's gradient sum projected on the canary's (clipped) gradient direction; isotropic Gaussian
    # noise N(0, (zC)^2 I) projects onto a unit direction as exactly N(0, (zC)^2), drawn here per trial
    sigma = z * clip if mode == "dp" else 0.0
    scores_in = projection(with_canary) + sigma * rng.standard_normal(trials)
    scores_out = projection(without) + sigma * rng.standard_normal(trials)
    bound = empirical_epsilon(scores_in, scores_out, dp.delta)
    step_epsilon = accountant_epsilon("rdp", [(z, 1.0, 1)], dp.delta) if mode == "dp" else float("inf")
    return {"trials": trials, "epsilon_lower_bound": bound, "noise_multiplier": z,
            "step_epsilon": step_epsilon if np.isfinite(step_epsilon) else None,
            "ledger_epsilon": dp.epsilon if mode == "dp" else None}


LEAK_SSIM_MARGIN = 0.2  # a reconstruction leaks when its SSIM beats the no-information baseline by this much
POWER_EPSILON = 2.0  # the canary test has power when it bounds standard's epsilon at least this high


def verdict(result: dict) -> tuple[int, list[str]]:
    """(exit code, findings) of an audit: 0 when ``standard`` leaks (the positive control: the
    attacks work) and ``dp`` does not; 2 when the positive control shows no leakage (the audit
    itself is broken: its result says nothing); 3 when ``dp`` leaks."""
    findings, broken, leaks = [], False, False
    for batch_size, per_mode in sorted(result["batches"].items(), key=lambda kv: int(kv[0])):
        base = per_mode["no_information_baseline"]["ssim"]
        for mode, scores in per_mode["modes"].items():
            leaked = scores["ssim"] >= base + LEAK_SSIM_MARGIN
            scores["leaks"] = bool(leaked)
            if mode == "dp" and leaked:
                leaks = True
                findings.append(f"dp leaks at batch {batch_size}: SSIM {scores['ssim']:.3f} vs no-information {base:.3f}")
            if mode == "standard" and int(batch_size) == 1 and not leaked:
                broken = True
                findings.append(f"positive control failed: standard at batch 1 reconstructs at SSIM {scores['ssim']:.3f}, "
                                f"not {LEAK_SSIM_MARGIN} above the no-information {base:.3f}")
    canary = result.get("canary", {})
    if "standard" in canary and canary["standard"]["epsilon_lower_bound"] < POWER_EPSILON:
        broken = True
        findings.append(f"positive control failed: the canary test bounds standard's epsilon only at "
                        f"{canary['standard']['epsilon_lower_bound']:.2f} (< {POWER_EPSILON}): it has no power")
    if "dp" in canary and canary["dp"]["step_epsilon"] is not None and canary["dp"]["epsilon_lower_bound"] > canary["dp"]["step_epsilon"]:
        leaks = True
        findings.append(f"dp leaks: the canary test's empirical epsilon {canary['dp']['epsilon_lower_bound']:.2f} exceeds the "
                        f"{canary['dp']['step_epsilon']:.2f} the accountant gives one step")
    if "standard" not in next(iter(result["batches"].values()))["modes"]:
        broken = True
        findings.append("no positive control: the audit must include the standard mode")
    return (2 if broken else 3 if leaks else 0), findings


def audit(images: np.ndarray, labels: np.ndarray, modes=AUDIT_MODES, batch_size: int = 4, iterations: int = 300,
          network_spec: dict | None = None, dp: DPAudit | None = None, membership_size: int = 100,
          membership_epochs: int = 10, seed: int = 0) -> dict:
    """Run both attacks for every mode. ``images`` [N, 1, H, W] in [0, 1], ``labels`` [N]; the first
    ``batch_size`` images are the inverted batch; ``2 * membership_size`` further images are the
    members and non-members. Returns ``{"modes": {mode: {...}}, "batch": originals, "reconstructions":
    {mode: array}, ...}``."""
    network_spec = network_spec or {"name": "small_cnn", "args": {"width": 16, "dropout": 0.0}}
    dp = dp or DPAudit()
    needed = batch_size + 2 * membership_size
    if len(images) < needed:
        raise ValueError(f"the audit needs at least {needed} images (batch {batch_size} + 2 x {membership_size}), got {len(images)}")
    images_t = torch.as_tensor(np.asarray(images, dtype=np.float32))
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    batch, batch_labels = images_t[:batch_size], labels_t[:batch_size]
    members = slice(batch_size, batch_size + membership_size)
    others = slice(batch_size + membership_size, needed)
    generator = torch.Generator().manual_seed(seed + 1)
    result = {"batch_size": batch_size, "iterations": iterations, "network": network_spec, "modes": {},
              "dp": {"epsilon": dp.epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm, "site_size": dp.site_size,
                     "rounds": dp.rounds, "noise_multiplier": dp.noise_multiplier(batch_size)}}
    # what an attacker gets without the update: a flat image at the batch's mean intensity
    flat = image_scores(torch.full_like(batch, float(batch.mean())), batch)
    result["no_information_baseline"] = {"what": "a flat image at the batch's mean intensity", "psnr": flat["psnr"], "ssim": flat["ssim"]}
    reconstructions = {}
    for mode in modes:
        model = build_network(network_spec, seed=seed)
        model.eval()  # dropout off: the attacker's best case
        update = site_update(model, batch, batch_labels, mode, dp=dp, generator=generator)
        recon = invert_update(model, update, batch_labels, tuple(batch.shape[1:]), iterations=iterations, seed=seed)
        scores = image_scores(recon, batch)
        reconstructions[mode] = recon.numpy()[scores["matching"]]  # row i: the reconstruction matched to true image i
        auc = None
        if membership_size:
            trained = train_in_mode(network_spec, images_t[members], labels_t[members], mode, epochs=membership_epochs, dp=dp, seed=seed)
            auc = membership_auc(per_record_losses(trained, images_t[members], labels_t[members]),
                                 per_record_losses(trained, images_t[others], labels_t[others]))
        result["modes"][mode] = {"psnr": scores["psnr"], "ssim": scores["ssim"], "psnr_per_image": scores["psnr_per_image"],
                                 "ssim_per_image": scores["ssim_per_image"], "matching": scores["matching"]}
        if auc is not None:
            result["modes"][mode]["membership_auc"] = auc
    result["originals"] = batch.numpy()
    result["reconstructions"] = reconstructions
    return result
