"""The FedAvg server loop (McMahan et al. 2017, Algorithm 1): sample, train locally, average, evaluate."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexp import interrupt
from flexp.aggregate import weighted_average
from flexp.algorithm import Algorithm, tensor_bytes
from flexp.arrival import held, held_fraction
from flexp.client import ClientResult, ClientTask
from flexp.config import ClientsConfig, DataConfig, FLConfig
from flexp.data import Split
from flexp.flat import flat_parameters, load_flat, model_state
from flexp.metrics import evaluate, interpolated_rounds_to_target, rounds_to_target
from flexp.rng import client_key
from flexp.system.clock import Schedule, schedule

if TYPE_CHECKING:
    from flexp.system.devices import System

log = logging.getLogger("flexp")
FAILED_ROUNDS = 3  # a run whose first rounds all fail entirely stops after this many


class Engine(Protocol):
    """Anything that runs an algorithm's client side for the sampled clients from the global weights, returning
    their results in task order. Models with buffers or frozen parameters also get `state` (flat.model_state)."""

    def run_round(self, global_params: torch.Tensor, tasks: Sequence[ClientTask],
                  algorithm: Algorithm | None = None, **state: dict[str, torch.Tensor]) -> list[ClientResult]: ...


@dataclass(frozen=True)
class RoundRecord:
    """One round's metrics, as logged."""

    round: int
    clients: int
    train_loss: float
    round_seconds: float
    bytes_up: int
    bytes_down: int
    test_accuracy: float | None = None
    test_loss: float | None = None
    dropped: int = 0
    stragglers: int = 0
    malicious: int = 0
    samples: int = 0
    failed_clients: int = 0
    test_metrics: dict[str, float] = field(default_factory=dict)  # the configured `metrics`, by name
    extra: dict[str, float] = field(default_factory=dict)  # the algorithm's and its stages' (round_metrics)
    sim_seconds: float | None = None  # the round on the simulated clock (None: no system model)
    sim_hours: float | None = None  # simulated hours since the run began, this round included
    late: int = 0  # clients that reported after system.deadline and were left out
    surplus: int = 0  # over-selected clients that reported after the first m and were left out

    def metrics(self) -> dict[str, float]:
        """The record as a metric dict (test metrics only on evaluated rounds; the clock's only with a system)."""
        out = {"train_loss": self.train_loss, "round_seconds": self.round_seconds, "clients": self.clients,
               "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "dropped": self.dropped,
               "stragglers": self.stragglers, "malicious": self.malicious, "samples": self.samples,
               "failed_clients": self.failed_clients, **self.extra}
        if self.sim_seconds is not None:
            out.update(sim_seconds=self.sim_seconds, sim_hours=self.sim_hours, late=self.late, surplus=self.surplus)
        if self.test_accuracy is not None:
            out.update(test_accuracy=self.test_accuracy, test_loss=self.test_loss)
            out.update({f"test_{name}": value for name, value in self.test_metrics.items()})
        return out


@dataclass
class TrainingResult:
    """Final weights and the history of a federated or centralized run."""

    params: torch.Tensor
    history: list[RoundRecord] = field(default_factory=list)
    target: float | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # buffers and frozen parameters (flat.model_state)
    stopped: str | None = None  # why the run ended before fl.rounds without reaching the target (run_fedavg's stop)
    texts: dict[str, str] = field(default_factory=dict)  # files to log beside the run, by name (async: staleness.csv)

    def accuracies(self) -> list[tuple[int, float]]:
        return [(r.round, r.test_accuracy) for r in self.history if r.test_accuracy is not None]

    def summary(self) -> dict[str, float]:
        """best/final accuracy, rounds_to_target (first round, and the paper's interpolated one, when reached), total
        seconds and MB sent each way, the round a stop rule ended the run after (stopped_at_round), and with a
        system model the simulated hours in all (total_sim_hours) and to the target (hours_to_target)."""
        accs = self.accuracies()
        out: dict[str, float] = {"total_seconds": sum(r.round_seconds for r in self.history)}
        if self.history and any(r.bytes_up or r.bytes_down for r in self.history):  # the baseline sends nothing
            out["total_mb_up"] = sum(r.bytes_up for r in self.history) / 1e6
            out["total_mb_down"] = sum(r.bytes_down for r in self.history) / 1e6
        if accs:
            out["best_test_accuracy"] = max(a for _, a in accs)
            out["final_test_accuracy"] = accs[-1][1]
        if self.target is not None and (reached := rounds_to_target(accs, self.target)) is not None:
            out["rounds_to_target"] = reached
            out["rounds_to_target_interp"] = interpolated_rounds_to_target(accs, self.target)
        if self.stopped is not None and self.history:
            out["stopped_at_round"] = self.history[-1].round
        if self.history and self.history[-1].sim_hours is not None:
            out["total_sim_hours"] = self.history[-1].sim_hours
            if "rounds_to_target" in out:
                out["hours_to_target"] = next(r.sim_hours for r in self.history if r.round == out["rounds_to_target"])
        return out


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """The round's client set S_t, drawn from (seed, round) alone and sorted by client id."""
    rng = np.random.default_rng([seed, round_])
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def poisson_clients(num_clients: int, rate: float, seed: int, round_: int) -> list[int]:
    """The round's client set when each client joins independently with probability `rate` (Poisson sampling, what
    privacy amplification by subsampling assumes): its size varies from round to round, and may be 0."""
    rng = np.random.default_rng([seed, round_])
    return np.flatnonzero(rng.random(num_clients) < rate).tolist()


def round_clients(fl: FLConfig, num_clients: int, seed: int, round_: int, per_round: int | None = None) -> list[int]:
    """The clients fl.sampling draws for a round: `fixed` m = max(round(C K), 1) (or `per_round`, when
    over-selecting) without replacement, or `poisson`."""
    if fl.sampling == "poisson":
        return poisson_clients(num_clients, fl.fraction, seed, round_)
    return sample_clients(num_clients, per_round or fl.clients_per_round, seed, round_)


def heterogeneity(chosen: Sequence[int], dropout: float, stragglers: float, epochs: int, seed: int,
                  round_: int) -> tuple[list[int], dict[int, int]]:
    """(clients that return, {straggler: its 1..E local epochs}) for a round, drawn from (seed, round) alone."""
    rng = np.random.default_rng([seed, round_, 1])
    dropped = rng.random(len(chosen)) < dropout
    slow = rng.random(len(chosen)) < stragglers
    slow_epochs = rng.integers(1, epochs + 1, len(chosen))
    returned = [c for c, d in zip(chosen, dropped) if not d]
    return returned, {c: int(e) for c, s, e, d in zip(chosen, slow, slow_epochs, dropped) if s and not d}


def client_seed(seed: int, round_: int, client: int) -> int:
    """Seed of one client's batch order in one round, independent of threads and sampling order."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Conditions:
    """What the clients are like: heterogeneity, how their data arrives, and what a failure does."""

    clients: ClientsConfig = field(default_factory=ClientsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    on_client_error: str = "drop"
    system: System | None = None  # their devices, the deadline and over-selection (None: no simulated clock)


@dataclass(frozen=True)
class Evaluation:
    """How the global model is scored: the task loss (test_loss) and extra metrics (flexp.objective)."""

    loss: Callable[..., torch.Tensor] = F.cross_entropy
    metrics: Sequence[tuple[str, Callable[..., float]]] = ()


@dataclass
class ServerState:
    """The server after `round` rounds: global weights, the algorithm with its state, the history, and the
    model's buffers and frozen parameters (flat.model_state; {} for most models), and an asynchronous run's clock
    (flexp.asynchronous.Clock.state(); {} in rounds)."""

    round: int
    params: torch.Tensor
    strategy: Algorithm
    history: list[RoundRecord]
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    loop: dict[str, Any] = field(default_factory=dict)


class ClientFailure(RuntimeError):
    """A client failed and engine.on_client_error is `abort`."""


class Diverged(RuntimeError):
    """The test loss became NaN or infinite."""


class ServerStepFailed(RuntimeError):
    """The algorithm's server side (aggregate) raised: the run cannot go on."""


def aggregated(algorithm: Algorithm, round_: int, params: torch.Tensor,
               replies: Sequence[ClientResult]) -> torch.Tensor:
    """algorithm.aggregate, its failure told in one line naming the algorithm and the round."""
    try:
        return algorithm.aggregate(round_, params, replies)
    except Exception as err:
        text = " ".join(str(err).split())[:300]
        raise ServerStepFailed(f"round {round_}: {type(algorithm).__name__}.aggregate raised "
                               f"{type(err).__name__}: {text}") from err


class AllClientsFailed(RuntimeError):
    """Every client failed in each of the run's first FAILED_ROUNDS rounds: no update was ever averaged."""


def failure(update: ClientResult) -> str | None:
    """Why a client's result cannot be averaged (it raised, or sent NaN/inf weights), else None. The extremes say it
    in one pass, ~10x faster than isfinite().all(): NaN propagates into both, an infinity is one of them."""
    if update.error is not None:
        return update.error
    if update.params.numel() and not all(map(math.isfinite, torch.aminmax(update.params))):
        return "returned NaN or infinite weights"
    return None


def usable(updates: Sequence[ClientResult], round_: int, policy: str) -> tuple[list[ClientResult], list[str]]:
    """(the updates to average, "client k: why" for each failed one): failed clients are logged and left out, or
    abort the run when policy is `abort`."""
    good, failed = [], []
    for update in updates:
        why = failure(update)
        if why is None:
            good.append(update)
            continue
        if policy == "abort":
            raise ClientFailure(f"round {round_}: client {update.client} failed: {why} (engine.on_client_error=abort)")
        log.warning("round %d: client %d failed and is left out: %s", round_, update.client, why)
        failed.append(f"client {update.client}: {why}")
    return good, failed


def failed_from_start(history: Sequence[RoundRecord], rounds: int) -> bool:
    """True once the first min(FAILED_ROUNDS, rounds) rounds are done and every client that returned in them failed."""
    return len(history) == min(FAILED_ROUNDS, rounds) and all(r.clients == 0 and r.failed_clients for r in history)


def all_failed(history: Sequence[RoundRecord], first_error: str) -> AllClientsFailed:
    """The error that ends a run in which no client update was ever usable."""
    n = len(history)
    rounds = "round 1" if n == 1 else f"each of rounds 1-{n}"
    return AllClientsFailed(f"every client failed in {rounds}, so the run stopped (first error, {first_error})")


def average_buffers(state: dict[str, torch.Tensor], replies: Sequence[ClientResult]) -> dict[str, torch.Tensor]:
    """The next global model state: each buffer the n_k-weighted mean of the clients' (float64 sums, cast back;
    integer buffers such as num_batches_tracked rounded to the nearest integer, ties to even); frozen parameters,
    which clients do not return, stay as they are. Every algorithm averages buffers this way."""
    if not state or not replies:
        return state
    out = dict(state)
    for name in replies[0].buffers:
        mean = weighted_average([r.buffers[name].to(torch.float64) for r in replies], [r.num_samples for r in replies])
        out[name] = (mean if state[name].is_floating_point() else mean.round()).to(state[name].dtype)
    return out


def round_tasks(partition: Sequence[torch.Tensor], returned: Sequence[int], slow: dict[int, int], seed: int,
                round_: int, data: DataConfig, algorithm: Algorithm, global_params: torch.Tensor,
                data_round: int | None = None) -> list[ClientTask]:
    """The returning clients' tasks: the data they hold in round `data_round` (default: this round), their epochs
    and the algorithm's messages. Each task's indices are its own copy: a view into a Partition would carry (and
    pickle) every client's."""
    fraction = held_fraction(data.arrival, data_round or round_, data.arrival_start, data.arrival_full_at,
                             data.arrival_every)
    return [ClientTask(c, held(partition[c], fraction).clone(), client_seed(seed, round_, c), slow.get(c),
                       with_key(algorithm, algorithm.message(c, round_, global_params), seed, round_, c))
            for c in returned]


def with_key(algorithm: Algorithm, message: dict[str, torch.Tensor], seed: int, round_: int,
             client: int) -> dict[str, torch.Tensor]:
    """The message, with the key of the client's random stream when the algorithm draws (Algorithm.random)."""
    if not algorithm.random:
        return message
    return {**message, "random": torch.tensor(client_key(seed, round_, client), dtype=torch.int64)}


def run_fedavg(model: nn.Module, partition: Sequence[torch.Tensor], test: Split, fl: FLConfig, engine: Engine,
               seed: int, on_round: Callable[[RoundRecord], None] = lambda r: None,
               strategy: Algorithm | None = None, conditions: Conditions | None = None,
               resume: ServerState | None = None,
               on_state: Callable[[ServerState], None] = lambda s: None,
               evaluation: Evaluation | None = None,
               stop: Callable[[Sequence[RoundRecord]], str | None] = lambda h: None) -> TrainingResult:
    """Run FedAvg (or another algorithm, `strategy`) from `model`'s weights, or from `resume`; `model` ends holding
    the final weights. `on_state` sees the server after each round, before `on_round` (checkpoint, then log);
    `stop(history)` returning a reason ends the run early (result.stopped, e.g. a pruned learning rate). Raises
    Diverged on a non-finite test loss, AllClientsFailed once every client failed in each of the first rounds."""
    cond = conditions or Conditions()
    scoring = evaluation or Evaluation()
    state = resume or ServerState(0, flat_parameters(model), strategy or Algorithm(), [], model_state(model))
    algorithm = state.strategy
    global_params, global_state = state.params, state.model_state or model_state(model)
    sent = {"state": global_state} if global_state else {}  # engines of buffer-less models see the old call
    result = TrainingResult(global_params, list(state.history), target=fl.target_accuracy)
    first_error = ""
    for round_ in range(state.round + 1, fl.rounds + 1):
        interrupt.check()
        if ends_before(round_, result, fl, algorithm, stop):
            break
        start = time.perf_counter()
        system = cond.system
        chosen = round_clients(fl, len(partition), seed, round_,
                               system.per_round(fl.clients_per_round) if system else None)
        returned, slow = heterogeneity(chosen, cond.clients.dropout, cond.clients.stragglers, fl.local_epochs, seed,
                                       round_)
        weights, weights_bytes = algorithm.broadcast(round_, global_params)
        tasks = round_tasks(partition, returned, slow, seed, round_, cond.data, algorithm, global_params)
        updates = engine.run_round(weights, tasks, algorithm, **sent) if tasks else []
        updates = [algorithm.receive(round_, global_params, rebased(u, weights, global_params)) for u in updates]
        good, failed = usable(updates, round_, cond.on_client_error)
        down = {t.client: weights_bytes + message_bytes(t.message) for t in tasks}
        up = {u.client: algorithm.upload_bytes(u) for u in good}
        clock = None if system is None else on_clock(system, tasks, down, up, fl, len(chosen), round_)
        if clock is not None:
            left_out = set(clock.late) | set(clock.surplus)
            good = [u for u in good if u.client not in left_out]
        first_error = first_error or (f"round {round_}, {failed[0]}" if failed else "")
        if not good and not algorithm.empty_rounds:
            log.warning("round %d: %s; the global model is unchanged", round_,
                        "every client failed" if failed else "no client returned")
        else:
            global_params = aggregated(algorithm, round_, global_params, good)
            global_state = average_buffers(global_state, good)
            sent = {"state": global_state} if global_state else {}
        n_total = sum(u.num_samples for u in good)
        record = RoundRecord(
            round=round_, clients=len(good),
            train_loss=sum(u.loss * u.num_samples for u in good) / n_total if good else float("nan"),
            round_seconds=0.0, bytes_up=sum(up[u.client] for u in good), bytes_down=sum(down.values()),
            dropped=len(chosen) - len(returned), stragglers=len(slow),
            malicious=sum(u.malicious for u in good), samples=n_total,
            failed_clients=len(failed), extra=algorithm.round_metrics(round_))
        if clock is not None:
            hours = (result.history[-1].sim_hours or 0.0) if result.history else 0.0
            record = replace(record, sim_seconds=clock.seconds, sim_hours=hours + clock.seconds / 3600,
                             late=len(clock.late), surplus=len(clock.surplus))
        record = evaluated(record, fl, partial(load_flat, model, global_params, global_state), test, scoring, "round")
        record = replace(record, round_seconds=time.perf_counter() - start)
        result.history.append(record)
        result.params, result.state = global_params, global_state
        on_state(ServerState(round_, global_params, algorithm, result.history, global_state))
        on_round(record)
        if failed_from_start(result.history, fl.rounds):
            raise all_failed(result.history, first_error)
    result.state = global_state
    load_flat(model, global_params, global_state)
    return result


def ends_before(round_: int, result: TrainingResult, fl: FLConfig, algorithm: Algorithm,
                stop: Callable[[Sequence[RoundRecord]], str | None]) -> bool:
    """True when the run ends before `round_`: the target was reached (fl.stop_at_target), or `stop` or the
    algorithm's halt gives a reason (logged, and kept as result.stopped)."""
    if reached_target(fl, result.history):
        return True
    if (why := stop(result.history) or algorithm.halt(round_)) is not None:
        log.info("%s", why)
        result.stopped = why
        return True
    return False


def evaluated(record: RoundRecord, fl: FLConfig, model: Callable[[], nn.Module], test: Split, scoring: Evaluation,
              unit: str) -> RoundRecord:
    """`record` with the test metrics of `model()` (the model holding the new global weights) on evaluation rounds
    (every fl.eval_every, and the last); Diverged on a non-finite test loss (`unit` names the round in its message:
    round, server step)."""
    if record.round % fl.eval_every and record.round != fl.rounds:
        return record
    found: dict[str, float] = {}
    accuracy, loss = evaluate(model(), test, loss_fn=scoring.loss, metrics=scoring.metrics, found=found)
    if not math.isfinite(loss):
        raise Diverged(f"{unit} {record.round}: the test loss is {loss}; the run diverged (lower fl.lr?)")
    return replace(record, test_accuracy=accuracy, test_loss=loss, test_metrics=found)


def rebased(update: ClientResult, start: torch.Tensor, global_params: torch.Tensor) -> ClientResult:
    """A usable update moved from the weights its client started from (an encoded broadcast) onto the global
    weights: the update is the client's, the broadcast's rounding is not. Unchanged when they are the same."""
    if start is global_params or failure(update) is not None:
        return update
    return replace(update, params=global_params + (update.params - start))


def message_bytes(message: dict[str, torch.Tensor]) -> int:
    """Bytes of an algorithm's message to a client (its random key stays out: a device draws its own)."""
    return tensor_bytes(v for k, v in message.items() if k != "random")


def on_clock(system: System, tasks: Sequence[ClientTask], down: dict[int, int], up: dict[int, int], fl: FLConfig,
             chosen: int, round_: int) -> Schedule:
    """The round on the simulated clock: each client that sent a reply takes download + local training (its
    epochs x its samples) + upload of its own messages; the server keeps the first m on time (all with Poisson
    sampling) and waits for the deadline when a sampled client never reports."""
    times = {t.client: system.profiles.seconds(t.client, down[t.client], (t.epochs or fl.local_epochs) * len(t.indices),
                                               up[t.client]) for t in tasks if t.client in up}
    wanted = fl.clients_per_round if fl.sampling == "fixed" else chosen
    clock = schedule(times, wanted, system.deadline, waiting=len(times) < chosen)
    if clock.late and not clock.kept:
        log.warning("round %d: every client reported after system.deadline=%g s (the fastest took %.3g s)", round_,
                    system.deadline, min(times.values()))
    return clock


def reached_target(fl: FLConfig, history: Sequence[RoundRecord]) -> bool:
    """True when fl.stop_at_target is set and the last evaluated round reached the target."""
    if not (fl.stop_at_target and fl.target_accuracy is not None and history):
        return False
    return (history[-1].test_accuracy or 0) >= fl.target_accuracy
