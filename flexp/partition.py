"""Client partitions of a training set: pure, seeded functions returning one index tensor per client."""

from __future__ import annotations

import numpy as np
import torch

Partition = list[torch.Tensor]


def _as_tensors(parts: list[np.ndarray]) -> Partition:
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def iid(num_samples: int, clients: int, seed: int) -> Partition:
    """Shuffle and split into `clients` equal parts (sizes differ by at most one)."""
    if clients > num_samples:
        raise ValueError(f"cannot give {clients} clients at least one of {num_samples} samples")
    order = np.random.default_rng(seed).permutation(num_samples)
    return _as_tensors(np.array_split(order, clients))


def shards(labels: np.ndarray, clients: int, shards_per_client: int, seed: int,
           num_shards: int | None = None) -> Partition:
    """The paper's pathological non-IID split: sort by label, cut into shards, deal them out at random."""
    num_shards = num_shards or clients * shards_per_client
    if num_shards % clients:
        raise ValueError(f"{num_shards} shards do not split evenly over {clients} clients")
    if num_shards > len(labels):
        raise ValueError(f"{num_shards} shards need at least as many samples, got {len(labels)}")
    by_label = np.argsort(labels, kind="stable")
    pieces = np.array_split(by_label, num_shards)
    dealt = np.random.default_rng(seed).permutation(num_shards).reshape(clients, -1)
    return _as_tensors([np.concatenate([pieces[s] for s in row]) for row in dealt])


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 1000) -> Partition:
    """Label skew: each class's samples go to clients in proportions drawn from Dir(alpha)."""
    if clients > len(labels):
        raise ValueError(f"cannot give {clients} clients at least one of {len(labels)} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for members in by_class:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(members, cuts)):
                part.append(piece)
        joined = [np.concatenate(p) for p in parts]
        if min(len(p) for p in joined) >= min_size:
            return _as_tensors(joined)
    raise ValueError(f"alpha={alpha} left some client with fewer than {min_size} samples in {max_tries} draws")


def natural(groups: np.ndarray, clients: int) -> Partition:
    """The dataset's own clients (e.g. synthetic's generator users), in group-id order."""
    found = int(groups.max()) + 1 if len(groups) else 0
    if found != clients:
        raise ValueError(f"the dataset has {found} natural clients, not {clients}")
    return _as_tensors([np.flatnonzero(groups == g) for g in range(found)])
