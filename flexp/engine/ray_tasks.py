"""Client updates as Ray tasks: the same ClientUpdate as the thread engine, on a local Ray instance or a cluster.

The training split is put in Ray's object store once, the global weights once per round; each task builds its
replica, trains on one intra-op thread (as the thread engine does) and returns its result, so the round's results,
taken in task order, equal the thread engine's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexp import interrupt
from flexp.algorithm import Algorithm, TaskLoss
from flexp.client import ClientResult, ClientTask, LocalSpec, failed_result, local_sgd
from flexp.config import ConfigError
from flexp.data import Split
from flexp.engine.path import EnginePath
from flexp.rng import draws_random


def import_ray() -> Any:
    """Ray, or a ConfigError with the install hint (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine", "ray", 'needs Ray: pip install -e ".[ray]"') from None
    return ray


def client_update(make_model: Callable[[], nn.Module], train: Split, global_params: torch.Tensor, task: ClientTask,
                  spec: LocalSpec, algorithm: Algorithm, task_loss: TaskLoss,
                  state: dict[str, torch.Tensor] | None = None, random: bool = False) -> ClientResult:
    """One client's update inside a Ray worker, on one intra-op thread: the thread engine's code (a model that
    draws random numbers under the client's seed, as there)."""
    from flexp.engine.cnn_kernel import replica_for
    from flexp.rng import seeded

    torch.set_num_threads(1)
    replica = replica_for(make_model().train())
    try:
        replica.load(global_params, state)
        if not random:
            return local_sgd(replica, train.x, train.y, task, spec, algorithm, task_loss)
        with seeded([task.seed], torch.device("cpu")):
            return local_sgd(replica, train.x, train.y, task, spec, algorithm, task_loss)
    except Exception as err:
        return failed_result(task, global_params, err)


def gathered(ray: Any, futures: list[Any], poll_s: float = 0.2) -> list[Any]:
    """ray.get of every future, checking for a stop request while they run (the tasks are cancelled then)."""
    pending = futures
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        if interrupt.requested():
            for future in pending:
                ray.cancel(future, force=True)
            raise KeyboardInterrupt
    return ray.get(futures)


class RayEngine:
    """Runs each sampled client as a Ray task with `num_cpus`/`num_gpus` each; results come back in task order."""

    name = "ray"

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec, address: str = "local",
                 num_cpus: float = 1.0, num_gpus: float = 0.0, task_loss: TaskLoss = F.cross_entropy) -> None:
        ray = import_ray()
        self.ray, self.make_model, self.spec, self.task_loss = ray, make_model, spec, task_loss
        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            interrupt.reclaim()
        self.train_ref = ray.put(Split(train.x.cpu(), train.y.cpu()))
        self.model = make_model()  # read only, by describe: which step the tasks' replicas take
        self.random = draws_random(self.model, train.x[:2].cpu())
        self.remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(client_update)
        self.last_path: EnginePath | None = None  # the path the last round took

    def describe(self, algorithm: Algorithm) -> EnginePath:
        """The path run_round's tasks take for `algorithm`: the hand CNN kernel or autograd, and why."""
        from flexp.engine.cnn_kernel import replica_path

        return replica_path(self.model, algorithm, self.task_loss, self.spec.batch_size)

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask],
                  algorithm: Algorithm | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> list[ClientResult]:
        """Train every task's client from `global_params` (and the model's other `state`) with `algorithm` (put in
        the object store once for the round, the algorithm with its server state: its client hooks must not need
        that state)."""
        algorithm = algorithm or Algorithm()
        self.last_path = self.describe(algorithm)
        params_ref = self.ray.put(global_params.cpu())
        algorithm_ref = self.ray.put(algorithm)
        state = {k: v.cpu() for k, v in (state or {}).items()}
        futures = [self.remote.remote(self.make_model, self.train_ref, params_ref, task, self.spec, algorithm_ref,
                                      self.task_loss, state, self.random) for task in tasks]
        return gathered(self.ray, futures)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()
