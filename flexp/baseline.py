"""The centralized baseline: the same model and SGD trained on the pooled training set, one record per epoch."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flexp.algorithm import Algorithm
from flexp.client import ClientTask, LocalSpec, local_sgd
from flexp.config import BaselineConfig
from flexp.data import Split
from flexp.engine.cnn_kernel import replica_for
from flexp.fedavg import RoundRecord, TrainingResult, client_seed
from flexp.flat import model_state
from flexp.metrics import evaluate


def run_baseline(model: nn.Module, train: Split, test: Split, cfg: BaselineConfig, seed: int,
                 target: float | None = None,
                 on_epoch: Callable[[RoundRecord], None] = lambda r: None) -> TrainingResult:
    """Train `model` in place for cfg.epochs epochs of minibatch SGD; evaluate after each epoch."""
    replica = replica_for(model.train())
    everything = torch.arange(len(train))
    spec = LocalSpec(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr)
    result = TrainingResult(replica.flat(), target=target)
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        task = ClientTask(0, everything, client_seed(seed, epoch, 0))
        update = local_sgd(replica, train.x, train.y, task, spec, Algorithm(), F.cross_entropy)
        accuracy, loss = evaluate(model, test)
        record = RoundRecord(round=epoch, clients=1, train_loss=update.loss,
                             round_seconds=time.perf_counter() - start, bytes_up=0, bytes_down=0,
                             test_accuracy=accuracy, test_loss=loss)
        result.history.append(record)
        on_epoch(record)
    result.params, result.state = replica.flat(), model_state(model)
    return result
