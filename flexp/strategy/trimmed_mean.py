"""Coordinate-wise trimmed mean (Yin et al. 2018): drop the beta fraction of largest and smallest values."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.algorithm import Algorithm
from flexp.client import ClientResult
from flexp.component import number
from flexp.strategy import stacked


def trimmed_mean(params: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Per coordinate, the mean after removing floor(beta * k) values from each end."""
    k = len(params)
    cut = int(beta * k)
    if 2 * cut >= k:
        raise ValueError(f"trimming {cut} of {k} values from each end leaves nothing")
    ordered = stacked(params).sort(dim=0).values
    return ordered[cut:k - cut].mean(dim=0).to(params[0].dtype)


class TrimmedMean(Algorithm):
    """The mean of each coordinate's middle values, ignoring sample counts."""

    mean_aggregate = False  # it ranks individual replies

    def __init__(self, trim: float = 0.1) -> None:
        self.trim = number("trim", trim, low=0.0, high=0.49)

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        return trimmed_mean([r.params for r in replies], self.trim)
