"""A model's state beyond its trainable weights: BatchNorm statistics are averaged and used by the global model,
frozen parameters stay put, Dropout draws from per-client seeds, integer inputs train on the vectorized engine, and
a run with buffers resumes bit for bit."""

import io

import pytest
import torch
from rounding import sgd_rounding_bound
from torch import nn

from flexp.client import LocalSpec
from flexp.config import FLConfig
from flexp.data import Split
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import ServerState, run_fedavg
from flexp.flat import load_flat
from flexp.metrics import evaluate
from flexp.strategy.fedavg import FedAvg

FEATURES, CLASSES = 6, 3


def fl(rounds=1, batch_size=None, fraction=1.0, clients=2, epochs=1):
    return FLConfig(clients=clients, fraction=fraction, local_epochs=epochs, batch_size=batch_size, lr=0.1,
                    rounds=rounds, eval_every=1, target_accuracy=None, stop_at_target=False)


def data(n=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=dtype) * 2 + 1
    return Split(x, torch.randint(0, CLASSES, (n,), generator=g))


def bn_net(dropout=0.0):
    layers = [nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(4, CLASSES)).double()


def drop_net():
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, CLASSES)).double()


def frozen_net():
    net = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES)).double()
    net[0].requires_grad_(False)
    return net


def run(make, engine_cls, cfg, partition, train, resume=None, test=None, **kwargs):
    torch.manual_seed(0)
    model = make()
    engine = engine_cls(make, train, LocalSpec(cfg.local_epochs, cfg.batch_size, cfg.lr), **kwargs)
    try:
        return model, run_fedavg(model, partition, test or data(20, seed=1), cfg, engine, 5, strategy=FedAvg(),
                                 resume=resume)
    finally:
        engine.close()


def test_batchnorm_statistics_are_the_n_k_weighted_mean_and_the_global_model_evaluates_with_them():
    train, parts = data(), [torch.arange(0, 28), torch.arange(28, 40)]
    model, result = run(bn_net, ThreadEngine, fl(), parts, train, workers=1)
    torch.manual_seed(0)
    first = bn_net()[0]  # one full-batch step per client: the statistics are those of the global first layer
    with torch.no_grad():
        hidden = [first(train.x[p]) for p in parts]
    mean = sum(len(p) / 40 * 0.1 * h.mean(0) for p, h in zip(parts, hidden))
    var = sum(len(p) / 40 * (0.9 + 0.1 * h.var(0, unbiased=True)) for p, h in zip(parts, hidden))
    tol = 64 * 2.0**-53 * float(var.abs().max())
    assert torch.allclose(result.state["1.running_mean"], mean, rtol=0, atol=tol)
    assert torch.allclose(result.state["1.running_var"], var, rtol=0, atol=tol)
    assert int(result.state["1.num_batches_tracked"]) == 1
    assert torch.equal(model[1].running_mean, result.state["1.running_mean"])
    test = data(20, seed=1)
    assert result.history[-1].test_loss == evaluate(load_flat(bn_net(), result.params, result.state), test)[1]
    assert result.history[-1].test_loss != evaluate(load_flat(bn_net(), result.params), test)[1]


def test_integer_buffers_are_the_rounded_weighted_mean_and_the_vectorized_engine_gives_the_same_weights():
    train, parts = data(), [torch.arange(0, 30), torch.arange(30, 37)]  # 3 and 1 steps of B=10, one partial
    _, threads = run(bn_net, ThreadEngine, fl(batch_size=10), parts, train, workers=2)
    assert int(threads.state["1.num_batches_tracked"]) == round((30 * 3 + 7 * 1) / 37)
    _, vectorized = run(bn_net, VectorizedEngine, fl(batch_size=10), parts, train)
    assert torch.equal(vectorized.params, threads.params)  # models with buffers train per client there too
    assert all(torch.equal(vectorized.state[name], value) for name, value in threads.state.items())


@pytest.mark.engines
def test_dropout_draws_per_client_so_neither_workers_nor_the_engine_matter():
    train, cfg = data(80), fl(rounds=2, batch_size=5, clients=4, epochs=2)
    parts = list(torch.arange(80).split([30, 10, 25, 15]))
    rng = torch.get_rng_state()
    _, one = run(drop_net, ThreadEngine, cfg, parts, train, workers=1)
    _, two = run(drop_net, ThreadEngine, cfg, parts, train, workers=2)
    assert torch.equal(one.params, two.params)
    _, vectorized = run(drop_net, VectorizedEngine, cfg, parts, train)
    assert torch.equal(vectorized.params, one.params)
    torch.set_rng_state(rng)
    _, again = run(drop_net, ThreadEngine, cfg, parts, train, workers=2)
    assert torch.equal(again.params, one.params)
    no_dropout = lambda: nn.Sequential(*list(drop_net())[:2], nn.Identity(), drop_net()[3])  # noqa: E731
    assert not torch.allclose(run(no_dropout, ThreadEngine, cfg, parts, train, workers=1)[1].params, one.params)


@pytest.mark.parametrize("engine_cls", [ThreadEngine, VectorizedEngine])
def test_frozen_parameters_are_neither_trained_nor_averaged(engine_cls):
    train, parts = data(), [torch.arange(0, 25), torch.arange(25, 40)]
    torch.manual_seed(0)
    before = frozen_net()
    model, result = run(frozen_net, engine_cls, fl(rounds=2, batch_size=5), parts, train, workers=2)
    assert result.params.numel() == sum(p.numel() for p in before[2].parameters())
    assert all(r.failed_clients == 0 for r in result.history)
    assert torch.equal(model[0].weight, before[0].weight) and torch.equal(model[0].bias, before[0].bias)
    assert not torch.equal(model[2].weight, before[2].weight)


class Bag(nn.Module):
    """Token ids [n, length] -> mean embedding -> class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.bag, self.out = nn.EmbeddingBag(50, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.out(self.bag(x))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_an_embedding_bag_on_token_ids_trains_on_the_vectorized_engine_as_on_threads():
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 50, (40, 5), generator=g), torch.randint(0, CLASSES, (40,), generator=g))
    make = lambda: Bag().double()  # noqa: E731
    parts, cfg = [torch.arange(0, 24), torch.arange(24, 40)], fl(rounds=2, batch_size=8)
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(make().parameters()).detach()
    _, vectorized = run(make, VectorizedEngine, cfg, parts, train, test=train)
    _, threads = run(make, ThreadEngine, cfg, parts, train, test=train, workers=1)
    assert all(r.failed_clients == 0 for r in vectorized.history)
    assert not torch.equal(vectorized.params, start)
    bound = sgd_rounding_bound(6, 40, 4, torch.float64)
    assert torch.allclose(vectorized.params, threads.params, rtol=bound, atol=bound)


def test_a_run_with_buffers_and_dropout_resumes_from_its_saved_state_bit_for_bit():
    train, cfg = data(60), fl(rounds=3, batch_size=5, clients=3)
    parts = list(torch.arange(60).split([25, 20, 15]))
    make = lambda: bn_net(dropout=0.3)  # noqa: E731
    _, whole = run(make, ThreadEngine, cfg, parts, train, workers=2)
    _, part = run(make, ThreadEngine, fl(rounds=1, batch_size=5, clients=3), parts, train, workers=2)
    buffer = io.BytesIO()
    torch.save({"params": part.params, "state": part.state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resume = ServerState(1, saved["params"], FedAvg(), list(part.history), saved["state"])
    _, resumed = run(make, ThreadEngine, cfg, parts, train, resume=resume, workers=2)
    assert torch.equal(resumed.params, whole.params)
    assert all(torch.equal(resumed.state[k], v) for k, v in whole.state.items())
    assert [r.test_loss for r in resumed.history] == [r.test_loss for r in whole.history]


def top2(outputs, targets):
    """Top-2 accuracy: a metric written in a test."""
    return (outputs.topk(2, 1).indices == targets[:, None]).any(1).double().mean()


def test_a_configured_loss_trains_and_scores_and_a_configured_metric_is_logged():
    from flexp.fedavg import Evaluation

    train, parts = data(), [torch.arange(0, 25), torch.arange(25, 40)]
    margin = torch.nn.functional.multi_margin_loss
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, CLASSES)).double()
    engine = VectorizedEngine(lambda: nn.Sequential(nn.Linear(FEATURES, CLASSES)).double(), train,
                              LocalSpec(1, 5, 0.1), task_loss=margin)
    test = data(20, seed=1)
    result = run_fedavg(model, parts, test, fl(), engine, 5, evaluation=Evaluation(margin, [("top2", top2)]))
    assert engine.last_path.name == "vmap"  # the batched kernel claims cross-entropy only
    record = result.history[-1]
    with torch.no_grad():
        logits = model(test.x)
    assert record.test_loss == pytest.approx(float(margin(logits, test.y)), rel=1e-12)
    assert record.metrics()["test_top2"] == pytest.approx(float(top2(logits, test.y)), rel=1e-12)
