"""ClientUpdate from the paper: E epochs of minibatch SGD on the client's own samples, from the global weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexp.flat import FlatModel


@dataclass(frozen=True)
class LocalSpec:
    """E, B (None: full local batch) and the learning rate."""

    epochs: int
    batch_size: int | None
    lr: float


@dataclass(frozen=True)
class ClientTask:
    """One sampled client for one round: which samples it holds and the seed of its batch order."""

    client: int
    indices: torch.Tensor
    seed: int


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back: new weights, its n_k, and its mean training loss."""

    client: int
    params: torch.Tensor
    num_samples: int
    loss: float


def local_sgd(model: FlatModel, x: torch.Tensor, y: torch.Tensor, task: ClientTask, spec: LocalSpec) -> ClientResult:
    """Train `model` (already holding the global weights) on the task's samples; return its weights and loss."""
    indices = task.indices.to(x.device)
    n = len(indices)
    batch = spec.batch_size or n
    generator = torch.Generator().manual_seed(task.seed)
    loss_sum = torch.zeros((), device=x.device)
    for _ in range(spec.epochs):
        order = indices[torch.randperm(n, generator=generator).to(x.device)]
        for start in range(0, n, batch):
            chosen = order[start:start + batch]
            model.grads.zero_()
            loss = F.cross_entropy(model.module(x[chosen]), y[chosen])
            loss.backward()
            model.sgd_step(spec.lr)
            loss_sum += loss.detach() * len(chosen)
    mean_loss = float(loss_sum) / (n * spec.epochs)
    return ClientResult(task.client, model.params.clone(), n, mean_loss)
