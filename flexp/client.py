"""ClientUpdate from the paper: E epochs of minibatch SGD on the client's own samples, from the global weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flexp import interrupt
from flexp.flat import Replica

if TYPE_CHECKING:
    from flexp.algorithm import Algorithm, TaskLoss


@dataclass(frozen=True)
class LocalSpec:
    """E, B (None: full local batch) and the learning rate."""

    epochs: int
    batch_size: int | None
    lr: float


@dataclass(frozen=True)
class ClientTask:
    """One sampled client for one round: which samples it holds, the seed of its batch order, and the algorithm's
    message to it (Algorithm.message)."""

    client: int
    indices: torch.Tensor
    seed: int
    epochs: int | None = None  # a straggler's own E; None: the configured E
    message: dict[str, torch.Tensor] = field(default_factory=dict)

    def local_epochs(self, spec: LocalSpec) -> int:
        return self.epochs or spec.epochs


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back: new weights, its n_k, its mean training (task) loss, its step count, the
    algorithm's extra tensors (Algorithm.client_final) and the model's buffers after training (by name; {} when
    the model has none), and the size of the weights as sent when a codec encoded them."""

    client: int
    params: torch.Tensor
    num_samples: int
    loss: float
    steps: int = 0  # local SGD steps taken (SCAFFOLD's K)
    error: str | None = None  # why the client failed (its params are then the global ones, unused)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    malicious: bool = False  # set by an attacker's Algorithm.receive
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    sent_bytes: int | None = None  # the weights' bytes as sent (a codec's message, ...); None: params' own size
    staleness: int = 0  # server steps since the client downloaded its weights (asynchronous runs; 0 in rounds)


def epoch_orders(task: ClientTask, epochs: int) -> torch.Tensor:
    """[epochs, n_k] sample indices in the order the client visits them; a function of the task's seed alone."""
    generator = torch.Generator().manual_seed(task.seed)
    n = len(task.indices)
    return torch.stack([task.indices[torch.randperm(n, generator=generator)] for _ in range(epochs)])


def local_steps(n: int, batch_size: int | None, epochs: int) -> int:
    """SGD steps of E epochs over n samples in batches of B (the last one partial)."""
    return epochs * -(-n // (batch_size or n))


def local_sgd(model: Replica, x: torch.Tensor, y: torch.Tensor, task: ClientTask, spec: LocalSpec,
              algorithm: Algorithm, task_loss: TaskLoss) -> ClientResult:
    """Run the algorithm's client side on `model` (already holding the global weights) over the task's samples:
    E epochs of its steps in the task's batch order; return its weights, mean task loss and extra tensors."""
    n = len(task.indices)
    batch = spec.batch_size or n
    loss_sum = torch.zeros((), device=x.device)
    start = {name: p.detach().clone() for name, p in model.named.items()}
    message = {k: v.to(x.device) for k, v in task.message.items()}
    cstate: Any = algorithm.client_init(start, message)
    step = model.step_for(algorithm, task_loss, message)
    epochs = task.local_epochs(spec)
    for order in epoch_orders(task, epochs).to(x.device):
        for first in range(0, n, batch):
            interrupt.check()
            chosen = order[first:first + batch]
            loss, cstate = step(x[chosen], y[chosen], spec.lr, algorithm, cstate, task_loss)
            loss_sum += loss * len(chosen)
    mean_loss = float(loss_sum) / (n * epochs)
    with torch.no_grad():
        extra = algorithm.client_final(start, model.detached(), cstate)
    return ClientResult(task.client, model.flat(), n, mean_loss, local_steps(n, spec.batch_size, epochs),
                        extra={k: v.detach().clone() for k, v in extra.items()}, buffers=model.buffers())


def failed_result(task: ClientTask, global_params: torch.Tensor, err: BaseException) -> ClientResult:
    """The result of a client whose update raised: no usable weights, the error in one line."""
    text = str(err).strip().splitlines()
    return ClientResult(task.client, global_params, len(task.indices), float("nan"),
                        error=f"{type(err).__name__}: {text[0] if text else ''}"[:300])
