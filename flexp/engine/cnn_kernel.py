"""The paper's MNIST CNN trained without autograd: one hand-written SGD step, ~1.4x eager PyTorch on one CPU thread.

conv2 (~80% of the FLOPs) runs on the same oneDNN NCHW kernels as eager, with one fused convolution_backward.
Max-pooling runs on channels-last views (the NCHW max-pool kernel is ~15x slower here). conv1 is an im2col GEMM
writing NHWC directly, with no input gradient. The FC weight gradients are fused into the update
(W.addmm_(dH^T, X, alpha=-lr)). Max-pool ties (first maximum), ReLU's zero gradient at 0 and the mean
cross-entropy follow eager PyTorch; in float64 the step matches autograd to ~1e-16.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flexp.algorithm import Algorithm, StepTerms, TaskLoss, hook_owner, overrides, step_terms
from flexp.engine.path import EnginePath
from flexp.flat import Replica

aten = torch.ops.aten
CL = torch.channels_last
KERNEL, STRIDE, NO_PAD, DILATION = [2, 2], [2, 2], [0, 0], [1, 1]
MAX_BATCH = 512  # larger batches (the baseline's full batch) use autograd: im2col would need 80 KB per sample


def is_paper_cnn(module: nn.Module) -> bool:
    """True for flexp.models.cnn(1, classes): the layer types and shapes this kernel is written for."""
    layers = list(module) if isinstance(module, nn.Sequential) else []
    kinds = [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.ReLU,
             nn.Linear]
    if len(layers) != len(kinds) or any(not isinstance(m, k) for m, k in zip(layers, kinds)):
        return False
    conv1, conv2, fc1, fc2 = layers[0], layers[3], layers[7], layers[9]
    return (conv1.weight.shape == (32, 1, 5, 5) and conv1.padding == (2, 2) and conv2.weight.shape == (64, 32, 5, 5)
            and conv2.padding == (2, 2) and fc1.weight.shape == (512, 3136) and fc2.in_features == 512
            and all(m.bias is not None for m in (conv1, conv2, fc1, fc2))
            and all(isinstance(m, nn.MaxPool2d) and m.kernel_size == 2 and m.stride == 2 and m.padding == 0
                    for m in (layers[2], layers[5])))


class Forward(NamedTuple):
    """The forward pass's tensors that the backward pass reads."""

    unf: torch.Tensor
    y1c: torch.Tensor
    i1: torch.Tensor
    p1: torch.Tensor
    y2c: torch.Tensor
    i2: torch.Tensor
    f: torch.Tensor
    h: torch.Tensor
    logits: torch.Tensor


def forward(params: list[torch.Tensor], xb: torch.Tensor) -> Forward:
    """The CNN's forward pass on a batch [n,1,28,28]: conv1 as an im2col GEMM writing NHWC, max-pool on
    channels-last views, conv2 on oneDNN's NCHW kernel."""
    w1, b1, w2, b2, w3, b3, w4, b4 = params
    n = xb.shape[0]
    xp = F.pad(xb.reshape(n, 28, 28), (2, 2, 2, 2))
    unf = xp.as_strided((n, 5, 5, 28, 28), (1024, 32, 1, 32, 1)).reshape(n, 25, 784)
    y1h = torch.matmul(unf.transpose(1, 2), w1.view(32, 25).t()).add_(b1)
    y1c = y1h.view(n, 28, 28, 32).permute(0, 3, 1, 2)
    p1c, i1 = aten.max_pool2d_with_indices(y1c, KERNEL, STRIDE)
    p1c.relu_()  # relu(maxpool(y)) == maxpool(relu(y))
    p1 = p1c.contiguous()
    y2 = F.conv2d(p1, w2, b2, padding=2)
    y2c = y2.contiguous(memory_format=CL)
    p2c, i2 = aten.max_pool2d_with_indices(y2c, KERNEL, STRIDE)
    p2c.relu_()
    f = p2c.contiguous().view(n, 3136)
    h = torch.addmm(b3, f, w3.t()).relu_()
    return Forward(unf, y1c, i1, p1, y2c, i2, f, h, torch.addmm(b4, h, w4.t()))


def inference(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The paper's CNN `module` on the CPU as a function of a batch, on this kernel's forward (~1.5x eager's in
    inference here); None for any other model."""
    if not is_paper_cnn(module) or any(p.device.type != "cpu" for p in module.parameters()):
        return None
    params = [p.detach().contiguous() for p in module.parameters()]
    return lambda xb: forward(params, xb.contiguous()).logits


def sgd_step(params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, lr: float,
             pull: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One SGD step on a batch [n,1,28,28], updating params in place: w <- w - lr (dloss/dw + pull); returns loss."""
    w1, b1, w2, b2, w3, b3, w4, b4 = params
    n = xb.shape[0]
    unf, y1c, i1, p1, y2c, i2, f, h, logits = forward(params, xb)
    logp = torch._log_softmax(logits, 1, False)
    loss, total_weight = aten.nll_loss_forward(logp, yb, None, 1, -100)

    one = torch.ones((), dtype=xb.dtype, device=xb.device)
    dlog = aten._log_softmax_backward_data(aten.nll_loss_backward(one, logp, yb, None, 1, -100, total_weight),
                                           logp, 1, xb.dtype)
    dh = aten.threshold_backward(torch.mm(dlog, w4), h, 0)
    w4.addmm_(dlog.t(), h, alpha=-lr)
    b4.sub_(dlog.sum(0), alpha=lr)
    df = torch.mm(dh, w3)
    w3.addmm_(dh.t(), f, alpha=-lr)
    b3.sub_(dh.sum(0), alpha=lr)
    dp2 = aten.threshold_backward(df.view(n, 64, 7, 7), f.view(n, 64, 7, 7), 0).contiguous(memory_format=CL)
    dy2 = aten.max_pool2d_with_indices_backward(dp2, y2c, KERNEL, STRIDE, NO_PAD, DILATION, False, i2).contiguous()
    dp1, dw2, db2 = aten.convolution_backward(dy2, p1, w2, [64], [1, 1], [2, 2], [1, 1], False, [0, 0], 1,
                                              [True, True, True])
    w2.sub_(dw2, alpha=lr)
    b2.sub_(db2, alpha=lr)
    dp1c = aten.threshold_backward(dp1, p1, 0).contiguous(memory_format=CL)
    dy1c = aten.max_pool2d_with_indices_backward(dp1c, y1c, KERNEL, STRIDE, NO_PAD, DILATION, False, i1)
    g = dy1c.permute(0, 2, 3, 1).reshape(n, 784, 32)
    w1.view(32, 25).sub_(torch.bmm(unf, g).sum(0).t(), alpha=lr)
    b1.sub_(g.sum((0, 1)), alpha=lr)
    if pull is not None:
        torch._foreach_add_(params, pull, alpha=-lr)
    return loss


def client_side(algorithm: Algorithm) -> str:
    """The phrase "<class>'s client side" for the run's log, <class> the one whose step hook runs (an attacker runs
    the hooks of the algorithm inside it), or whose own gradient hook replaces local training's gradients (a
    wrapper says what it wraps: `client_side_name`)."""
    hook = "gradient" if overrides(algorithm, "gradient") else "step"
    owner = hook_owner(algorithm, hook)
    return f"{getattr(owner, 'client_side_name', type(owner).__name__)}'s client side"


def supports(module: nn.Module, algorithm: Algorithm, task_loss: TaskLoss) -> bool:
    """True when this kernel runs `algorithm` on `module` exactly: the paper's CNN on the CPU and a claimed pair."""
    return is_paper_cnn(module) and not unsupported(module, algorithm, task_loss)


def unsupported(module: nn.Module, algorithm: Algorithm, task_loss: TaskLoss) -> str:
    """Why this kernel cannot run `algorithm` on the paper's CNN `module` ('' when it can), for the run's log."""
    if not all(p.device.type == "cpu" for p in module.parameters()):
        return "the CNN kernel runs on the CPU only"
    return unclaimed("CNN kernel", module, algorithm, task_loss)


def unclaimed(kernel: str, module: nn.Module, algorithm: Algorithm, task_loss: TaskLoss) -> str:
    """Why a hand kernel (named `kernel`) that fits `module` still cannot train it ('' when it can): frozen
    parameters, another task loss, or a client side it does not implement."""
    if not all(p.requires_grad for p in module.parameters()):
        return "the model has frozen parameters"
    if task_loss is not F.cross_entropy:
        return "the task loss is not cross-entropy"
    if step_terms(algorithm) is None:
        return f"the {kernel} does not implement {client_side(algorithm)}: it declares no StepTerms"
    return ""


def replica_path(module: nn.Module, algorithm: Algorithm, task_loss: TaskLoss, batch_size: int | None) -> EnginePath:
    """The step a replica_for(module) replica takes for `algorithm` with batches of `batch_size` (None: a client's
    whole data): the hand CNN kernel, or autograd (and why not the kernel, for the paper's CNN)."""
    if not is_paper_cnn(module):
        return EnginePath("autograd")
    why = unsupported(module, algorithm, task_loss)
    if why:
        return EnginePath("autograd", why)
    if batch_size is None:
        return EnginePath("kernel", f"hand CNN kernel; autograd for a client of over {MAX_BATCH} samples, as B=inf")
    if batch_size > MAX_BATCH:
        return EnginePath("autograd", f"the CNN kernel takes batches of at most {MAX_BATCH} samples")
    return EnginePath("kernel", "hand CNN kernel")


class PaperCnnReplica(Replica):
    """A Replica whose training step is the hand-written kernel where it supports the algorithm (autograd for
    batches above MAX_BATCH and for every algorithm it does not claim)."""

    def step_for(self, algorithm: Any, task_loss: TaskLoss, message: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
        if not supports(self.module, algorithm, task_loss):
            return self.train_step
        terms = step_terms(algorithm)
        return partial(self.kernel_step, pull=puller(self.params, terms, message), labels=terms.label_map and
                       message[terms.label_map])

    def kernel_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, algorithm: Algorithm, cstate: Any,
                    task_loss: TaskLoss, pull: Callable[[], list[torch.Tensor] | None],
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        if len(x) > MAX_BATCH:
            return self.train_step(x, y, lr, algorithm, cstate, task_loss)
        with torch.no_grad():
            return sgd_step(self.params, x, y if labels is None else labels[y], lr, pull()), cstate


def puller(params: list[torch.Tensor], terms: StepTerms, message: Mapping[str, torch.Tensor]) -> Callable[
        [], list[torch.Tensor] | None]:
    """The function giving a step's extra gradient per parameter under `terms` (None for none): the proximal pull
    mu (w - w_start) from the weights `params` hold now (the client's start), plus the message's correction."""
    start = [p.detach().clone() for p in params] if terms.proximal else None
    correction = message[terms.correction].split([p.numel() for p in params]) if terms.correction else None
    fixed = [c.view(p.shape) for c, p in zip(correction, params)] if correction is not None else None
    if start is None:
        return lambda: fixed

    def pull() -> list[torch.Tensor]:
        out = torch._foreach_mul(torch._foreach_sub(params, start), terms.proximal)
        return out if fixed is None else torch._foreach_add(out, fixed)

    return pull


def replica_for(module: nn.Module) -> Replica:
    """The fastest Replica for `module`: the CNN kernel for the paper's CNN on the CPU, autograd otherwise."""
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return PaperCnnReplica(module) if on_cpu and is_paper_cnn(module) else Replica(module)
