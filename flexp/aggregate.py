"""Server-side aggregation as pure functions over flat parameter vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(params: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k p_k / sum_k w_k, accumulated in float64 in the order given, so the result is order-fixed."""
    if not params or len(params) != len(weights):
        raise ValueError(f"need one weight per parameter vector, got {len(params)} vectors and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    acc = torch.zeros_like(params[0], dtype=torch.float64)
    for p, w in zip(params, weights):
        acc.add_(p.to(torch.float64), alpha=float(w) / total)
    return acc.to(params[0].dtype)


def fedavg(params: Sequence[torch.Tensor], num_samples: Sequence[int]) -> torch.Tensor:
    """FedAvg's server step: weights n_k / m_t over the clients that returned (the paper's erratum)."""
    return weighted_average(params, num_samples)
