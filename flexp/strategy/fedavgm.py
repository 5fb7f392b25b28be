"""FedAvgM (Hsu et al. 2019): server momentum on the pseudo-gradient global - average."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm, tensors
from flexp.client import ClientResult
from flexp.component import number


def momentum_step(global_params: torch.Tensor, average: torch.Tensor, velocity: torch.Tensor | None,
                  server_lr: float, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v <- momentum * v + (w - avg); w <- w - server_lr * v. Returns (new weights, new v), in float64."""
    delta = global_params.double() - average.double()
    velocity = delta if velocity is None else momentum * velocity + delta
    return global_params.double() - server_lr * velocity, velocity


class FedAvgM(Algorithm):
    """FedAvg with server momentum; momentum=0, server_lr=1 is FedAvg exactly."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = number("server_lr", server_lr, low=0.0, strict_low=True)
        self.momentum = number("momentum", momentum, low=0.0, high=1.0)
        self.velocity: torch.Tensor | None = None

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        average = weighted_average([r.params for r in replies], [r.num_samples for r in replies])
        new, self.velocity = momentum_step(global_params, average, self.velocity, self.server_lr, self.momentum)
        return new.to(global_params.dtype)

    def state_dict(self) -> dict[str, Any]:
        """{"velocity": v} once there is one, else {}."""
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = tensors(state, "fedavgm", ("velocity",)).get("velocity")
