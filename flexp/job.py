"""One job, start to end: data, partition, model, then FedAvg or the baseline, logged as one MLflow run."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from flexp import checkpoint, interrupt
from flexp import partition as partitions
from flexp.algorithm import Algorithm, tensor_bytes
from flexp.asynchronous import AsyncSettings, run_async
from flexp.baseline import run_baseline
from flexp.callbacks import Callback, RoundData, build_callbacks, run_callbacks
from flexp.checkpoint import STATE_DIR
from flexp.client import LocalSpec
from flexp.client_state import configure_stores, state_to
from flexp.config import ConfigError, ExperimentConfig
from flexp.data import Dataset, load_dataset
from flexp.engine import make_engine
from flexp.engine.path import watch_path
from flexp.fedavg import Conditions, Evaluation, RoundRecord, ServerState, TrainingResult, run_fedavg
from flexp.flat import load_flat
from flexp.models import ModelFactory, count_parameters
from flexp.objective import build_loss, build_metrics
from flexp.progress import Progress
from flexp.prune import CELL_TAG, Pruner, Rival, cell_id, stop_rule
from flexp.stage import build_stages, plan_of, with_stages
from flexp.strategy import make_algorithm, make_strategy
from flexp.system.devices import System
from flexp.tracking import flatten

log = logging.getLogger("flexp")
ENGINE_TAG, PATH_TAG = "flexp.engine", "flexp.engine_path"  # the engine `auto` resolved to; how rounds trained
STOPPED_TAG = "flexp.stopped"  # why a run ended before fl.rounds (a stop rule: a pruned rate, the privacy budget)


class Tracker(Protocol):
    """What a run logs to; MlflowTracker in production, anything alike in tests."""

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> str: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_text(self, text: str, path: str) -> None: ...
    def log_model(self, model: nn.Module) -> None: ...
    def logged_rounds(self) -> set[int]: ...
    def finish(self, status: str = "FINISHED") -> None: ...


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, built and checked before any tracking starts."""

    data: Dataset
    partition: Sequence[torch.Tensor]  # a partition.Partition in federated runs
    model: nn.Module
    device: torch.device
    callbacks: Sequence[tuple[str, Callback]] = ()
    algorithm: Algorithm | None = None  # federated runs: built here, so a bad strategy target leaves no run behind
    system: System | None = None  # the simulated deployment (conf/system/), None when off
    asynchronous: AsyncSettings | None = None  # an algorithm with a buffer runs asynchronously; None: in rounds


def make_partition(cfg: ExperimentConfig, data: Dataset) -> partitions.Partition:
    """Split the training set over fl.clients clients as partition.* says."""
    p, k, n = cfg.partition, cfg.fl.clients, len(data.train)
    if k > n:
        hint = " (dataset=synthetic makes dataset.users users: set it to K with partition=natural)" \
            if cfg.dataset.name == "synthetic" else ""
        raise ConfigError("fl.clients", k, f"is larger than the training set ({n} samples){hint}")
    labels = data.train.y.numpy()
    try:
        if p.name == "iid":
            return partitions.iid(n, k, cfg.seed)
        if p.name == "shards":
            return partitions.shards(labels, k, p.shards_per_client, cfg.seed, p.num_shards)
        if p.name == "dirichlet":
            return partitions.dirichlet(labels, k, p.alpha, cfg.seed)
        if data.train_groups is None:
            raise ValueError(f"dataset {data.name} has no natural clients (npz: a client_train array; "
                             "huggingface: dataset.client_column)")
        return partitions.natural(data.train_groups, k)
    except ValueError as err:
        raise ConfigError(f"partition={p.name} with fl.clients", k, str(err)) from None


def resolve_device(name: str) -> torch.device:
    """The torch device for engine.device, refusing cuda where there is none and cuda:N past the last GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", name, "CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("engine.device", name, f"this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load data, partition it and build the model; every ConfigError surfaces here, before a run exists."""
    device = resolve_device(cfg.engine.device)
    federated = cfg.mode == "federated"
    stages, system = (build_stages(cfg), make_system(cfg)) if federated else ({}, None)  # before the data loads
    asynchronous = async_settings(cfg, make_strategy(cfg.strategy, cfg.fl.clients, cfg.fl.lr, cfg.seed), system) \
        if federated else None
    data = load_dataset(cfg.dataset, log=log.info)
    interrupt.check()
    parts = make_partition(cfg, data) if cfg.mode == "federated" else []
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data).to(device)
    callbacks = build_callbacks(cfg.callbacks) if cfg.mode == "federated" else []
    build_loss(cfg.loss), build_metrics(cfg.metrics)  # a bad loss or metric target is a ConfigError here
    algorithm = None
    if federated:
        algorithm = make_algorithm(cfg.strategy, cfg.attack, cfg.fl.clients, cfg.fl.lr, cfg.seed, data.num_classes)
        for stage in stages.values():
            stage.check(model, algorithm)
        warn_retired_hooks(algorithm)
        algorithm = with_stages(algorithm, stages)
        if system is not None and asynchronous is None:
            check_deadline(cfg, system, parts, model, algorithm)
        return Prepared(data.to(device), parts, model, device, callbacks, algorithm, system, asynchronous)
    return Prepared(data.to(device), parts, model, device, callbacks, algorithm, system)


def async_settings(cfg: ExperimentConfig, algorithm: Algorithm, system: System | None) -> AsyncSettings | None:
    """The asynchronous loop's settings when the algorithm has a buffer (None: it runs in rounds); what that loop
    does not simulate is refused in one line."""
    given = cfg.asynchronous
    if algorithm.buffer_size is None:
        for key in ("concurrency", "max_staleness"):
            if (value := getattr(given, key)) is not None:
                raise ConfigError(f"async.{key}", value, f"needs an asynchronous strategy (strategy=fedbuff); "
                                                         f"strategy={cfg.strategy.name} runs in rounds")
        return None
    name = f"strategy={cfg.strategy.name}"
    if system is None:
        raise ConfigError("system", "none", f"{name} runs on the simulated clock: choose the clients' devices, e.g. "
                                            "system=uniform or system=heavy_tailed")
    refused = [("privacy", cfg.privacy and cfg.privacy.name, "is not accounted for asynchronous training: its "
                "clients are not sampled per round"),
               ("system.deadline", system.deadline, "has no meaning asynchronously: the server steps every "
                "buffer_size reports"),
               ("system.over_select", system.over_select or None, "has no meaning asynchronously: a client "
                "starts whenever one reports"),
               ("fl.sampling", None if cfg.fl.sampling == "fixed" else cfg.fl.sampling, "is not simulated "
                "asynchronously: a new client is drawn uniformly whenever one reports"),
               ("clients.dropout", cfg.clients.dropout or None, "is not simulated asynchronously (slow devices "
                "are: system.spread)"),
               ("clients.stragglers", cfg.clients.stragglers or None, "is not simulated asynchronously (slow devices "
                "are: system.spread)")]
    for key, value, why in refused:
        if value is not None:
            raise ConfigError(key, value, f"{why} ({name})")
    return AsyncSettings(cfg.asynchronous.concurrency or cfg.fl.clients_per_round, cfg.asynchronous.max_staleness)


def warn_retired_hooks(algorithm: Algorithm) -> None:
    """Warn about an algorithm hook flexp no longer calls (wire_bytes: bytes are now read off the messages)."""
    inner = getattr(algorithm, "inner", algorithm)
    if hasattr(inner, "wire_bytes"):
        log.warning("%s.wire_bytes is no longer called: bytes are counted from the messages themselves (send what a "
                    "client downloads as message() tensors; override upload_bytes(reply) for what it sends beyond "
                    "its reply)", type(inner).__name__)


def make_system(cfg: ExperimentConfig) -> System | None:
    """The configured system (None when off)."""
    from flexp.component import build

    if cfg.system is None:
        return None
    system = build(cfg.system, plan=plan_of(cfg))
    if not isinstance(system, System):
        raise ConfigError("system._target_", cfg.system.target, "must build a flexp.system.devices.System")
    return system


def check_deadline(cfg: ExperimentConfig, system: System, parts: Sequence[torch.Tensor], model: nn.Module,
                   algorithm: Algorithm) -> None:
    """Refuse a system.deadline no client can meet: what each must download, train on and (without a codec)
    upload in a round takes longer."""
    from flexp.flat import flat_parameters

    weights = flat_parameters(model).detach()
    upload = tensor_bytes([weights]) if cfg.compression is None else 0  # a codec's message size depends on the data
    sizes = parts.sizes() if isinstance(parts, partitions.Partition) else [len(p) for p in parts]
    system.check_deadline(algorithm.broadcast(1, weights)[1], cfg.fl.local_epochs * np.asarray(sizes), upload)


def run_name(cfg: ExperimentConfig) -> str:
    """A run name with the knobs that vary first (K C E B, or the baseline's B), then strategy, model, dataset and
    partition: the MLflow runs table shows only a name's first ~23 characters."""
    batch = f"B{(cfg.baseline.batch_size if cfg.mode == 'baseline' else cfg.fl.batch_size) or 'inf'}"
    if cfg.mode == "baseline":
        return f"baseline {batch} {cfg.model.name} {cfg.dataset.name}"
    fl = cfg.fl
    return (f"K{fl.clients} C{fl.fraction:g} E{fl.local_epochs} {batch} {cfg.strategy.name}{async_label(cfg)}"
            f"{privacy_label(cfg)}{compression_label(cfg)}{system_label(cfg)} "
            f"{cfg.model.name} {cfg.dataset.name} {cfg.partition.name}")


def async_label(cfg: ExperimentConfig) -> str:
    """' buf10 of 20 ms3': an asynchronous strategy's buffer, the clients training at once and the staleness
    limit, for the run name; '' for a strategy without a buffer."""
    buffer = cfg.strategy.kwargs.get("buffer_size")
    if not isinstance(buffer, int):
        return ""
    given = cfg.asynchronous
    limit = "" if given.max_staleness is None else f" ms{given.max_staleness}"
    return f" buf{buffer} of {given.concurrency or cfg.fl.clients_per_round}{limit}"


def compression_label(cfg: ExperimentConfig) -> str:
    """' quantize8 rot', ' topk0.01 ef', ' sign ef down8': the codec, its bits or ratio, rotation, error feedback
    and download bits, for the run name; '' without compression."""
    if cfg.compression is None:
        return ""
    kwargs = cfg.compression.kwargs
    size = next((kwargs[k] for k in ("bits", "ratio") if isinstance(kwargs.get(k), (int, float))), None)
    flags = [flag for key, flag in (("rotate", "rot"), ("error_feedback", "ef")) if kwargs.get(key) is True]
    if isinstance(kwargs.get("download_bits"), int) and cfg.compression.name != "download":
        flags.append(f"down{kwargs['download_bits']}")
    name = cfg.compression.name + ("" if size is None else format(size, "g"))
    if cfg.compression.name == "download":
        name += str(kwargs.get("download_bits", ""))
    return " " + " ".join([name, *flags])


def system_label(cfg: ExperimentConfig) -> str:
    """' heavy_tailed os0.3 dl30': the system option, over-selection and deadline (s), for the run name."""
    if cfg.system is None:
        return ""
    kwargs = cfg.system.kwargs
    flags = [f"{short}{kwargs[key]:g}" for key, short in (("over_select", "os"), ("deadline", "dl"))
             if isinstance(kwargs.get(key), (int, float)) and kwargs[key]]
    return " " + " ".join([cfg.system.name, *flags])


def privacy_label(cfg: ExperimentConfig) -> str:
    """' dp_fedavg eps8' (or ' dp_sgd z1.1'): the privacy option and its target epsilon or noise multiplier, for the
    run name; '' without privacy."""
    if cfg.privacy is None:
        return ""
    kwargs = cfg.privacy.kwargs
    for key, short in (("target_epsilon", "eps"), ("noise_multiplier", "z")):
        if (value := kwargs.get(key)) is not None:
            return f" {cfg.privacy.name} {short}{value:g}" if isinstance(value, (int, float)) else \
                f" {cfg.privacy.name} {short}{value}"
    return f" {cfg.privacy.name}"


def most_clients(cfg: ExperimentConfig, ready: Prepared) -> int | None:
    """The most clients a round trains (over-selected ones included); None when it varies (Poisson sampling)."""
    if ready.asynchronous is not None:
        return ready.asynchronous.concurrency
    if cfg.fl.sampling != "fixed":
        return None
    m = cfg.fl.clients_per_round
    return ready.system.per_round(m) if ready.system is not None else m


def new_model(cfg: ExperimentConfig, data: Dataset) -> nn.Module:
    """A freshly initialised model of the configured kind for `data`."""
    return ModelFactory(cfg.model, data.input_shape, data.num_classes)()


def train(cfg: ExperimentConfig, ready: Prepared, on_record: Callable[[RoundRecord], None],
          resume: ServerState | None = None,
          on_state: Callable[[ServerState], None] = lambda s: None,
          stop: Callable[[Sequence[RoundRecord]], str | None] = lambda h: None,
          on_tags: Callable[[Mapping[str, str]], None] = lambda t: None,
          output_dir: Path | None = None) -> TrainingResult:
    """Run FedAvg or the baseline on prepared inputs (FedAvg from `resume` when given, until `stop` says why);
    the engine and the path its rounds take are logged and given to `on_tags`; per-client state spills under
    `output_dir` (a temporary directory without one) past checkpoint.client_state_mb."""
    if cfg.mode == "baseline":
        return run_baseline(ready.model, ready.data.train, ready.data.test, cfg.baseline, cfg.seed,
                            cfg.fl.target_accuracy, on_record)
    spec = LocalSpec(cfg.fl.local_epochs, cfg.fl.batch_size, cfg.fl.lr)
    make_model = ModelFactory(cfg.model, ready.data.input_shape, ready.data.num_classes)
    task_loss = build_loss(cfg.loss)
    evaluation = Evaluation(task_loss, build_metrics(cfg.metrics))
    engine = make_engine(cfg.engine, make_model, ready.data.train, spec, ready.device, task_loss,
                         most_clients(cfg, ready))
    try:
        algorithm = ready.algorithm
        if resume is not None:  # the checkpoint holds the state; the attacker wrapping it comes from the config
            resume = on_device(resume, ready.device)
            algorithm.load_state_dict(resume.strategy.state_dict())
            resume = replace(resume, strategy=algorithm)
        budget = cfg.checkpoint.client_state_mb
        configure_stores(algorithm, None if budget is None else int(budget * 2**20),
                         None if output_dir is None else output_dir / STATE_DIR / "spill")
        conditions = Conditions(cfg.clients, cfg.data, cfg.engine.on_client_error, ready.system)
        check_path = watch_path(cfg.engine.name, engine, algorithm,
                                lambda name, path: on_tags({ENGINE_TAG: name, PATH_TAG: path}))

        def checked(record: RoundRecord) -> None:
            check_path(record.round)
            on_record(record)

        if ready.asynchronous is not None:
            return run_async(ready.model, ready.partition, ready.data.test, cfg.fl, engine, cfg.seed,
                             ready.asynchronous, checked, algorithm, conditions, resume, on_state, evaluation, stop)
        return run_fedavg(ready.model, ready.partition, ready.data.test, cfg.fl, engine, cfg.seed, checked,
                          algorithm, conditions, resume, on_state, evaluation, stop)
    finally:
        engine.close()
        if output_dir is not None:  # spilled client state is working memory: the checkpoint holds the state
            shutil.rmtree(output_dir / STATE_DIR / "spill", ignore_errors=True)


def on_device(state: ServerState, device: torch.device) -> ServerState:
    """A resumed server state (read onto the CPU) with its weights, buffers and algorithm state on the run's device."""
    if device.type == "cpu":
        return state
    strategy = state.strategy
    moved = state_to(strategy.state_dict(), device)
    strategy.load_state_dict(moved)
    return replace(state, params=state.params.to(device),
                   model_state={k: v.to(device) for k, v in state.model_state.items()})


def checkpointer(cfg: ExperimentConfig, directory: Path | None, run_id: str,
                 algorithm: Algorithm | None = None) -> Callable[[ServerState], None]:
    """Save the server state every checkpoint.every rounds and after the last one (federated runs only); at the
    first, warn if `algorithm` keeps state that its state_dict() leaves out."""
    unsaved = checkpoint.UnsavedStateWarning(algorithm)

    def on_state(state: ServerState) -> None:
        every = cfg.checkpoint.every
        if directory is not None and every and (state.round % every == 0 or state.round == cfg.fl.rounds):
            unsaved(state.strategy)
            checkpoint.save(directory, checkpoint.Checkpoint(state, run_id, cfg.raw, checkpoint.rng_states()))

    return on_state


OnState = Callable[[ServerState], None]
Rivals = Callable[[str], Callable[[], Rival | None]]  # setting id -> its best finished run's lookup (fl.prune)


def pruning(cfg: ExperimentConfig, cell: str, rivals: Rivals | None) -> Callable[[Sequence[RoundRecord]], str | None]:
    """The run's stop rule: fl.prune's, asking `rivals` about the setting `cell`; never stop when it is off."""
    if not cfg.fl.prune or cfg.mode != "federated":
        return lambda history: None
    if rivals is None:
        raise ConfigError("fl.prune", True, "needs a tracking store to find the other rates' runs (tracking=True)")
    return stop_rule(Pruner(rivals(cell)), cfg.fl.target_accuracy)


def with_callbacks(ready: Prepared, on_state: OnState) -> tuple[OnState, dict[int, dict[str, float]]]:
    """`on_state` that also runs the configured callbacks after each evaluated round, and {round: their metrics}."""
    if not ready.callbacks:
        return on_state, {}
    found: dict[int, dict[str, float]] = {}
    holder = copy.deepcopy(ready.model)
    data = RoundData(ready.data.train, ready.data.test, ready.partition, ready.data.num_classes)

    def on_state_and_callbacks(state: ServerState) -> None:
        on_state(state)
        if state.history and state.history[-1].test_accuracy is not None:
            model = load_flat(holder, state.params, state.model_state)
            found[state.round] = run_callbacks(ready.callbacks, state.round, state, model, data)

    return on_state_and_callbacks, found


def execute(cfg: ExperimentConfig, tracker: Tracker, tags: Mapping[str, str], config_yaml: str,
            output_dir: Path | None = None, resume: checkpoint.Checkpoint | None = None,
            ready: Prepared | None = None, rivals: Rivals | None = None) -> TrainingResult:
    """Prepare (unless `ready` is given), then train inside one tracked run that always ends FINISHED, FAILED or
    KILLED.

    With `resume`, the checkpoint's MLflow run is reopened, rounds it lacks are logged from the checkpoint, and
    training goes on from the checkpoint's round. Every run is tagged with its setting's id (prune.cell_id); with
    fl.prune, `rivals` finds the best finished run of that setting.
    """
    ready = ready or prepare(cfg)
    cell = cell_id(flatten(cfg.raw))
    stop = pruning(cfg, cell, rivals)
    unit = "epoch" if cfg.mode == "baseline" else "round"
    total = cfg.baseline.epochs if cfg.mode == "baseline" else cfg.fl.rounds
    tags = {**tags, "flexp.mode": cfg.mode, "flexp.output_dir": str(output_dir or ""), CELL_TAG: cell}
    run_id = tracker.start(run_name(cfg), tags, run_id=resume.run_id if resume else None)
    log.info("run %s: %s, %d parameters, %d %ss", run_id, run_name(cfg), count_parameters(ready.model), total, unit)
    progress = Progress(total, unit)
    history = list(resume.state.history) if resume else []   # every round logged, for a stopped run's summary
    status = "FAILED"
    try:
        if resume is None:
            tracker.log_params(flatten(cfg.raw))
            resolved = {**(ready.algorithm.run_params() if ready.algorithm else {}),
                        **(ready.system.run_params() if ready.system else {}),
                        **({"async.resolved_concurrency": ready.asynchronous.concurrency}
                           if ready.asynchronous else {})}
            if resolved:
                tracker.log_params(resolved)
                log.info("%s", "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in resolved.items()))
            tracker.log_text(config_yaml, "config.yaml")
        else:
            checkpoint.restore_rng(resume.rng)
            logged = tracker.logged_rounds()
            for record in resume.state.history:
                if record.round not in logged:
                    tracker.log_metrics(record.metrics(), step=record.round)
            log.info("resuming after round %d of %d (output dir %s)", resume.state.round, total, output_dir)

        on_state, callback_metrics = with_callbacks(ready, checkpointer(cfg, output_dir, run_id, ready.algorithm))

        def on_record(record: RoundRecord) -> None:
            tracker.log_metrics({**record.metrics(), **callback_metrics.pop(record.round, {})}, step=record.round)
            history.append(record)
            progress.update(record)

        state = resume.state if resume else None
        result = train(cfg, ready, on_record, state, on_state, stop, tracker.set_tags, output_dir)
        progress.close()
        if result.stopped is not None:
            tracker.set_tags({STOPPED_TAG: result.stopped})
        summary = result.summary()
        trained = resume is None or len(result.history) > len(resume.state.history)
        if trained:
            tracker.log_metrics(summary)
            for name, text in result.texts.items():
                tracker.log_text(text, name)
        if trained and cfg.tracking.log_model:
            tracker.log_model(load_flat(new_model(cfg, ready.data), result.params.cpu(),
                                        {k: v.cpu() for k, v in result.state.items()}))
        log.info("done: %s", "  ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        if history:  # the runs table's best and final accuracy of a stopped run are those of its rounds so far
            tracker.log_metrics(TrainingResult(torch.empty(0), history, cfg.fl.target_accuracy).summary())
        raise
    finally:
        progress.close()
        tracker.finish(status)
