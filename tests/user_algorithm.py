"""A user algorithm written on flexp.algorithm alone: local SGD with momentum whose velocity each client keeps
from one round to the next (per-client state held by the server), plus a server-side round counter."""

from __future__ import annotations

import torch

from flexp.algorithm import Algorithm, StepTerms, tensors, unflatten


class LocalMomentum(Algorithm):
    """v <- beta v + g; w <- w - lr v on the client; v travels as a message and comes back in the reply."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.velocity: dict[int, torch.Tensor] = {}
        self.rounds = torch.zeros((), dtype=torch.int64)

    def message(self, client, round_, params):
        return {"velocity": self.velocity.get(client, torch.zeros_like(params))}

    def client_init(self, params, message):
        return {"velocity": unflatten(message["velocity"], params)}

    def step(self, params, grads, cstate, lr):
        velocity = {name: self.beta * v + grads[name] for name, v in cstate["velocity"].items()}
        return {name: p - lr * velocity[name] for name, p in params.items()}, {"velocity": velocity}

    def client_final(self, start, params, cstate):
        return {"velocity": torch.cat([v.reshape(-1) for v in cstate["velocity"].values()])}

    def aggregate(self, round_, params, replies):
        self.rounds = self.rounds + 1
        for r in replies:
            self.velocity[r.client] = r.extra["velocity"]
        return super().aggregate(round_, params, replies)

    def state_dict(self):
        return {"velocity": dict(self.velocity), "rounds": self.rounds}

    def load_state_dict(self, state):
        self.velocity = tensors(state["velocity"], "momentum velocity", list(state["velocity"]))
        self.rounds = state["rounds"]


class Proximal(Algorithm):
    """FedProx written another way (its term in the loss, mu/2 ||w - w_start||^2) and declared as StepTerms: the
    hand kernels run it without knowing the class."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def client_init(self, params, message):
        return {**message, "start": {name: p.clone() for name, p in params.items()}}

    def loss(self, task_loss, params, cstate):
        start = cstate["start"]
        return task_loss + self.mu / 2 * sum(((p - start[name]) ** 2).sum() for name, p in params.items())

    def step_terms(self):
        return StepTerms(proximal=self.mu)
