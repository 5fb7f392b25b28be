"""MOON (examples/flexp_examples/moon.py), a user algorithm on the `gradient` hook: its contrastive loss by hand,
the same weights on threads (any worker count) and vectorized (vmap), FedAvg at mu=0, the documented config, a
bit-for-bit resume."""

import io
import math
import sys
from functools import cache

import pytest
import torch
from conftest import ROOT, SMALL
from rounding import assert_same_sgd, chained_reductions, longest_sum, most_steps

import flexp
from flexp.algorithm import Batch
from flexp.client import LocalSpec
from flexp.client_state import plain
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import ServerState, run_fedavg
from flexp.models import build_model
from flexp.partition import natural
from flexp.strategy.fedavg import FedAvg

sys.path.insert(0, str(ROOT / "examples"))  # what PYTHONPATH=examples does for the command line

from flexp_examples.moon import MOON, contrastive  # noqa: E402

SYNTH = DatasetConfig(name="synthetic", users=8, alpha=0.5, beta=0.5, seed=3)
FL = FLConfig(clients=8, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=3,
              target_accuracy=None, stop_at_target=False)


@cache
def data():
    return load_dataset(SYNTH)


def model():
    torch.manual_seed(0)
    return build_model("2nn", data().input_shape, data().num_classes, hidden=32)


def run(engine_cls, algorithm, rounds=3, resume=None, **kwargs):
    fl = FLConfig(**{**FL.__dict__, "rounds": rounds})
    engine = engine_cls(lambda: build_model("2nn", data().input_shape, data().num_classes, hidden=32), data().train,
                        LocalSpec(fl.local_epochs, fl.batch_size, fl.lr), **kwargs)
    try:
        result = run_fedavg(model(), natural(data().train_groups, 8), data().test, fl, engine, 2,
                            strategy=algorithm, resume=resume)
    finally:
        engine.close()
    return result, engine


def assert_same_training(a, b, chained):
    """a and b are the same 3 rounds of SGD from the seeded 2NN, up to float32 rounding."""
    start = torch.nn.utils.parameters_to_vector(model().parameters()).detach()
    steps = most_steps(natural(data().train_groups, 8), 10, 2, 3)
    assert_same_sgd(a, b, start, steps, longest_sum("2nn", data().input_shape, 10), chained)


def test_the_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    glob = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # cosine 1 with z
    prev = torch.tensor([[0.0, 5.0], [-1.0, 0.0]])  # cosine 0 with z
    # -log(e^(1/tau) / (e^(1/tau) + e^0)) = log(1 + e^(-1/tau)), tau = 0.5
    assert torch.allclose(contrastive(z, glob, prev, 0.5), torch.full((2,), math.log1p(math.exp(-2.0))))
    assert torch.allclose(contrastive(z, prev, glob, 0.5), torch.full((2,), math.log1p(math.exp(2.0))))
    assert torch.allclose(contrastive(z, glob, glob, 0.5), torch.full((2,), math.log(2.0)))  # no pull either way


def test_padding_rows_change_no_gradient():
    net = model()
    params = {name: p.detach() for name, p in net.named_parameters()}
    shifted = lambda scale: {name: p + scale * torch.randn_like(p) for name, p in params.items()}  # noqa: E731
    cstate = MOON(8).client_init(shifted(0.1), {"previous": torch.cat([p.reshape(-1) for p in shifted(0.3).values()])})
    forward = lambda p, x: torch.func.functional_call(net, p, (x,))  # noqa: E731
    x, y = data().train.x[:6], data().train.y[:6]
    garbage = torch.randn(4, *x.shape[1:]) * 10, torch.zeros(4, dtype=y.dtype)
    real = Batch(x, y, torch.ones(6), forward, torch.nn.functional.cross_entropy)
    padded = Batch(torch.cat([x, garbage[0]]), torch.cat([y, garbage[1]]), torch.cat([torch.ones(6), torch.zeros(4)]),
                   forward, torch.nn.functional.cross_entropy)
    (want, want_loss, _), (got, got_loss, _) = (MOON(8, mu=5.0).gradient(b, params, cstate) for b in (real, padded))
    assert torch.allclose(got_loss, want_loss, rtol=1e-6)
    assert all(torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7) for name in params)
    plain = MOON(8, mu=0.0).gradient(real, params, cstate)[0]
    assert not all(torch.allclose(plain[name], want[name], rtol=1e-3) for name in params), "l_con made no difference"


@pytest.mark.engines
def test_moon_trains_the_same_on_threads_at_any_worker_count_and_vectorized():
    one, _ = run(ThreadEngine, MOON(8), workers=1)
    two, _ = run(ThreadEngine, MOON(8), workers=2)
    assert torch.equal(one.params, two.params)
    vectorized, engine = run(VectorizedEngine, MOON(8))
    assert engine.last_path.name == "vmap"
    # two forward passes more per step (the global and previous weights' representations)
    assert_same_training(vectorized.params, two.params, chained_reductions("2nn") + 2 * 3)
    assert vectorized.history[-1].train_loss < vectorized.history[0].train_loss


def test_moon_with_mu_0_is_fedavg_and_with_mu_1_is_not():
    fedavg, engine = run(VectorizedEngine, FedAvg())  # the batched MLP kernel's gradients, not autograd's
    assert engine.last_path.name == "kernel"
    assert_same_training(run(VectorizedEngine, MOON(8, mu=0.0))[0].params, fedavg.params, chained_reductions("2nn"))
    # round 1 is FedAvg's (every client's previous model is the global one): the difference comes from clients
    # sampled again, whose previous local weights the server kept
    moon = run(VectorizedEngine, MOON(8, mu=1.0))[0].params
    start = torch.nn.utils.parameters_to_vector(model().parameters()).detach()
    assert (moon - fedavg.params).norm() > 1e-3 * (fedavg.params - start).norm()


def test_a_label_flip_attack_reaches_moons_own_gradients():
    from flexp.strategy.label_flip import LabelFlip

    every = frozenset(range(8))
    flipped = run(VectorizedEngine, LabelFlip(MOON(8, mu=0.0), every, data().num_classes))[0].params
    fedavg_flipped = run(VectorizedEngine, LabelFlip(FedAvg(), every, data().num_classes))[0].params
    assert_same_training(flipped, fedavg_flipped, chained_reductions("2nn"))
    honest = run(VectorizedEngine, MOON(8, mu=0.0))[0].params
    assert not torch.allclose(flipped, honest)


def test_dp_sgd_refuses_an_algorithm_with_its_own_gradients(capsys):
    from test_bad_config import cli_error

    line = cli_error([*SMALL, "privacy=dp_sgd", "strategy=custom", "strategy._target_=flexp_examples.moon.MOON"],
                     capsys)
    assert line.startswith("privacy='dp_sgd': clips per-sample gradients") and "MOON computes its own" in line


def test_the_documented_command_builds_moon_with_the_run_s_clients_and_trains():
    result = flexp.run(flexp.compose([*SMALL, "fl.fraction=0.5", "strategy=custom",
                                      "strategy._target_=flexp_examples.moon.MOON", "strategy.mu=5"]))
    moon = result.algorithm
    assert isinstance(moon, MOON) and (moon.num_clients, moon.mu, moon.tau) == (10, 5.0, 0.5)
    assert set(moon.previous) <= set(range(10)) and len(moon.previous) >= result.history[0].clients
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_moon_resumes_from_its_saved_state_bit_for_bit():
    whole, _ = run(VectorizedEngine, MOON(8))
    first = MOON(8)
    part, _ = run(VectorizedEngine, first, rounds=1)
    buffer = io.BytesIO()
    torch.save(plain(first.state_dict()), buffer)
    buffer.seek(0)
    restored = MOON(8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(restored.previous) == part.history[0].clients
    resumed, _ = run(VectorizedEngine, restored, resume=ServerState(1, part.params, restored, part.history))
    assert torch.equal(resumed.params, whole.params)
    fresh = MOON(8)
    forgetful, _ = run(VectorizedEngine, fresh, resume=ServerState(1, part.params, fresh, part.history))
    assert not torch.equal(forgetful.params, whole.params), "the previous local models made no difference"


@pytest.mark.parametrize("state, match", [
    ({"previous": {8: torch.zeros(3)}}, "client ids 0..7"),
    ({"previous": {}, "c": torch.zeros(1)}, "unknown entries"),
    ({"previous": {0: [1.0]}}, "not tensors"),
])
def test_a_state_that_is_not_moons_is_refused(state, match):
    with pytest.raises(ValueError, match=match):
        MOON(8).load_state_dict(state)
