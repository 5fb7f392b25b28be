"""A user algorithm (local momentum with per-client state) runs on every engine with the same result, takes the
generic path where no kernel claims it, and resumes from its saved state bit for bit."""

import io

import pytest
import torch
from rounding import assert_same_sgd, chained_reductions, longest_sum, most_steps
from user_algorithm import LocalMomentum

from flexp.client import LocalSpec
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import ServerState, run_fedavg
from flexp.models import build_model
from flexp.partition import natural
from flexp.strategy.fedavg import FedAvg

SYNTH = DatasetConfig(name="synthetic", users=8, alpha=0.5, beta=0.5, seed=3)
FL = FLConfig(clients=8, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=3,
              target_accuracy=None, stop_at_target=False)


def _run(engine_cls, algorithm, rounds=3, resume=None, **kwargs):
    data = load_dataset(SYNTH)
    fl = FLConfig(**{**FL.__dict__, "rounds": rounds})
    make = lambda: build_model("2nn", data.input_shape, data.num_classes, hidden=32)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    engine = engine_cls(make, data.train, LocalSpec(fl.local_epochs, fl.batch_size, fl.lr), **kwargs)
    try:
        result = run_fedavg(model, natural(data.train_groups, 8), data.test, fl, engine, 2, strategy=algorithm,
                            resume=resume)
    finally:
        engine.close()
    return result, engine


@pytest.mark.engines
def test_a_user_algorithm_trains_the_same_on_threads_and_vectorized_without_a_kernel():
    threads, _ = _run(ThreadEngine, LocalMomentum(), workers=2)
    vectorized, engine = _run(VectorizedEngine, LocalMomentum())
    assert engine.last_path.name == "vmap" and engine.uses_kernel(FedAvg())
    assert "does not implement LocalMomentum's client side" in engine.last_path.why
    data = load_dataset(SYNTH)
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(build_model("2nn", data.input_shape, data.num_classes, 32).parameters())
    steps = most_steps(natural(data.train_groups, 8), 10, 2, 3)
    assert_same_sgd(vectorized.params, threads.params, start.detach(), steps,
                    longest_sum("2nn", data.input_shape, 10), chained_reductions("2nn"))
    assert not torch.allclose(threads.params, _run(ThreadEngine, FedAvg(), workers=2)[0].params)


def test_a_user_algorithm_resumes_from_its_saved_state_bit_for_bit():
    whole, _ = _run(VectorizedEngine, LocalMomentum())
    first = LocalMomentum()
    part, _ = _run(VectorizedEngine, first, rounds=1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    restored = LocalMomentum()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(restored.velocity) == part.history[0].clients and int(restored.rounds) == 1
    resumed, _ = _run(VectorizedEngine, restored, resume=ServerState(1, part.params, restored, part.history))
    assert torch.equal(resumed.params, whole.params)
    forgetful, _ = _run(VectorizedEngine, LocalMomentum(), resume=ServerState(1, part.params, LocalMomentum(),
                                                                                part.history))
    assert not torch.equal(forgetful.params, whole.params), "the per-client state made no difference"
