"""Models as flat parameter vectors: the server, aggregation and engines exchange one 1-D tensor per model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Replica:
    """A worker's reusable copy of the model: load a flat vector in place, step, read the vector back.

    Layout stays contiguous (NCHW); engine/cnn_kernel.py has a faster step for the paper's CNN.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = list(self.module.parameters())

    def load(self, flat: torch.Tensor) -> None:
        """Copy a flat parameter vector into the model's own tensors."""
        load_flat(self.module, flat)

    def sgd_step(self, loss: torch.Tensor, lr: float, mu: float = 0.0, anchor: list[torch.Tensor] | None = None,
                 correction: list[torch.Tensor] | None = None) -> None:
        """w <- w - lr * (dloss/dw + mu (w - anchor) + correction): FedProx's pull and SCAFFOLD's c - c_i."""
        grads = list(torch.autograd.grad(loss, self.params))
        with torch.no_grad():
            if mu and anchor is not None:
                torch._foreach_add_(grads, torch._foreach_sub(self.params, anchor), alpha=mu)
            if correction is not None:
                torch._foreach_add_(grads, correction)
            torch._foreach_add_(self.params, grads, alpha=-lr)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, mu: float = 0.0,
                   anchor: list[torch.Tensor] | None = None,
                   correction: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One SGD step on the mean cross-entropy of (x, y); returns the (detached) loss."""
        loss = F.cross_entropy(self.module(x), y)
        self.sgd_step(loss, lr, mu, anchor, correction)
        return loss.detach()

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
