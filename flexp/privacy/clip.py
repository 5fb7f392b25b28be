"""Clipping maths: an update scaled into the L2 ball of radius `clip`, per client or per sample."""

from __future__ import annotations

import torch


def clip_factor(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, clip / norm) per norm (1 for a zero norm): what scales each vector into the ball of radius clip."""
    return torch.where(norms > clip, clip / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def clipped(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """(delta scaled to L2 norm at most `clip`, in float64; delta's norm before clipping)."""
    delta = delta.to(torch.float64)
    norm = torch.linalg.vector_norm(delta)
    return delta * clip_factor(norm, clip), float(norm)


def per_sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """[b] L2 norms of per-sample gradients given as {name: [b, *shape]}, over all parameters together."""
    return torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()))
