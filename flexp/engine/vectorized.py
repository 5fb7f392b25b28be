"""Sampled clients train in lockstep as one batched functional model (torch.func: functional_call + vmap + grad).

Each client keeps its own batch order (client.epoch_orders); a per-sample mask pads short clients and partial
last batches, so every client does exactly the SGD steps it would do alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from flexp.client import ClientResult, ClientTask, LocalSpec, epoch_orders, failed_result, local_steps
from flexp.data import Split
from flexp.engine.batched_mlp import BatchedMLP, mlp_layers
from flexp.engine.threads import intra_op_threads


@dataclass(frozen=True)
class Lockstep:
    """Padded per-step sample indices [T, m, B] and their validity mask, for m clients over T steps, with the
    clients' SCAFFOLD corrections [m, P] and label maps [m, classes] where any client has one."""

    indices: torch.Tensor
    mask: torch.Tensor
    corrections: torch.Tensor | None = None
    label_maps: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> Lockstep:
        """On `device`, with the mask and corrections in the training dtype."""
        return Lockstep(self.indices.to(device), self.mask.to(device, dtype),
                        None if self.corrections is None else self.corrections.to(device, dtype),
                        None if self.label_maps is None else self.label_maps.to(device))


def stacked_extras(tasks: Sequence[ClientTask], num_params: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-client corrections (zeros where a client has none) and label maps (identity where none), or None."""
    corrections = label_maps = None
    if any(t.correction is not None for t in tasks):
        corrections = torch.stack([t.correction.cpu() if t.correction is not None else torch.zeros(num_params)
                                   for t in tasks])
    maps = [t.label_map for t in tasks if t.label_map is not None]
    if maps:
        identity = torch.arange(len(maps[0]))
        label_maps = torch.stack([t.label_map.cpu() if t.label_map is not None else identity for t in tasks])
    return corrections, label_maps


def lockstep_plan(tasks: Sequence[ClientTask], spec: LocalSpec, num_params: int = 0) -> Lockstep:
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
    return Lockstep(grid.clamp_min(0), mask, *stacked_extras(tasks, num_params))


class VectorizedEngine:
    """Runs the round's clients in lockstep, `group_size` at a time (all when None), in the calling thread.

    MLPs (2nn, logreg) use hand-written batched kernels (engine/batched_mlp.py); other models use
    torch.func's vmap over per-client weights. Results do not depend on any thread count: there are no workers.
    """

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec,
                 group_size: int | None = None, device: torch.device | str = "cpu", workers: int = 1) -> None:
        self.train, self.spec, self.group_size = train, spec, group_size
        self.device = torch.device(device)
        self.model = make_model().to(self.device).train()
        self.layers = mlp_layers(self.model)
        parallel = workers > 1 and self.layers is not None and self.device.type == "cpu"
        self.workers = workers if parallel else 1
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexp-group") if parallel else None
        self.flat_x = train.x.reshape(len(train), -1) if self.layers else train.x
        self.names = [name for name, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.vmapped = vmap(grad_and_value(self._client_loss))

    def _client_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(functional_call(self.model, params, (x,)), y, reduction="none")
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    def _labels(self, idx: torch.Tensor, plan: Lockstep) -> torch.Tensor:
        y = self.train.y[idx]
        return y if plan.label_maps is None else torch.gather(plan.label_maps, 1, y)

    def _train_mlp(self, global_params: torch.Tensor, plan: Lockstep, clients: int) -> tuple[torch.Tensor, ...]:
        net = BatchedMLP.from_flat(global_params, self.layers, clients)
        anchor = BatchedMLP.from_flat(global_params, self.layers, clients) if self.spec.mu else None
        correction = BatchedMLP.from_rows(plan.corrections, self.layers) if plan.corrections is not None else None
        loss_sum = torch.zeros(clients, device=self.device, dtype=self.train.x.dtype)
        for idx, mask in zip(plan.indices, plan.mask):
            losses = net.step(self.flat_x[idx], self._labels(idx, plan), mask, self.spec.lr, self.spec.mu, anchor,
                              correction)
            loss_sum += losses * mask.sum(1)
        return net.flat(), loss_sum

    def _per_parameter(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """[m, P] flat rows as a list of [m, *shape] views, one per parameter."""
        sizes = [math.prod(shape) for shape in self.shapes]
        return [part.view(len(rows), *shape) for part, shape in zip(rows.split(sizes, dim=1), self.shapes)]

    def _train_vmap(self, global_params: torch.Tensor, plan: Lockstep, clients: int) -> tuple[torch.Tensor, ...]:
        tensors = [t.clone() for t in self._per_parameter(global_params.expand(clients, -1))]
        params = dict(zip(self.names, tensors))
        anchor = [t.clone() for t in tensors] if self.spec.mu else None
        correction = self._per_parameter(plan.corrections) if plan.corrections is not None else None
        loss_sum = torch.zeros(clients, device=self.device, dtype=self.train.x.dtype)
        for idx, mask in zip(plan.indices, plan.mask):
            grads, losses = self.vmapped(params, self.train.x[idx], self._labels(idx, plan), mask)
            grads = [grads[name] for name in self.names]
            active = (mask.sum(1) > 0).to(mask.dtype)  # extra gradient terms apply only to clients with a batch
            if anchor is not None:  # FedProx: mu (w - anchor)
                pulls = torch._foreach_sub(tensors, anchor)
                grads = [g + p * (active * self.spec.mu).view(-1, *[1] * (p.dim() - 1)) for g, p in zip(grads, pulls)]
            if correction is not None:  # SCAFFOLD: c - c_i
                grads = [g + c * active.view(-1, *[1] * (c.dim() - 1)) for g, c in zip(grads, correction)]
            torch._foreach_add_(tensors, grads, alpha=-self.spec.lr)
            loss_sum += losses * mask.sum(1)
        return torch.cat([p.reshape(clients, -1) for p in tensors], dim=1), loss_sum

    def _train_group(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        plan = lockstep_plan(tasks, self.spec, global_params.numel())
        plan = plan.to(self.device, self.train.x.dtype)
        train = self._train_mlp if self.layers else self._train_vmap
        with torch.no_grad() if self.layers else nullcontext():
            flat, loss_sum = train(global_params, plan, len(tasks))
        sizes = [len(task.indices) for task in tasks]
        epochs = [task.local_epochs(self.spec) for task in tasks]
        mean_loss = (loss_sum.cpu() / (torch.tensor(sizes) * torch.tensor(epochs))).tolist()
        return [ClientResult(task.client, flat[k].clone(), sizes[k], mean_loss[k],
                             local_steps(sizes[k], self.spec.batch_size, epochs[k])) for k, task in enumerate(tasks)]

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """Train every task's client from `global_params`; results in task order.

        On the CPU every group runs on one intra-op thread, and MLP groups (by default the sampled clients in two
        halves) run in parallel on `workers` threads, which also degrades gracefully under CPU contention where
        intra-op threads stall. Groups depend on the config alone, so the result never depends on thread counts.
        """
        halves = self.layers is not None and self.device.type == "cpu"
        size = self.group_size or (math.ceil(len(tasks) / 2) if halves else len(tasks))
        groups = [tasks[i:i + size] for i in range(0, len(tasks), size)]
        if self.device.type != "cpu":
            return [r for group in groups for r in self._guarded(global_params, group)]
        with intra_op_threads(1):  # kernels round differently with different thread counts
            if self.pool is None:
                return [r for group in groups for r in self._guarded(global_params, group)]
            return [r for out in self.pool.map(lambda g: self._guarded(global_params, g), groups) for r in out]

    def _guarded(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        try:
            return self._train_group(global_params, tasks)
        except Exception as err:  # a lockstep group fails as a whole; the server judges what to do
            return [failed_result(task, global_params, err) for task in tasks]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
