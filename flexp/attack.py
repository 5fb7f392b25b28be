"""Byzantine clients: a fixed, seeded subset of clients, and the wrapper that turns any algorithm into an attacked
one (flexp/strategy/sign_flip.py, gaussian.py, label_flip.py say what the attackers do)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from flexp.algorithm import CLIENT_HOOKS, Algorithm, StepTerms, step_terms
from flexp.client import ClientResult


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """round(fraction * K) clients, drawn once from the seed; they stay malicious for the whole run."""
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 7])
    return frozenset(rng.choice(num_clients, size=count, replace=False).tolist())


def flipped_labels(num_classes: int) -> torch.Tensor:
    """The label map of a label-flipping client: class c is trained as class (C - 1 - c)."""
    return torch.arange(num_classes - 1, -1, -1)


def sign_flip(global_params: torch.Tensor, params: torch.Tensor, scale: float) -> torch.Tensor:
    """Send w - scale * (w_k - w): the honest update reversed and scaled."""
    return global_params - scale * (params - global_params)


def gaussian(global_params: torch.Tensor, scale: float, seed: int, round_: int, client: int) -> torch.Tensor:
    """Send random weights ~ N(0, scale^2), drawn from (seed, round, client)."""
    state = np.random.SeedSequence([seed, round_, client, 7]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> 1))
    noise = torch.randn(global_params.shape, generator=generator, dtype=global_params.dtype)
    return (noise * scale).to(global_params.device)


def poison(kind: str, global_params: torch.Tensor, params: torch.Tensor, scale: float, seed: int, round_: int,
           client: int) -> torch.Tensor:
    """What a malicious client sends instead of its trained weights (label_flip sends them unchanged)."""
    if kind == "sign_flip":
        return sign_flip(global_params, params, scale)
    if kind == "gaussian":
        return gaussian(global_params, scale, seed, round_, client)
    return params


class Attacker(Algorithm):
    """`inner` with `malicious` clients: their replies are marked and go through `poison`; everything else,
    client hooks included, is inner's (the hooks are inner's own bound methods, so a kernel that implements
    inner implements the attacked algorithm too, unless the attacker overrides a hook)."""

    def __init__(self, inner: Algorithm, malicious: frozenset[int]) -> None:
        self.inner, self.malicious = inner, malicious
        self.random, self.mean_aggregate, self.empty_rounds = inner.random, inner.mean_aggregate, inner.empty_rounds
        self.buffer_size = inner.buffer_size
        for name in CLIENT_HOOKS:
            if getattr(type(self), name) is getattr(Algorithm, name):
                setattr(self, name, getattr(inner, name))

    def poison(self, round_: int, global_params: torch.Tensor, reply: ClientResult) -> torch.Tensor:
        """What the malicious client sends instead of its trained weights (default: them, unchanged)."""
        return reply.params

    def message(self, client: int, round_: int, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner.message(client, round_, params)

    def step_terms(self) -> StepTerms | None:
        return step_terms(self.inner)

    def receive(self, round_: int, params: torch.Tensor, reply: ClientResult) -> ClientResult:
        reply = self.inner.receive(round_, params, reply)
        if reply.client not in self.malicious:
            return reply
        return replace(reply, params=self.poison(round_, params, reply), malicious=True)

    def aggregate(self, round_: int, params: torch.Tensor, replies: Any) -> torch.Tensor:
        return self.inner.aggregate(round_, params, replies)

    def broadcast(self, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.inner.broadcast(round_, params)

    def upload_bytes(self, reply: ClientResult) -> int:
        return self.inner.upload_bytes(reply)

    def round_metrics(self, round_: int) -> dict[str, float]:
        return self.inner.round_metrics(round_)

    def halt(self, round_: int) -> str | None:
        return self.inner.halt(round_)

    def run_params(self) -> dict[str, Any]:
        return self.inner.run_params()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
