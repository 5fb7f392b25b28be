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
