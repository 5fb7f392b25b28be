"""The vectorized engine trains every client exactly as the thread engine does (unequal n_k, partial batches)."""

import numpy as np
import pytest
import torch
from rounding import assert_same_sgd, chained_reductions, longest_sum
from user_algorithm import Proximal

from flexp.client import LocalSpec
from flexp.config import DatasetConfig, EngineConfig, FLConfig
from flexp.data import Dataset, Split, load_mnist_dataset
from flexp.engine import choose_engine, make_engine
from flexp.engine.batched_mlp import mlp_layers
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine, lockstep_plan
from flexp.fedavg import run_fedavg
from flexp.models import build_model
from flexp.partition import iid, shards
from flexp.strategy.fedavg import FedAvg
from flexp.strategy.fedprox import FedProx
from flexp.strategy.label_flip import LabelFlip
from flexp.strategy.scaffold import Scaffold

pytestmark = pytest.mark.engines
CLIENTS = 6


@pytest.fixture(scope="module")
def mnist_small(mnist_root) -> Dataset:
    full = load_mnist_dataset(DatasetConfig(name="mnist", root=mnist_root), log=lambda _: None)
    return Dataset("mnist", Split(full.train.x[:900], full.train.y[:900]), Split(full.test.x[:300], full.test.y[:300]),
                   full.input_shape, 10)


def _unequal(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Trim client k by 7k samples (at most half of it), so sizes differ and last batches are partial."""
    return [p[: len(p) - min(7 * k, len(p) // 2)] for k, p in enumerate(parts)]


def _train(engine_cls, model_name, data, parts, fl: FLConfig, algorithm=None, **kwargs):
    spec = LocalSpec(fl.local_epochs, fl.batch_size, fl.lr)

    def make():
        torch.manual_seed(0)
        return build_model(model_name, data.input_shape, 10)

    engine = engine_cls(make, data.train, spec, **kwargs)
    try:
        return run_fedavg(make(), parts, data.test, fl, engine, seed=3, strategy=algorithm).params
    finally:
        engine.close()


def _compare(data: Dataset, model_name: str, split: str, batch_size: int | None, epochs: int, rounds: int) -> None:
    """Threads, vectorized and vectorized in groups of 2 train the same clients; all three agree to rounding."""
    labels = data.train.y.numpy()
    parts = iid(len(labels), CLIENTS, 1) if split == "iid" else shards(labels, CLIENTS, 2, 1)
    parts = _unequal(parts)
    fl = FLConfig(clients=CLIENTS, fraction=0.5, local_epochs=epochs, batch_size=batch_size, lr=0.05, rounds=rounds,
                  eval_every=rounds, target_accuracy=None, stop_at_target=False)
    threads = _train(ThreadEngine, model_name, data, parts, fl, workers=2)
    vectorized = _train(VectorizedEngine, model_name, data, parts, fl)
    grouped = _train(VectorizedEngine, model_name, data, parts, fl, group_size=2)
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(build_model(model_name, data.input_shape, 10).parameters())
    start = start.to(threads.dtype)
    largest = max(len(p) for p in parts)
    steps = rounds * epochs * -(-largest // (batch_size or largest))
    longest = longest_sum(model_name, data.input_shape, batch_size or largest)
    for other in (vectorized, grouped):
        assert_same_sgd(other, threads, start, steps, longest, chained_reductions(model_name))


@pytest.mark.parametrize("model_name", ["2nn", "cnn", "logreg"])
@pytest.mark.parametrize("split", ["iid", "shards"])
@pytest.mark.parametrize("batch_size", [50, None])
def test_vectorized_equals_threads_in_float32(mnist_small, model_name, split, batch_size):
    """One round of E=1 (1 or 3 local steps) over 3 clients of unequal sizes, partial last batches included: the
    same SGD steps up to float32 rounding on any CPU (tests/rounding.py says why few steps)."""
    _compare(mnist_small, model_name, split, batch_size, epochs=1, rounds=1)


@pytest.mark.parametrize("model_name", ["2nn", "cnn", "logreg"])
@pytest.mark.parametrize("split", ["iid", "shards"])
def test_vectorized_equals_threads_over_rounds_in_float64(mnist_small, model_name, split):
    """Three rounds of E=2, B=10 (~90 local steps): in float64 the engines agree to rounding, which shows they do the
    same arithmetic step for step; a float32 tie flip would compound over these steps (tests/rounding.py)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        n = 150 if model_name == "cnn" else len(mnist_small.train)  # float64 convolutions are slow on the CPU
        data = Dataset("mnist", Split(mnist_small.train.x[:n].double(), mnist_small.train.y[:n]),
                       Split(mnist_small.test.x[:100].double(), mnist_small.test.y[:100]), mnist_small.input_shape, 10)
        _compare(data, model_name, split, 10, epochs=2, rounds=3)
    finally:
        torch.set_default_dtype(default)


def test_full_batch_rounds_keep_each_clients_data_and_follow_new_data(mnist_small):
    """B=inf on the MLP kernel: a client's data is copied out once and reused while its indices stay the same, and
    three rounds of E=2 full-batch steps agree with threads to float64 rounding."""
    from flexp.client import ClientTask
    from flexp.engine.vectorized import FullBatches

    x, y = mnist_small.train.x.reshape(len(mnist_small.train), -1), mnist_small.train.y
    kept, gathered = FullBatches(x, y, x.numel() * x.element_size()), FullBatches(x, y, 0)
    first, moved = ClientTask(2, torch.arange(10, 40), 1), ClientTask(2, torch.arange(50, 95), 2)
    for batches in (kept, gathered):
        for task in (first, first, moved, moved):
            xs, ys = batches.client(task)
            assert torch.equal(xs, x[task.indices]) and torch.equal(ys, y[task.indices])
    assert kept.client(moved)[0] is kept.client(moved)[0] and kept.used == 45 * x.shape[1] * x.element_size()
    assert gathered.client(moved)[0] is not gathered.client(moved)[0] and not gathered.kept
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = Dataset("mnist", Split(mnist_small.train.x.double(), mnist_small.train.y),
                       Split(mnist_small.test.x[:100].double(), mnist_small.test.y[:100]), mnist_small.input_shape, 10)
        _compare(data, "2nn", "shards", None, epochs=2, rounds=3)
    finally:
        torch.set_default_dtype(default)


def test_lockstep_plan_masks_short_clients_and_partial_batches():
    from flexp.client import ClientTask

    tasks = [ClientTask(0, torch.arange(25), 1), ClientTask(1, torch.arange(100, 107), 2)]
    plan = lockstep_plan(tasks, LocalSpec(epochs=2, batch_size=10, lr=0.1))
    assert plan.indices.shape == (6, 2, 10)  # client 0: 3 steps per epoch; client 1: 1
    valid = plan.mask.sum(2)
    assert valid[:, 0].tolist() == [10, 10, 5, 10, 10, 5]
    assert valid[:, 1].tolist() == [7, 7, 0, 0, 0, 0]
    for k, task in enumerate(tasks):
        seen = plan.indices[:, k][plan.mask[:, k]]
        assert np.array_equal(np.sort(seen.numpy()), np.sort(np.tile(task.indices.numpy(), 2)))


def test_auto_picks_vectorized_for_mlps_and_threads_for_the_cnn_on_cpu():
    cpu = torch.device("cpu")
    assert mlp_layers(build_model("2nn", (1, 28, 28), 10)) is not None
    assert mlp_layers(build_model("cnn", (1, 28, 28), 10)) is None
    assert choose_engine("auto", build_model("2nn", (1, 28, 28), 10), cpu) == "vectorized"
    assert choose_engine("auto", build_model("logreg", (60,), 10), cpu) == "vectorized"
    assert choose_engine("auto", build_model("cnn", (1, 28, 28), 10), cpu) == "threads"
    assert choose_engine("auto", build_model("cnn", (1, 28, 28), 10), torch.device("cuda")) == "vectorized"
    assert choose_engine("threads", build_model("2nn", (1, 28, 28), 10), cpu) == "threads"
    split = Split(torch.zeros(4, 60), torch.zeros(4, dtype=torch.int64))
    engine = make_engine(EngineConfig(name="auto"), lambda: build_model("logreg", (60,), 10), split,
                         LocalSpec(1, 2, 0.1), cpu)
    assert isinstance(engine, VectorizedEngine)


class OwnStep(FedAvg):
    """SGD written anew: the same steps as FedAvg's, but no kernel claims a step it does not know."""

    def step(self, params, grads, cstate, lr):
        return {name: p - lr * grads[name] for name, p in params.items()}, cstate


def test_the_thread_engine_says_whether_the_cnn_kernel_or_autograd_trains_the_clients():
    split = Split(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64))

    def path(model_name, batch_size, algorithm):
        engine = ThreadEngine(lambda: build_model(model_name, (1, 28, 28), 10), split, LocalSpec(1, batch_size, 0.1), 1)
        engine.run_round(torch.nn.utils.parameters_to_vector(engine.model.parameters()).detach(), [], algorithm)
        assert engine.last_path == engine.describe(algorithm)
        return str(engine.last_path)

    assert path("cnn", 10, FedAvg()) == path("cnn", 512, Scaffold(4, 0.1)) == "kernel (hand CNN kernel)"
    assert path("cnn", 10, OwnStep()) == ("autograd (the CNN kernel does not implement OwnStep's client side: it "
                                          "declares no StepTerms)")
    assert path("cnn", 513, FedAvg()) == "autograd (the CNN kernel takes batches of at most 512 samples)"
    assert path("cnn", None, FedProx(0.1)).startswith("kernel (hand CNN kernel; autograd for a client of over 512")
    assert path("2nn", 10, FedAvg()) == "autograd"


@pytest.mark.parametrize("model_name", ["2nn", "cnn", "logreg"])
def test_fedprox_agrees_across_engines_and_pulls_clients_towards_the_global_model(mnist_small, model_name):
    labels = mnist_small.train.y.numpy()
    parts = _unequal(shards(labels, CLIENTS, 2, 1))
    fl = FLConfig(clients=CLIENTS, fraction=0.5, local_epochs=1, batch_size=50, lr=0.05, rounds=1,
                  eval_every=1, target_accuracy=None, stop_at_target=False)
    plain = _train(ThreadEngine, model_name, mnist_small, parts, fl, workers=2)
    same = _train(ThreadEngine, model_name, mnist_small, parts, fl, FedProx(0.0), workers=2)
    prox = _train(ThreadEngine, model_name, mnist_small, parts, fl, FedProx(1.0), workers=2)
    prox_vec = _train(VectorizedEngine, model_name, mnist_small, parts, fl, FedProx(1.0))
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(build_model(model_name, mnist_small.input_shape, 10).parameters())
    assert torch.equal(plain, same)
    assert (prox - start).norm() < (plain - start).norm()
    steps = -(-max(len(p) for p in parts) // 50)
    assert_same_sgd(prox_vec, prox, start, steps, longest_sum(model_name, mnist_small.input_shape, 50),
                    chained_reductions(model_name))


@pytest.mark.parametrize("model_name", ["2nn", "logreg"])
def test_vectorized_mlp_result_does_not_depend_on_the_worker_count(mnist_small, model_name):
    labels = mnist_small.train.y.numpy()
    parts = _unequal(shards(labels, CLIENTS, 2, 1))
    fl = FLConfig(clients=CLIENTS, fraction=1.0, local_epochs=2, batch_size=10, lr=0.05, rounds=2, eval_every=2,
                  target_accuracy=None, stop_at_target=False)
    for group_size in (None, 1, 4):
        alone = _train(VectorizedEngine, model_name, mnist_small, parts, fl, workers=1, group_size=group_size)
        for workers in (2, 3):
            parallel = _train(VectorizedEngine, model_name, mnist_small, parts, fl, workers=workers,
                              group_size=group_size)
            assert torch.equal(parallel, alone), (group_size, workers)


KERNEL_CLAIMS = {"fedavg": lambda: FedAvg(), "fedprox": lambda: FedProx(0.5),
                 "scaffold": lambda: Scaffold(CLIENTS, 0.05),
                 "label_flip": lambda: LabelFlip(FedProx(0.5), frozenset({0, 3}), 10),
                 "user_proximal": lambda: Proximal(0.5)}


@pytest.mark.parametrize("name", sorted(KERNEL_CLAIMS))
@pytest.mark.parametrize("batch_size", [10, None])
def test_batched_mlp_kernel_equals_the_vmap_path_for_each_algorithm_it_claims(mnist_small, name, batch_size):
    """Two rounds of E=1, B=10 (the clients in lockstep) or E=3, B=inf (one client at a time on its whole data, so
    the proximal and correction terms act from the second step) in float64: the kernel and torch.func's vmap path do
    the same SGD steps."""
    epochs = 1 if batch_size else 3
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = Dataset("mnist", Split(mnist_small.train.x[:300].double(), mnist_small.train.y[:300]),
                       Split(mnist_small.test.x[:50].double(), mnist_small.test.y[:50]), mnist_small.input_shape, 10)
        parts = _unequal(iid(300, CLIENTS, 1))
        fl = FLConfig(clients=CLIENTS, fraction=0.5, local_epochs=epochs, batch_size=batch_size, lr=0.05, rounds=2,
                      eval_every=2, target_accuracy=None, stop_at_target=False)
        results = {}
        for path in ("kernel", "vmap"):
            torch.manual_seed(0)
            engine = VectorizedEngine(lambda: build_model("2nn", data.input_shape, 10, hidden=16), data.train,
                                      LocalSpec(epochs, batch_size, fl.lr))
            if path == "vmap":
                engine.uses_kernel = lambda algorithm: False
            torch.manual_seed(0)
            model = build_model("2nn", data.input_shape, 10, hidden=16)
            start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            results[path] = run_fedavg(model, parts, data.test, fl, engine, 3, strategy=KERNEL_CLAIMS[name]()).params
            assert engine.last_path.name == path
        largest = max(len(p) for p in parts)
        steps = 2 * epochs * -(-largest // (batch_size or largest))
        longest = longest_sum("2nn", data.input_shape, batch_size or largest)
        assert_same_sgd(results["kernel"], results["vmap"], start, steps, longest,
                        chained_reductions("2nn"))
    finally:
        torch.set_default_dtype(default)
