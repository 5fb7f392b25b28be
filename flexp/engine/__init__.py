"""Engines run one round's client updates; they differ in how, never in the result."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flexp.client import LocalSpec
from flexp.config import EngineConfig
from flexp.data import Split
from flexp.engine.batched_mlp import mlp_layers


def choose_engine(name: str, model: nn.Module, device: torch.device) -> str:
    """`auto`: vectorized for MLPs (2nn, logreg) and on any GPU; threads for other models on the CPU.

    Measured on 2 CPU cores (bench/rounds.py): the batched MLP kernels beat per-client autograd steps several
    times over, while vmap over the CNN loses to two threads of per-client steps.
    """
    if name != "auto":
        return name
    return "vectorized" if device.type != "cpu" or mlp_layers(model) is not None else "threads"


def make_engine(cfg: EngineConfig, make_model: Callable[[], nn.Module], train: Split, spec: LocalSpec,
                device: torch.device, task_loss: Callable[..., torch.Tensor] = F.cross_entropy,
                clients_per_round: int | None = None):
    """Build the configured engine (after resolving `auto`: its `name` says which) for the task loss `task_loss`;
    `clients_per_round` caps the Ray engine's pool (more actors than clients would idle).

    Every engine says how a round trains its clients: `describe(algorithm)` before a round, `last_path` after one
    (an engine.path.EnginePath)."""
    name = choose_engine(cfg.name, make_model(), device)
    if name == "ray":
        from flexp.engine.ray_pool import RayEngine

        return RayEngine(make_model, train, spec, cfg.address, cfg.num_cpus, cfg.num_gpus, task_loss, device,
                         clients_per_round, cfg.actor_engine)
    if name == "vectorized":
        from flexp.engine.vectorized import VectorizedEngine

        return VectorizedEngine(make_model, train, spec, cfg.group_size, device, cfg.workers, task_loss)
    from flexp.engine.threads import ThreadEngine

    return ThreadEngine(make_model, train, spec, cfg.workers, device, task_loss)
