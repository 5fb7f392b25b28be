"""The compression stage: each client's update (its weights minus those it started from) is encoded before it is
sent, and the server takes the decoded update; optionally the broadcast weights are quantized too.

With `error_feedback` (Stich et al. 2018; Karimireddy et al. 2019) a client adds what its earlier messages left
out (its residual) to its update before encoding, and keeps what this message leaves out: sent + new residual =
update + old residual. Residuals are per-client state, checkpointed with the stage. Every draw is keyed by
(seed, round, client), and the codec runs on the server's side of the engine, so it is equal on every engine.
The reply carries the encoded message's size (`ClientResult.sent_bytes`), which the round counts as bytes up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from torch import Tensor

from flexp.algorithm import client_tensors
from flexp.client import ClientResult
from flexp.client_state import ClientStore
from flexp.component import Invalid, integer, number
from flexp.compression.codecs import Quantizer, RandomMask, Sign, TopK
from flexp.rng import client_key
from flexp.stage import Plan, Stage

DOWNLOAD = 0xD0  # the broadcast's stream: (seed, round, DOWNLOAD)


def checked_bits(argument: str, value: Any) -> int:
    """A bit width, 1..16."""
    bits = integer(argument, value)
    if not 1 <= bits <= 16:
        raise Invalid(argument, value, "must be from 1 to 16")
    return bits


def checked_ratio(value: Any) -> float:
    """A kept fraction in (0, 1]."""
    return number("ratio", value, low=0.0, high=1.0, strict_low=True)


def checked_block(value: Any, rotate: bool) -> int:
    """Values per quantization block (a power of two when rotating)."""
    block = integer("block", value, low=1)
    if rotate and block & (block - 1):
        raise Invalid("block", value, "must be a power of two with rotate=true (the Hadamard transform's size)")
    return block


class Compression(Stage):
    """Encode every usable reply's update with `codec`; decode it as the server receives it."""

    def __init__(self, codec: Any, plan: Plan, error_feedback: bool = False, download_bits: int | None = None,
                 block: int = 1024) -> None:
        if not isinstance(error_feedback, bool):
            raise Invalid("error_feedback", error_feedback, "must be true or false")
        self.codec, self.plan, self.error_feedback = codec, plan, error_feedback
        self.download = None if download_bits is None else Quantizer(checked_bits("download_bits", download_bits),
                                                                     block)
        self.residual = ClientStore()  # per client, once it sent a message; off RAM past checkpoint.client_state_mb

    def broadcast(self, round_: int, params: Tensor) -> tuple[Tensor, int] | None:
        """The weights the round's clients start from and the bytes each downloads: quantized with
        `download_bits` (one draw per round, shared by every client: it is a broadcast), else None."""
        if self.download is None:
            return None
        key = int(np.random.SeedSequence([self.plan.seed, round_, DOWNLOAD]).generate_state(1, np.uint64)[0] >> 1)
        message = self.download.encode(params.detach().cpu(), key)
        return self.download.decode(message).to(params.device), message.nbytes

    def client(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """The reply with its update (in the model's dtype, as a device would send it, even after a float64 stage)
        encoded and decoded; the message's size in `sent_bytes`."""
        update = (reply.params - params).detach().cpu().to(params.dtype)
        owed = self.residual.get(reply.client)
        if owed is not None:
            update = update + owed
        message = self.codec.encode(update, client_key(self.plan.seed, round_, reply.client))
        decoded = self.codec.decode(message)
        if self.error_feedback:
            self.residual[reply.client] = update - decoded
        return replace(reply, params=params + decoded.to(params.device), sent_bytes=message.nbytes)

    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual} if self.error_feedback else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.error_feedback:
            return super().load_state_dict(state)
        unknown = sorted(set(state) - {"residual"})
        if unknown:
            raise ValueError(f"{type(self).__name__} state has unknown entries {unknown}")
        self.residual = client_tensors(state, "residual", type(self).__name__, self.plan.clients)


class QuantizeUpdates(Compression):
    """compression=quantize: stochastic uniform quantization to `bits` bits (codecs.Quantizer)."""

    def __init__(self, plan: Plan, bits: int = 8, block: int = 1024, rotate: bool = False,
                 error_feedback: bool = False, download_bits: int | None = None) -> None:
        if not isinstance(rotate, bool):
            raise Invalid("rotate", rotate, "must be true or false")
        codec = Quantizer(checked_bits("bits", bits), checked_block(block, rotate), rotate)
        super().__init__(codec, plan, error_feedback, download_bits, codec.block)


class TopKUpdates(Compression):
    """compression=topk: the `ratio` largest-magnitude values of each update (codecs.TopK)."""

    def __init__(self, plan: Plan, ratio: float = 0.01, error_feedback: bool = True,
                 download_bits: int | None = None) -> None:
        super().__init__(TopK(checked_ratio(ratio)), plan, error_feedback, download_bits)


class RandomMaskUpdates(Compression):
    """compression=random_mask: a random `ratio` of each update's values, unbiased unless under error feedback
    (codecs.RandomMask)."""

    def __init__(self, plan: Plan, ratio: float = 0.01, error_feedback: bool = False,
                 download_bits: int | None = None) -> None:
        super().__init__(RandomMask(checked_ratio(ratio), scaled=not error_feedback), plan, error_feedback,
                         download_bits)


class SignUpdates(Compression):
    """compression=sign: one bit per value and the mean magnitude (codecs.Sign)."""

    def __init__(self, plan: Plan, error_feedback: bool = True, download_bits: int | None = None) -> None:
        super().__init__(Sign(), plan, error_feedback, download_bits)


class QuantizeDownload(Compression):
    """compression=download: only the broadcast is quantized (to `download_bits` bits); updates go up in full."""

    def __init__(self, plan: Plan, download_bits: int = 8) -> None:
        super().__init__(None, plan, False, checked_bits("download_bits", download_bits))

    def client(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        return reply
