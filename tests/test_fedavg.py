import copy

import pytest
import torch
import torch.nn.functional as F
from rounding import assert_same_sgd, chained_reductions, longest_sum

from flexp.client import LocalSpec
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.fedavg import run_fedavg, sample_clients
from flexp.flat import flat_parameters
from flexp.metrics import rounds_to_target
from flexp.models import build_model
from flexp.partition import iid, natural

SYNTH = DatasetConfig(name="synthetic", users=12, samples_per_user=None, alpha=0.5, beta=0.5, seed=1)


def _fl(**changes) -> FLConfig:
    base = dict(clients=12, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=1,
                target_accuracy=None, stop_at_target=False)
    return FLConfig(**{**base, **changes})


def _run(model_name: str, fl: FLConfig, parts, workers: int, data):
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    spec = LocalSpec(fl.local_epochs, fl.batch_size, fl.lr)
    engine = ThreadEngine(lambda: build_model(model_name, data.input_shape, data.num_classes), data.train, spec,
                          workers)
    try:
        return run_fedavg(model, parts, data.test, fl, engine, seed=7), model
    finally:
        engine.close()


@pytest.mark.engines
def test_one_fedavg_round_equals_one_full_batch_gradient_step():
    data = load_dataset(SYNTH)
    fl = _fl(fraction=1.0, local_epochs=1, batch_size=None, rounds=1, lr=0.3)
    parts = natural(data.train_groups, 12)
    assert len({len(p) for p in parts}) > 1, "client sizes should differ for this check to mean something"
    torch.manual_seed(0)
    reference = build_model("2nn", data.input_shape, data.num_classes)
    start = copy.deepcopy(reference)
    F.cross_entropy(reference(data.train.x), data.train.y).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= fl.lr * p.grad
    result, _ = _run("2nn", fl, parts, workers=2, data=data)
    expected = flat_parameters(reference)
    assert not torch.allclose(flat_parameters(start), expected)
    assert_same_sgd(result.params, expected, flat_parameters(start), 1,
                    longest_sum("2nn", data.input_shape, len(data.train)), chained_reductions("2nn"))


def test_final_weights_do_not_depend_on_worker_count():
    data = load_dataset(SYNTH)
    parts = natural(data.train_groups, 12)
    for model_name in ("2nn", "logreg"):
        one, _ = _run(model_name, _fl(), parts, workers=1, data=data)
        four, _ = _run(model_name, _fl(), parts, workers=4, data=data)
        assert torch.equal(one.params, four.params)
        assert [r.test_accuracy for r in one.history] == [r.test_accuracy for r in four.history]


def test_fedavg_learns_and_logs_every_round():
    data = load_dataset(SYNTH)
    parts = iid(len(data.train), 12, seed=0)
    fl = _fl(rounds=8, fraction=0.25, eval_every=3)
    result, model = _run("logreg", fl, parts, workers=2, data=data)
    assert [r.round for r in result.history] == list(range(1, 9))
    assert [r.round for r in result.history if r.test_accuracy is not None] == [3, 6, 8]
    assert all(r.clients == 3 for r in result.history)
    assert result.history[-1].test_accuracy > 0.5
    assert torch.equal(flat_parameters(model), result.params)
    assert result.history[0].bytes_up == 3 * result.params.numel() * 4


def test_stop_at_target_stops_early():
    data = load_dataset(SYNTH)
    parts = iid(len(data.train), 12, seed=0)
    result, _ = _run("logreg", _fl(rounds=30, target_accuracy=0.3, stop_at_target=True), parts, 2, data)
    assert len(result.history) < 30
    assert result.history[-1].test_accuracy >= 0.3
    assert result.summary()["rounds_to_target"] == len(result.history)


def test_sampling_is_seeded_sorted_and_sized():
    a = sample_clients(100, 10, seed=3, round_=5)
    assert a == sample_clients(100, 10, seed=3, round_=5)
    assert a == sorted(a) and len(set(a)) == 10
    assert a != sample_clients(100, 10, seed=3, round_=6)
    assert _fl(clients=100, fraction=0.0).clients_per_round == 1
    assert _fl(clients=100, fraction=0.1).clients_per_round == 10
    assert _fl(clients=7, fraction=1.0).clients_per_round == 7


def test_rounds_to_target_uses_the_best_accuracy_so_far():
    history = [(1, 0.5), (2, 0.8), (3, 0.7), (5, 0.91), (6, 0.85)]
    assert rounds_to_target(history, 0.8) == 2
    assert rounds_to_target(history, 0.9) == 5
    assert rounds_to_target(history, 0.95) is None
    assert rounds_to_target([], 0.5) is None
