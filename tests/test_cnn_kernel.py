"""The hand-written CNN step is the autograd step: equal in float64 (with FedProx and SCAFFOLD terms too)."""

import pytest
import torch
from rounding import assert_same_sgd, chained_reductions, longest_sum

from flexp.engine.cnn_kernel import PaperCnnReplica, is_paper_cnn, replica_for
from flexp.flat import Replica, flat_parameters
from flexp.models import build_model

pytestmark = pytest.mark.engines


def _pair(dtype):
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10).to(dtype)
    other = build_model("cnn", (1, 28, 28), 10).to(dtype)
    other.load_state_dict(model.state_dict())
    return Replica(model), PaperCnnReplica(other)


def _batches(dtype, sizes):
    g = torch.Generator().manual_seed(1)
    for n in sizes:
        x = torch.rand(n, 1, 28, 28, generator=g, dtype=dtype)
        yield torch.where(x < 0.8, torch.zeros((), dtype=dtype), x), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("mu, corrected", [(0.0, False), (0.5, True)])
def test_kernel_equals_autograd_in_float64(mu, corrected):
    reference, fast = _pair(torch.float64)
    start = flat_parameters(reference.module)
    anchor = [p.detach().clone() for p in reference.params]
    correction = [0.01 * torch.randn_like(p) for p in reference.params] if corrected else None
    for x, y in _batches(torch.float64, [10, 10, 10, 7, 10]):
        slow_loss = reference.train_step(x, y, 0.1, mu, anchor, correction)
        fast_loss = fast.train_step(x, y, 0.1, mu, anchor, correction)
        assert abs(float(slow_loss - fast_loss)) < 1e-12
    assert_same_sgd(flat_parameters(fast.module), flat_parameters(reference.module), start, 5,
                    longest_sum("cnn", (1, 28, 28), 10), chained_reductions("cnn"))


def test_kernel_agrees_with_autograd_in_float32_over_a_few_steps():
    reference, fast = _pair(torch.float32)
    start = flat_parameters(reference.module)
    for x, y in _batches(torch.float32, [10, 10, 3]):
        reference.train_step(x, y, 0.1)
        fast.train_step(x, y, 0.1)
    assert_same_sgd(flat_parameters(fast.module), flat_parameters(reference.module), start, 3,
                    longest_sum("cnn", (1, 28, 28), 10), chained_reductions("cnn"))


def test_only_the_papers_cnn_on_the_cpu_gets_the_kernel():
    assert is_paper_cnn(build_model("cnn", (1, 28, 28), 10))
    assert isinstance(replica_for(build_model("cnn", (1, 28, 28), 10)), PaperCnnReplica)
    assert not is_paper_cnn(build_model("2nn", (1, 28, 28), 10))
    assert type(replica_for(build_model("logreg", (1, 28, 28), 10))) is Replica
