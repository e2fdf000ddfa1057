"""Server-side optimizers: how the aggregated site update moves the global model.

Pure module (numpy only). The round's aggregated weight difference ``mean_update`` (the mean of
``local - global`` over the sites) is treated as a negative pseudo-gradient, as in Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021):

- ``fedavg``: ``w <- w + lr * d`` (lr 1 is plain FedAvg);
- ``fedavgm``: server momentum, ``m <- beta * m + d``; ``w <- w + lr * m``;
- ``fedadam``: ``m <- b1 m + (1 - b1) d``; ``v <- b2 v + (1 - b2) d^2``; ``w <- w + lr m / (sqrt(v) + tau)``;
- ``fedyogi``: as fedadam with ``v <- v - (1 - b2) d^2 sign(v - d^2)``.

Only floating-point tensors are optimised. Integer buffers (e.g. BatchNorm's
``num_batches_tracked``) take the plain rounded mean update, as :func:`fedmed.aggregation.apply_update`
does. A spec is ``{"name": ..., "args": {...}}``; the optimizer's state (round count and moments)
round-trips through :meth:`ServerOptimizer.state_dict` for a server that resumes after a crash.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedmed.aggregation import apply_update

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


class ServerOptimizer:
    """``step(global_weights, mean_update) -> new global weights``; state for resume."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0):
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"server optimizer {self.name}: lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.steps = 0
        self.moments: dict[str, dict[str, np.ndarray]] = {}

    def _direction(self, key: str, update: np.ndarray) -> np.ndarray:
        return update

    def step(self, global_weights: Mapping[str, np.ndarray], mean_update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        moves = {}
        for key, update in mean_update.items():
            if key in global_weights:
                update = np.asarray(update, dtype=np.float64)
                moves[key] = self.lr * self._direction(key, update) if _is_float(global_weights[key]) else update
        self.steps += 1
        return apply_update(global_weights, moves)

    def _moment(self, name: str, key: str, like: np.ndarray, fill: float = 0.0) -> np.ndarray:
        slot = self.moments.setdefault(name, {})
        if key not in slot:
            slot[key] = np.full(like.shape, fill, dtype=np.float64)
        return slot[key]

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "moments": {name: {key: value.copy() for key, value in slot.items()} for name, slot in self.moments.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"server optimizer state is for {state.get('name')!r}, this optimizer is {self.name!r}")
        self.steps = int(state.get("steps", 0))
        self.moments = {
            name: {key: np.asarray(value, dtype=np.float64) for key, value in slot.items()}
            for name, slot in state.get("moments", {}).items()
        }


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server optimizer fedavgm: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def _direction(self, key, update):
        m = self._moment("m", key, update)
        m *= self.momentum
        m += update
        return m


class FedAdam(ServerOptimizer):
    name = "fedadam"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr)
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"server optimizer {self.name}: {label} must be in [0, 1), got {beta!r}")
        if not tau > 0:
            raise ValueError(f"server optimizer {self.name}: tau must be > 0, got {tau!r}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v *= self.beta2
        v += (1.0 - self.beta2) * squared

    def _direction(self, key, update):
        m = self._moment("m", key, update)
        m *= self.beta1
        m += (1.0 - self.beta1) * update
        v = self._moment("v", key, update, fill=self.tau**2)
        self._second_moment(v, update * update)
        return m / (np.sqrt(v) + self.tau)


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v, squared):
        v -= (1.0 - self.beta2) * squared * np.sign(v - squared)


_CLASSES = {cls.name: cls for cls in (ServerOptimizer, FedAvgM, FedAdam, FedYogi)}


def build_server_optimizer(spec: Mapping | None) -> ServerOptimizer:
    """The optimizer a spec ``{"name": ..., "args": {...}}`` names (None: plain FedAvg)."""
    spec = spec or {"name": "fedavg"}
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if name not in _CLASSES:
        raise ValueError(f"server_optimizer {spec!r}: 'name' must be one of {', '.join(SERVER_OPTIMIZERS)}")
    try:
        return _CLASSES[name](**spec.get("args", {}))
    except TypeError as exc:
        raise ValueError(f"server_optimizer {spec!r}: bad 'args' for {name} ({exc})") from exc
