"""FedAvg (McMahan et al. 2017): the n_k-weighted mean of the returned weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.aggregate import fedavg
from flexp.strategy import Stateless


class FedAvg(Stateless):
    """sum_k n_k w_k / sum_k n_k over the clients that returned."""

    def aggregate(self, global_params: torch.Tensor, params: Sequence[torch.Tensor],
                  num_samples: Sequence[int]) -> torch.Tensor:
        return fedavg(params, num_samples)
