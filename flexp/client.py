"""ClientUpdate from the paper: E epochs of minibatch SGD on the client's own samples, from the global weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexp.flat import Replica


@dataclass(frozen=True)
class LocalSpec:
    """E, B (None: full local batch), the learning rate, and FedProx's proximal weight mu (0: plain SGD)."""

    epochs: int
    batch_size: int | None
    lr: float
    mu: float = 0.0


@dataclass(frozen=True)
class ClientTask:
    """One sampled client for one round: which samples it holds and the seed of its batch order."""

    client: int
    indices: torch.Tensor
    seed: int
    epochs: int | None = None  # a straggler's own E; None: the configured E
    correction: torch.Tensor | None = None  # SCAFFOLD's c - c_i, added to every local gradient
    label_map: torch.Tensor | None = None  # a label-flipping attacker trains on label_map[y]

    def local_epochs(self, spec: LocalSpec) -> int:
        return self.epochs or spec.epochs


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back: new weights, its n_k, and its mean training loss."""

    client: int
    params: torch.Tensor
    num_samples: int
    loss: float
    steps: int = 0  # local SGD steps taken (SCAFFOLD's K)
    error: str | None = None  # why the client failed (its params are then the global ones, unused)


def epoch_orders(task: ClientTask, epochs: int) -> torch.Tensor:
    """[epochs, n_k] sample indices in the order the client visits them; a function of the task's seed alone."""
    generator = torch.Generator().manual_seed(task.seed)
    n = len(task.indices)
    return torch.stack([task.indices[torch.randperm(n, generator=generator)] for _ in range(epochs)])


def local_steps(n: int, batch_size: int | None, epochs: int) -> int:
    """SGD steps of E epochs over n samples in batches of B (the last one partial)."""
    return epochs * -(-n // (batch_size or n))


def local_sgd(model: Replica, x: torch.Tensor, y: torch.Tensor, task: ClientTask, spec: LocalSpec) -> ClientResult:
    """Train `model` (already holding the global weights) on the task's samples; return its weights and loss."""
    n = len(task.indices)
    batch = spec.batch_size or n
    loss_sum = torch.zeros((), device=x.device)
    anchor = [p.detach().clone() for p in model.params] if spec.mu else None
    correction = model.split(task.correction.to(x.device)) if task.correction is not None else None
    label_map = task.label_map.to(x.device) if task.label_map is not None else None
    epochs = task.local_epochs(spec)
    for order in epoch_orders(task, epochs).to(x.device):
        for start in range(0, n, batch):
            chosen = order[start:start + batch]
            labels = y[chosen] if label_map is None else label_map[y[chosen]]
            loss = model.train_step(x[chosen], labels, spec.lr, spec.mu, anchor, correction)
            loss_sum += loss * len(chosen)
    mean_loss = float(loss_sum) / (n * epochs)
    return ClientResult(task.client, model.flat(), n, mean_loss, local_steps(n, spec.batch_size, epochs))


def failed_result(task: ClientTask, global_params: torch.Tensor, err: BaseException) -> ClientResult:
    """The result of a client whose update raised: no usable weights, the error in one line."""
    text = str(err).strip().splitlines()
    return ClientResult(task.client, global_params, len(task.indices), float("nan"),
                        error=f"{type(err).__name__}: {text[0] if text else ''}"[:300])
