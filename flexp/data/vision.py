"""`dataset=torchvision`: any torchvision dataset by class name, downloaded, cached and checksummed by torchvision."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexp.config import ConfigError
from flexp.data.federated import DatasetError, FederatedDataset, read_map_style
from flexp.data.mnist import DataSourceError

DOWNLOAD_TIMEOUT_S = 30.0


def _dataset_class(name: str) -> type:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type) or name.startswith("_"):
        raise ConfigError("dataset.name", name, "is not a torchvision dataset (e.g. FashionMNIST, CIFAR10, EMNIST)")
    return cls


def _split_kwargs(cls: type, name: str, split: str | None, train: bool) -> dict[str, Any]:
    """torchvision's own train/test switch: train=bool (EMNIST also its split), or split='train'/'test' (SVHN)."""
    options = getattr(cls, "splits", None)
    if isinstance(options, tuple):
        if split not in options:
            raise ConfigError("dataset.split", split, f"{name} needs one of {', '.join(options)}")
        return {"split": split, "train": train}
    if split is not None:
        raise ConfigError("dataset.split", split, f"{name} has no split to choose (EMNIST has)")
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return {"train": train}
    if "split" in params:
        return {"split": "train" if train else "test"}
    raise ConfigError("dataset.name", name, "has no train/test split flexp knows (train= or split=)")


def _arrays(ds: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a dataset's in-memory .data and .targets/.labels, else by reading every item once."""
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    data = getattr(ds, "data", None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and labels is not None and len(data) == len(labels):
        return torch.as_tensor(np.asarray(data)), torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return read_map_style(ds, split)


def load_torchvision(name: str, root: str, split: str | None = None, download: bool = True) -> FederatedDataset:
    """torchvision.datasets.<name>(root, train/test, download): torchvision fetches and verifies what is missing."""
    cls = _dataset_class(name)
    folder = Path(root).expanduser()
    splits = {}
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for part, train in (("train", True), ("test", False)):
            splits[part] = cls(str(folder), download=download, **_split_kwargs(cls, name, split, train))
    except (RuntimeError, OSError) as err:
        why = " ".join(str(err).split())[:300]
        if not download:
            raise ConfigError("dataset.root", root, f"holds no usable {name} ({why}); dataset.download=true "
                                                    "fetches it") from None
        raise DataSourceError(f"torchvision {name} under {folder}: {why}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    try:
        return FederatedDataset.from_arrays(*_arrays(splits["train"], "train"), *_arrays(splits["test"], "test"),
                                            name=name)
    except DatasetError as err:
        raise ConfigError("dataset.name", name, str(err)) from None
