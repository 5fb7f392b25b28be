"""FedDyn (Acar et al. 2021): dynamic regularization, so that the clients' local optima agree with the global one.

Client k minimises  L_k(w) - <g_k, w> + alpha/2 ||w - x||^2  from the global weights x, where g_k (its gradient
state, kept by the server between the client's rounds) then becomes g_k - alpha (y_k - x). The server keeps
h <- h - alpha/K sum_k (y_k - x) over the round's clients (K: all clients) and sets x <- mean_k y_k - h / alpha.
The mean is n_k-weighted as in FedAvg (the paper's plain mean when the clients hold equal data); alpha = 0 is
FedAvg. Written on flexp.algorithm alone: a loss term on the client, per-client and server state on the server.

    python -m flexp strategy=custom strategy._target_=flexp_examples.feddyn.FedDyn strategy.alpha=0.01
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm, Params, client_tensors, tensors, unflatten
from flexp.client import ClientResult
from flexp.client_state import ClientStore
from flexp.component import number


class FedDyn(Algorithm):
    """Holds h and every client's gradient state g_k (zero until the client has trained once)."""

    mean_aggregate = False  # each reply updates its client's g_k

    def __init__(self, num_clients: int, alpha: float = 0.01) -> None:
        self.num_clients, self.alpha = num_clients, number("alpha", alpha, low=0.0)
        self.h: Tensor | None = None
        self.grad = ClientStore()

    def message(self, client: int, round_: int, params: Tensor) -> dict[str, Tensor]:
        return {"grad": self.grad.get(client, torch.zeros_like(params))}

    def client_init(self, params: Params, message: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"grad": unflatten(message["grad"], params), "start": params}

    def loss(self, task_loss: Tensor, params: Params, cstate: Mapping[str, Any]) -> Tensor:
        """task loss - <g_k, w> + alpha/2 ||w - x||^2."""
        linear = sum((cstate["grad"][name] * p).sum() for name, p in params.items())
        quadratic = sum(((p - cstate["start"][name]) ** 2).sum() for name, p in params.items())
        return task_loss - linear + self.alpha / 2 * quadratic

    def aggregate(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> Tensor:
        average = weighted_average([r.params for r in replies], [r.num_samples for r in replies])
        if self.alpha == 0:
            return average
        x = params.double()
        if self.h is None:
            self.h = torch.zeros_like(x)
        for r in replies:
            moved = r.params.double() - x
            old = self.grad.get(r.client, torch.zeros_like(params)).double()
            self.grad[r.client] = (old - self.alpha * moved).to(params.dtype)
            self.h = self.h - self.alpha / self.num_clients * moved
        return (average.double() - self.h / self.alpha).to(params.dtype)

    def state_dict(self) -> dict[str, Any]:
        """{"h": h (once there is one), "grad": {client id: g_k}}: tensors and plain data only."""
        return {"grad": self.grad} | ({} if self.h is None else {"h": self.h})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.grad = client_tensors(state, "grad", "feddyn", self.num_clients)
        self.h = tensors({k: v for k, v in state.items() if k != "grad"}, "feddyn", ("h",)).get("h")
