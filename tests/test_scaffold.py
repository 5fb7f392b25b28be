"""SCAFFOLD: option II control variates by hand, FedAvg on round one, and the same result in both engines."""

import pytest
import torch
from rounding import assert_same_sgd, chained_reductions, longest_sum, most_steps

from flexp.client import ClientResult, LocalSpec
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import run_fedavg
from flexp.flat import flat_parameters
from flexp.models import build_model
from flexp.partition import natural
from flexp.strategy.fedavg import FedAvg
from flexp.strategy.scaffold import Scaffold

SYNTH = DatasetConfig(name="synthetic", users=12, alpha=1.0, beta=1.0, seed=2)


def test_control_variates_hand_computed_over_two_rounds():
    s = Scaffold(num_clients=4, lr=0.5)
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(s.correction(0, x), torch.zeros(2))
    results = [ClientResult(0, torch.tensor([0.0, 0.0]), 1, 0.0, steps=2),
               ClientResult(1, torch.tensor([3.0, -2.0]), 3, 0.0, steps=4)]
    new_x = s.aggregate(1, x, results)
    assert torch.allclose(new_x, torch.tensor([2.25, -1.5]))  # (1*[0,0] + 3*[3,-2]) / 4
    # c_0 = (x - y_0)/(2*0.5) = [1, -2]; c_1 = (x - y_1)/(4*0.5) = [-1, 0]; c = (c_0 + c_1)/4
    assert torch.allclose(s.c_i[0].float(), torch.tensor([1.0, -2.0]))
    assert torch.allclose(s.c_i[1].float(), torch.tensor([-1.0, 0.0]))
    assert torch.allclose(s.c.float(), torch.tensor([0.0, -0.5]))
    assert torch.allclose(s.correction(0, new_x), torch.tensor([-1.0, 1.5]))  # c - c_0
    assert torch.allclose(s.correction(3, new_x), torch.tensor([0.0, -0.5]))  # a new client: c - 0
    # round two, client 0 again: c_0+ = c_0 - c + (x - y)/(K lr)
    s.aggregate(2, new_x, [ClientResult(0, torch.tensor([2.25, -2.5]), 1, 0.0, steps=1)])
    assert torch.allclose(s.c_i[0].float(), torch.tensor([1.0, -2.0]) - torch.tensor([0.0, -0.5])
                          + torch.tensor([0.0, 1.0]) / 0.5)


def _run(strategy_factory, engine_cls, rounds, **kwargs):
    data = load_dataset(SYNTH)
    parts = natural(data.train_groups, 12)
    fl = FLConfig(clients=12, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=rounds, eval_every=1,
                  target_accuracy=None, stop_at_target=False)
    torch.manual_seed(0)
    model = build_model("2nn", data.input_shape, data.num_classes, hidden=32)
    engine = engine_cls(lambda: build_model("2nn", data.input_shape, data.num_classes, hidden=32), data.train,
                        LocalSpec(fl.local_epochs, fl.batch_size, fl.lr), **kwargs)
    return run_fedavg(model, parts, data.test, fl, engine, 4, strategy=strategy_factory(fl))


def test_round_one_with_zero_control_variates_is_fedavg_and_later_rounds_differ():
    scaffold = _run(lambda fl: Scaffold(12, fl.lr), ThreadEngine, 1, workers=2)
    fedavg = _run(lambda fl: FedAvg(), ThreadEngine, 1, workers=2)
    assert torch.equal(scaffold.params, fedavg.params)
    later = _run(lambda fl: Scaffold(12, fl.lr), ThreadEngine, 3, workers=2)
    assert not torch.allclose(later.params, _run(lambda fl: FedAvg(), ThreadEngine, 3, workers=2).params)


@pytest.mark.engines
def test_scaffold_trains_the_same_in_both_engines():
    threads = _run(lambda fl: Scaffold(12, fl.lr), ThreadEngine, 3, workers=2)
    vectorized = _run(lambda fl: Scaffold(12, fl.lr), VectorizedEngine, 3)
    data = load_dataset(SYNTH)
    torch.manual_seed(0)
    start = flat_parameters(build_model("2nn", data.input_shape, data.num_classes, hidden=32))
    steps = most_steps(natural(data.train_groups, 12), 10, 2, 3)
    assert_same_sgd(vectorized.params, threads.params, start, steps, longest_sum("2nn", data.input_shape, 10),
                    chained_reductions("2nn"))
