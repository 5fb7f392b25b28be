"""Per-class test accuracy: which classes the global model gets right."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flexp.callbacks import RoundData, predictions


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, float]:
    """{class: accuracy} over the test samples of each class; classes absent from the test set are left out."""
    total = torch.bincount(labels, minlength=classes)
    hits = torch.bincount(labels[predicted == labels], minlength=classes)
    return {str(c): float(hits[c]) / float(total[c]) for c in range(classes) if total[c] > 0}


class ClassAccuracy:
    """Test accuracy of the global model on each class, logged as `<name>/<class>`."""

    def __call__(self, round_: int, state: Any, model: nn.Module, data: RoundData) -> Mapping[str, float]:
        return per_class_accuracy(predictions(model, data.test.x), data.test.y, data.num_classes)
