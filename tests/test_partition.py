import numpy as np
import pytest
import torch

from flexp import partition


def _labels(n: int = 1000, classes: int = 10, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _check_cover(parts: list[torch.Tensor], n: int) -> None:
    everything = torch.cat(list(parts))
    assert len(everything) == n
    assert torch.equal(torch.sort(everything).values, torch.arange(n))


def test_iid_disjoint_covering_equal_sizes():
    parts = partition.iid(1003, 10, seed=1)
    _check_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_iid_deterministic_per_seed():
    a, b, c = partition.iid(500, 7, 5), partition.iid(500, 7, 5), partition.iid(500, 7, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_shards_two_labels_per_client_on_the_papers_layout():
    labels = np.repeat(np.arange(10), 600)  # 6000 samples, 600 per digit; shards of 30 never straddle labels
    parts = partition.shards(labels, clients=100, shards_per_client=2, seed=0)
    _check_cover(parts, len(labels))
    assert all(len(p) == 60 for p in parts)
    per_client = [len(np.unique(labels[p.numpy()])) for p in parts]
    assert max(per_client) <= 2 and min(per_client) >= 1
    assert sum(n == 2 for n in per_client) > 50


def test_shards_on_unsorted_labels_cover_and_stay_within_two_labels_mostly():
    labels = _labels(2000)
    parts = partition.shards(labels, clients=20, shards_per_client=2, seed=4)
    _check_cover(parts, 2000)
    assert max(len(np.unique(labels[p.numpy()])) for p in parts) <= 4  # a shard may straddle a label boundary


def test_shards_deterministic_and_seed_dependent():
    labels = _labels()
    a, b = partition.shards(labels, 10, 2, 1), partition.shards(labels, 10, 2, 1)
    c = partition.shards(labels, 10, 2, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs", [dict(clients=3, shards_per_client=2, num_shards=7),
                                    dict(clients=10, shards_per_client=200)])
def test_shards_reject_settings_that_cannot_split(kwargs):
    with pytest.raises(ValueError):
        partition.shards(_labels(1000), seed=0, **kwargs)


def test_dirichlet_covers_and_skews_with_small_alpha():
    labels = _labels(3000)
    skewed = partition.dirichlet(labels, 10, alpha=0.05, seed=0)
    even = partition.dirichlet(labels, 10, alpha=1000.0, seed=0)
    _check_cover(skewed, 3000)
    _check_cover(even, 3000)

    def mean_labels(parts):
        return np.mean([len(np.unique(labels[p.numpy()])) for p in parts])

    assert mean_labels(skewed) < 6 < mean_labels(even)
    assert all(torch.equal(x, y) for x, y in zip(skewed, partition.dirichlet(labels, 10, 0.05, 0)))


def test_natural_partition_follows_groups():
    groups = np.array([0, 1, 1, 2, 0, 2, 2])
    parts = partition.natural(groups, 3)
    assert [p.tolist() for p in parts] == [[0, 4], [1, 2], [3, 5, 6]]
    with pytest.raises(ValueError):
        partition.natural(groups, 4)
