"""Clients obtaining new data: the schedules, and round weights that follow what each client holds."""

import torch
from conftest import Recording

from flexp.arrival import held, held_fraction
from flexp.client import LocalSpec
from flexp.config import ClientsConfig, DataConfig, DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import Conditions, heterogeneity, run_fedavg, sample_clients
from flexp.models import build_model
from flexp.partition import natural


def test_schedules_by_hand():
    assert [held_fraction("linear", r, 0.1, 4) for r in (1, 2, 3, 4, 9)] == [0.1, 0.4, 0.7, 1.0, 1.0]
    assert [held_fraction("step", r, 0.1, 4, every=2) for r in (1, 2, 3, 4, 5)] == [0.1, 0.1, 0.7, 0.7, 1.0]
    assert held_fraction("none", 1, 0.1, 4) == 1.0
    assert torch.equal(held(torch.arange(10, 20), 0.25), torch.arange(10, 13))
    assert len(held(torch.arange(5), 0.01)) == 1


def test_round_weights_are_what_returning_clients_hold_that_round():
    data = load_dataset(DatasetConfig(name="synthetic", users=12, alpha=0.5, beta=0.5, seed=1))
    parts = natural(data.train_groups, 12)
    fl = FLConfig(clients=12, fraction=0.5, local_epochs=1, batch_size=10, lr=0.05, rounds=6, eval_every=3,
                  target_accuracy=None, stop_at_target=False)
    arrival = DataConfig(arrival="linear", arrival_start=0.2, arrival_full_at=5)
    torch.manual_seed(0)
    model = build_model("logreg", data.input_shape, data.num_classes)
    engine = VectorizedEngine(lambda: build_model("logreg", data.input_shape, data.num_classes), data.train,
                              LocalSpec(1, 10, fl.lr))
    recording = Recording()
    result = run_fedavg(model, parts, data.test, fl, engine, 5, strategy=recording,
                        conditions=Conditions(clients=ClientsConfig(dropout=0.3), data=arrival))
    for record, weights in zip(result.history, recording.weights):
        returned, _ = heterogeneity(sample_clients(12, 6, 5, record.round), 0.3, 0.0, 1, 5, record.round)
        fraction = held_fraction("linear", record.round, 0.2, 5)
        assert weights == [len(held(parts[c], fraction)) for c in returned]
        assert record.samples == sum(weights)
    assert recording.weights[0] != [len(parts[c]) for c in heterogeneity(sample_clients(12, 6, 5, 1), 0.3, 0.0, 1,
                                                                          5, 1)[0]]
