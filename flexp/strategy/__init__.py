"""Server strategies: how the round's client weights become the next global weights. One strategy per module.

Each takes (global weights, client weights, client sample counts) as flat vectors and returns new global weights;
stateful ones (server momentum, adaptive optimizers) keep their state on the object and hand it out as a
state_dict of tensors and plain data, so a checkpoint loads with torch.load(weights_only=True).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from flexp.config import StrategyConfig


class Strategy(Protocol):
    """The server step of one round."""

    def aggregate(self, global_params: torch.Tensor, params: Sequence[torch.Tensor],
                  num_samples: Sequence[int]) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Stateless:
    """A strategy that keeps nothing between rounds: its state is {}."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors(state, type(self).__name__, ())


def tensors(state: Mapping[str, Any], owner: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors in a loaded state_dict, each of `keys` optional; anything else is refused (ValueError)."""
    unknown = sorted(str(k) for k in state if k not in keys)
    if unknown:
        raise ValueError(f"{owner} state has unknown entries {unknown}")
    wrong = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if wrong:
        raise ValueError(f"{owner} state entries {wrong} are not tensors")
    return dict(state)


def make_strategy(cfg: StrategyConfig, num_clients: int = 0, lr: float = 0.0) -> Strategy:
    """The configured strategy (SCAFFOLD needs K and the clients' learning rate)."""
    from flexp.strategy import fedavg, fedavgm, fedopt, krum, median, scaffold, trimmed_mean

    if cfg.name in ("fedavg", "fedprox"):  # FedProx changes the clients (LocalSpec.mu), not the server
        return fedavg.FedAvg()
    if cfg.name == "scaffold":
        return scaffold.Scaffold(num_clients, lr, cfg.server_lr)
    if cfg.name == "fedavgm":
        return fedavgm.FedAvgM(cfg.server_lr, cfg.momentum)
    if cfg.name in ("fedadam", "fedyogi", "fedadagrad"):
        return fedopt.FedOpt(cfg.name[3:], cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau)
    if cfg.name == "median":
        return median.Median()
    if cfg.name == "trimmed_mean":
        return trimmed_mean.TrimmedMean(cfg.trim)
    return krum.Krum(cfg.byzantine, 1 if cfg.name == "krum" else cfg.keep)


def stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[clients, P] in float64, so the server arithmetic adds no rounding of its own."""
    return torch.stack([p.to(torch.float64) for p in params])
