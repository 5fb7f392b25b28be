"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates correct each client's drift from the server.

Clients step with g + (c - c_i); after K local steps c_i+ = c_i - c + (x - y_i) / (K lr). The server moves x by
server_lr times the n_k-weighted mean of y_i - x and c by (1/N) sum of (c_i+ - c_i). With every c zero (round
one) and server_lr = 1 the round is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm, Params, StepTerms, client_tensors, tensors, unflatten
from flexp.client import ClientResult
from flexp.client_state import ClientStore
from flexp.component import integer, number


def client_control(c_i: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int,
                   lr: float) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K lr), in float64."""
    return c_i - c + (x.double() - y.double()) / (steps * lr)


def server_step(x: torch.Tensor, params: Sequence[torch.Tensor], num_samples: Sequence[int],
                server_lr: float) -> torch.Tensor:
    """x + server_lr (weighted mean of y_i - x); server_lr = 1 is the weighted mean itself."""
    average = weighted_average(params, num_samples)
    if server_lr == 1.0:
        return average
    return (x.double() + server_lr * (average.double() - x.double())).to(x.dtype)


class Scaffold(Algorithm):
    """Holds c and every client's c_i (created at zero on a client's first round); sends each client c - c_i."""

    mean_aggregate = False  # it uses each client's own reply (to update its c_i), not only their mean

    def __init__(self, num_clients: int, lr: float, server_lr: float = 1.0) -> None:
        """num_clients (K) and lr (the clients' rate) are fl.clients and fl.lr, supplied by flexp."""
        self.num_clients = integer("num_clients", num_clients, low=1)
        self.lr = number("lr", lr, low=0.0, strict_low=True)
        self.server_lr = number("server_lr", server_lr, low=0.0, strict_low=True)
        self.c: torch.Tensor | None = None
        self.c_i = ClientStore()  # created for a client at its first reply; off RAM past checkpoint.client_state_mb

    def correction(self, client: int, global_params: torch.Tensor) -> torch.Tensor:
        """c - c_i for a client about to train, in the parameters' dtype."""
        if self.c is None:
            self.c = torch.zeros_like(global_params, dtype=torch.float64)
        own = self.c_i.get(client)
        return (self.c if own is None else self.c - own.double()).to(global_params.dtype)

    def message(self, client: int, round_: int, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"correction": self.correction(client, params)}

    def step(self, params: Params, grads: Params, cstate: dict[str, Any], lr: float) -> tuple[Params, dict[str, Any]]:
        correction = unflatten(cstate["correction"], params)
        return super().step(params, {name: g + correction[name] for name, g in grads.items()}, cstate, lr)

    def step_terms(self) -> StepTerms:
        return StepTerms(correction="correction")

    def upload_bytes(self, reply: ClientResult) -> int:
        """The reply and its control-variate delta (c_i+ - c_i, computed here on the server from the reply)."""
        return super().upload_bytes(reply) + reply.params.numel() * reply.params.element_size()

    def aggregate(self, round_: int, global_params: torch.Tensor, replies: Sequence[ClientResult]) -> torch.Tensor:
        """Update every returning client's c_i and the server's c, and return the new global weights."""
        if self.c is None:
            self.c = torch.zeros_like(global_params, dtype=torch.float64)
        delta_c = torch.zeros_like(self.c)
        for r in replies:
            old = self.c_i.get(r.client, torch.zeros_like(global_params)).double()
            new = client_control(old, self.c, global_params, r.params, r.steps, self.lr)
            delta_c += new - old
            self.c_i[r.client] = new.to(global_params.dtype)  # K of them: kept in the model's dtype
        new_global = server_step(global_params, [r.params for r in replies], [r.num_samples for r in replies],
                                 self.server_lr)
        self.c = self.c + delta_c / self.num_clients
        return new_global

    def state_dict(self) -> dict[str, Any]:
        """{"c": c (once there is one), "c_i": {client id: c_i}}."""
        return {"c_i": self.c_i} | ({} if self.c is None else {"c": self.c})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c_i = client_tensors(state, "c_i", "scaffold", self.num_clients)
        self.c = tensors({k: v for k, v in state.items() if k != "c_i"}, "scaffold", ("c",)).get("c")
