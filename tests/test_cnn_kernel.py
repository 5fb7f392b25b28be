"""The hand-written CNN step is the autograd step: equal in float64 for every client side that declares StepTerms
(FedAvg, FedProx, SCAFFOLD, label flipping, a user's proximal algorithm the kernel never heard of), and never chosen
for one that does not."""

import pytest
import torch
import torch.nn.functional as F
from rounding import assert_same_sgd, chained_reductions, longest_sum, sgd_rounding_bound
from user_algorithm import Proximal

from flexp.algorithm import Algorithm
from flexp.data import Split
from flexp.engine.cnn_kernel import PaperCnnReplica, inference, is_paper_cnn, replica_for
from flexp.flat import Replica, flat_parameters
from flexp.metrics import evaluate
from flexp.models import build_model
from flexp.strategy.fedprox import FedProx
from flexp.strategy.label_flip import LabelFlip
from flexp.strategy.scaffold import Scaffold

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


CLAIMED = {"fedavg": lambda: Algorithm(), "fedprox": lambda: FedProx(0.5), "scaffold": lambda: Scaffold(4, 0.1),
           "label_flip": lambda: LabelFlip(FedProx(0.5), frozenset({0}), 10), "user_proximal": lambda: Proximal(0.5),
           "label_flip_scaffold": lambda: LabelFlip(Scaffold(4, 0.1), frozenset({0}), 10)}


@pytest.mark.parametrize("name", sorted(CLAIMED))
def test_kernel_equals_autograd_in_float64(name):
    algorithm = CLAIMED[name]()
    reference, fast = _pair(torch.float64)
    start = flat_parameters(reference.module)
    message = algorithm.message(0, 1, start)
    if "scaffold" in name:
        message = {**message, "correction": 0.01 * torch.randn(start.shape, dtype=torch.float64)}
    kernel = fast.step_for(algorithm, F.cross_entropy, message)
    assert kernel.func == fast.kernel_step
    slow_state = algorithm.client_init({k: v.clone() for k, v in reference.detached().items()}, message)
    fast_state = algorithm.client_init({k: v.clone() for k, v in fast.detached().items()}, message)
    for x, y in _batches(torch.float64, [10, 10, 10, 7, 10]):
        slow_loss, slow_state = reference.train_step(x, y, 0.1, algorithm, slow_state, F.cross_entropy)
        fast_loss, fast_state = kernel(x, y, 0.1, algorithm, fast_state, F.cross_entropy)
        assert abs(float(slow_loss - fast_loss)) < 1e-12
    assert_same_sgd(flat_parameters(fast.module), flat_parameters(reference.module), start, 5,
                    longest_sum("cnn", (1, 28, 28), 10), chained_reductions("cnn"))


def test_kernel_agrees_with_autograd_in_float32_over_a_few_steps():
    reference, fast = _pair(torch.float32)
    start = flat_parameters(reference.module)
    fedavg = Algorithm()
    kernel = fast.step_for(fedavg, F.cross_entropy, {})
    for x, y in _batches(torch.float32, [10, 10, 3]):
        reference.train_step(x, y, 0.1, fedavg, {}, F.cross_entropy)
        kernel(x, y, 0.1, fedavg, {}, F.cross_entropy)
    assert_same_sgd(flat_parameters(fast.module), flat_parameters(reference.module), start, 3,
                    longest_sum("cnn", (1, 28, 28), 10), chained_reductions("cnn"))


def test_only_the_papers_cnn_on_the_cpu_gets_the_kernel():
    assert is_paper_cnn(build_model("cnn", (1, 28, 28), 10))
    assert isinstance(replica_for(build_model("cnn", (1, 28, 28), 10)), PaperCnnReplica)
    assert not is_paper_cnn(build_model("2nn", (1, 28, 28), 10))
    assert type(replica_for(build_model("logreg", (1, 28, 28), 10))) is Replica


class Tweaked(FedProx):
    """FedProx with its own step: not what the kernel implements."""

    def step(self, params, grads, cstate, lr):
        return super().step(params, grads, cstate, 2 * lr)


class Undeclared(Proximal):
    """The user's proximal algorithm with another loss but the StepTerms it inherits: they no longer describe it."""

    def loss(self, task_loss, params, cstate):
        return 2 * super().loss(task_loss, params, cstate)


def test_the_kernel_is_not_used_for_an_algorithm_or_loss_it_does_not_claim():
    replica = replica_for(build_model("cnn", (1, 28, 28), 10))
    message = {"label_map": torch.arange(10)}
    for algorithm in (Tweaked(0.5), LabelFlip(Tweaked(0.5), frozenset(), 10), Undeclared(0.5)):
        assert replica.step_for(algorithm, F.cross_entropy, message) == replica.train_step, algorithm
    assert replica.step_for(Algorithm(), F.nll_loss, {}) == replica.train_step


def test_evaluation_runs_the_kernels_forward_and_scores_as_the_module_does():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10).double()
    x, y = next(_batches(torch.float64, [300]))
    with torch.no_grad():
        fast, slow = inference(model)(x), model(x)
    drift = float((fast - slow).norm() / slow.norm())
    assert drift <= sgd_rounding_bound(1, 64 * 7 * 7, 4, torch.float64)  # one forward: 4 chained fan-ins
    assert inference(build_model("2nn", (1, 28, 28), 10)) is None
    generic = torch.nn.Sequential(torch.nn.Identity(), *model)  # the same layers, not the shape the kernel knows
    assert inference(generic) is None
    (fast_accuracy, fast_loss), (accuracy, loss) = evaluate(model, Split(x, y)), evaluate(generic, Split(x, y))
    # cross-entropy moves at most 2 max|d logit| a sample (log-softmax is 2-Lipschitz in the max-norm), plus the sum
    assert fast_accuracy == accuracy
    assert abs(fast_loss - loss) <= 2 * float((fast - slow).abs().max()) + len(x) * 2**-53 * loss
