"""Client updates on a pool of resident Ray actors: each holds an engine (threads or vectorized, on one thread), the
training split and the algorithm's client side for the whole run, on a local Ray instance or across a cluster.

The split is put in Ray's object store once (numpy arrays: shared, not copied, by the actors of a node), the
algorithm is sent to every actor once per run, and each round costs one put of the global weights and one call
per actor with its share of the round's tasks. An actor trains its share on one intra-op thread with the code of
its engine (`engine.actor_engine`), and the results are returned in task order, so they equal that engine's run
here bit for bit: `engine=threads`, or `engine=vectorized` (a client's batched-kernel steps do not depend on which
clients share its group).
The algorithm travels with the state it has when first sent: its client hooks must not read server state (what
a client needs comes in its ClientTask's message), as on any engine.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexp import interrupt
from flexp.algorithm import Algorithm, TaskLoss
from flexp.client import ClientResult, ClientTask, LocalSpec, failed_result
from flexp.client_state import client_side_only
from flexp.config import ConfigError
from flexp.data import Split
from flexp.engine.path import EnginePath
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.flat import flat_parameters, model_state

log = logging.getLogger("flexp")


def import_ray() -> Any:
    """Ray, or a ConfigError with the install hint (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine", "ray", 'needs Ray: pip install -e ".[ray]"') from None
    return ray


def on_device(result: ClientResult, device: torch.device) -> ClientResult:
    """`result` with its tensors (weights, extra tensors, buffers) on `device`."""
    return replace(result, params=result.params.to(device),
                   extra={k: v.to(device) for k, v in result.extra.items()},
                   buffers={k: v.to(device) for k, v in result.buffers.items()})


def task_on(task: ClientTask, device: torch.device) -> ClientTask:
    """`task` with its message on `device`."""
    return replace(task, message={k: v.to(device) for k, v in task.message.items()})


def shares(tasks: Sequence[ClientTask], workers: int, epochs: int) -> list[list[int]]:
    """Task positions per worker, balanced by local work (samples x epochs; the largest first, each to the least
    loaded worker, ties to the lowest), each share in task order: which worker trains a client never changes it."""
    load = [0] * workers
    out: list[list[int]] = [[] for _ in range(workers)]
    work = [len(t.indices) * (t.epochs or epochs) for t in tasks]
    for i in sorted(range(len(tasks)), key=lambda i: -work[i]):
        w = min(range(workers), key=lambda w: load[w])
        load[w] += work[i]
        out[w].append(i)
    return [sorted(s) for s in out]


ACTOR_ENGINES = ("auto", "threads", "vectorized")


def one_thread_engine(name: str, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec,
                      device: torch.device, task_loss: TaskLoss) -> ThreadEngine | VectorizedEngine:
    """The engine an actor runs (`threads` or `vectorized`), on one worker thread: an actor is one CPU share."""
    if name == "vectorized":
        return VectorizedEngine(make_model, train, spec, None, device, 1, task_loss)
    return ThreadEngine(make_model, train, spec, 1, device, task_loss)


class ClientWorker:
    """A Ray actor: a one-thread engine (`engine_name`) on its own training split and device, for the whole run."""

    def __init__(self, make_model: Callable[[], nn.Module], train: tuple[np.ndarray, np.ndarray], spec: LocalSpec,
                 device: str, task_loss: TaskLoss, engine_name: str = "threads") -> None:
        torch.set_num_threads(1)
        with warnings.catch_warnings():  # the object store's arrays are read-only; training only reads them
            warnings.simplefilter("ignore", UserWarning)
            split = Split(torch.from_numpy(train[0]), torch.from_numpy(train[1]))
        self.device = torch.device(device)
        self.engine = one_thread_engine(engine_name, make_model, Split(split.x.to(self.device),
                                                                       split.y.to(self.device)),
                                        spec, self.device, task_loss)
        self.algorithm = Algorithm()
        self._warm_up(make_model())

    def _warm_up(self, model: nn.Module) -> None:
        """Train a client of one sample once, so that the first round pays no lazy initialisation (imports, the
        first autograd step); it draws from no generator that a round uses."""
        task = ClientTask(-1, torch.zeros(1, dtype=torch.int64), 0)
        state = {k: v.to(self.device) for k, v in model_state(model).items()}
        self.engine.run_round(flat_parameters(model).to(self.device), [task], Algorithm(), state or None)

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def echo(self, value: Any) -> Any:
        return value

    def set_algorithm(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm

    def run(self, global_params: torch.Tensor, tasks: list[ClientTask],
            state: dict[str, torch.Tensor]) -> list[ClientResult]:
        """Train `tasks` in order from the global weights (on the CPU: moved to this actor's device and back)."""
        params = global_params.to(self.device)
        state = {k: v.to(self.device) for k, v in state.items()}
        tasks = [task_on(t, self.device) for t in tasks]
        cpu = torch.device("cpu")
        return [on_device(r, cpu) for r in self.engine.run_round(params, tasks, self.algorithm, state)]


def fits(resources: dict[str, float], num_cpus: float, num_gpus: float) -> None:
    """Refuse (ConfigError) an actor larger than the whole cluster: it could never start, and the run would wait."""
    if num_gpus > 0 and resources.get("GPU", 0) < num_gpus:
        raise ConfigError("engine.num_gpus", num_gpus, f"the Ray cluster has {resources.get('GPU', 0):g} GPUs")
    if num_cpus > resources.get("CPU", 0):
        raise ConfigError("engine.num_cpus", num_cpus, f"the Ray cluster has {resources.get('CPU', 0):g} CPUs")


def pool_size(resources: dict[str, float], num_cpus: float, num_gpus: float, most: int | None) -> int:
    """Actors the cluster's resources hold at `num_cpus` (and `num_gpus`) each, at most `most`, at least one (all of
    the cluster's, not only what is free now: actors that do not fit yet wait for room, and so do their clients)."""
    slots = math.floor(resources.get("CPU", 0) / num_cpus) if num_cpus > 0 else math.inf
    if num_gpus > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0) / num_gpus))
    if slots == math.inf:
        slots = 1
    return max(1, min(int(slots), most or int(slots)))


class RayEngine:
    """Runs the sampled clients on a pool of resident Ray actors (one per `num_cpus`/`num_gpus` share of the
    cluster, at most `most_actors`), each training its share on `device` with `actor_engine` (threads,
    vectorized, or auto: as engine=auto picks); results come back in task order."""

    name = "ray"

    def __init__(self, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec, address: str = "local",
                 num_cpus: float = 1.0, num_gpus: float = 0.0, task_loss: TaskLoss = F.cross_entropy,
                 device: torch.device | str = "cpu", most_actors: int | None = None,
                 actor_engine: str = "threads") -> None:
        if actor_engine not in ACTOR_ENGINES:
            raise ConfigError("engine.actor_engine", actor_engine, f"must be one of {', '.join(ACTOR_ENGINES)}")
        from flexp.engine import choose_engine

        resolved = choose_engine(actor_engine, make_model(), torch.device(device))
        self.actor_engine = resolved if resolved == actor_engine else f"{resolved}, resolved from {actor_engine}"
        ray = import_ray()
        self.ray, self.spec, self.device = ray, spec, torch.device(device)
        if self.device.type == "cuda" and num_gpus <= 0:
            raise ConfigError("engine.num_gpus", num_gpus, "engine=ray with engine.device=cuda needs a GPU share per "
                                                           "Ray actor (e.g. engine.num_gpus=0.5)")
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except Exception as err:  # noqa: BLE001 - no cluster at the address, ray:// without ray[client], ...
                first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                raise ConfigError("engine.address", address, f"cannot start or join Ray: {first.strip()}") from None
            interrupt.reclaim()
        resources = ray.cluster_resources()
        try:
            fits(resources, num_cpus, num_gpus)
        except ConfigError:
            if self.started_here:
                ray.shutdown()
            raise
        self.local = one_thread_engine(resolved, make_model, train, spec, self.device, task_loss)  # describe's
        train_ref = ray.put((train.x.cpu().numpy(), train.y.cpu().numpy()))
        self.actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(ClientWorker)
        self.args = (make_model, train_ref, spec, str(self.device), task_loss, resolved)
        size = pool_size(resources, num_cpus, num_gpus, most_actors)
        log.info("starting %d Ray actor%s (engine=%s) on %g CPUs%s", size, "s" * (size != 1), resolved,
                 resources.get("CPU", 0), f", {resources['GPU']:g} GPUs" if resources.get("GPU") else "")
        self.actors = [self._start() for _ in range(size)]
        self.nodes = [a.node.remote() for a in self.actors]  # the id of each actor's node, when it is up
        self._gathered(self.nodes)  # the pool is up before the first round,
        weights = self.ray.put(flat_parameters(self.local.model).cpu())  # and weights went to each node and back
        self._gathered([a.echo.remote(weights) for a in self.actors])
        self.algorithm: Algorithm | None = None  # the one the actors hold
        self.last_path: EnginePath | None = None  # the path the last round took
        self.last_nodes: dict[int, str] = {}  # client -> the Ray node that trained it in the last round

    def _start(self) -> Any:
        return self.actor_class.remote(*self.args)

    def describe(self, algorithm: Algorithm) -> EnginePath:
        """The path run_round's actors take for `algorithm`: their engine's (kernel, vmap, autograd...), and how
        many actors take it."""
        path = self.local.describe(algorithm)
        pool = f"{len(self.actors)} Ray actor{'s' * (len(self.actors) != 1)} of engine={self.actor_engine}"
        return EnginePath(path.name, f"{pool}; {path.why}" if path.why else pool)

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask],
                  algorithm: Algorithm | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> list[ClientResult]:
        """Train every task's client from `global_params` (and the model's other `state`) with `algorithm`, sent
        to the actors only when it is not the one they hold. A client whose actor died fails (the actor is
        replaced for the next round)."""
        algorithm = algorithm or Algorithm()
        self.last_path = self.describe(algorithm)
        if algorithm is not self.algorithm:
            with client_side_only():  # its client stores stay here: client hooks read their message, not them
                ref = self.ray.put(algorithm)
            for actor in self.actors:
                actor.set_algorithm.remote(ref)
            self.algorithm = algorithm
        params_ref = self.ray.put(global_params.cpu())
        state = {k: v.cpu() for k, v in (state or {}).items()}
        cpu = torch.device("cpu")
        plan = [s for s in enumerate(shares(tasks, len(self.actors), self.spec.epochs)) if s[1]]
        futures = [self.actors[w].run.remote(params_ref, [task_on(tasks[i], cpu) for i in share], state)
                   for w, share in plan]
        results: list[ClientResult | None] = [None] * len(tasks)
        self.last_nodes = {}
        for (w, share), replies in zip(plan, self._gathered(futures)):
            if isinstance(replies, Exception):
                self._replace(w)
                replies = [failed_result(tasks[i], global_params.cpu(), replies) for i in share]
            else:
                node = self.ray.get(self.nodes[w])
                self.last_nodes.update({tasks[i].client: node for i in share})
            for i, reply in zip(share, replies):
                results[i] = on_device(reply, self.device)
        return results  # type: ignore[return-value]

    def _replace(self, w: int) -> None:
        """Start a new actor in place of dead actor `w`, holding the current algorithm."""
        self.actors[w] = self._start()
        self.nodes[w] = self.actors[w].node.remote()
        if self.algorithm is not None:
            self.actors[w].set_algorithm.remote(self.ray.put(self.algorithm))

    def _gathered(self, futures: list[Any], poll_s: float = 0.2) -> list[Any]:
        """Each future's value, or the error that lost it (an actor that died); on a stop request the pool is
        killed and KeyboardInterrupt rises."""
        pending = futures
        while pending:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            if interrupt.requested():
                self.close()
                raise KeyboardInterrupt
        out = []
        for future in futures:
            try:
                out.append(self.ray.get(future))
            except self.ray.exceptions.RayActorError as err:
                out.append(err)
        return out

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        self.local.close()
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
