"""Client partitions of a training set: pure, seeded functions returning each client's sorted sample indices."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class Partition(Sequence[torch.Tensor]):
    """K clients' indices as one array cut by offsets (CSR), so a million clients cost two arrays, not K tensors.

    `part[k]` is client k's indices as a view into `indices`; `len(part)` is K; it equals the list of those tensors.
    """

    def __init__(self, indices: torch.Tensor, offsets: np.ndarray) -> None:
        self.indices = indices
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_owners(cls, owner: np.ndarray, clients: int) -> Partition:
        """Sample i goes to client owner[i]; each client's indices come out ascending."""
        order = np.argsort(owner, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=clients))])
        return cls(torch.from_numpy(order.astype(np.int64)), offsets)

    @classmethod
    def from_list(cls, parts: Sequence[torch.Tensor]) -> Partition:
        """The same clients from a list of index tensors (kept in their order)."""
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        flat = [torch.as_tensor(p, dtype=torch.int64) for p in parts]
        return cls(torch.cat(flat) if flat else torch.empty(0, dtype=torch.int64), np.cumsum([0, *sizes]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int | slice) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"client {k} of {len(self)}")
        return self.indices[int(self.offsets[k]):int(self.offsets[k + 1])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in range(len(self)))

    def sizes(self) -> np.ndarray:
        """n_k of every client, as one array."""
        return np.diff(self.offsets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(torch.equal(a, torch.as_tensor(b)) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Partition({len(self)} clients, {len(self.indices)} samples)"


def _by_owner(values: np.ndarray, owner: np.ndarray, clients: int) -> Partition:
    """Client k gets the `values` whose owner is k, ascending (what sorting each client's list gave)."""
    order = np.lexsort((values, owner))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=clients))])
    return Partition(torch.from_numpy(values[order].astype(np.int64)), offsets)


def _split_owner(n: int, parts: int) -> np.ndarray:
    """For each of n positions, which of np.array_split's `parts` pieces holds it."""
    base, extra = divmod(n, parts)
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.repeat(np.arange(parts), sizes)


def iid(num_samples: int, clients: int, seed: int) -> Partition:
    """Shuffle and split into `clients` equal parts (sizes differ by at most one)."""
    if clients > num_samples:
        raise ValueError(f"cannot give {clients} clients at least one of {num_samples} samples")
    order = np.random.default_rng(seed).permutation(num_samples)
    return _by_owner(order, _split_owner(num_samples, clients), clients)


def shards(labels: np.ndarray, clients: int, shards_per_client: int, seed: int,
           num_shards: int | None = None) -> Partition:
    """The paper's pathological non-IID split: sort by label, cut into shards, deal them out at random."""
    num_shards = num_shards or clients * shards_per_client
    if num_shards % clients:
        raise ValueError(f"{num_shards} shards do not split evenly over {clients} clients")
    if num_shards > len(labels):
        raise ValueError(f"{num_shards} shards need at least as many samples, got {len(labels)}")
    by_label = np.argsort(labels, kind="stable")
    dealt = np.random.default_rng(seed).permutation(num_shards).reshape(clients, -1)
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[dealt] = np.arange(clients)[:, None]
    return _by_owner(by_label, client_of_shard[_split_owner(len(labels), num_shards)], clients)


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 1000) -> Partition:
    """Label skew: each class's samples go to clients in proportions drawn from Dir(alpha)."""
    if clients > len(labels):
        raise ValueError(f"cannot give {clients} clients at least one of {len(labels)} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        values, owners = [], []
        for members in by_class:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            values.append(members)
            owners.append(np.searchsorted(cuts, np.arange(len(members)), side="right"))
        owner = np.concatenate(owners)
        if np.bincount(owner, minlength=clients).min() >= min_size:
            return _by_owner(np.concatenate(values), owner, clients)
    raise ValueError(f"alpha={alpha} left some client with fewer than {min_size} samples in {max_tries} draws")


def natural(groups: np.ndarray, clients: int) -> Partition:
    """The dataset's own clients (e.g. synthetic's generator users), in group-id order."""
    found = int(groups.max()) + 1 if len(groups) else 0
    if found != clients:
        raise ValueError(f"the dataset has {found} natural clients, not {clients}")
    return Partition.from_owners(np.asarray(groups, dtype=np.int64), found)
