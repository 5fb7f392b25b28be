"""Client updates on a thread pool, each worker reusing its own model replica (no copy per client).

Each client's kernels run on one intra-op thread whatever `workers` is: PyTorch's CPU kernels round
differently with different thread counts, and results must not depend on the worker count.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from flexp import interrupt
from flexp.algorithm import Algorithm, TaskLoss
from flexp.client import ClientResult, ClientTask, LocalSpec, failed_result, local_sgd
from flexp.data import Split
from flexp.engine.cnn_kernel import replica_for, replica_path
from flexp.engine.path import EnginePath, draws_random_why
from flexp.flat import Replica
from flexp.rng import draws_random, seeded


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run a block with `count` PyTorch intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ThreadEngine:
    """Runs the algorithm's client side for the sampled clients on `workers` threads, by autograd (or a hand
    kernel that implements the model and algorithm exactly); results come back in task order."""

    name = "threads"

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec, workers: int,
                 device: torch.device | str = "cpu", task_loss: TaskLoss = F.cross_entropy) -> None:
        self.train, self.spec, self.workers, self.task_loss = train, spec, workers, task_loss
        self.device = torch.device(device)
        probe = make_model().to(device)
        self.random = draws_random(probe, train.x[:2])  # Dropout: one client at a time, seeded
        self.random_why = f"one client at a time under its own seed, as {draws_random_why(probe)}" \
            if self.random else ""
        replicas = [replica_for(make_model().to(device).train()) for _ in range(workers)]
        self.model = replicas[0].module  # read only, by describe: which step the replicas take
        self.replicas: queue.Queue[Replica] = queue.Queue()
        for replica in replicas:
            self.replicas.put(replica)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexp-client") if workers > 1 else None
        self.last_path: EnginePath | None = None  # the path the last round took

    def describe(self, algorithm: Algorithm) -> EnginePath:
        """The path run_round takes for `algorithm`: the hand CNN kernel or autograd, and why."""
        path = replica_path(self.model, algorithm, self.task_loss, self.spec.batch_size)
        if not self.random:
            return path
        return EnginePath(path.name, "; ".join(w for w in (path.why, self.random_why) if w))

    def _update(self, global_params: torch.Tensor, task: ClientTask, algorithm: Algorithm,
                state: dict[str, torch.Tensor] | None) -> ClientResult:
        replica = self.replicas.get()
        try:
            replica.load(global_params, state)
            if not self.random:
                return local_sgd(replica, self.train.x, self.train.y, task, self.spec, algorithm, self.task_loss)
            with seeded([task.seed], self.device):
                return local_sgd(replica, self.train.x, self.train.y, task, self.spec, algorithm, self.task_loss)
        except Exception as err:  # one client's failure is the server's to judge, not a crash
            interrupt.check()  # torch may hand a KeyboardInterrupt back as another error: never a client failure
            return failed_result(task, global_params, err)
        finally:
            self.replicas.put(replica)

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask],
                  algorithm: Algorithm | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> list[ClientResult]:
        """Train every task's client from `global_params` (and the model's other `state`: flat.model_state) with
        `algorithm` (FedAvg when None)."""
        algorithm = algorithm or Algorithm()
        self.last_path = self.describe(algorithm)
        with intra_op_threads(1):
            if self.pool is None:
                return [self._update(global_params, t, algorithm, state) for t in tasks]
            return interrupt.mapped(self.pool, lambda t: self._update(global_params, t, algorithm, state), tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
