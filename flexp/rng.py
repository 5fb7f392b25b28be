"""Per-client randomness: models whose forward draws random numbers (Dropout) run each client under its own seed.

torch has one global generator per device, shared by all threads, so the threads engine trains such a model one
client at a time, each from the seed of (seed, round, client), and puts the global state back afterwards: the
result does not depend on engine.workers, and the server's own random stream is untouched. Models that draw
nothing run exactly as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

LOCK = threading.Lock()  # held while a client trains on the (process-wide) global generator
STREAM = 0x5EED  # the client's random stream is distinct from its batch order's (the same seed, another stream)


def devices_of(device: torch.device) -> list[torch.device]:
    """The accelerator devices whose generators fork_rng must fork for `device` (none on the CPU)."""
    return [device] if device.type == "cuda" else []


def draws_random(module: nn.Module, sample: torch.Tensor) -> bool:
    """Whether a training-mode forward of `module` on `sample` draws from torch's global generator (Dropout does);
    the probe leaves the module, its buffers and the generators as they were."""
    device = sample.device
    with torch.random.fork_rng(devices=devices_of(device)), torch.no_grad():
        before = generator_states(device)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        was_training = module.training
        module.train()
        try:
            module(sample)
        except Exception:  # noqa: BLE001 - a model that cannot run fails in its clients, where it is reported
            return False
        finally:
            module.load_state_dict(state)
            module.train(was_training)
        after = generator_states(device)
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def generator_states(device: torch.device) -> list[torch.Tensor]:
    """The global generator states that a forward on `device` may advance."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def stream_seed(seeds: Sequence[int]) -> int:
    """The seed of the random stream for a client (its task seed) or a lockstep group (its clients' seeds)."""
    return int(np.random.SeedSequence([*seeds, STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def seeded(seeds: Sequence[int], device: torch.device) -> Iterator[None]:
    """Run a block alone on the global generators, seeded from `seeds`, restoring their state afterwards."""
    with LOCK, torch.random.fork_rng(devices=devices_of(device)):
        torch.manual_seed(stream_seed(seeds))
        yield


M32 = 0xFFFFFFFF
TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))  # Wellons' triple32: a bijection on 32 bits


def client_key(seed: int, round_: int, client: int) -> int:
    """The key of one client's random stream in one round (`Algorithm.random`): a function of (seed, round, client)
    alone, so every engine and worker count draws the same numbers."""
    return int(np.random.SeedSequence([seed, round_, client, STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


def mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2^32 for int64 tensors below 2^32, in two 16-bit halves so no product leaves int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & M32


def triple32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash that is a bijection (xorshift-multiply rounds), on int64 tensors below 2^32."""
    for shift, constant in TRIPLE32:
        h = mul32(h ^ (h >> shift), constant)
    return h ^ (h >> 14)


def uniform_bits(key: torch.Tensor, counter: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per `index` from (key, counter): counter-based, so it needs no generator state and runs under
    vmap with a key and counter per client; distinct indices of one stream never collide."""
    stream = triple32(triple32(triple32(key & M32) ^ ((key >> 32) & M32)) ^ (counter & M32))
    return triple32(triple32(index & M32) ^ stream)


def normal(key: torch.Tensor, counter: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`numel` standard normal draws (Box-Muller on counter-based uniforms) for the stream `key` at step `counter`:
    the same numbers on every engine, worker count and device. For simulation, not cryptographic use."""
    index = torch.arange(2 * numel, device=key.device, dtype=torch.int64)
    bits = uniform_bits(key.to(torch.int64), counter.to(torch.int64), index).to(torch.float64)
    u = (bits + 0.5) / 2.0 ** 32
    u1, u2 = u[:numel], u[numel:]
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)
