"""Models as flat parameter vectors: the server, aggregation and engines exchange one 1-D tensor per model."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn


@cache
def sgd_step_function() -> Callable[..., Any]:
    """Algorithm.step, the interface's default (imported late: flexp.algorithm imports this module's users)."""
    from flexp.algorithm import Algorithm

    return Algorithm.step


class Replica:
    """A worker's reusable copy of the model: load a flat vector in place, step, read the vector back.

    Layout stays contiguous (NCHW); engine/cnn_kernel.py has a faster step for the paper's CNN.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.named = dict(self.module.named_parameters())
        self.params = list(self.named.values())

    def load(self, flat: torch.Tensor) -> None:
        """Copy a flat parameter vector into the model's own tensors."""
        load_flat(self.module, flat)

    def detached(self) -> dict[str, torch.Tensor]:
        """The current parameters by name, detached views of the model's own tensors."""
        return {name: p.detach() for name, p in self.named.items()}

    def step_for(self, algorithm: Any, task_loss: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        """The training step to run `algorithm` with: autograd here; a hand kernel where one implements the pair."""
        return self.train_step

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, algorithm: Any, cstate: Any,
                   task_loss: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """One step of the algorithm's client side by autograd on the batch (x, y); returns (task loss, cstate)."""
        xb, yb = algorithm.batch(x, y, cstate)
        task = task_loss(self.module(xb), yb)
        grads = torch.autograd.grad(algorithm.loss(task, self.named, cstate), self.params)
        with torch.no_grad():
            if getattr(algorithm.step, "__func__", None) is sgd_step_function():  # the default step, in place
                torch._foreach_add_(self.params, list(grads), alpha=-lr)
                return task.detach(), cstate
            new, cstate = algorithm.step(self.detached(), dict(zip(self.named, grads)), cstate, lr)
            torch._foreach_copy_(self.params, [new[name] for name in self.named])
        return task.detach(), cstate

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like each parameter."""
        return [part.view(p.shape) for part, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def flat(self) -> torch.Tensor:
        """The current parameters as a new flat vector in PyTorch's order."""
        return flat_parameters(self.module)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """A detached copy of `module`'s parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def load_flat(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Write a flat parameter vector into `module` (which keeps its own storage and layout); return it."""
    offset = 0
    with torch.no_grad():
        for p in module.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view(p.shape))
            offset += n
    return module
