"""Sign-flipping attackers: malicious clients send w - scale (w_k - w), their honest update reversed and scaled."""

from __future__ import annotations

import torch

from flexp.algorithm import Algorithm
from flexp.attack import Attacker, sign_flip
from flexp.client import ClientResult


class SignFlip(Attacker):
    def __init__(self, inner: Algorithm, malicious: frozenset[int], scale: float = 1.0) -> None:
        super().__init__(inner, malicious)
        self.scale = scale

    def poison(self, round_: int, global_params: torch.Tensor, reply: ClientResult) -> torch.Tensor:
        return sign_flip(global_params, reply.params, self.scale)
