"""A random rotation (Konecny et al. 2016): random signs, then a normalised Walsh-Hadamard transform in blocks of a
power of two. It spreads a vector's energy evenly over its coordinates, so a per-block quantizer loses less."""

from __future__ import annotations

import torch
from torch import Tensor


def hadamard(x: Tensor) -> Tensor:
    """The orthonormal Walsh-Hadamard transform of each row of x [rows, 2^j] (its own inverse)."""
    rows, size = x.shape
    h = 1
    while h < size:
        y = x.view(rows, size // (2 * h), 2, h)
        x = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(rows, size)
        h *= 2
    return x * size ** -0.5


def signs(n: int, key: int, dtype: torch.dtype) -> Tensor:
    """n random signs (+1/-1) from the generator seeded by `key`."""
    generator = torch.Generator().manual_seed(key)
    return torch.randint(0, 2, (n,), generator=generator).to(dtype).mul_(2).sub_(1)


def rotate(x: Tensor, key: int) -> Tensor:
    """x [rows, 2^j] rotated: H D x per row, D the diagonal of signs drawn from `key`."""
    return hadamard(x * signs(x.numel(), key, x.dtype).view_as(x))


def unrotate(y: Tensor, key: int) -> Tensor:
    """The inverse of rotate: D H y per row."""
    return hadamard(y) * signs(y.numel(), key, y.dtype).view_as(y)
