"""Evaluation and the paper's rounds-to-target metric."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flexp.data import Split


def evaluate(module: nn.Module, split: Split, batch_size: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `module` on a whole split, in large inference batches."""
    was_training = module.training
    module.eval()
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    loss = torch.zeros((), dtype=torch.float64, device=split.x.device)
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            logits = module(split.x[start:start + batch_size])
            labels = split.y[start:start + batch_size]
            loss += F.cross_entropy(logits, labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
    module.train(was_training)
    return int(correct) / len(split), float(loss) / len(split)


def rounds_to_target(history: Iterable[tuple[int, float]], target: float) -> int | None:
    """First round whose best accuracy so far reaches `target` (the paper's monotone curve), or None."""
    best = float("-inf")
    for round_, accuracy in history:
        best = max(best, accuracy)
        if best >= target:
            return round_
    return None
