"""Krum and Multi-Krum (Blanchard et al. 2017): keep the clients closest to their n - f - 2 nearest neighbours."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm
from flexp.client import ClientResult
from flexp.component import integer
from flexp.strategy import stacked


def krum_scores(params: Sequence[torch.Tensor], byzantine: int) -> torch.Tensor:
    """Each client's sum of squared distances to its n - f - 2 nearest other clients."""
    points = stacked(params)
    distances = torch.cdist(points, points).pow(2)
    nearest = max(len(params) - byzantine - 2, 1)
    others = distances + torch.diag(torch.full((len(params),), float("inf"), dtype=distances.dtype))
    return others.sort(dim=1).values[:, :nearest].sum(dim=1)


def multi_krum(params: Sequence[torch.Tensor], num_samples: Sequence[int], byzantine: int,
               keep: int) -> torch.Tensor:
    """The n_k-weighted mean of the `keep` lowest-scored clients (keep=1 is Krum)."""
    chosen = krum_scores(params, byzantine).argsort(stable=True)[:keep].sort().values.tolist()
    return weighted_average([params[i] for i in chosen], [num_samples[i] for i in chosen])


class MultiKrum(Algorithm):
    """Multi-Krum keeping `keep` clients under at most `byzantine` attackers."""

    mean_aggregate = False  # it ranks individual replies

    def __init__(self, byzantine: int = 1, keep: int = 5) -> None:
        self.byzantine = integer("byzantine", byzantine, low=0)
        self.keep = integer("keep", keep, low=1)

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        return multi_krum([r.params for r in replies], [r.num_samples for r in replies], self.byzantine,
                          min(self.keep, len(replies)))


class Krum(MultiKrum):
    """Multi-Krum keeping one client."""

    def __init__(self, byzantine: int = 1) -> None:
        super().__init__(byzantine, keep=1)
