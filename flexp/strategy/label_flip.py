"""Label-flipping attackers: malicious clients train honestly on labels C - 1 - y and send what they trained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from flexp.algorithm import Algorithm, Batch, Params, StepTerms, overrides, step_terms
from flexp.attack import Attacker, flipped_labels


class LabelFlip(Attacker):
    """Every client receives a label map (the identity for honest ones) and trains on label_map[y]."""

    def __init__(self, inner: Algorithm, malicious: frozenset[int], num_classes: int) -> None:
        super().__init__(inner, malicious)
        self.flipped, self.identity = flipped_labels(num_classes), torch.arange(num_classes)
        if overrides(inner, "gradient"):  # inner computes its own gradients: its batch hook, not ours, would run
            self.gradient = self.flipped_gradient

    def message(self, client: int, round_: int, params: torch.Tensor) -> dict[str, torch.Tensor]:
        label_map = self.flipped if client in self.malicious else self.identity
        return {**self.inner.message(client, round_, params), "label_map": label_map}

    def flipped_gradient(self, batch: Batch, params: Params,
                         cstate: dict[str, Any]) -> tuple[Params, torch.Tensor, dict[str, Any]]:
        """inner's own gradient hook on the batch with its labels mapped."""
        return self.inner.gradient(replace(batch, y=cstate["label_map"][batch.y]), params, cstate)

    def step_terms(self) -> StepTerms | None:
        inner = step_terms(self.inner)
        return None if inner is None or inner.label_map else replace(inner, label_map="label_map")

    def batch(self, x: torch.Tensor, y: torch.Tensor, cstate: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner.batch(x, y, cstate)
        return x, cstate["label_map"][y]
