"""Models as flat parameter vectors: the server, aggregation and engines exchange one 1-D tensor per model.

The flat vector holds the trainable parameters (requires_grad) only. The rest of a model's state travels beside it
as a dict by name (`model_state`): its buffers (BatchNorm running statistics), which clients update and the server
averages, and its frozen parameters, which the server sends and nobody changes. Models without either send {}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import torch
from torch import nn


@cache
def interface() -> Any:
    """flexp.algorithm, imported late: it imports this module's users."""
    import flexp.algorithm

    return flexp.algorithm


class Replica:
    """A worker's reusable copy of the model: load a flat vector in place, step, read the vector back.

    Layout stays contiguous (NCHW); engine/cnn_kernel.py has a faster step for the paper's CNN.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.named = dict(trainable(module))
        self.params = list(self.named.values())
        self.stateful = bool(model_state(module))

    def load(self, flat: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> None:
        """Copy a flat parameter vector (and the model's other state, when it has any) into the model's tensors."""
        load_flat(self.module, flat, state)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers, as local training left them (what a client returns besides its weights)."""
        return {name: b.detach().clone() for name, b in self.module.named_buffers()} if self.stateful else {}

    def detached(self) -> dict[str, torch.Tensor]:
        """The current parameters by name, detached views of the model's own tensors."""
        return {name: p.detach() for name, p in self.named.items()}

    def step_for(self, algorithm: Any, task_loss: Callable[..., torch.Tensor],
                 message: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
        """The training step to run `algorithm` with for one client (its `message`, the replica holding its start
        weights): autograd here; a hand kernel where one implements the pair."""
        return self.train_step

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, algorithm: Any, cstate: Any,
                   task_loss: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """One step of the algorithm's client side by autograd on the batch (x, y); returns (task loss, cstate)."""
        if interface().overrides(algorithm, "gradient"):
            mask = torch.ones(len(x), dtype=self.params[0].dtype, device=x.device)
            batch = interface().Batch(x, y, mask, self.forward, task_loss)
            found, task, cstate = algorithm.gradient(batch, self.detached(), cstate)
            grads = [found[name] for name in self.named]
        else:
            xb, yb = algorithm.batch(x, y, cstate)
            task = task_loss(self.module(xb), yb)
            grads = torch.autograd.grad(algorithm.loss(task, self.named, cstate), self.params)
        with torch.no_grad():
            if getattr(algorithm.step, "__func__", None) is interface().Algorithm.step:  # the default step, in place
                torch._foreach_add_(self.params, list(grads), alpha=-lr)
                return task.detach(), cstate
            new, cstate = algorithm.step(self.detached(), dict(zip(self.named, grads)), cstate, lr)
            torch._foreach_copy_(self.params, [new[name] for name in self.named])
        return task.detach(), cstate

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model's output on `x` with `params` for its trainable weights (the `gradient` hook's forward)."""
        return torch.func.functional_call(self.module, params, (x,))

    def flat(self) -> torch.Tensor:
        """The current parameters as a new flat vector in PyTorch's order."""
        return flat_parameters(self.module)


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for the parameters that train (requires_grad), in PyTorch's order: the flat layout."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """A detached copy of `module`'s trainable parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(module)])


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what the flat vector leaves out: frozen parameters and buffers, by name ({} for most models)."""
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    return {**frozen, **{name: b.detach().clone() for name, b in module.named_buffers()}}


def load_flat(module: nn.Module, flat: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Write a flat vector into `module`'s trainable parameters (the module keeps its own storage and layout), and
    `state` (model_state's dict) into its frozen parameters and buffers by name; return the module."""
    offset = 0
    with torch.no_grad():
        for _, p in trainable(module):
            n = p.numel()
            p.copy_(flat[offset:offset + n].view(p.shape))
            offset += n
        if state:
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            for name, value in state.items():
                tensors[name].copy_(value)
    return module
