"""Gaussian attackers: malicious clients send random weights ~ N(0, scale^2), drawn from (seed, round, client)."""

from __future__ import annotations

import torch

from flexp.algorithm import Algorithm
from flexp.attack import Attacker, gaussian
from flexp.client import ClientResult


class Gaussian(Attacker):
    def __init__(self, inner: Algorithm, malicious: frozenset[int], scale: float, seed: int) -> None:
        super().__init__(inner, malicious)
        self.scale, self.seed = scale, seed

    def poison(self, round_: int, global_params: torch.Tensor, reply: ClientResult) -> torch.Tensor:
        return gaussian(global_params, self.scale, self.seed, round_, reply.client)
