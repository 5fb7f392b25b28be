"""Sampled clients train in lockstep as one batched functional model (torch.func: functional_call + vmap + grad).

Each client keeps its own batch order (client.epoch_orders); a per-sample mask pads short clients and partial
last batches, so every client does exactly the SGD steps it would do alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from flexp.client import ClientResult, ClientTask, LocalSpec, epoch_orders
from flexp.data import Split
from flexp.engine.batched_mlp import BatchedMLP, mlp_layers


@dataclass(frozen=True)
class Lockstep:
    """Padded per-step sample indices [T, m, B] and their validity mask, for m clients over T steps."""

    indices: torch.Tensor
    mask: torch.Tensor


def lockstep_plan(tasks: Sequence[ClientTask], spec: LocalSpec) -> Lockstep:
    """Lay each client's E epochs of batches side by side; missing steps and samples are masked out."""
    batch = spec.batch_size or max(len(t.indices) for t in tasks)
    per_client = []
    for task in tasks:
        epochs = task.local_epochs(spec)
        orders = epoch_orders(task, epochs)
        n = orders.shape[1]
        steps = math.ceil(n / batch)
        padded = torch.full((epochs, steps * batch), -1, dtype=torch.int64)
        padded[:, :n] = orders
        per_client.append(padded.reshape(epochs * steps, batch))
    total = max(len(p) for p in per_client)
    grid = torch.full((total, len(tasks), batch), -1, dtype=torch.int64)
    for k, steps in enumerate(per_client):
        grid[: len(steps), k] = steps
    mask = grid >= 0
    return Lockstep(grid.clamp_min(0), mask)


class VectorizedEngine:
    """Runs the round's clients in lockstep, `group_size` at a time (all when None), in the calling thread.

    MLPs (2nn, logreg) use hand-written batched kernels (engine/batched_mlp.py); other models use
    torch.func's vmap over per-client weights. Results do not depend on any thread count: there are no workers.
    """

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec,
                 group_size: int | None = None, device: torch.device | str = "cpu") -> None:
        self.train, self.spec, self.group_size = train, spec, group_size
        self.device = torch.device(device)
        self.model = make_model().to(self.device).train()
        self.layers = mlp_layers(self.model)
        self.flat_x = train.x.reshape(len(train), -1) if self.layers else train.x
        self.names = [name for name, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.vmapped = vmap(grad_and_value(self._client_loss))

    def _client_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(functional_call(self.model, params, (x,)), y, reduction="none")
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    def _train_mlp(self, global_params: torch.Tensor, plan: Lockstep, clients: int) -> tuple[torch.Tensor, ...]:
        net = BatchedMLP.from_flat(global_params, self.layers, clients)
        anchor = BatchedMLP.from_flat(global_params, self.layers, clients) if self.spec.mu else None
        loss_sum = torch.zeros(clients, device=self.device, dtype=self.train.x.dtype)
        for idx, mask in zip(plan.indices, plan.mask):
            losses = net.step(self.flat_x[idx], self.train.y[idx], mask, self.spec.lr, self.spec.mu, anchor)
            loss_sum += losses * mask.sum(1)
        return net.flat(), loss_sum

    def _train_vmap(self, global_params: torch.Tensor, plan: Lockstep, clients: int) -> tuple[torch.Tensor, ...]:
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            params[name] = global_params[offset:offset + n].view(shape).expand(clients, *shape).clone()
            offset += n
        tensors = list(params.values())
        anchor = [t.clone() for t in tensors] if self.spec.mu else None
        loss_sum = torch.zeros(clients, device=self.device, dtype=self.train.x.dtype)
        for idx, mask in zip(plan.indices, plan.mask):
            grads, losses = self.vmapped(params, self.train.x[idx], self.train.y[idx], mask)
            grads = [grads[name] for name in self.names]
            if anchor is not None:  # FedProx: mu (w - anchor), only for clients that have a batch at this step
                active = (mask.sum(1) > 0).to(mask.dtype) * self.spec.mu
                pulls = torch._foreach_sub(tensors, anchor)
                grads = [g + p * active.view(-1, *[1] * (p.dim() - 1)) for g, p in zip(grads, pulls)]
            torch._foreach_add_(tensors, grads, alpha=-self.spec.lr)
            loss_sum += losses * mask.sum(1)
        return torch.cat([p.reshape(clients, -1) for p in tensors], dim=1), loss_sum

    def _train_group(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        plan = lockstep_plan(tasks, self.spec)
        plan = Lockstep(plan.indices.to(self.device), plan.mask.to(self.device, self.train.x.dtype))
        train = self._train_mlp if self.layers else self._train_vmap
        with torch.no_grad() if self.layers else nullcontext():
            flat, loss_sum = train(global_params, plan, len(tasks))
        sizes = [len(task.indices) for task in tasks]
        epochs = torch.tensor([task.local_epochs(self.spec) for task in tasks])
        mean_loss = (loss_sum.cpu() / (torch.tensor(sizes) * epochs)).tolist()
        return [ClientResult(task.client, flat[k].clone(), sizes[k], mean_loss[k]) for k, task in enumerate(tasks)]

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """Train every task's client from `global_params`; results in task order."""
        size = self.group_size or len(tasks)
        return [r for i in range(0, len(tasks), size) for r in self._train_group(global_params, tasks[i:i + size])]

    def close(self) -> None:
        """Nothing to release; present for the engine interface."""
