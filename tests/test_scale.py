"""A million clients: the array partition, the batched synthetic generator and the mapped npz give what the list
partition, the per-user loop and the in-memory npz gave, bit for bit."""


import numpy as np
import pytest
import torch
from conftest import SMALL

import flexp
from flexp import partition
from flexp.algorithm import Algorithm
from flexp.client import LocalSpec
from flexp.config import DataConfig, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.data.synthetic import generate, split_per_user
from flexp.engine.threads import ThreadEngine
from flexp.fedavg import round_tasks, run_fedavg
from flexp.models import build_model


def _sorted(parts):
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def list_iid(n, clients, seed):
    return _sorted(np.array_split(np.random.default_rng(seed).permutation(n), clients))


def list_shards(labels, clients, per_client, seed, num_shards=None):
    num_shards = num_shards or clients * per_client
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    dealt = np.random.default_rng(seed).permutation(num_shards).reshape(clients, -1)
    return _sorted([np.concatenate([pieces[s] for s in row]) for row in dealt])


def list_dirichlet(labels, clients, alpha, seed, min_size=1):
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    while True:
        parts = [[] for _ in range(clients)]
        for members in by_class:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(members, cuts)):
                part.append(piece)
        joined = [np.concatenate(p) for p in parts]
        if min(len(p) for p in joined) >= min_size:
            return _sorted(joined)


def list_natural(groups, clients):
    return _sorted([np.flatnonzero(groups == g) for g in range(clients)])


LABELS = np.random.default_rng(0).integers(0, 10, 1500)
GROUPS = np.concatenate([np.arange(23), np.random.default_rng(1).integers(0, 23, 977)])
CASES = [(partition.iid, list_iid, (1003, 17, 4)), (partition.iid, list_iid, (40, 40, 0)),
         (partition.shards, list_shards, (LABELS, 30, 2, 1)), (partition.shards, list_shards, (LABELS, 10, 3, 2, 70)),
         (partition.dirichlet, list_dirichlet, (LABELS, 25, 0.2, 5)),
         (partition.dirichlet, list_dirichlet, (LABELS, 8, 50.0, 3)), (partition.natural, list_natural, (GROUPS, 23))]


@pytest.mark.parametrize("new, old, args", CASES, ids=[c[0].__name__ for c in CASES])
def test_the_array_partition_equals_the_list_one_client_by_client(new, old, args):
    parts, expected = new(*args), old(*args)
    assert isinstance(parts, partition.Partition) and len(parts) == len(expected)
    for got, want in zip(parts, expected):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert parts == expected and parts.sizes().tolist() == [len(p) for p in expected]
    assert partition.Partition.from_list(expected) == expected


def test_a_client_is_a_view_and_a_task_its_own_copy():
    parts = partition.natural(GROUPS, 23)
    assert parts[-1].data_ptr() == parts[22].data_ptr()
    assert parts[3].untyped_storage().data_ptr() == parts.indices.untyped_storage().data_ptr()
    with pytest.raises(IndexError):
        parts[23]
    tasks = round_tasks(parts, [3, 7], {}, 0, 1, DataConfig(), Algorithm(), torch.zeros(1))
    assert [t.indices.tolist() for t in tasks] == [parts[3].tolist(), parts[7].tolist()]
    assert all(t.indices.untyped_storage().nbytes() == 8 * len(t.indices) for t in tasks)


def test_a_run_on_the_array_partition_equals_one_on_the_list():
    data = load_dataset(DatasetConfig(name="synthetic", users=12, samples_per_user=None, alpha=0.5, beta=0.5, seed=1))
    fl = FLConfig(12, 0.5, 2, 10, 0.05, 3, 1, None, False)
    parts = partition.natural(data.train_groups, 12)
    finals = []
    for given in (parts, list_natural(data.train_groups, 12)):
        torch.manual_seed(0)
        model = build_model("logreg", data.input_shape, data.num_classes)
        engine = ThreadEngine(lambda: build_model("logreg", data.input_shape, data.num_classes), data.train,
                              LocalSpec(2, 10, 0.05), 2)
        finals.append(run_fedavg(model, given, data.test, fl, engine, seed=7).params)
        engine.close()
    assert torch.equal(*finals)


def list_generate(alpha, beta, users, samples_per_user, features, classes, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, users).astype(int) + 50 if samples_per_user is None else np.full(users,
                                                                                               samples_per_user)
    std = np.arange(1, features + 1, dtype=np.float64) ** -0.6
    model_means = rng.normal(0, np.sqrt(alpha), users) if alpha else np.zeros(users)
    input_centres = rng.normal(0, np.sqrt(beta), users) if beta else np.zeros(users)
    xs, ys = [], []
    for user in range(users):
        weights = rng.normal(model_means[user], 1, (features, classes))
        bias = rng.normal(model_means[user], 1, classes)
        x = rng.normal(input_centres[user], 1, features) + rng.standard_normal((sizes[user], features)) * std
        xs.append(x)
        ys.append(np.argmax(x @ weights + bias, axis=1))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.repeat(np.arange(users), sizes)


@pytest.mark.parametrize("args", [(1.0, 1.0, 30, None, 60, 10, 0), (0.5, 2.0, 700, 7, 20, 5, 3),
                                  (0.0, 0.0, 50, 1, 3, 2, 1)])
def test_the_synthetic_generator_draws_what_the_per_user_loop_drew(args):
    got, want = generate(*args), list_generate(*args)
    assert all(np.array_equal(g, w) for g, w in zip(got, want)) and got[0].dtype == np.float32
    users = want[2]
    for fraction in (0.2, 0.5, 0.25):
        train = np.concatenate([np.flatnonzero(users == u)[:-max(1, int(round((users == u).sum() * fraction)))]
                                for u in np.unique(users)])
        assert np.array_equal(split_per_user(users, fraction, 0)[0], train)


def test_a_memory_mapped_npz_runs_as_the_in_memory_one(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.standard_normal((300, 6)).astype(np.float32), y_train=rng.integers(0, 3, 300),
                  x_test=rng.standard_normal((60, 6)).astype(np.float32), y_test=rng.integers(0, 3, 60),
                  client_train=rng.integers(0, 10, 300))
    np.savez(tmp_path / "d.npz", **arrays)
    base = [o for o in SMALL if not o.startswith("dataset")] + ["dataset=npz", f"dataset.path={tmp_path / 'd.npz'}",
                                                                "partition=natural"]
    plain, mapped = (flexp.run(flexp.compose([*base, f"dataset.mmap={m}"])) for m in ("false", "true"))
    assert isinstance(mapped.data.train.x, torch.Tensor) and torch.equal(plain.params, mapped.params)
    assert [r.train_loss for r in plain.history] == [r.train_loss for r in mapped.history]


def test_a_compressed_npz_cannot_be_mapped(tmp_path):
    from flexp.config import ConfigError
    from flexp.data.npz import load_npz

    zeros = np.zeros((4, 2), np.float32)
    np.savez_compressed(tmp_path / "c.npz", x_train=zeros, y_train=np.zeros(4, int), x_test=zeros,
                        y_test=np.zeros(4, int))
    with pytest.raises(ConfigError, match="dataset.mmap.*compressed"):
        load_npz(str(tmp_path / "c.npz"), mmap=True)


def test_a_hundred_thousand_natural_clients_run_two_rounds():
    cfg = flexp.compose(["dataset=synthetic", "dataset.users=100000", "dataset.samples_per_user=3",
                         "dataset.features=2", "dataset.classes=2", "partition=natural", "model=logreg",
                         "fl.clients=100000", "fl.fraction=0.0001", "fl.rounds=2", "fl.batch_size=2",
                         "tracking.log_model=false"])
    result = flexp.run(cfg)
    assert [r.clients for r in result.history] == [10, 10] and len(result.data.train) == 200000
