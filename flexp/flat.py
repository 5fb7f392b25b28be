"""A model whose parameters and gradients live in two flat tensors, so loading, SGD and averaging are single ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FlatModel:
    """`module`'s parameters are views into `params`; its .grad tensors are views into `grads`."""

    module: nn.Module
    params: torch.Tensor
    grads: torch.Tensor

    @classmethod
    def wrap(cls, module: nn.Module) -> FlatModel:
        """Re-home every parameter and gradient of `module` into one flat buffer each (values kept)."""
        plist = list(module.parameters())
        params = torch.cat([p.detach().reshape(-1) for p in plist]).contiguous()
        grads = torch.zeros_like(params)
        offset = 0
        for p in plist:
            n = p.numel()
            p.data = params[offset:offset + n].view_as(p)
            p.grad = grads[offset:offset + n].view_as(p)
            offset += n
        return cls(module, params, grads)

    def load(self, flat: torch.Tensor) -> None:
        """Copy a flat parameter vector into the model in place."""
        with torch.no_grad():
            self.params.copy_(flat)

    def sgd_step(self, lr: float) -> None:
        """w <- w - lr * grad over the whole flat vector."""
        with torch.no_grad():
            self.params.add_(self.grads, alpha=-lr)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """A detached copy of `module`'s parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def load_flat(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Write a flat parameter vector into `module` (which keeps its own storage); return it."""
    offset = 0
    with torch.no_grad():
        for p in module.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
    return module
