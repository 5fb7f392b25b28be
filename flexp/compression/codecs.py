"""Codecs: what a client's update becomes on the wire, and what the server decodes from it.

Each codec maps a flat update x (1-D, float) to an `Encoded` message whose tensors are exactly what would be sent
(packed codes, values, indices or bitmask, scales, seeds), so its byte count is read off the message itself. Every
draw comes from the message's `key`, a function of (seed, round, client). Pure functions: no state, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexp.compression.bits import pack, packed_size, unpack
from flexp.compression.rotation import rotate, unrotate

ROUNDING, SIGNS, MASK = 1, 2, 3  # sub-streams of a message's key


@dataclass(frozen=True)
class Encoded:
    """One encoded vector as sent: its tensors (by name), the length and dtype it decodes to."""

    parts: dict[str, Tensor]
    n: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the message occupies: the sum of its tensors' sizes."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def substream(key: int, stream: int) -> int:
    """The seed of one sub-stream of a message's key."""
    return int(np.random.SeedSequence([key, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def uniform(key: int, stream: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uniform draws in [0, 1) from one sub-stream of a message's key (numpy's PCG64: a third of torch's cost)."""
    kind = np.float64 if dtype == torch.float64 else np.float32
    return torch.from_numpy(np.random.default_rng(substream(key, stream)).random(shape, dtype=kind)).to(dtype)


def key_part(key: int) -> Tensor:
    """A key as the 8 bytes a message carries so that the server can redraw what the client drew."""
    return torch.tensor([key], dtype=torch.int64)


def count(ratio: float, n: int) -> int:
    """ceil(ratio n), at least 1 (ratio n rounded first, so 0.01 * 300 is 3, not 4)."""
    return max(1, math.ceil(round(ratio * n, 9)))


@dataclass(frozen=True)
class Quantizer:
    """Stochastic uniform quantization (Konecny et al. 2016; QSGD, Alistarh et al. 2017): per block of `block`
    values, 2^bits levels from its min to its max (two scales per block), each value rounded up or down at random
    so that the decoded value is the input on average (unbiased). With `rotate`, each block is first turned by a
    random rotation (signs, then a Walsh-Hadamard transform; `block` a power of two) whose key the message carries."""

    bits: int = 8
    block: int = 1024
    rotate: bool = False
    unbiased = True

    def encode(self, x: Tensor, key: int) -> Encoded:
        n = x.numel()
        rows = -(-n // self.block)
        grid = F.pad(x, (0, rows * self.block - n)).view(rows, self.block)
        if self.rotate:
            grid = rotate(grid, substream(key, SIGNS))
        low, high = grid.amin(1), grid.amax(1)  # a third of aminmax's time over rows on the CPU
        step = (high - low) / (2 ** self.bits - 1)
        inverse = torch.where(step > 0, 1 / step, 0)[:, None]
        scaled = torch.addcmul(uniform(key, ROUNDING, grid.shape, x.dtype), grid - low[:, None], inverse)
        scaled.clamp_(max=2 ** self.bits - 1)  # >= 0 already: truncation below is the floor
        codes = scaled.to(torch.uint8 if self.bits <= 8 else torch.int32).view(-1)
        parts = {"codes": pack(codes if self.rotate else codes[:n], self.bits), "low": low, "step": step}
        return Encoded({**parts, "key": key_part(key)} if self.rotate else parts, n, x.dtype)

    def decode(self, message: Encoded) -> Tensor:
        parts, n = message.parts, message.n
        rows = parts["low"].numel()
        sent = rows * self.block if self.rotate else n
        codes = F.pad(unpack(parts["codes"], sent, self.bits).to(message.dtype), (0, rows * self.block - sent))
        grid = torch.addcmul(parts["low"][:, None], codes.view(rows, self.block), parts["step"][:, None])
        if self.rotate:
            grid = unrotate(grid, substream(int(parts["key"]), SIGNS))
        return grid.reshape(-1)[:n]


@dataclass(frozen=True)
class TopK:
    """Top-k sparsification: the ceil(ratio n) largest-magnitude values and where they sit (biased; Stich et al.
    2018 pair it with error feedback). Positions go as int32 indices or as a bitmask, whichever is smaller."""

    ratio: float = 0.01
    unbiased = False

    def encode(self, x: Tensor, key: int) -> Encoded:
        n = x.numel()
        k = count(self.ratio, n)
        magnitude = x.abs().numpy()  # numpy's introselect: a fifth of torch.topk's time on the CPU
        where = torch.from_numpy(np.sort(np.argpartition(magnitude, n - k)[n - k:]))
        if 4 * k <= packed_size(n, 1):
            return Encoded({"values": x[where], "indices": where.to(torch.int32)}, n, x.dtype)
        mask = torch.zeros(n, dtype=torch.uint8)
        mask[where] = 1
        return Encoded({"values": x[where], "mask": pack(mask, 1)}, n, x.dtype)

    def decode(self, message: Encoded) -> Tensor:
        parts, n = message.parts, message.n
        where = parts["indices"].to(torch.int64) if "indices" in parts else unpack(parts["mask"], n, 1).nonzero()[:, 0]
        out = torch.zeros(n, dtype=message.dtype)
        out[where] = parts["values"]
        return out


@dataclass(frozen=True)
class RandomMask:
    """Random sparsification (Konecny et al. 2016): each value kept with probability `ratio` by a mask the server
    redraws from the key the message carries; the kept values are scaled by 1/ratio when `scaled` (unbiased),
    and sent as they are under error feedback (which needs a contraction, not an unbiased codec)."""

    ratio: float = 0.01
    scaled: bool = True

    @property
    def unbiased(self) -> bool:
        return self.scaled

    def mask(self, n: int, key: int) -> Tensor:
        return uniform(key, MASK, (n,), torch.float32) < self.ratio

    def encode(self, x: Tensor, key: int) -> Encoded:
        return Encoded({"values": x[self.mask(x.numel(), key)], "key": key_part(key)}, x.numel(), x.dtype)

    def decode(self, message: Encoded) -> Tensor:
        out = torch.zeros(message.n, dtype=message.dtype)
        values = message.parts["values"]
        out[self.mask(message.n, int(message.parts["key"]))] = values / self.ratio if self.scaled else values
        return out


@dataclass(frozen=True)
class Sign:
    """Scaled sign compression (signSGD; with error feedback, Karimireddy et al. 2019): one bit per value and one
    scale, the mean magnitude ||x||_1 / n (biased)."""

    unbiased = False

    def encode(self, x: Tensor, key: int) -> Encoded:
        scale = x.abs().mean().reshape(1)
        return Encoded({"signs": pack((x >= 0).to(torch.uint8), 1), "scale": scale}, x.numel(), x.dtype)

    def decode(self, message: Encoded) -> Tensor:
        signs = unpack(message.parts["signs"], message.n, 1).to(message.dtype).mul_(2).sub_(1)
        return signs * message.parts["scale"]
