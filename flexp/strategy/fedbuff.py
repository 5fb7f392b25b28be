"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous FedAvg that steps every `buffer_size` arrivals, each update
weighted down by its staleness; `buffer_size=1` is FedAsync's update (Xie et al. 2019) on client deltas.

The clock-driven loop that runs it is flexp.asynchronous: an algorithm with `buffer_size` set runs there, and each
reply it aggregates carries its staleness s (server steps since its client downloaded the weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.aggregate import fedavg
from flexp.algorithm import Algorithm
from flexp.client import ClientResult
from flexp.component import Invalid, integer, number

STALENESS = ("constant", "polynomial", "hinge")


def staleness_weight(kind: str, staleness: int, a: float, b: float) -> float:
    """The weight of an update `staleness` steps old: `constant` 1; `polynomial` 1/(1+s)^a; `hinge` 1 up to s=b,
    then 1/(a(s-b)+1) (FedAsync's functions)."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -a)
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def buffered_step(global_params: torch.Tensor, params: Sequence[torch.Tensor], num_samples: Sequence[int],
                  weights: Sequence[float], server_lr: float) -> torch.Tensor:
    """w + server_lr sum_k n_k s_k (p_k - w) / sum_k n_k, in float64: with every s_k = 1 and server_lr = 1 that is
    FedAvg's n_k-weighted mean of the p_k, computed as FedAvg computes it (the same bits)."""
    if server_lr == 1.0 and all(w == 1.0 for w in weights):
        return fedavg(params, num_samples)
    base = global_params.double()
    total = float(sum(num_samples))
    delta = torch.zeros_like(base)
    for p, n, w in zip(params, num_samples, weights):
        delta.add_(p.double() - base, alpha=n * w / total)
    return (base + server_lr * delta).to(global_params.dtype)


class FedBuff(Algorithm):
    """Local SGD as FedAvg; the server applies the buffer of `buffer_size` updates with `server_lr`, each weighted
    by `staleness` (constant, polynomial 1/(1+s)^a, hinge with a and b)."""

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, staleness: str = "polynomial",
                 a: float = 0.5, b: float = 4.0) -> None:
        self.buffer_size = integer("buffer_size", buffer_size, low=1)
        self.server_lr = number("server_lr", server_lr, low=0.0, strict_low=True)
        if staleness not in STALENESS:
            raise Invalid("staleness", staleness, f"must be one of {', '.join(STALENESS)}")
        self.staleness = staleness
        self.a = number("a", a, low=0.0)
        self.b = number("b", b, low=0.0)

    def aggregate(self, round_: int, params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        weights = [staleness_weight(self.staleness, r.staleness, self.a, self.b) for r in replies]
        return buffered_step(params, [r.params for r in replies], [r.num_samples for r in replies], weights,
                             self.server_lr)
