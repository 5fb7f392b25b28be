"""Byzantine clients: a fixed, seeded subset of clients that send poisoned weights or train on flipped labels."""

from __future__ import annotations

import numpy as np
import torch


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """round(fraction * K) clients, drawn once from the seed; they stay malicious for the whole run."""
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 7])
    return frozenset(rng.choice(num_clients, size=count, replace=False).tolist())


def flipped_labels(num_classes: int) -> torch.Tensor:
    """The label map of a label-flipping client: class c is trained as class (C - 1 - c)."""
    return torch.arange(num_classes - 1, -1, -1)


def sign_flip(global_params: torch.Tensor, params: torch.Tensor, scale: float) -> torch.Tensor:
    """Send w - scale * (w_k - w): the honest update reversed and scaled."""
    return global_params - scale * (params - global_params)


def gaussian(global_params: torch.Tensor, scale: float, seed: int, round_: int, client: int) -> torch.Tensor:
    """Send random weights ~ N(0, scale^2), drawn from (seed, round, client)."""
    state = np.random.SeedSequence([seed, round_, client, 7]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> 1))
    noise = torch.randn(global_params.shape, generator=generator, dtype=global_params.dtype)
    return (noise * scale).to(global_params.device)


def poison(kind: str, global_params: torch.Tensor, params: torch.Tensor, scale: float, seed: int, round_: int,
           client: int) -> torch.Tensor:
    """What a malicious client sends instead of its trained weights (label_flip sends them unchanged)."""
    if kind == "sign_flip":
        return sign_flip(global_params, params, scale)
    if kind == "gaussian":
        return gaussian(global_params, scale, seed, round_, client)
    return params
