"""Client dropout and stragglers: seeded, logged, and aggregation weights are the n_k of clients that returned."""

import pytest
import torch
from conftest import Recording
from rounding import assert_same_sgd, chained_reductions, longest_sum, most_steps

from flexp.client import LocalSpec
from flexp.config import ClientsConfig, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import Conditions, heterogeneity, run_fedavg, sample_clients
from flexp.flat import flat_parameters
from flexp.models import build_model
from flexp.partition import natural

SYNTH = DatasetConfig(name="synthetic", users=12, alpha=0.5, beta=0.5, seed=1)


def _fl(**changes) -> FLConfig:
    base = dict(clients=12, fraction=0.5, local_epochs=3, batch_size=10, lr=0.05, rounds=6, eval_every=3,
                target_accuracy=None, stop_at_target=False)
    return FLConfig(**{**base, **changes})


def _run(fl, clients, engine_cls=ThreadEngine, strategy=None, **kwargs):
    data = load_dataset(SYNTH)
    parts = natural(data.train_groups, 12)
    torch.manual_seed(0)
    model = build_model("2nn", data.input_shape, data.num_classes)
    start = flat_parameters(model)
    engine = engine_cls(lambda: build_model("2nn", data.input_shape, data.num_classes), data.train,
                        LocalSpec(fl.local_epochs, fl.batch_size, fl.lr), **kwargs)
    return run_fedavg(model, parts, data.test, fl, engine, 5, strategy=strategy,
                      conditions=Conditions(clients=clients)), parts, start


def test_heterogeneity_is_seeded_and_bounded():
    chosen = list(range(0, 40, 2))
    assert heterogeneity(chosen, 0.0, 0.0, 5, 1, 1) == (chosen, {})
    assert heterogeneity(chosen, 1.0, 0.5, 5, 1, 1) == ([], {})
    returned, slow = heterogeneity(chosen, 0.3, 1.0, 5, 1, 1)
    assert (returned, slow) == heterogeneity(chosen, 0.3, 1.0, 5, 1, 1)
    assert set(slow) == set(returned) and all(1 <= e <= 5 for e in slow.values())
    assert 0 < len(returned) < len(chosen)


def test_round_weights_are_the_sample_counts_of_the_clients_that_returned():
    fl, clients = _fl(), ClientsConfig(dropout=0.4, stragglers=0.5)
    recording = Recording()
    result, parts, _ = _run(fl, clients, strategy=recording, workers=2)
    for record, weights in zip(result.history, recording.weights):
        chosen = sample_clients(12, fl.clients_per_round, 5, record.round)
        returned, slow = heterogeneity(chosen, 0.4, 0.5, fl.local_epochs, 5, record.round)
        assert weights == [len(parts[c]) for c in returned]
        assert record.clients == len(returned) and record.dropped == len(chosen) - len(returned)
        assert record.stragglers == len(slow)
    assert sum(r.dropped for r in result.history) > 0 and sum(r.stragglers for r in result.history) > 0


def test_a_round_where_every_client_drops_keeps_the_model_and_goes_on():
    result, _, start = _run(_fl(rounds=3), ClientsConfig(dropout=1.0), workers=2)
    assert [r.clients for r in result.history] == [0, 0, 0]
    assert torch.equal(result.params, start)
    assert result.history[-1].test_accuracy is not None


@pytest.mark.engines
def test_stragglers_train_the_same_in_both_engines():
    clients = ClientsConfig(stragglers=1.0)
    threads, parts, start = _run(_fl(rounds=2), clients, ThreadEngine, workers=2)
    vectorized, _, _ = _run(_fl(rounds=2), clients, VectorizedEngine)
    full, _, _ = _run(_fl(rounds=2), ClientsConfig(), ThreadEngine, workers=2)
    assert_same_sgd(vectorized.params, threads.params, start, most_steps(parts, 10, 3, 2),
                    longest_sum("2nn", (60,), 10), chained_reductions("2nn"))
    assert not torch.allclose(threads.params, full.params)
