"""FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): an adaptive server optimizer on the averaged update."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm, tensors
from flexp.client import ClientResult
from flexp.component import number


def second_moment(kind: str, v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """v_t for adagrad (sum of squares), adam (EMA) or yogi (sign-controlled additive update)."""
    square = delta * delta
    if kind == "adagrad":
        return v + square
    if kind == "adam":
        return beta2 * v + (1 - beta2) * square
    return v - (1 - beta2) * square * torch.sign(v - square)


class FedOpt(Algorithm):
    """w <- w + server_lr * m / (sqrt(v) + tau), m and v moments of delta = average - w (bias-uncorrected); `kind`,
    the second moment, is each variant's (FedAdam, FedYogi, FedAdagrad)."""

    kind: str

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if not hasattr(self, "kind"):
            raise TypeError("FedOpt is the base of FedAdam, FedYogi and FedAdagrad: build one of those")
        self.server_lr = number("server_lr", server_lr, low=0.0, strict_low=True)
        self.beta1 = number("beta1", beta1, low=0.0, high=1.0)
        self.beta2 = number("beta2", beta2, low=0.0, high=1.0)
        self.tau = number("tau", tau, low=0.0, strict_low=True)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        w = global_params.double()
        delta = weighted_average([r.params for r in replies], [r.num_samples for r in replies]).double() - w
        if self.m is None:
            self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = second_moment(self.kind, self.v, delta, self.beta2)
        return (w + self.server_lr * self.m / (self.v.sqrt() + self.tau)).to(global_params.dtype)

    def state_dict(self) -> dict[str, Any]:
        """{"m": m, "v": v} after the first round, else {}."""
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        moments = tensors(state, f"fed{self.kind}", ("m", "v"))
        if len(moments) == 1:
            raise ValueError(f"fed{self.kind} state has only {next(iter(moments))}; it needs both m and v")
        self.m, self.v = moments.get("m"), moments.get("v")


class FedAdam(FedOpt):
    """v: an exponential moving average of delta^2."""

    kind = "adam"


class FedYogi(FedOpt):
    """v: Yogi's sign-controlled additive update."""

    kind = "yogi"


class FedAdagrad(FedOpt):
    """v: the running sum of delta^2."""

    kind = "adagrad"
