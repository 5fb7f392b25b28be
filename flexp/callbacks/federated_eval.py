"""Federated evaluation: the global model's accuracy on each client's own data, and how fairly it is spread."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flexp.callbacks import RoundData, predictions
from flexp.partition import Partition


def client_accuracies(correct: torch.Tensor, partition: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-client accuracy from one correct/incorrect flag per training sample: a segment mean, no Python per
    sample (nor per client, for a Partition). Clients without data are left out."""
    if isinstance(partition, Partition):
        sizes = torch.from_numpy(partition.sizes()).to(correct.device)
        index = partition.indices.to(correct.device)
    else:
        sizes = torch.tensor([len(p) for p in partition], device=correct.device)
        index = torch.cat([p.to(correct.device) for p in partition])
    owner = torch.repeat_interleave(torch.arange(len(partition), device=correct.device), sizes)
    hits = torch.zeros(len(partition), dtype=torch.float64, device=correct.device)
    hits.index_add_(0, owner, correct[index].double())
    keep = sizes > 0
    return hits[keep] / sizes[keep]


def fairness(accuracy: torch.Tensor, worst: float = 0.1) -> dict[str, float]:
    """mean, std (population), the mean of the worst `worst` fraction (at least one client), the minimum, and Jain's
    index (sum a)^2 / (n sum a^2): 1 when all are equal, 1/n when one client has it all; 1 when all are 0."""
    a = accuracy.double()
    n = len(a)
    k = max(1, math.ceil(worst * n))
    squares = float((a * a).sum())
    return {"mean": float(a.mean()), "std": float(a.std(unbiased=False)),
            f"worst{round(worst * 100)}": float(a.sort().values[:k].mean()), "min": float(a.min()),
            "jain": float(a.sum()) ** 2 / (n * squares) if squares > 0 else 1.0}


class FederatedEvaluation:
    """Accuracy of the global model on each client's training data: mean, std, worst 10%, min, Jain's index."""

    def __init__(self, worst: float = 0.1) -> None:
        if not 0 < worst <= 1:
            raise ValueError(f"worst={worst!r} must be in (0, 1]")
        self.worst = worst

    def __call__(self, round_: int, state: Any, model: nn.Module, data: RoundData) -> Mapping[str, float]:
        correct = predictions(model, data.train.x) == data.train.y
        return fairness(client_accuracies(correct, data.partition), self.worst)
