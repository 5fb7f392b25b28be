"""Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary client weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.algorithm import Algorithm
from flexp.client import ClientResult
from flexp.strategy import stacked


def coordinate_median(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the middle value (the mean of the two middle ones for an even count)."""
    ordered = stacked(params).sort(dim=0).values
    k = len(params)
    middle = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return middle.to(params[0].dtype)


class Median(Algorithm):
    """Ignores sample counts: every returned client votes once per coordinate."""

    mean_aggregate = False  # it ranks individual replies

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        return coordinate_median([r.params for r in replies])
