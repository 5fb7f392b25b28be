"""Bit packing: b-bit codes (1 <= b <= 16) stored in exactly ceil(n b / 8) bytes, and back."""

from __future__ import annotations

import torch
from torch import Tensor

WHOLE = {1: 8, 2: 4, 4: 2}  # codes per byte where b divides 8


def packed_size(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits occupy."""
    return -(-n * bits // 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes in [0, 2^bits) (any integer dtype) as a uint8 tensor of packed_size(n, bits) bytes."""
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 16:
        return codes.to(torch.int32).to(torch.int16).view(torch.uint8)
    if bits in WHOLE:
        per = WHOLE[bits]
        padded = torch.zeros(-(-n // per) * per, dtype=torch.uint8)
        padded[:n] = codes
        out = padded[0::per].clone()
        for j in range(1, per):
            out |= padded[j::per] << (j * bits)
        return out
    planes = (codes.to(torch.int32).unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1
    return pack(planes.reshape(-1), 1)


def unpack(data: Tensor, n: int, bits: int) -> Tensor:
    """The n codes `pack` stored in `data`: uint8 up to 8 bits, int64 above."""
    if bits == 8:
        return data[:n]
    if bits == 16:
        return data.view(torch.int16).to(torch.int64) & 0xFFFF
    if bits in WHOLE:
        mask = (1 << bits) - 1
        return torch.stack([(data >> shift) & mask for shift in range(0, 8, bits)], 1).reshape(-1)[:n]
    planes = unpack(data, n * bits, 1).view(n, bits)
    return (planes << torch.arange(bits, dtype=torch.int64)).sum(1)
