"""The asynchronous server loop on the simulated clock (FedBuff, Nguyen et al. 2022): `concurrency` clients train
at once, each reports after its download + local training + upload (its device profile), and the server steps
every `buffer_size` usable reports, each reply carrying its staleness (server steps since its client downloaded).

Events run in (time, client id) order. At each moment the reports due are taken first, the server stepping
whenever its buffer fills; then the free slots are filled with clients drawn uniformly from those not training,
by a generator seeded by (seed, dispatch number), all starting from the current weights: they train as one batch
on the engine. The dispatch number takes the round's place in everything drawn per client (batch order, messages,
codec keys), so with buffer_size = concurrency = m and clients that all take the same time, dispatch d is round d
of the synchronous loop and the weights are FedAvg's bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from flexp import interrupt
from flexp.algorithm import Algorithm
from flexp.client import ClientResult, ClientTask
from flexp.config import FLConfig
from flexp.data import Split
from flexp.fedavg import (
    FAILED_ROUNDS,
    AllClientsFailed,
    ClientFailure,
    Conditions,
    Engine,
    Evaluation,
    RoundRecord,
    ServerState,
    TrainingResult,
    aggregated,
    average_buffers,
    ends_before,
    evaluated,
    failure,
    message_bytes,
    rebased,
    round_tasks,
)
from flexp.flat import flat_parameters, load_flat, model_state

log = logging.getLogger("flexp")
HISTOGRAM = "staleness.csv"  # the run's artifact: how many updates of each staleness were aggregated and discarded


@dataclass(frozen=True)
class AsyncSettings:
    """How many clients train at once and the oldest update the server still takes (None: any)."""

    concurrency: int
    max_staleness: int | None = None


@dataclass
class Flight:
    """A client on its way: when it started, the server step its weights come from, the dispatch that started it,
    the bytes it downloads and the samples it trains on; until it is trained, its task, the broadcast it starts from
    (None: its step's weights) and the model state sent with them; then its reply and upload bytes. `finish` is when
    it reports once trained, before that the earliest it could (its upload left out)."""

    started: float
    finish: float
    client: int
    version: int
    dispatch: int
    down: int
    samples: int
    task: ClientTask | None = None
    weights: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    up: int = 0
    reply: ClientResult | None = None

    def batch(self) -> tuple[int, int]:
        """Flights with the same batch start from the same weights: one step's, or one dispatch's broadcast."""
        return (self.version, 0 if self.weights is None else self.dispatch)


def plain(value: Any) -> Any:
    """A dataclass (ClientTask, ClientResult) as a dict of its fields; anything else as it is."""
    return {k.name: getattr(value, k.name) for k in fields(value)} if is_dataclass(value) else value


@dataclass
class Clock:
    """The loop between server steps: the simulated time, dispatches so far, the clients training (by report
    time, then id), the buffer, the weights of older server steps that clients started from, what happened since
    the last step, and the staleness histogram {s: [aggregated, discarded]}."""

    time: float = 0.0
    dispatches: int = 0
    last_step: float = 0.0
    flying: list[Flight] = field(default_factory=list)
    buffer: list[Flight] = field(default_factory=list)
    starts: dict[int, torch.Tensor] = field(default_factory=dict)
    since: dict[str, int] = field(default_factory=lambda: {"discarded": 0, "failed": 0, "bytes_down": 0})
    failing: int = 0  # reports in a row that failed
    first_error: str = ""
    histogram: dict[int, list[int]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """Tensors and plain data (a checkpoint's `loop` entry)."""
        def flight(f: Flight) -> dict[str, Any]:
            return {k.name: plain(getattr(f, k.name)) for k in fields(f)}
        return {"time": self.time, "dispatches": self.dispatches, "last_step": self.last_step,
                "flying": [flight(f) for f in self.flying], "buffer": [flight(f) for f in self.buffer],
                "starts": dict(self.starts), "since": dict(self.since), "failing": self.failing,
                "first_error": self.first_error, "histogram": {s: list(c) for s, c in self.histogram.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Clock:
        """The clock a checkpoint's `loop` entry holds, its tensors on `device`."""
        def on(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return {k: on(v) for k, v in value.items()} if isinstance(value, dict) else value

        def flight(f: dict[str, Any]) -> Flight:
            f = on(f)
            return Flight(**{**f, "task": f["task"] and ClientTask(**f["task"]),
                             "reply": f["reply"] and ClientResult(**f["reply"])})
        return cls(state["time"], state["dispatches"], state["last_step"], [flight(f) for f in state["flying"]],
                   [flight(f) for f in state["buffer"]], on(state["starts"]), dict(state["since"]),
                   state["failing"], state["first_error"], {s: list(c) for s, c in state["histogram"].items()})

    def histogram_csv(self) -> str:
        """`staleness,aggregated,discarded`, one row per staleness seen."""
        rows = [f"{s},{c[0]},{c[1]}" for s, c in sorted(self.histogram.items())]
        return "\n".join(["staleness,aggregated,discarded", *rows]) + "\n"


def draw_clients(num_clients: int, count: int, busy: set[int], seed: int, dispatch: int) -> list[int]:
    """`count` clients drawn uniformly without replacement from those not `busy`, by (seed, dispatch), sorted:
    with none busy, the synchronous loop's sample_clients(num_clients, count, seed, dispatch)."""
    rng = np.random.default_rng([seed, dispatch])
    if not busy:
        return sorted(rng.choice(num_clients, size=count, replace=False).tolist())
    free = np.setdiff1d(np.arange(num_clients), np.fromiter(busy, dtype=np.int64, count=len(busy)))
    return sorted(free[rng.choice(len(free), size=min(count, len(free)), replace=False)].tolist())


class AsyncLoop:
    """The server's side of an asynchronous run: dispatch clients, take their reports in order, step."""

    def __init__(self, partition: Sequence[Any], fl: FLConfig, engine: Engine, seed: int, algorithm: Algorithm,
                 conditions: Conditions, settings: AsyncSettings, clock: Clock) -> None:
        if conditions.system is None:
            raise ValueError("an asynchronous run needs a system model (the clients' devices)")
        self.partition, self.fl, self.engine, self.seed = partition, fl, engine, seed
        self.algorithm, self.cond, self.settings, self.clock = algorithm, conditions, settings, clock
        self.buffer_size = int(algorithm.buffer_size or 1)

    def next_buffer(self, version: int, params: torch.Tensor, sent: dict[str, Any]) -> list[Flight]:
        """Run the clock until the buffer holds `buffer_size` usable reports; return them (the buffer empties).

        A client is trained when it is the next that could report (the earliest finish of those trained, the
        earliest possible of those not): then with every client not yet trained that starts from the same weights,
        as one batch. Reports are taken in the order eager training would give, the batches are larger."""
        clock = self.clock
        while len(clock.buffer) < self.buffer_size:
            interrupt.check()
            head = clock.flying[0] if clock.flying else None
            if head is not None and head.reply is None:
                self.train(head.batch(), version, params)
            elif head is not None and head.finish <= clock.time:
                self.take(clock.flying.pop(0), version)
            elif len(clock.flying) < self.settings.concurrency:
                self.dispatch(self.settings.concurrency - len(clock.flying), version, params, sent)
            else:
                clock.time = head.finish
        out, clock.buffer = clock.buffer, []
        return out

    def take(self, flight: Flight, version: int) -> None:
        """A report: failed, too stale (discarded) or into the buffer."""
        clock = self.clock
        why = failure(flight.reply)
        if why is not None:
            log.warning("server step %d: client %d failed and is left out: %s", version + 1, flight.client, why)
            clock.since["failed"] += 1
            clock.failing += 1
            clock.first_error = clock.first_error or f"client {flight.client}: {why}"
            if clock.failing >= FAILED_ROUNDS * self.settings.concurrency:
                raise AllClientsFailed(f"the last {clock.failing} clients to report all failed, so the run stopped "
                                       f"(first error, {clock.first_error})")
            return
        clock.failing = 0
        staleness = version - flight.version
        counts = clock.histogram.setdefault(staleness, [0, 0])
        limit = self.settings.max_staleness
        if limit is not None and staleness > limit:
            counts[1] += 1
            clock.since["discarded"] += 1
            return
        counts[0] += 1
        flight.reply = replace(flight.reply, staleness=staleness)
        clock.buffer.append(flight)

    def dispatch(self, count: int, version: int, params: torch.Tensor, sent: dict[str, Any]) -> None:
        """Start `count` clients now from the current weights (server step `version`): their tasks and messages
        are made now, their training when it is first needed (AsyncLoop.train)."""
        clock, algorithm, profiles = self.clock, self.algorithm, self.cond.system.profiles
        d = clock.dispatches + 1
        chosen = draw_clients(len(self.partition), count, {f.client for f in clock.flying}, self.seed, d)
        weights, weights_bytes = algorithm.broadcast(d, params)
        tasks = round_tasks(self.partition, chosen, {}, self.seed, d, self.cond.data, algorithm, params, version + 1)
        for task in tasks:
            down = weights_bytes + message_bytes(task.message)
            samples = (task.epochs or self.fl.local_epochs) * len(task.indices)
            earliest = clock.time + float(profiles.seconds(task.client, down, samples, 0))
            clock.flying.append(Flight(clock.time, earliest, task.client, version, d, down, samples, task,
                                       None if weights is params else weights, sent.get("state", {})))
            clock.since["bytes_down"] += down
        clock.flying.sort(key=lambda f: (f.finish, f.client))
        clock.dispatches = d

    def train(self, batch: tuple[int, int], version: int, params: torch.Tensor) -> None:
        """Train every client of `batch` not trained yet (in dispatch, then client order) as one engine call; each
        reply goes through the algorithm's receive (its client-side stages) and sets when the client reports."""
        clock, algorithm, profiles = self.clock, self.algorithm, self.cond.system.profiles
        group = sorted((f for f in clock.flying if f.reply is None and f.batch() == batch),
                       key=lambda f: (f.dispatch, f.client))
        first = group[0]
        start = params if first.version == version else clock.starts[first.version]
        weights = start if first.weights is None else first.weights
        sent = {"state": first.state} if first.state else {}
        replies = self.engine.run_round(weights, [f.task for f in group], algorithm, **sent)
        for flight, update in zip(group, replies):
            reply = algorithm.receive(flight.dispatch, start, rebased(update, weights, start))
            why = failure(reply)
            if why is not None and self.cond.on_client_error == "abort":
                raise ClientFailure(f"dispatch {flight.dispatch}: client {reply.client} failed: {why} "
                                    f"(engine.on_client_error=abort)")
            flight.up = algorithm.upload_bytes(reply) if why is None else 0
            flight.finish = flight.started + float(profiles.seconds(flight.client, flight.down, flight.samples,
                                                                    flight.up))
            flight.reply, flight.task, flight.weights, flight.state = reply, None, None, {}
        clock.flying.sort(key=lambda f: (f.finish, f.client))


def run_async(model: nn.Module, partition: Sequence[Any], test: Split, fl: FLConfig, engine: Engine, seed: int,
              settings: AsyncSettings, on_round: Callable[[RoundRecord], None] = lambda r: None,
              strategy: Algorithm | None = None, conditions: Conditions | None = None,
              resume: ServerState | None = None, on_state: Callable[[ServerState], None] = lambda s: None,
              evaluation: Evaluation | None = None,
              stop: Callable[[Sequence[RoundRecord]], str | None] = lambda h: None) -> TrainingResult:
    """Run `strategy` (an algorithm with a buffer_size) asynchronously for fl.rounds server steps, or on from
    `resume` (its clock included); as run_fedavg, each server step is a RoundRecord (its `round` the step), checked
    after, logged, evaluated every fl.eval_every steps. The result's texts hold the staleness histogram."""
    cond = conditions or Conditions()
    scoring = evaluation or Evaluation()
    state = resume or ServerState(0, flat_parameters(model), strategy or Algorithm(), [], model_state(model))
    algorithm = state.strategy
    params, global_state = state.params, state.model_state or model_state(model)
    clock = Clock.from_state(state.loop, params.device) if state.loop else Clock()
    loop = AsyncLoop(partition, fl, engine, seed, algorithm, cond, settings, clock)
    result = TrainingResult(params, list(state.history), target=fl.target_accuracy)
    for version in range(state.round, fl.rounds):
        step = version + 1
        interrupt.check()
        if ends_before(step, result, fl, algorithm, stop):
            break
        start = time.perf_counter()
        sent = {"state": global_state} if global_state else {}
        buffer = loop.next_buffer(version, params, sent)
        replies = [rebased(f.reply, clock.starts.get(f.version, params), params) for f in buffer]
        new = aggregated(algorithm, step, params, replies)
        global_state = average_buffers(global_state, replies)
        if any(f.version == version for f in clock.flying):
            clock.starts[version] = params
        params = new
        clock.starts = {v: p for v, p in clock.starts.items() if any(f.version == v for f in clock.flying)}
        record = step_record(step, replies, buffer, clock, algorithm.round_metrics(step))
        record = evaluated(record, fl, partial(load_flat, model, params, global_state), test, scoring, "server step")
        record = replace(record, round_seconds=time.perf_counter() - start)
        result.history.append(record)
        result.params, result.state = params, global_state
        on_state(ServerState(step, params, algorithm, result.history, global_state, clock.state()))
        on_round(record)
    result.state = global_state
    result.texts = {HISTOGRAM: clock.histogram_csv()}
    load_flat(model, params, global_state)
    return result


def step_record(step: int, replies: Sequence[ClientResult], buffer: Sequence[Flight], clock: Clock,
                extra: dict[str, float]) -> RoundRecord:
    """A server step's metrics; what happened since the last step is counted here and reset."""
    n_total = sum(r.num_samples for r in replies)
    staleness = [r.staleness for r in replies]
    record = RoundRecord(
        round=step, clients=len(replies), train_loss=sum(r.loss * r.num_samples for r in replies) / n_total,
        round_seconds=0.0, bytes_up=sum(f.up for f in buffer), bytes_down=clock.since["bytes_down"],
        malicious=sum(r.malicious for r in replies), samples=n_total, failed_clients=clock.since["failed"],
        extra={**extra, "staleness_mean": float(np.mean(staleness)), "staleness_max": float(max(staleness)),
               "discarded": float(clock.since["discarded"]), "in_flight": float(len(clock.flying))},
        sim_seconds=clock.time - clock.last_step, sim_hours=clock.time / 3600)
    clock.last_step = clock.time
    clock.since = {"discarded": 0, "failed": 0, "bytes_down": 0}
    return record
