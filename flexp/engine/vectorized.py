"""Sampled clients train in lockstep as one batched functional model (torch.func: functional_call + vmap + grad).

Each client keeps its own batch order (client.epoch_orders); a per-sample mask pads short clients and partial
last batches, so every client does exactly the SGD steps it would do alone. With B=inf on the MLP kernel a client's
step is its whole data, kept contiguous between rounds (FullBatches) instead of gathered, one client at a time (a
full batch is a GEMM large enough alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from flexp import interrupt
from flexp.algorithm import Algorithm, Batch, TaskLoss, overrides
from flexp.client import ClientResult, ClientTask, LocalSpec, epoch_orders, failed_result, local_steps
from flexp.data import Split
from flexp.engine import batched_mlp
from flexp.engine.batched_mlp import BatchedMLP, mlp_layers
from flexp.engine.path import EnginePath, buffers_why, draws_random_why
from flexp.engine.threads import ThreadEngine, intra_op_threads
from flexp.flat import trainable
from flexp.rng import draws_random

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Lockstep:
    """Padded per-step sample indices [T, m, B] and their validity mask, for m clients over T steps."""

    indices: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype) -> Lockstep:
        """On `device`, with the mask in the training dtype."""
        return Lockstep(self.indices.to(device), self.mask.to(device, dtype))


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


class FullBatches:
    """Each client's whole data [n_k, ...] (inputs and labels) as contiguous copies, kept between rounds, so a B=inf
    step reads them in place instead of gathering samples. A client's samples stay in the order its task lists them: the
    full-batch gradient is the same sum in any order, up to rounding. At most `limit` bytes are kept (a second copy
    of the training split); clients beyond that are gathered every round."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, limit: int) -> None:
        self.x, self.y, self.limit, self.used = x, y, limit, 0
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def client(self, task: ClientTask) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the task's samples, contiguous."""
        hit = self.kept.get(task.client)
        if hit is not None and torch.equal(hit[0], task.indices):
            return hit[1], hit[2]
        if hit is not None:  # the client's data changed: its old copy goes
            del self.kept[task.client]
            self.used -= hit[1].numel() * hit[1].element_size()
        index = task.indices.to(self.x.device)
        x, y = self.x[index], self.y[index]
        size = x.numel() * x.element_size()
        if self.used + size <= self.limit:
            self.kept[task.client], self.used = (task.indices.clone(), x, y), self.used + size
        return x, y


def stacked_messages(tasks: Sequence[ClientTask], device: torch.device) -> dict[str, torch.Tensor]:
    """The clients' messages as one dict of [m, ...] tensors (every client gets the same keys and shapes)."""
    keys = tasks[0].message.keys()
    return {k: torch.stack([t.message[k] for t in tasks]).to(device) for k in keys}


def keep_where(active: torch.Tensor, new: Any, old: Any) -> Any:
    """`new` for clients with a batch this step, `old` for the rest, leaf by leaf over [m, ...] tensors."""
    def pick(n: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return torch.where(active.view(-1, *[1] * (n.dim() - 1)), n, o)
    return tree_map(pick, new, old)


class VectorizedEngine:
    """Runs the round's clients in lockstep, `group_size` at a time (all when None), in the calling thread.

    Any algorithm runs on torch.func: its client hooks are vmapped over per-client weights and states, the loss
    through functional_call and grad_and_value. MLPs (2nn, logreg) with an algorithm the batched kernels claim
    (engine/batched_mlp.py) use those instead. Results do not depend on any thread count.
    """

    name = "vectorized"

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec,
                 group_size: int | None = None, device: torch.device | str = "cpu", workers: int = 1,
                 task_loss: TaskLoss = F.cross_entropy) -> None:
        self.train, self.spec, self.group_size, self.task_loss = train, spec, group_size, task_loss
        self.device = torch.device(device)
        self.model = make_model().to(self.device).train()
        self.layers = mlp_layers(self.model)
        parallel = workers > 1 and self.layers is not None and self.device.type == "cpu"
        self.workers = workers if parallel else 1
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexp-group") if parallel else None
        self.flat_x = train.x.reshape(len(train), -1) if self.layers else train.x
        self.names = [name for name, _ in trainable(self.model)]
        self.shapes = [p.shape for _, p in trainable(self.model)]
        self.dtype = trainable(self.model)[0][1].dtype  # of the weights and losses; inputs may be token ids
        self.per_client_why = per_client_why(self.model, train.x[:2])
        self.per_client = ThreadEngine(make_model, train, spec, workers, device, task_loss) \
            if self.per_client_why else None
        limit = self.flat_x.numel() * self.flat_x.element_size()
        self.full = FullBatches(self.flat_x, train.y, limit) if self.layers and spec.batch_size is None else None
        self.last_path: EnginePath | None = None  # kernel, vmap or per-client: the path the last round took

    def uses_kernel(self, algorithm: Algorithm) -> bool:
        """True when the batched MLP kernel implements this model and algorithm exactly."""
        return self.layers is not None and batched_mlp.supports(self.model, algorithm, self.task_loss)

    def describe(self, algorithm: Algorithm) -> EnginePath:
        """The path run_round takes for `algorithm`: the batched MLP kernel, torch.func's vmap, or client by client
        on the thread engine's code; and why."""
        if self.per_client is not None:
            return EnginePath("per-client", self.per_client_why)
        if self.uses_kernel(algorithm):
            return EnginePath("kernel", "batched MLP kernel")
        why = batched_mlp.unsupported(self.model, algorithm, self.task_loss)
        return EnginePath("vmap", "torch.func" + (f": {why}" if why else ""))

    def _client_loss(self, algorithm: Algorithm, params: dict[str, torch.Tensor], frozen: State, cstate: Any,
                     x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = algorithm.batch(x, y, cstate)
        output = functional_call(self.model, {**params, **frozen}, (x,))
        losses = self.task_loss(output, y, reduction="none")
        task = (losses * mask).sum() / mask.sum().clamp_min(1)
        return algorithm.loss(task, params, cstate), task

    def _gradient_function(self, algorithm: Algorithm) -> Callable[..., tuple[Any, torch.Tensor, Any]]:
        """One client's (gradients, task loss, client state) for a step: the algorithm's `gradient` hook where it
        overrides it, else grad_and_value of its loss."""
        if not overrides(algorithm, "gradient"):
            plain = grad_and_value(partial(self._client_loss, algorithm), has_aux=True)

            def default(params: State, frozen: State, cstate: Any, x: torch.Tensor, y: torch.Tensor,
                        mask: torch.Tensor) -> tuple[Any, torch.Tensor, Any]:
                grads, (_, losses) = plain(params, frozen, cstate, x, y, mask)
                return grads, losses, cstate
            return default

        def hooked(params: State, frozen: State, cstate: Any, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor) -> tuple[Any, torch.Tensor, Any]:
            def forward(p: State, inputs: torch.Tensor) -> torch.Tensor:
                return functional_call(self.model, {**p, **frozen}, (inputs,))
            return algorithm.gradient(Batch(x, y, mask, forward, self.task_loss), params, cstate)
        return hooked

    def _train_mlp(self, global_params: torch.Tensor, tasks: Sequence[ClientTask], algorithm: Algorithm,
                   messages: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        clients = len(tasks)
        mu, anchor, correction, label_maps = batched_mlp.terms(algorithm, messages)
        if self.full is not None:
            return self._train_full(global_params, tasks, mu, anchor, correction, label_maps)
        net = BatchedMLP.from_flat(global_params, self.layers, clients)
        anchor = BatchedMLP.from_flat(global_params, self.layers, clients) if anchor else None
        correction = BatchedMLP.from_rows(correction, self.layers) if correction is not None else None
        plan = lockstep_plan(tasks, self.spec).to(self.device, self.dtype)
        labels = self.train.y[plan.indices]
        labels = labels if label_maps is None else torch.gather(label_maps.expand(len(labels), -1, -1), 2, labels)
        losses = torch.zeros(clients, plan.mask.shape[2], 1, device=self.device, dtype=self.dtype)
        for idx, batch in zip(plan.indices, batched_mlp.batches(labels, plan.mask)):
            interrupt.check()
            net.step(self.flat_x[idx], batch, self.spec.lr, losses, mu, anchor, correction)
        return owned_rows(net.flat()), losses.sum((1, 2)), {}

    def _train_full(self, global_params: torch.Tensor, tasks: Sequence[ClientTask], mu: float, anchor: bool,
                    correction: torch.Tensor | None,
                    label_maps: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """B=inf: one client at a time on its whole data in place, each starting from the global weights copied
        into the same working tensors (fresh memory costs a page fault per 4 KiB written) from one copy in the
        kernel's layout (a plain copy, not a transposing one)."""
        rows, loss_sum = [], torch.zeros(len(tasks), device=self.device, dtype=self.dtype)
        start = BatchedMLP.from_flat(global_params, self.layers, 1)  # read only: each client's start, FedProx's anchor
        net = BatchedMLP.from_flat(global_params, self.layers, 1)
        for k, task in enumerate(tasks):
            x, y = self.full.client(task)
            y = y if label_maps is None else label_maps[k][y]
            if k:
                net.load_(start)
            fix = BatchedMLP.from_rows(correction[k:k + 1], self.layers) if correction is not None else None
            [batch] = batched_mlp.batches(y[None, None], torch.ones((1, 1, len(y)), device=self.device,
                                                                    dtype=self.dtype))
            losses = torch.zeros(1, len(y), 1, device=self.device, dtype=self.dtype)
            for _ in range(task.local_epochs(self.spec)):
                interrupt.check()
                net.step(x[None], batch, self.spec.lr, losses, mu, start if anchor else None, fix)
            loss_sum[k] = losses.sum()
            rows.append(net.flat()[0])
        return rows, loss_sum, {}

    def _per_parameter(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """[m, P] flat rows as a list of [m, *shape] views, one per parameter."""
        sizes = [math.prod(shape) for shape in self.shapes]
        return [part.view(len(rows), *shape) for part, shape in zip(rows.split(sizes, dim=1), self.shapes)]

    def _train_vmap(self, global_params: torch.Tensor, plan: Lockstep, clients: int, algorithm: Algorithm,
                    messages: dict[str, torch.Tensor],
                    state: State) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        tensors = [t.clone() for t in self._per_parameter(global_params.expand(clients, -1))]
        start = params = dict(zip(self.names, tensors))
        frozen = dict(state)  # models with buffers train per client: what remains are frozen parameters
        cstate = vmap(algorithm.client_init)(params, messages)
        gradient = vmap(self._gradient_function(algorithm), in_dims=(0, None, 0, 0, 0, 0))
        step = vmap(algorithm.step, in_dims=(0, 0, 0, None))
        loss_sum = torch.zeros(clients, device=self.device, dtype=self.dtype)
        for idx, mask in zip(plan.indices, plan.mask):
            interrupt.check()
            grads, losses, stepped = gradient(params, frozen, cstate, self.train.x[idx], self.train.y[idx], mask)
            new_params, new_cstate = step(params, grads, stepped, self.spec.lr)
            active = mask.sum(1) > 0  # a client without a batch this step keeps its weights and state
            params, cstate = keep_where(active, new_params, params), keep_where(active, new_cstate, cstate)
            loss_sum += losses.detach() * mask.sum(1)
        extra = vmap(algorithm.client_final)(start, params, cstate) if has_final(algorithm) else {}
        flat = torch.cat([params[name].detach().reshape(clients, -1) for name in self.names], dim=1)
        return owned_rows(flat), loss_sum, {k: v.detach() for k, v in extra.items()}

    def _train_group(self, global_params: torch.Tensor, tasks: Sequence[ClientTask], algorithm: Algorithm,
                     state: State) -> list[ClientResult]:
        messages = stacked_messages(tasks, self.device)
        if self.uses_kernel(algorithm):
            with torch.no_grad():
                rows, loss_sum, extra = self._train_mlp(global_params, tasks, algorithm, messages)
        else:
            plan = lockstep_plan(tasks, self.spec).to(self.device, self.dtype)
            rows, loss_sum, extra = self._train_vmap(global_params, plan, len(tasks), algorithm, messages, state)
        sizes = [len(task.indices) for task in tasks]
        epochs = [task.local_epochs(self.spec) for task in tasks]
        mean_loss = (loss_sum.cpu() / (torch.tensor(sizes) * torch.tensor(epochs))).tolist()
        return [ClientResult(task.client, rows[k], sizes[k], mean_loss[k],
                             local_steps(sizes[k], self.spec.batch_size, epochs[k]),
                             extra={name: v[k].clone() for name, v in extra.items()})
                for k, task in enumerate(tasks)]

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask],
                  algorithm: Algorithm | None = None, state: State | None = None) -> list[ClientResult]:
        """Train every task's client from `global_params` (and the model's other `state`: flat.model_state) with
        `algorithm` (FedAvg when None); results in task order.

        On the CPU every group runs on one intra-op thread, and kernel MLP groups (by default the sampled clients in
        two halves) run in parallel on `workers` threads, which also degrades gracefully under CPU contention where
        intra-op threads stall. Groups depend on the config alone, so the result never depends on thread counts.
        """
        algorithm = algorithm or Algorithm()
        self.last_path = self.describe(algorithm)
        if self.per_client is not None:
            return self.per_client.run_round(global_params, tasks, algorithm, state)
        kernel = self.last_path.name == "kernel"
        halves = kernel and self.device.type == "cpu"
        size = self.group_size or (math.ceil(len(tasks) / 2) if halves else len(tasks))
        groups = [tasks[i:i + size] for i in range(0, len(tasks), size)]
        run = partial(self._guarded, global_params, algorithm=algorithm, state=state or {})
        if self.device.type != "cpu":
            return [r for group in groups for r in run(group)]
        with intra_op_threads(1):  # kernels round differently with different thread counts
            if self.pool is None or not kernel:
                return [r for group in groups for r in run(group)]
            return [r for out in interrupt.mapped(self.pool, run, groups) for r in out]

    def _guarded(self, global_params: torch.Tensor, tasks: Sequence[ClientTask], algorithm: Algorithm,
                 state: State) -> list[ClientResult]:
        try:
            return self._train_group(global_params, tasks, algorithm, state)
        except Exception as err:  # a lockstep group fails as a whole; the server judges what to do
            interrupt.check()  # torch may hand a KeyboardInterrupt back as another error: never a client failure
            return [failed_result(task, global_params, err) for task in tasks]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.per_client is not None:
            self.per_client.close()


def per_client_why(model: nn.Module, sample: torch.Tensor) -> str:
    """Why `model` cannot train in a vmapped lockstep group ('' when it can): vmap can neither draw each client's
    Dropout masks from its own (seed, round, client) generator nor keep a group's padding out of BatchNorm's batch
    statistics. Such models train client by client, on the thread engine's code, so every engine gives them the
    same weights."""
    if draws_random(model, sample):
        return draws_random_why(model)
    return buffers_why(model) if any(True for _ in model.buffers()) else ""


def owned_rows(flat: torch.Tensor) -> list[torch.Tensor]:
    """Each client's row of [m, P] as its own tensor: a view would keep the whole group's alive, and a checkpoint
    that saves one reply would save all of them."""
    return [row.clone() for row in flat]


def has_final(algorithm: Algorithm) -> bool:
    """Whether the algorithm's client_final is its own (the default returns nothing: no vmap needed)."""
    return getattr(algorithm.client_final, "__func__", None) is not Algorithm.client_final
