"""The site-local trainer: no FLARE import, usable alone (baselines) or behind the FLARE executor.

Trains ``local_epochs`` epochs from the weights it is given and evaluates on the site's validation
data. Uses CUDA and mixed precision when a GPU is present, the CPU otherwise.

With ``train(..., dp=DPSGD(...))`` the round is trained with record-level DP-SGD (Opacus
``PrivacyEngine``: Poisson sampling, per-sample clipping, Gaussian noise; see
:mod:`fedmed.privacy.dp`). The result then carries Opacus' accountant history for the round, which
the caller charges to the site's ledger. Without ``dp`` nothing changes.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedmed.networks import build_network, numpy_to_state, state_to_numpy


LR_SCHEDULES = ("cosine", "constant")


def round_learning_rate(lr: float, schedule: str, round_num: int, num_rounds: int | None) -> float:
    """The learning rate for ``round_num`` (0-based) of ``num_rounds``."""
    if schedule == "constant" or not num_rounds:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(round_num, num_rounds) / num_rounds))


class TrainingAborted(RuntimeError):
    """Raised when the caller's abort check fires between batches."""


class DPNetworkError(ValueError):
    """A network that Opacus cannot train with per-sample gradients (e.g. BatchNorm)."""


@dataclass(frozen=True)
class DPSGD:
    """One round of record-level DP-SGD: Gaussian noise ``noise_multiplier * max_grad_norm`` on the
    sum of per-record gradients clipped to ``max_grad_norm``; Poisson sampling at rate
    1 / ceil(n / batch_size); ``accountant`` is the Opacus accountant the round's steps go to."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"

    def __post_init__(self):
        for key in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DP-SGD {key} must be a positive number, got {value!r}")


def check_dp_network(network_spec: dict, where: str = "the job's config_fed_server.json, key 'network'") -> None:
    """Raise :class:`DPNetworkError` when Opacus cannot train ``network_spec`` (its ModuleValidator)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(build_network(network_spec), strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]
        raise DPNetworkError(
            f"network '{network_spec.get('name')}' ({where}) cannot be trained with DP-SGD: {len(errors)} incompatible "
            f"module(s), e.g. {first}; use a GroupNorm network such as small_cnn, or a privacy scope other than dp"
        )


@dataclass
class TrainResult:
    weights: dict[str, np.ndarray]  # the local model after training
    num_samples: int  # real training-sample count (not batches)
    metrics: dict = field(default_factory=dict)  # train_loss, seconds, samples_per_second, ...
    privacy_steps: list = field(default_factory=list)  # DP-SGD only: Opacus history [(z, q, steps)] of this round


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class TrainerSettings:
    """How a site trains: the one declaration of the trainer's settings (the executor's and the
    baselines' ``args`` are these keys).

    local_epochs: epochs over the local training data per call to :meth:`LocalTrainer.train`.
    lr: Adam learning rate.
    batch_size: mini-batch size (under DP-SGD: the expected Poisson batch size).
    fedprox_mu: FedProx proximal weight; 0 is plain FedAvg local training.
    seed: seeds shuffling (combined with the round number) and the network's initialisation.
    device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
    amp: mixed precision on CUDA (ignored on CPU).
    num_workers: DataLoader worker processes.
    lr_schedule: "cosine" decays the learning rate over the federation's rounds (round r of R
        trains at lr * (1 + cos(pi * r / R)) / 2), so the final global model settles; "constant"
        keeps ``lr``.
    min_local_steps: the fewest optimizer steps a round makes (0: ``local_epochs`` only). A site
        whose ``local_epochs`` are fewer steps trains whole epochs more until it reaches them, so a
        17-image hospital's update is not one short step that pulls a size-blind robust rule
        (geometric median) toward no change. Set it at or below the largest site's steps and no
        round takes longer. Not applied under DP-SGD, whose budget is planned over
        ``local_epochs``: more passes over the same few records would add noise, not signal.
    """

    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    fedprox_mu: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    lr_schedule: str = "cosine"
    min_local_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.local_epochs, int) or self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1 (an integer), got {self.local_epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (an integer), got {self.batch_size!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.fedprox_mu, (int, float)) or self.fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {self.fedprox_mu!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.min_local_steps, bool) or not isinstance(self.min_local_steps, int) or self.min_local_steps < 0:
            raise ValueError(f"min_local_steps must be an integer >= 0 (0: local_epochs only), got {self.min_local_steps!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")

    def epochs_for(self, num_samples: int) -> int:
        """Epochs a round makes over ``num_samples`` training records: ``local_epochs``, or more
        whole epochs where they are fewer than ``min_local_steps`` optimizer steps."""
        steps_per_epoch = max(1, math.ceil(num_samples / self.batch_size))
        return max(self.local_epochs, math.ceil(self.min_local_steps / steps_per_epoch))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping, where: str = "the trainer settings") -> "TrainerSettings":
        """Settings from a dict (e.g. a job's executor args); an unknown key or a bad value raises
        ``ValueError`` naming ``where``, the key and the valid keys."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"{where}: unknown trainer setting(s) {', '.join(unknown)}; valid: {', '.join(cls.keys())}")
        try:
            return cls(**dict(values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def to_json(self) -> dict:
        return asdict(self)


class LocalTrainer:
    def __init__(self, task, train_dataset: Dataset, val_dataset: Dataset, settings: TrainerSettings | None = None,
                 **overrides):
        """Args:
        task: a task object from :mod:`fedmed.tasks` (loss, metrics, batch handling).
        train_dataset / val_dataset: this site's data.
        settings: :class:`TrainerSettings` (default: its defaults); keyword ``overrides`` replace
            single settings (``LocalTrainer(task, tr, va, lr=0.01)``).
        """
        settings = settings if settings is not None else TrainerSettings()
        if overrides:
            settings = TrainerSettings.from_mapping({**settings.to_json(), **overrides}, "LocalTrainer")
        if len(train_dataset) == 0:
            raise ValueError("the site's training set is empty")
        self.settings = settings
        self.task = task
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.local_epochs = settings.local_epochs
        self.lr = settings.lr
        self.batch_size = settings.batch_size
        self.fedprox_mu = settings.fedprox_mu
        self.seed = settings.seed
        self.device = pick_device(settings.device)
        self.amp = settings.amp and self.device.type == "cuda"
        self.num_workers = settings.num_workers
        self.lr_schedule = settings.lr_schedule
        self.round_epochs = settings.epochs_for(len(train_dataset))  # non-DP rounds (min_local_steps)
        self._model = None
        self._model_spec = None
        self._dp_checked_spec = None

    @property
    def num_train_samples(self) -> int:
        return len(self.train_dataset)

    def model(self, network_spec: dict, weights: dict[str, np.ndarray] | None = None) -> torch.nn.Module:
        """The network for ``network_spec`` (built once), loaded with ``weights`` when given."""
        if self._model is None or self._model_spec != network_spec:
            self._model = build_network(network_spec, seed=self.seed).to(self.device)
            self._model_spec = network_spec
        if weights is not None:
            reference = self._model.state_dict()
            self._model.load_state_dict(numpy_to_state(weights, reference), strict=True)
        return self._model

    def _loader(self, dataset, shuffle: bool, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def train(
        self,
        network_spec: dict,
        global_weights: dict[str, np.ndarray] | None,
        round_num: int = 0,
        should_abort: Callable[[], bool] | None = None,
        num_rounds: int | None = None,
        dp: DPSGD | None = None,
    ) -> TrainResult:
        """Train from ``global_weights`` (or a fresh seeded network) and return the local model.

        ``round_num`` of ``num_rounds`` sets the learning rate under the cosine schedule (no
        ``num_rounds``: constant ``lr``) and seeds shuffling. ``dp``: train with DP-SGD instead.
        """
        if dp is not None:
            return self._train_dp(network_spec, global_weights, round_num, should_abort, num_rounds, dp)
        model = self.model(network_spec, global_weights)
        model.train()
        loss_fn = self.task.loss()
        lr = round_learning_rate(self.lr, self.lr_schedule, round_num, num_rounds)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        anchor = [p.detach().clone() for p in model.parameters()] if self.fedprox_mu > 0 else None
        loader = self._loader(self.train_dataset, shuffle=True, seed=self.seed * 100003 + round_num)
        started = time.perf_counter()
        loss_sum, seen, steps = 0.0, 0, 0
        for _ in range(self.round_epochs):
            for batch in loader:
                if should_abort is not None and should_abort():
                    raise TrainingAborted("training aborted by the caller")
                inputs, targets = self.task.batch_to_device(batch, self.device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
                total = loss
                if anchor is not None:
                    prox = sum(torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor))
                    total = loss + 0.5 * self.fedprox_mu * prox
                if not torch.isfinite(total):
                    raise FloatingPointError(f"training loss became {float(total)}; lower the learning rate")
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += float(loss.detach()) * len(inputs)
                seen += len(inputs)
                steps += 1
        return self._result(model, lr, loss_sum, seen, started, local_steps=steps)

    def _train_dp(self, network_spec, global_weights, round_num, should_abort, num_rounds, dp: DPSGD) -> TrainResult:
        """DP-SGD with Opacus: a fresh copy of the network (hooks never linger on the cached one),
        Poisson sampling and noise from generators seeded from the OS entropy pool, float32 (no AMP:
        per-sample gradients are clipped in full precision)."""
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        if self.fedprox_mu > 0:
            raise ValueError("FedProx (fedprox_mu > 0) cannot be combined with DP-SGD: its proximal gradient would bypass "
                             "per-sample clipping; set fedprox_mu to 0 or use a privacy scope other than dp")
        if self._dp_checked_spec != network_spec:
            check_dp_network(network_spec)
            self._dp_checked_spec = network_spec
        model = build_network(network_spec, seed=self.seed)
        if global_weights is not None:
            model.load_state_dict(numpy_to_state(global_weights, model.state_dict()), strict=True)
        for module in model.modules():  # Opacus' backward hooks forbid in-place activations
            if getattr(module, "inplace", False):
                module.inplace = False
        model.to(self.device).train()
        lr = round_learning_rate(self.lr, self.lr_schedule, round_num, num_rounds)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        base = DataLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")
        sampling = torch.Generator().manual_seed(secrets.randbits(63))
        noise = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=dp.accountant)
        loader = DPDataLoader.from_data_loader(base, generator=sampling)
        private_model, private_optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=False, noise_generator=noise,
        )
        private_model.forbid_grad_accumulation()  # as make_private(poisson_sampling=True) does
        # Opacus' floating-point-safe Gaussian (Holohan & Braghin 2021: the sum of 4 draws rescaled, so the
        # low bits of the noise do not reveal the unnoised gradient). PrivacyEngine(secure_mode=True) would also
        # demand torchcsprng; the DP optimizer's own flag needs nothing: our generators are seeded from os entropy.
        private_optimizer.secure_mode = True
        sample_rate = float(loader.sample_rate)  # the Poisson sampler's own rate: what is charged
        loss_fn = self.task.loss()
        started = time.perf_counter()
        loss_sum, seen, steps = 0.0, 0, 0
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the first layer's input needs no grad
                for _ in range(self.local_epochs):
                    for batch in loader:
                        if should_abort is not None and should_abort():
                            raise TrainingAborted("training aborted by the caller")
                        inputs, targets = self.task.batch_to_device(batch, self.device)
                        private_optimizer.zero_grad(set_to_none=True)
                        loss = loss_fn(private_model(inputs), targets)
                        if len(inputs) == 0:  # an empty Poisson batch is still a step: clipped sum 0, noise added
                            loss.backward()
                            private_optimizer.step()
                            steps += 1
                            continue
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"training loss became {float(loss)}; lower the learning rate")
                        loss.backward()
                        private_optimizer.step()
                        steps += 1
                        loss_sum += float(loss.detach()) * len(inputs)
                        seen += len(inputs)
        finally:
            private_model._close()  # remove Opacus' hooks and per-sample gradients
        # the steps the optimizer really took, each at the sampler's rate (Opacus' own accountant would record
        # 1 / len(loader), which differs from the sampler's rate where int(1 / q) < ceil(n / batch_size))
        return self._result(model, lr, loss_sum, seen, started, [(dp.noise_multiplier, sample_rate, steps)] if steps else [])

    def _result(self, model, lr: float, loss_sum: float, seen: int, started: float, privacy_steps=(),
                local_steps: int | None = None) -> TrainResult:
        """The round's TrainResult: the local weights, the real sample count and the training metrics
        (``local_steps``, the optimizer steps taken, outside DP-SGD only: there the count is in ``privacy_steps``)."""
        seconds = time.perf_counter() - started
        metrics = {
            "train_loss": loss_sum / max(seen, 1),
            "learning_rate": lr,
            "train_seconds": seconds,
            "samples_per_second": seen / seconds if seconds > 0 else 0.0,
        }
        if local_steps is not None:
            metrics["local_steps"] = local_steps
        return TrainResult(weights=state_to_numpy(model), num_samples=self.num_train_samples, metrics=metrics,
                           privacy_steps=list(privacy_steps))

    def positive_scores(self, network_spec: dict, weights: dict[str, np.ndarray] | None = None):
        """(positive-class probabilities, labels) on the validation data for a two-class task that
        predicts probabilities; None otherwise (e.g. segmentation)."""
        if not hasattr(self.task, "predict") or getattr(self.task, "num_classes", None) != 2:
            return None
        model = self.model(network_spec, weights)
        probs, labels, _ = self.task.predict(model, self._loader(self.val_dataset, shuffle=False, seed=0), self.device, self.amp)
        return probs[:, 1], labels

    def evaluate(self, network_spec: dict, weights: dict[str, np.ndarray] | None = None, dataset=None) -> dict:
        """Validation metrics of ``weights`` on this site's validation data (or ``dataset``)."""
        model = self.model(network_spec, weights)
        loader = self._loader(dataset if dataset is not None else self.val_dataset, shuffle=False, seed=0)
        return self.task.evaluate(model, loader, self.device, self.amp)
