"""Typed experiment config: the Hydra/OmegaConf tree is validated here once, then only these objects flow inward."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flexp.component import Component

MODES = ("federated", "baseline")
DATASETS = ("mnist", "synthetic")
MODELS = ("2nn", "cnn", "logreg")
PARTITIONS = ("iid", "shards", "dirichlet", "natural")
ENGINES = ("auto", "threads", "vectorized", "ray")
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip")
ARRIVALS = ("none", "linear", "step")
SAMPLINGS = ("fixed", "poisson")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the value."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key}: {why}" if value is None else f"{key}={value!r}: {why}")
        self.key = key
        self.value = value


@dataclass(frozen=True)
class FLConfig:
    """FedAvg's knobs: K, C, E, B, lr and the stopping rule."""

    clients: int
    fraction: float
    local_epochs: int
    batch_size: int | None
    lr: float
    rounds: int
    eval_every: int
    target_accuracy: float | None
    stop_at_target: bool
    prune: bool = False  # in a learning-rate grid: stop once another rate of the setting reached the target sooner
    sampling: str = "fixed"  # fixed: m clients without replacement; poisson: each client with probability C

    @property
    def clients_per_round(self) -> int:
        """m = max(round(C*K), 1): C=0 means one client, as in the paper."""
        return max(int(round(self.fraction * self.clients)), 1)


@dataclass(frozen=True)
class BaselineConfig:
    """Centralized training on the pooled data."""

    epochs: int
    batch_size: int | None
    lr: float


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset, where it is cached, and the synthetic generator's parameters; or a `_target_` callable
    (`target`) and its keyword arguments (`options`)."""

    name: str
    root: Path | None = None
    alpha: float = 1.0
    beta: float = 1.0
    users: int = 30
    samples_per_user: int | None = None
    features: int = 60
    classes: int = 10
    test_fraction: float = 0.2
    seed: int = 0
    target: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split over clients."""

    name: str
    shards_per_client: int = 2
    num_shards: int | None = None
    alpha: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train: a built-in by name, or any callable returning an nn.Module (`_target_`) with its
    keyword arguments; `factory` is a model handed to flexp.run from Python (a module or a callable)."""

    name: str
    hidden: int = 200
    target: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class CallbackConfig:
    """One round callback: its name (the prefix of its metrics), the callable to build and its keyword arguments."""

    name: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    key: str = "callbacks"


@dataclass(frozen=True)
class EngineConfig:
    """How client updates are executed."""

    name: str = "auto"
    workers: int = 2
    group_size: int | None = None
    device: str = "cpu"
    on_client_error: str = "drop"
    address: str = "local"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actor_engine: str = "auto"


@dataclass(frozen=True)
class AsyncConfig:
    """The asynchronous loop (an algorithm with a buffer, strategy=fedbuff): how many clients train at once (None:
    fl.clients x fl.fraction) and the oldest update it still takes (server steps; None: any)."""

    concurrency: int | None = None
    max_staleness: int | None = None


@dataclass(frozen=True)
class ClientsConfig:
    """Systems heterogeneity: sampled clients that never return, and stragglers doing fewer local epochs."""

    dropout: float = 0.0
    stragglers: float = 0.0


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are logged."""

    uri: str
    experiment: str
    log_model: bool = True


@dataclass(frozen=True)
class AttackConfig:
    """Byzantine clients: which attack, the fraction of clients that are malicious, and its scale."""

    name: str = "none"
    fraction: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Clients obtaining new data: the arrival schedule and its shape."""

    arrival: str = "none"
    arrival_start: float = 0.1
    arrival_full_at: int = 10
    arrival_every: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """How often the server state is written to the job's output directory (0: never)."""

    every: int = 1
    client_state_mb: float | None = None  # RAM for per-client state (SCAFFOLD's c_i, ...) before it spills to disk


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole validated experiment."""

    mode: str
    seed: int
    fl: FLConfig
    baseline: BaselineConfig
    dataset: DatasetConfig
    partition: PartitionConfig
    model: ModelConfig
    engine: EngineConfig
    tracking: TrackingConfig
    strategy: Component = field(default_factory=lambda: DEFAULT_STRATEGY)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: tuple[CallbackConfig, ...] = ()
    loss: CallbackConfig | None = None  # the task loss (`loss._target_`); None: cross-entropy
    metrics: tuple[CallbackConfig, ...] = ()  # extra test metrics (`metrics.<name>._target_`), beside accuracy
    resume: str | None = None
    privacy: Any = None  # flexp.component.Component of a privacy mechanism (conf/privacy/), None when off
    compression: Any = None  # flexp.component.Component of a codec stage (conf/compression/), None when off
    system: Any = None  # flexp.component.Component of the clients' devices and the clock (conf/system/), None: off
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)  # the `async` section
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


class _Section:
    """Reads typed values from one mapping, naming `prefix.key` in every error."""

    def __init__(self, tree: Mapping[str, Any], prefix: str) -> None:
        node = tree.get(prefix) if prefix else tree
        if not isinstance(node, Mapping):
            raise ConfigError(prefix, node, "must be a mapping")
        self.node, self.prefix = node, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str, default: Any = ...) -> Any:
        if name not in self.node:
            if default is ...:
                raise ConfigError(self.key(name), None, "is missing")
            return default
        return self.node[name]

    def integer(self, name: str, low: int | None = None, default: Any = ..., optional: bool = False) -> int | None:
        value = self.raw(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise ConfigError(self.key(name), value, "must be an integer")
        if low is not None and value < low:
            raise ConfigError(self.key(name), value, f"must be >= {low}")
        return int(value)

    def number(self, name: str, low: float | None = None, high: float | None = None, default: Any = ...,
               optional: bool = False, strict_low: bool = False) -> float | None:
        value = self.raw(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(self.key(name), value, "must be a finite number")
        if low is not None and (value <= low if strict_low else value < low):
            raise ConfigError(self.key(name), value, f"must be {'>' if strict_low else '>='} {low}")
        if high is not None and value > high:
            raise ConfigError(self.key(name), value, f"must be <= {high}")
        return float(value)

    def flag(self, name: str, default: Any = ...) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), value, "must be true or false")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.raw(name, default)
        if value not in options:
            raise ConfigError(self.key(name), value, f"must be one of {', '.join(options)}")
        return str(value)

    def text(self, name: str, default: Any = ...) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.key(name), value, "must be a non-empty string")
        return value

    def batch(self, name: str) -> int | None:
        """Batch size: 0 or null mean the full local dataset (the paper's B=inf)."""
        value = self.raw(name)
        if value is None or (isinstance(value, str) and value.lower() in ("inf", "full")):
            return None
        size = self.integer(name, low=0)
        return size or None


def _fl(tree: Mapping[str, Any]) -> FLConfig:
    s = _Section(tree, "fl")
    fl = FLConfig(
        clients=s.integer("clients", low=1),
        fraction=s.number("fraction", low=0.0, high=1.0),
        local_epochs=s.integer("local_epochs", low=1),
        batch_size=s.batch("batch_size"),
        lr=s.number("lr", low=0.0, strict_low=True),
        rounds=s.integer("rounds", low=1),
        eval_every=s.integer("eval_every", low=1),
        target_accuracy=s.number("target_accuracy", low=0.0, high=1.0, optional=True, default=None),
        stop_at_target=s.flag("stop_at_target", default=False),
        prune=s.flag("prune", default=False),
        sampling=s.choice("sampling", SAMPLINGS, default="fixed"),
    )
    if fl.sampling == "poisson" and fl.fraction == 0:
        raise ConfigError("fl.fraction", fl.fraction, "must be > 0 with fl.sampling=poisson (each client joins a "
                                                      "round with probability fl.fraction)")
    if fl.prune and fl.target_accuracy is None:
        raise ConfigError("fl.prune", True, "needs fl.target_accuracy: runs are pruned by their rounds to the target")
    return fl


def _baseline(tree: Mapping[str, Any]) -> BaselineConfig:
    s = _Section(tree, "baseline")
    return BaselineConfig(
        epochs=s.integer("epochs", low=1),
        batch_size=s.batch("batch_size"),
        lr=s.number("lr", low=0.0, strict_low=True),
    )


def _dataset(tree: Mapping[str, Any]) -> DatasetConfig:
    s = _Section(tree, "dataset")
    if "_target_" in s.node or "name" not in s.node:
        return _target_dataset(s)
    known = [f.name for f in fields(DatasetConfig) if f.name not in ("target", "options")]
    for key in s.node:
        if key not in known:
            raise ConfigError(s.key(key), None, f"unknown key; dataset has {', '.join(known)} (or _target_)")
    name = s.choice("name", DATASETS)
    if name == "mnist":
        return DatasetConfig(name=name, root=Path(s.text("root")).expanduser())
    return DatasetConfig(
        name=name,
        alpha=s.number("alpha", low=0.0),
        beta=s.number("beta", low=0.0),
        users=s.integer("users", low=1),
        samples_per_user=s.integer("samples_per_user", low=2, optional=True, default=None),
        features=s.integer("features", low=1),
        classes=s.integer("classes", low=2),
        test_fraction=s.number("test_fraction", low=0.0, high=0.9, strict_low=True),
        seed=s.integer("seed", default=0),
    )


def _target_dataset(s: _Section) -> DatasetConfig:
    """dataset._target_: an importable callable whose signature takes every other key under `dataset`."""
    target = s.raw("_target_", None)
    if not isinstance(target, str) or not target.strip():
        raise ConfigError("dataset._target_", target, "must name a callable returning a dataset, e.g. "
                                                      "dataset=custom dataset._target_=mypkg.make_data")
    options = {k: v for k, v in s.node.items() if k != "_target_"}
    for key, value in options.items():
        if value == "???":
            raise ConfigError(s.key(key), None, "is missing")
    check_arguments(s.key("_target_"), target, options)
    name = options.get("name")
    if not isinstance(name, str):
        name = target.rsplit(".", 1)[-1].removeprefix("load_")
    return DatasetConfig(name=name, target=target, options=options)


RUN_SUPPLIED = ("plan",)  # arguments only flexp passes (a stage's or system's Plan); a config cannot set them


def check_arguments(key: str, target: str, options: Mapping[str, Any], supplied: tuple[str, ...] = (),
                    kind: type | None = None) -> Any:
    """Refuse (naming `section.argument`) a `_target_` that cannot be imported, a class that is not a `kind`, or
    keys its signature does not take; `supplied` are arguments flexp passes when taken (never missing)."""
    import inspect
    import logging

    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")  # it logs the failure over several lines; the error says it once
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        func = get_object(target)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's target
        raise ConfigError(key, target, f"cannot be imported ({' '.join(str(err).split())[:200]})") from None
    finally:
        hydra_log.disabled = disabled
    if not callable(func):
        raise ConfigError(key, target, "is not callable")
    if kind is not None and isinstance(func, type) and not issubclass(func, kind):
        raise ConfigError(key, target, f"is not a {kind.__module__}.{kind.__qualname__} subclass")
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func
    section = key.rsplit(".", 1)[0]
    given = {k: v for k, v in options.items() if not (k.startswith("_") and k.endswith("_"))}
    for name in given:
        if name in supplied and name in RUN_SUPPLIED:
            raise ConfigError(f"{section}.{name}", None, "is not a setting: flexp passes the run's plan")
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and n not in RUN_SUPPLIED]
        for name in given:
            if name not in takes:
                raise ConfigError(f"{section}.{name}", None,
                                  f"unknown key; {target} takes {', '.join(takes) or 'no arguments'}")
    if "_args_" not in options:
        for name, p in params.items():
            needed = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if needed and name not in given and name not in supplied:
                raise ConfigError(f"{section}.{name}", None, f"is missing ({target} needs it)")
    return func


def _partition(tree: Mapping[str, Any]) -> PartitionConfig:
    s = _Section(tree, "partition")
    return PartitionConfig(
        name=s.choice("name", PARTITIONS),
        shards_per_client=s.integer("shards_per_client", low=1, default=2),
        num_shards=s.integer("num_shards", low=1, optional=True, default=None),
        alpha=s.number("alpha", low=0.0, strict_low=True, default=0.5),
    )


MODEL_KEYS = ("name", "hidden", "_target_")


def target_name(target: str) -> str:
    """The name a `_target_` goes by in run names and params: its last dotted part (mypkg.nets.Net -> Net)."""
    return target.rpartition(".")[2]


def _model(tree: Mapping[str, Any]) -> ModelConfig:
    """A built-in model (name, hidden; other keys are typos) or `_target_` with any keyword arguments."""
    s = _Section(tree, "model")
    if "_target_" in s.node:
        target = s.text("_target_")
        name = s.text("name", default=target_name(target))
        name = target_name(target) if name in MODELS else name  # model._target_ set over a built-in's file
        kwargs = {k: v for k, v in s.node.items() if k not in ("name", "_target_")}
        check_arguments(s.key("_target_"), target, kwargs, supplied=("input_shape", "num_classes"))
        return ModelConfig(name=name, target=target, kwargs=kwargs)
    if "name" not in s.node:
        raise ConfigError("model._target_", None, "is missing: model=custom needs model._target_=module.Callable")
    for key in s.node:
        if key not in MODEL_KEYS:
            raise ConfigError(s.key(key), None, f"unknown key; model has {', '.join(MODEL_KEYS)} (other keys are "
                                                "keyword arguments of a model._target_)")
    return ModelConfig(name=s.choice("name", MODELS), hidden=s.integer("hidden", low=1, default=200))


def _callbacks(tree: Mapping[str, Any], section: str = "callbacks") -> tuple[CallbackConfig, ...]:
    """`callbacks` (or `metrics`): a list, or a mapping from name to entry, of `{_target_: ..., keyword arguments}`."""
    node = tree.get(section) or {}
    if isinstance(node, Mapping):
        entries = [(str(name), f"{section}.{name}", entry) for name, entry in node.items()]
    elif isinstance(node, (list, tuple)):
        entries = [(None, f"{section}[{i}]", entry) for i, entry in enumerate(node)]
    else:
        raise ConfigError(section, node, "must be a list or a mapping of {_target_: ...} entries")
    out = []
    for name, key, entry in entries:
        target = entry.get("_target_") if isinstance(entry, Mapping) else None
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"{key}._target_", target, "must name a callable (module.Class)")
        kwargs = {k: v for k, v in entry.items() if k != "_target_"}
        name = name or target.rpartition(".")[2]
        taken = {c.name for c in out}
        name = next(f"{name}_{i}" for i in range(2, len(out) + 3) if f"{name}_{i}" not in taken) \
            if name in taken else name
        out.append(CallbackConfig(name, target, kwargs, key))
    return tuple(out)


def _loss(tree: Mapping[str, Any]) -> CallbackConfig | None:
    """`loss`: {_target_: a function loss(output, target, reduction=...), keyword arguments}; None: cross-entropy."""
    node = tree.get("loss")
    if node is None:
        return None
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or not target.strip():
        raise ConfigError("loss._target_", target, "must name a loss function, e.g. torch.nn.functional.nll_loss")
    return CallbackConfig("loss", target, {k: v for k, v in node.items() if k != "_target_"}, "loss")


def _device(s: _Section) -> str:
    """engine.device: cpu, cuda or cuda:N."""
    value = s.raw("device", "cpu")
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(s.key("device"), value, "must be cpu, cuda or cuda:N (a GPU's index)")
    return value


RAY_ONLY = {"address": "local", "num_cpus": 1.0, "num_gpus": 0.0, "actor_engine": "auto"}  # and their defaults


def _engine(tree: Mapping[str, Any]) -> EngineConfig:
    s = _Section(tree, "engine")
    engine = EngineConfig(
        name=s.choice("name", ENGINES),
        workers=s.integer("workers", low=1, default=2),
        group_size=s.integer("group_size", low=1, optional=True, default=None),
        device=_device(s),
        on_client_error=s.choice("on_client_error", ("drop", "abort"), default="drop"),
        address=s.text("address", default="local"),
        num_cpus=s.number("num_cpus", low=0.0, default=1.0),
        num_gpus=s.number("num_gpus", low=0.0, default=0.0),
        actor_engine=s.choice("actor_engine", ("auto", "threads", "vectorized"), default="auto"),
    )
    if engine.name != "ray":
        for name, default in RAY_ONLY.items():
            if getattr(engine, name) != default:
                raise ConfigError(s.key(name), getattr(engine, name), f"is a setting of engine=ray, which "
                                  f"engine={engine.name} would ignore (add engine=ray to run on Ray)")
    return engine


def _tracking(tree: Mapping[str, Any]) -> TrackingConfig:
    s = _Section(tree, "tracking")
    return TrackingConfig(uri=s.text("uri"), experiment=s.text("experiment"),
                          log_model=s.flag("log_model", default=True))


STRATEGY_SUPPLIED = ("num_clients", "lr", "seed")  # passed to a strategy that takes them: K, fl.lr, seed
DEFAULT_STRATEGY = Component("strategy", "fedavg", "flexp.strategy.fedavg.FedAvg")  # when the section is absent


def _strategy(tree: Mapping[str, Any], fl: FLConfig, seed: int) -> Component:
    """The strategy: a `_target_` Algorithm and its keyword arguments, a built-in's file (conf/strategy) or the
    user's alike; built once here, so that an argument its class refuses stops before any data loads."""
    node = tree.get("strategy")
    if node is None:
        return DEFAULT_STRATEGY
    from flexp.algorithm import Algorithm
    from flexp.component import as_declared, naming_takers, parse_component
    from flexp.strategy import make_strategy

    if isinstance(node, Mapping):
        node = as_declared(node, "strategy")
        if not isinstance(node.get("_target_"), str) or not node["_target_"].strip():
            raise ConfigError("strategy._target_", node.get("_target_"), "must name a callable returning a "
                              "flexp.algorithm.Algorithm, e.g. strategy=custom strategy._target_=mypkg.MyAlgorithm")
    try:
        strategy = parse_component({"strategy": node}, "strategy", STRATEGY_SUPPLIED, Algorithm)
    except ConfigError as err:
        raise naming_takers(err, "strategy") from None
    make_strategy(strategy, fl.clients, fl.lr, seed)
    return strategy


SECTIONS = {"fl": FLConfig, "baseline": BaselineConfig, "dataset": DatasetConfig, "partition": PartitionConfig,
            "model": ModelConfig, "engine": EngineConfig, "tracking": TrackingConfig, "strategy": Component,
            "clients": ClientsConfig, "attack": AttackConfig, "data": DataConfig,
            "checkpoint": CheckpointConfig, "async": AsyncConfig}
TOP_LEVEL = ("mode", "seed", "report", "resume", "callbacks", "loss", "metrics", "privacy", "compression", "system",
             *SECTIONS)
OPEN_SECTIONS = ("dataset", "model", "strategy")  # keys depend on the chosen option (a _target_'s arguments)
STAGE_SECTIONS = ("privacy", "compression")  # the round's stages in order: a `_target_` class and its arguments


def check_key(path: str) -> None:
    """Raise ConfigError for a dotted key flexp does not know (a typo would otherwise be silently ignored)."""
    head, _, rest = path.partition(".")
    if head not in TOP_LEVEL:
        raise ConfigError(path, None, f"unknown key; top-level keys are {', '.join(TOP_LEVEL)}")
    if head in SECTIONS and rest and head not in OPEN_SECTIONS:
        known = [f.name for f in fields(SECTIONS[head]) if f.name != "raw"]
        if rest.split(".")[0] not in known:
            raise ConfigError(path, None, f"unknown key; {head} has {', '.join(known)}")


def _check_keys(tree: Mapping[str, Any]) -> None:
    for key, value in tree.items():
        check_key(key)
        if key in SECTIONS and isinstance(value, Mapping):
            for sub in value:
                check_key(f"{key}.{sub}")


def _clients(tree: Mapping[str, Any]) -> ClientsConfig:
    if "clients" not in tree:
        return ClientsConfig()
    s = _Section(tree, "clients")
    return ClientsConfig(dropout=s.number("dropout", low=0.0, high=1.0, default=0.0),
                         stragglers=s.number("stragglers", low=0.0, high=1.0, default=0.0))


def _async(tree: Mapping[str, Any], fl: FLConfig) -> AsyncConfig:
    if tree.get("async") is None:
        return AsyncConfig()
    s = _Section(tree, "async")
    concurrency = s.integer("concurrency", low=1, default=None, optional=True)
    if concurrency is not None and concurrency > fl.clients:
        raise ConfigError("async.concurrency", concurrency, f"must be at most fl.clients={fl.clients}")
    return AsyncConfig(concurrency, s.integer("max_staleness", low=0, default=None, optional=True))


def _attack(tree: Mapping[str, Any]) -> AttackConfig:
    if "attack" not in tree:
        return AttackConfig()
    s = _Section(tree, "attack")
    return AttackConfig(name=s.choice("name", ATTACKS, default="none"),
                        fraction=s.number("fraction", low=0.0, high=1.0, default=0.0),
                        scale=s.number("scale", low=0.0, default=1.0))


def _data(tree: Mapping[str, Any]) -> DataConfig:
    if "data" not in tree:
        return DataConfig()
    s = _Section(tree, "data")
    return DataConfig(arrival=s.choice("arrival", ARRIVALS, default="none"),
                      arrival_start=s.number("arrival_start", low=0.0, high=1.0, strict_low=True, default=0.1),
                      arrival_full_at=s.integer("arrival_full_at", low=1, default=10),
                      arrival_every=s.integer("arrival_every", low=1, default=1))


def _checkpoint(tree: Mapping[str, Any]) -> CheckpointConfig:
    if "checkpoint" not in tree:
        return CheckpointConfig()
    s = _Section(tree, "checkpoint")
    return CheckpointConfig(every=s.integer("every", low=0, default=1),
                            client_state_mb=s.number("client_state_mb", low=0.0, default=None, optional=True))


def _resume(tree: Mapping[str, Any]) -> str | None:
    value = tree.get("resume")
    if value is None:
        return None
    return _Section(tree, "").text("resume")


def parse_config(tree: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a resolved config mapping into an ExperimentConfig, or raise ConfigError naming the bad key."""
    _check_keys(tree)
    top = _Section(tree, "")
    fl, seed = _fl(tree), top.integer("seed", low=0)
    model, strategy = _model(tree), _strategy(tree, fl, seed)
    return ExperimentConfig(
        mode=top.choice("mode", MODES),
        seed=seed,
        fl=fl,
        baseline=_baseline(tree),
        dataset=_dataset(tree),
        partition=_partition(tree),
        model=model,
        engine=_engine(tree),
        tracking=_tracking(tree),
        strategy=strategy,
        clients=_clients(tree),
        attack=_attack(tree),
        data=_data(tree),
        checkpoint=_checkpoint(tree),
        callbacks=_callbacks(tree),
        loss=_loss(tree),
        metrics=_callbacks(tree, "metrics"),
        resume=_resume(tree),
        privacy=_stage(tree, "privacy"),
        compression=_stage(tree, "compression"),
        system=_system(tree),
        asynchronous=_async(tree, fl),
        raw=named_targets(tree, model, strategy),
    )


def _stage(tree: Mapping[str, Any], section: str) -> Any:
    """A stage section (conf/<section>/<option>.yaml: `_target_` and its arguments), checked; None when off."""
    from flexp.component import parse_component
    from flexp.stage import Stage

    return parse_component(tree, section, supplied=("plan",), kind=Stage)


def _system(tree: Mapping[str, Any]) -> Any:
    """The system section (conf/system/<option>.yaml: the clients' devices, deadline, over-selection); None: off."""
    from flexp.component import parse_component
    from flexp.system.devices import System

    return parse_component(tree, "system", supplied=("plan",), kind=System)


def named_targets(tree: Mapping[str, Any], model: ModelConfig, strategy: Component) -> Mapping[str, Any]:
    """`tree` with model.name and strategy.name set to the parsed names where a `_target_` is set, so the logged
    params (and the report's lookups) never name the built-in whose file the `_target_` was set over."""
    out = dict(tree)
    for section, parsed in (("model", model), ("strategy", strategy)):
        node = tree.get(section)
        if parsed.target is not None and isinstance(node, Mapping) and node.get("name") != parsed.name:
            out[section] = {**node, "name": parsed.name}
    return out
