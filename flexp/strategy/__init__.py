"""Server strategies: how the round's client weights become the next global weights. One strategy per module.

Each takes (global weights, client weights, client sample counts) as flat vectors and returns new global weights;
stateful ones (server momentum, adaptive optimizers) keep their state on the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from flexp.config import StrategyConfig


class Strategy(Protocol):
    """The server step of one round."""

    def aggregate(self, global_params: torch.Tensor, params: Sequence[torch.Tensor],
                  num_samples: Sequence[int]) -> torch.Tensor: ...


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
