"""A small CNN with BatchNorm and Dropout, for `model=custom model._target_=flexp_examples.cnn.SmallCNN`."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool -> Dropout -> linear; flexp passes input_shape and num_classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, dropout: float = 0.25) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Dropout(dropout))
        self.head = nn.Linear(width * (height // 2) * (width_px // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
