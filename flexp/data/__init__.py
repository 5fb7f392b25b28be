"""Datasets as whole tensors in memory; clients hold index tensors into them, so no Python runs per sample."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flexp.config import ConfigError, DatasetConfig
from flexp.data.federated import Dataset, DatasetError, FederatedDataset, Split, as_federated

__all__ = ["Dataset", "DatasetError", "FederatedDataset", "Split", "load_dataset"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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
    from flexp.data.synthetic import generate, split_per_user, total_samples

    need = total_samples(cfg.users, cfg.samples_per_user, cfg.seed) * (2 * 4 * cfg.features + 40)
    free = available_memory()
    if free is not None and need > free:
        key, value = ("dataset.users", cfg.users) if cfg.samples_per_user is None else \
            ("dataset.samples_per_user", cfg.samples_per_user)
        sizes = "FedProx's power-law sizes (dataset.samples_per_user: null)" if cfg.samples_per_user is None \
            else f"{cfg.samples_per_user} samples for each of {cfg.users:,} users"
        raise ConfigError(key, value, f"{sizes} need about {need / 2**30:.1f} GiB to generate, more than the "
                          f"{free / 2**30:.1f} GiB free here; set fewer users or dataset.samples_per_user")
    x, y, users = generate(cfg.alpha, cfg.beta, cfg.users, cfg.samples_per_user, cfg.features,
                           cfg.classes, cfg.seed)
    train, test = split_per_user(users, cfg.test_fraction, cfg.seed)
    return Dataset("synthetic", Split(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
                   Split(torch.from_numpy(x[test]), torch.from_numpy(y[test])), (cfg.features,),
                   cfg.classes, users[train], users[test], np.arange(cfg.users))


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can have (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_target_dataset(cfg: DatasetConfig) -> FederatedDataset:
    """Call dataset._target_ with its keyword arguments (Hydra's instantiate) and take what it returns as data."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from flexp.data.mnist import DataSourceError

    try:
        result = instantiate({"_target_": cfg.target, **cfg.options}, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ConfigError, DataSourceError)):
            raise err.__cause__ from None
        raise
    try:
        return as_federated(result, cfg.name)
    except DatasetError as err:
        raise ConfigError("dataset._target_", cfg.target, str(err)) from None


def load_dataset(cfg: DatasetConfig, log: Callable[[str], None] = print) -> Dataset:
    """Load the configured dataset."""
    if cfg.target is not None:
        return load_target_dataset(cfg)
    if cfg.name == "mnist":
        return load_mnist_dataset(cfg, log)
    return load_synthetic_dataset(cfg)
