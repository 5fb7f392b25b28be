"""A fairness callback: how the global model fares on the worst-off client, and how much clients differ.

    python -m flexp callbacks.fair._target_=flexp_examples.fairness.Fairness

logs fair/worst (the lowest per-client accuracy) and fair/variance (the population variance of per-client
accuracy), each on the clients' own training data, after every evaluated round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flexp.callbacks import RoundData, predictions


class Fairness:
    """callback(round, state, model, data) -> {"worst": min_k acc_k, "variance": var_k acc_k}."""

    def __call__(self, round_: int, state: Any, model: nn.Module, data: RoundData) -> Mapping[str, float]:
        correct = (predictions(model, data.train.x) == data.train.y).double()
        accuracy = torch.stack([correct[idx].mean() for idx in data.partition if len(idx)])
        return {"worst": float(accuracy.min()), "variance": float(accuracy.var(unbiased=False))}
