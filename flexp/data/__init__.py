"""Datasets as whole tensors in memory; clients hold index tensors into them, so no Python runs per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flexp.config import DatasetConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split, ready for the model."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """A train/test pair plus what the model and partitions need to know about it."""

    name: str
    train: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    train_groups: np.ndarray | None = None

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.input_shape,
                       self.num_classes, self.train_groups)


def _mnist_images(raw: torch.Tensor) -> torch.Tensor:
    return ((raw.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1).contiguous()


def load_mnist_dataset(cfg: DatasetConfig, log: Callable[[str], None] = print) -> Dataset:
    """MNIST normalized as float tensors [N, 1, 28, 28]."""
    from flexp.data.mnist import load_mnist

    train_x, train_y, test_x, test_y = load_mnist(cfg.root, log=log)
    return Dataset("mnist", Split(_mnist_images(train_x), train_y), Split(_mnist_images(test_x), test_y),
                   (1, 28, 28), 10)


def load_synthetic_dataset(cfg: DatasetConfig) -> Dataset:
    """Synthetic(alpha, beta); each user's last test_fraction of samples goes to the shared test set."""
    from flexp.data.synthetic import generate, split_per_user

    x, y, users = generate(cfg.alpha, cfg.beta, cfg.users, cfg.samples_per_user, cfg.features,
                           cfg.classes, cfg.seed)
    train, test = split_per_user(users, cfg.test_fraction, cfg.seed)
    return Dataset("synthetic", Split(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
                   Split(torch.from_numpy(x[test]), torch.from_numpy(y[test])), (cfg.features,),
                   cfg.classes, users[train])


def load_dataset(cfg: DatasetConfig, log: Callable[[str], None] = print) -> Dataset:
    """Load the configured dataset."""
    if cfg.name == "mnist":
        return load_mnist_dataset(cfg, log)
    return load_synthetic_dataset(cfg)
