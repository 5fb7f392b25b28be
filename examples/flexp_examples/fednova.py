"""FedNova (Wang et al. 2020): normalized averaging, so clients taking more local steps do not pull the global
model further than the others (objective inconsistency).

With plain local SGD a client's update after tau_k steps is y_k - x; FedNova averages the normalized updates
d_k = (y_k - x) / tau_k with weights p_k = n_k / n and rescales by the effective step count tau_eff = sum p_k tau_k:

    x <- x + server_lr * tau_eff * sum_k p_k d_k

With equal step counts this is FedAvg's weighted mean. Written on flexp.algorithm alone: a server step reading
each reply's `steps`, no client-side change.

    python -m flexp strategy=custom strategy._target_=flexp_examples.fednova.FedNova clients.stragglers=0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.algorithm import Algorithm
from flexp.client import ClientResult


def normalized_average(x: torch.Tensor, params: Sequence[torch.Tensor], num_samples: Sequence[int],
                       steps: Sequence[int], server_lr: float = 1.0) -> torch.Tensor:
    """x + server_lr tau_eff sum_k p_k (y_k - x) / tau_k, in float64, returned in x's dtype."""
    p = torch.tensor(num_samples, dtype=torch.float64) / sum(num_samples)
    tau = torch.tensor(steps, dtype=torch.float64)
    tau_eff = float((p * tau).sum())
    x64 = x.double()
    direction = sum(float(p_k / t_k) * (y.double() - x64) for p_k, t_k, y in zip(p, tau, params))
    return (x64 + server_lr * tau_eff * direction).to(x.dtype)


class FedNova(Algorithm):
    """FedAvg's clients; the server averages updates normalized by each client's local step count."""

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def aggregate(self, round_: int, params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        return normalized_average(params, [r.params for r in replies], [r.num_samples for r in replies],
                                  [max(r.steps, 1) for r in replies], self.server_lr)
