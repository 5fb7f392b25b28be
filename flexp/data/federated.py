"""A federated dataset: train and test tensors in memory, natural client ids mapped to clients 0..K-1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

ARRAYS = ("x_train", "y_train", "x_test", "y_test", "client_train", "client_test")


class DatasetError(ValueError):
    """Arrays that cannot form a dataset; the message names the array."""


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
class FederatedDataset:
    """A train/test pair plus what the model and partitions need to know about it.

    train_groups[i] is the client (0..K-1) of training sample i, test_groups the same for the test set (per-client
    test data); client_ids[k] is client k's own id in the source data (ids are taken in sorted order).
    """

    name: str
    train: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    client_ids: np.ndarray | None = None

    def to(self, device: torch.device | str) -> FederatedDataset:
        return replace(self, train=self.train.to(device), test=self.test.to(device))

    @classmethod
    def from_arrays(cls, x_train: Any, y_train: Any, x_test: Any, y_test: Any, client_train: Any = None,
                    client_test: Any = None, name: str = "custom", num_classes: int | None = None) -> FederatedDataset:
        """Build from arrays or tensors: uint8 images scaled and standardised, ids of any values mapped to 0..K-1."""
        x_tr, x_te = _inputs(x_train, "x_train"), _inputs(x_test, "x_test")
        y_tr, y_te = _labels(y_train, "y_train", len(x_tr)), _labels(y_test, "y_test", len(x_te))
        for key, y in (("x_train", y_tr), ("x_test", y_te)):
            if len(y) == 0:
                raise DatasetError(f"{key}: has no samples")
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DatasetError(f"x_test: samples of shape {tuple(x_te.shape[1:])}, x_train's are "
                               f"{tuple(x_tr.shape[1:])}")
        x_tr, x_te = _normalised(x_tr, x_te)
        return cls(name, Split(x_tr, y_tr), Split(x_te, y_te), tuple(x_tr.shape[1:]),
                   _num_classes(y_tr, y_te, num_classes), *_groups(client_train, client_test, len(y_tr), len(y_te)))

    @classmethod
    def from_map_style(cls, train: Any, test: Any, name: str = "custom",
                       num_classes: int | None = None) -> FederatedDataset:
        """Build from two map-style datasets of (x, y) items (e.g. torch Datasets), read once into tensors."""
        return cls.from_arrays(*read_map_style(train, "train"), *read_map_style(test, "test"), name=name,
                               num_classes=num_classes)


Dataset = FederatedDataset


def as_federated(result: Any, name: str) -> FederatedDataset:
    """Whatever a dataset callable returned (a FederatedDataset, a mapping of ARRAYS, a tuple of them, or a pair of
    map-style datasets) as a FederatedDataset."""
    if isinstance(result, FederatedDataset):
        return result
    if isinstance(result, Mapping):
        unknown = sorted(set(result) - {*ARRAYS, "num_classes", "name"})
        if unknown:
            raise DatasetError(f"{unknown[0]}: unknown array; expected {', '.join(ARRAYS)} (and num_classes)")
        missing = [k for k in ARRAYS[:4] if k not in result]
        if missing:
            raise DatasetError(f"{missing[0]}: is missing")
        return FederatedDataset.from_arrays(**{"name": name, **result})
    if isinstance(result, Sequence) and len(result) == 2 and not _is_array(result[0]):
        return FederatedDataset.from_map_style(*result, name=name)
    if isinstance(result, Sequence) and 4 <= len(result) <= 6:
        return FederatedDataset.from_arrays(*result, name=name)
    raise DatasetError(f"returned a {type(result).__name__}; expected a FederatedDataset, a dict of "
                       f"{', '.join(ARRAYS)}, a tuple (x_train, y_train, x_test, y_test[, client_train]) or a pair "
                       "of map-style datasets")


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _tensor(value: Any, key: str) -> torch.Tensor:
    try:
        array = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{key}: is not a numeric array ({' '.join(str(err).split())})") from None
    if array.is_complex():
        raise DatasetError(f"{key}: complex values are not inputs")
    return array


def _inputs(value: Any, key: str) -> torch.Tensor:
    x = _tensor(value, key)
    if x.ndim < 2:
        raise DatasetError(f"{key}: must have a sample axis and at least one feature axis, got shape {tuple(x.shape)}")
    return x


def _labels(value: Any, key: str, rows: int) -> torch.Tensor:
    y = _tensor(value, key)
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise DatasetError(f"{key}: must be 1-D integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) != rows:
        raise DatasetError(f"{key}: has {len(y)} labels, x_{key[2:]} has {rows} samples")
    if len(y) and int(y.min()) < 0:
        raise DatasetError(f"{key}: labels must be >= 0, found {int(y.min())}")
    return y.to(torch.int64)


def _num_classes(y_train: torch.Tensor, y_test: torch.Tensor, given: int | None) -> int:
    found = int(max(y_train.max(), y_test.max())) + 1
    if given is not None and int(given) < found:
        raise DatasetError(f"num_classes: {given}, but the labels go up to {found - 1}")
    return int(given) if given is not None else found


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """[N,H,W] -> [N,1,H,W]; channels-last [N,H,W,C] (C in 1, 3, 4) -> [N,C,H,W]."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.permute(0, 3, 1, 2)
    return x


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and std of uint8 [N, C, ...] data in [0, 1], from each channel's value histogram."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1) if x.ndim > 2 else x.reshape(1, -1)
    means, stds = [], []
    for channel in per_channel:
        counts = torch.bincount(channel.to(torch.int64), minlength=256).to(torch.float64)
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means), torch.stack(stds)


def _normalised(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 inputs are images: [N,C,H,W] floats standardised per channel with the training set's statistics;
    other integers (token ids) become int64, bools and floats float32."""
    if x_train.dtype != torch.uint8 or x_test.dtype != torch.uint8:
        return _plain(x_train), _plain(x_test)
    x_train, x_test = _channels_first(x_train), _channels_first(x_test)
    mean, std = _channel_stats(x_train)
    shape = (1, -1) + (1,) * (x_train.ndim - 2) if x_train.ndim > 2 else (1, 1)
    mean, std = mean.float().reshape(shape), std.float().clamp_min(1e-12).reshape(shape)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).contiguous()

    return scaled(x_train), scaled(x_test)


def _plain(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point() or x.dtype == torch.bool:
        return x.to(torch.float32).contiguous()
    return x.to(torch.int64).contiguous()


def _groups(client_train: Any, client_test: Any, n_train: int,
            n_test: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(train_groups, test_groups, client_ids): each sample's client 0..K-1, clients in sorted-id order."""
    if client_train is None:
        if client_test is not None:
            raise DatasetError("client_test: given without client_train")
        return None, None, None
    ids = _ids(client_train, "client_train", n_train)
    client_ids, train_groups = np.unique(ids, return_inverse=True)
    if client_test is None:
        return train_groups.astype(np.int64), None, client_ids
    test_ids = _ids(client_test, "client_test", n_test)
    unseen = np.setdiff1d(test_ids, client_ids)
    if len(unseen):
        raise DatasetError(f"client_test: ids {unseen[:5].tolist()} have no training samples")
    return train_groups.astype(np.int64), np.searchsorted(client_ids, test_ids).astype(np.int64), client_ids


def _ids(value: Any, key: str, rows: int) -> np.ndarray:
    ids = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if ids.ndim != 1 or len(ids) != rows:
        raise DatasetError(f"{key}: must hold one client id per sample ({rows}), got shape {ids.shape}")
    if ids.dtype.kind not in "iuUS":
        raise DatasetError(f"{key}: client ids must be integers or strings, got {ids.dtype}")
    return ids


def read_map_style(dataset: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a map-style dataset's (x, y) items once into two tensors."""
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
    except TypeError:
        raise DatasetError(f"x_{split}: the {split} dataset is not map-style (no len() or [i])") from None
    if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
        raise DatasetError(f"x_{split}: the {split} dataset's items must be (x, y) pairs")
    xs = [_tensor(x if isinstance(x, torch.Tensor) else np.array(x), f"x_{split}") for x, _ in pairs]
    shapes = sorted({tuple(x.shape) for x in xs})
    if len(shapes) > 1:
        raise DatasetError(f"x_{split}: items differ in shape ({shapes[0]}, {shapes[1]}, ...)")
    x = torch.stack(xs) if xs else torch.empty(0, 0)
    return x, torch.as_tensor([int(y) for _, y in pairs], dtype=torch.int64)
