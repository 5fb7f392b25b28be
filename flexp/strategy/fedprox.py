"""FedProx (Li et al. 2020): each client minimises its loss plus mu/2 ||w - w_global||^2; the server is FedAvg's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from flexp.algorithm import Algorithm, Params, StepTerms
from flexp.component import number


class FedProx(Algorithm):
    """The proximal term enters as its gradient, mu (w - anchor), added before the SGD step; mu=0 is FedAvg."""

    def __init__(self, mu: float = 0.0) -> None:
        self.mu = number("mu", mu, low=0.0)

    def client_init(self, params: Params, message: Mapping[str, Tensor]) -> dict[str, Any]:
        return {**message, "anchor": params}

    def step(self, params: Params, grads: Params, cstate: dict[str, Any], lr: float) -> tuple[Params, dict[str, Any]]:
        anchor = cstate["anchor"]
        pulled = {name: g.add(params[name] - anchor[name], alpha=self.mu) for name, g in grads.items()}
        return super().step(params, pulled, cstate, lr)

    def step_terms(self) -> StepTerms:
        return StepTerms(proximal=self.mu)
