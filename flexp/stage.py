"""The round's stages: what leaves a client passes through them, composed around any algorithm.

A stage acts on the client's side of the wire (`client`: clip, add local noise, encode; `gradient`: inside local
training, as DP-SGD's per-sample clipping), on the server's (`server`: add central noise, hand the algorithm what
it aggregates) and on the broadcast (`broadcast`: encode the weights clients download). Client sides run in the
order of the sections (privacy, then compression: clip and noise, then encode), server sides in the same order.
`Staged` wraps an algorithm in its stages the way an attacker wraps one: the round loop and the engines see one
Algorithm and name no stage. A stage is declared once, as a conf/<group>/ file
with its `_target_` class (flexp.component).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from flexp.algorithm import CLIENT_HOOKS, Algorithm, Batch, Params, RoundHooks, StepTerms, step_terms
from flexp.client import ClientResult


@dataclass(frozen=True)
class Plan:
    """What a stage may know of the run before it starts: K, the sampling (kind, expected clients per round),
    the planned rounds, the seed, and each client's local schedule (E, B)."""

    clients: int
    per_round: float  # m; with Poisson sampling the expected number, C K
    sampling: str
    rounds: int
    seed: int
    local_epochs: int = 1
    batch_size: int | None = None


class Stage(RoundHooks):
    """One stage of the round; every method's default leaves things as they are."""

    random = False  # True: its client side draws from the client's stream (message["random"])
    empty_rounds = False  # True: its server side runs for a round without replies too

    def check(self, model: nn.Module, algorithm: Algorithm) -> None:
        """Refuse (ConfigError) a model or algorithm this stage cannot work with, before any run starts."""

    def client(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """A usable reply as it leaves the client (`params`: the global weights the client started from)."""
        return reply

    def broadcast(self, round_: int, params: Tensor) -> tuple[Tensor, int] | None:
        """(the weights clients start from, the bytes each downloads) when this stage encodes the broadcast; None
        leaves the global weights as they are."""
        return None

    def server(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> list[ClientResult]:
        """The replies the algorithm aggregates (a DP stage hands it one noised mean)."""
        return list(replies)

    def client_state(self, message: Mapping[str, Tensor]) -> dict[str, Any]:
        """What this stage adds to a client's state before its first step (a stage that changes local training)."""
        return {}

    def gradient(self, inner: Algorithm, batch: Batch, params: Params,
                 cstate: dict[str, Any]) -> tuple[Params, Tensor, dict[str, Any]] | None:
        """A local step's gradients in place of the algorithm's (None: this stage leaves local training alone)."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")


def build_stages(cfg: Any) -> dict[str, Stage]:
    """The configured stages (an ExperimentConfig's `privacy`, ...), by section, each given the run's Plan."""
    from flexp.component import build

    plan = plan_of(cfg)
    return {c.section: build(c, plan=plan) for c in (cfg.privacy, cfg.compression) if c is not None}


def plan_of(cfg: Any) -> Plan:
    """The Plan of an ExperimentConfig."""
    fl = cfg.fl
    per_round = fl.fraction * fl.clients if fl.sampling == "poisson" else fl.clients_per_round
    return Plan(fl.clients, per_round, fl.sampling, fl.rounds, cfg.seed, fl.local_epochs, fl.batch_size)


def with_stages(algorithm: Algorithm, stages: Mapping[str, Stage]) -> Algorithm:
    """`algorithm` wrapped in `stages`; itself, unchanged, when there are none (today's runs, bit for bit)."""
    return Staged(algorithm, stages) if stages else algorithm


def touches_training(stage: Stage) -> bool:
    """Whether the stage replaces local training's gradients (its `gradient` is its own)."""
    return type(stage).gradient is not Stage.gradient


class Staged(Algorithm):
    """`inner` with `stages` (by section name, in order) around it. Client hooks are inner's own bound methods, so
    a kernel that implements inner implements the staged algorithm too, unless a stage changes local training."""

    def __init__(self, inner: Algorithm, stages: Mapping[str, Stage]) -> None:
        self.inner, self.stages = inner, dict(stages)
        self.trainer = next((s for s in self.stages.values() if touches_training(s)), None)
        self.random = inner.random or any(s.random for s in self.stages.values())
        self.empty_rounds = inner.empty_rounds or any(s.empty_rounds for s in self.stages.values())
        self.mean_aggregate, self.buffer_size = inner.mean_aggregate, inner.buffer_size
        if self.trainer is not None:  # what the run's log calls the client side (flexp.engine.cnn_kernel)
            self.client_side_name = f"{type(self.trainer).__name__} (around {type(inner).__name__})"
        for name in CLIENT_HOOKS:
            if self.trainer is None or name not in ("gradient", "client_init"):
                setattr(self, name, getattr(inner, name))

    def client_init(self, params: Params, message: Mapping[str, Tensor]) -> dict[str, Any]:
        return {**self.inner.client_init(params, message), **self.trainer.client_state(message)}

    def gradient(self, batch: Batch, params: Params, cstate: dict[str, Any]) -> tuple[Params, Tensor, dict[str, Any]]:
        return self.trainer.gradient(self.inner, batch, params, cstate)

    def message(self, client: int, round_: int, params: Tensor) -> dict[str, Tensor]:
        return self.inner.message(client, round_, params)

    def step_terms(self) -> StepTerms | None:
        return None if self.trainer is not None else step_terms(self.inner)

    def broadcast(self, round_: int, params: Tensor) -> tuple[Tensor, int]:
        sent = self.inner.broadcast(round_, params)
        for stage in self.stages.values():
            sent = stage.broadcast(round_, sent[0]) or sent
        return sent

    def receive(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """Failed replies pass untouched (the round leaves them out); usable ones go through each client stage, then
        to inner (an attacker's malicious clients poison what they were to send)."""
        from flexp.fedavg import failure

        if failure(reply) is None:
            for stage in self.stages.values():
                reply = stage.client(round_, params, reply)
        return self.inner.receive(round_, params, reply)

    def aggregate(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> Tensor:
        for stage in self.stages.values():
            replies = stage.server(round_, params, replies)
        return self.inner.aggregate(round_, params, replies) if replies else params

    def upload_bytes(self, reply: ClientResult) -> int:
        return self.inner.upload_bytes(reply)

    def round_metrics(self, round_: int) -> dict[str, float]:
        out = dict(self.inner.round_metrics(round_))
        for stage in self.stages.values():
            out.update(stage.round_metrics(round_))
        return out

    def halt(self, round_: int) -> str | None:
        reasons = [self.inner.halt(round_), *(s.halt(round_) for s in self.stages.values())]
        return next((r for r in reasons if r is not None), None)

    def run_params(self) -> dict[str, Any]:
        out = dict(self.inner.run_params())
        for section, stage in self.stages.items():
            out.update({f"{section}.{k}": v for k, v in stage.run_params().items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """{"algorithm": inner's state, "stages": {section: its state}}."""
        return {"algorithm": self.inner.state_dict(),
                "stages": {name: stage.state_dict() for name, stage in self.stages.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"algorithm", "stages"})
        if unknown:
            raise ValueError(f"staged algorithm state has unknown entries {unknown}")
        self.inner.load_state_dict(state.get("algorithm", {}))
        saved = state.get("stages", {})
        missing = sorted(set(self.stages) - set(saved))
        if missing:
            raise ValueError(f"the checkpoint holds no state for the stages {missing}")
        for name, stage in self.stages.items():
            stage.load_state_dict(saved[name])
