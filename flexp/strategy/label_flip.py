"""Label-flipping attackers: malicious clients train honestly on labels C - 1 - y and send what they trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flexp.algorithm import Algorithm
from flexp.attack import Attacker, flipped_labels


class LabelFlip(Attacker):
    """Every client receives a label map (the identity for honest ones) and trains on label_map[y]."""

    def __init__(self, inner: Algorithm, malicious: frozenset[int], num_classes: int) -> None:
        super().__init__(inner, malicious)
        self.flipped, self.identity = flipped_labels(num_classes), torch.arange(num_classes)

    def message(self, client: int, round_: int, params: torch.Tensor) -> dict[str, torch.Tensor]:
        label_map = self.flipped if client in self.malicious else self.identity
        return {**self.inner.message(client, round_, params), "label_map": label_map}

    def batch(self, x: torch.Tensor, y: torch.Tensor, cstate: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner.batch(x, y, cstate)
        return x, cstate["label_map"][y]
