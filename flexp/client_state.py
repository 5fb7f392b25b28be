"""Per-client state off RAM: a mapping {client id: tensor} that holds at most a memory budget in RAM, spills the
least recently used entries to files, and knows which clients changed since the last checkpoint.

SCAFFOLD's c_i, error-feedback residuals and any algorithm's per-client tensors live in a `ClientStore` instead
of a dict: entries exist only for clients that took part, a million clients cost what their state costs on disk,
and a checkpoint writes only what changed (flexp.checkpoint). Without a budget (the default) every entry stays in
RAM, as a dict would. A spilled entry is read back exactly (raw bytes), so a run is bit-identical either way.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SHIPPING = threading.local()  # .active inside client_side_only()
SHIPPING.active = False


@contextmanager
def client_side_only() -> Iterator[None]:
    """Pickle algorithms without their ClientStores' entries within this block (server state stays on the server)."""
    before = getattr(SHIPPING, "active", False)
    SHIPPING.active = True
    try:
        yield
    finally:
        SHIPPING.active = before


class ClientStore(MutableMapping[int, Tensor]):
    """{client id: tensor}, at most `budget_bytes` of it in RAM (None: no bound), the rest in files under
    `directory` (a temporary one unless configured)."""

    def __init__(self, budget_bytes: int | None = None, directory: Path | None = None) -> None:
        self.budget, self.directory = budget_bytes, directory
        self.memory: OrderedDict[int, Tensor] = OrderedDict()  # least recently used first
        self.spilled: dict[int, tuple[torch.dtype, tuple[int, ...], torch.device]] = {}
        self.held = 0  # bytes in RAM
        self.changed: set[int] = set()  # clients set since the last take_changes()
        self.owned_dir: Path | None = None  # a temporary directory this store made, removed with it
        self.files: list[str] = []  # the checkpoint files that hold it, oldest first (flexp.checkpoint)
        self.file_bytes = 0  # their size in all

    def configure(self, budget_bytes: int | None, directory: Path | None) -> None:
        """Set the RAM budget and the spill directory (the job's output dir), then keep within the budget."""
        if self.spilled and directory != self.directory:
            raise ValueError("a store that already spilled cannot move its files")
        if directory is not None and directory.exists() and not self.spilled:
            for stale in directory.glob("*.bin"):  # a killed run's spill files: the checkpoint holds its state
                stale.unlink()
        self.budget, self.directory = budget_bytes, directory
        self.evict()

    def __getitem__(self, client: int) -> Tensor:
        if client in self.memory:
            self.memory.move_to_end(client)
            return self.memory[client]
        if client not in self.spilled:
            raise KeyError(client)
        value = self.read(client)
        self.put(client, value)
        return value

    def __setitem__(self, client: int, value: Tensor) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"client {client}: a ClientStore holds tensors, not {type(value).__name__}")
        self.discard(client)
        self.put(client, value)
        self.changed.add(client)

    def __delitem__(self, client: int) -> None:
        if client not in self:
            raise KeyError(client)
        self.discard(client)
        self.changed.add(client)

    def __contains__(self, client: object) -> bool:
        return client in self.memory or client in self.spilled

    def __iter__(self) -> Iterator[int]:
        return iter(sorted([*self.memory, *self.spilled]))

    def __len__(self) -> int:
        return len(self.memory) + len(self.spilled)

    def peek(self, client: int) -> Tensor:
        """A client's tensor without moving it into RAM (a checkpoint's or a copy's read of the whole store)."""
        if client in self.memory:
            return self.memory[client]
        dtype, shape, device = self.spilled[client]
        raw = torch.from_numpy(np.fromfile(self.path(client), dtype=np.uint8))
        return raw.view(dtype).reshape(shape).to(device)

    def nbytes(self) -> int:
        """Bytes of every entry, in RAM or spilled."""
        return self.held + sum(int(np.prod(shape)) * dtype.itemsize for dtype, shape, _ in self.spilled.values())

    def take_changes(self) -> dict[int, Tensor | None]:
        """{client: its tensor, or None if deleted} for every client set or deleted since the last call."""
        changes = {c: (self.peek(c) if c in self else None) for c in sorted(self.changed)}
        self.changed.clear()
        return changes

    def put(self, client: int, value: Tensor) -> None:
        self.memory[client] = value
        self.held += value.numel() * value.element_size()
        self.evict()

    def discard(self, client: int) -> None:
        if client in self.memory:
            old = self.memory.pop(client)
            self.held -= old.numel() * old.element_size()
        elif self.spilled.pop(client, None) is not None:
            self.path(client).unlink(missing_ok=True)

    def evict(self) -> None:
        """Spill the least recently used entries until RAM holds at most the budget (the newest always stays)."""
        while self.budget is not None and self.held > self.budget and len(self.memory) > 1:
            client, value = self.memory.popitem(last=False)
            self.held -= value.numel() * value.element_size()
            self.write(client, value)

    def write(self, client: int, value: Tensor) -> None:
        value.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(self.path(client))
        self.spilled[client] = (value.dtype, tuple(value.shape), value.device)

    def read(self, client: int) -> Tensor:
        value = self.peek(client)
        del self.spilled[client]
        self.path(client).unlink()
        return value

    def path(self, client: int) -> Path:
        return self.spill_dir() / f"{client}.bin"

    def spill_dir(self) -> Path:
        if self.directory is None:
            self.owned_dir = self.owned_dir or Path(tempfile.mkdtemp(prefix="flexp-client-state-"))
            return self.owned_dir
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory

    def __getstate__(self) -> dict[str, Any]:
        """A pickled (or deep-copied) store carries every entry, spilled ones read back, and no files; none at all
        inside client_side_only() (an algorithm sent to workers, whose client hooks do not read it)."""
        if getattr(SHIPPING, "active", False):
            return {"budget": self.budget, "entries": {}}
        return {"budget": self.budget, "entries": {c: self.peek(c) for c in self}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["budget"], None)
        self.update(state["entries"])
        self.changed.clear()

    def __del__(self) -> None:
        if getattr(self, "owned_dir", None) is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


def state_to(state: Any, device: torch.device | str) -> Any:
    """A state_dict with every tensor, stores' entries too, on `device` (a checkpoint read on the CPU, resumed on a
    GPU)."""
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, ClientStore):
        moved = ClientStore(state.budget, state.directory)
        for client in state:
            moved[client] = state.peek(client).to(device)
        moved.files, moved.file_bytes, moved.changed = state.files, state.file_bytes, set(state.changed)
        return moved
    if isinstance(state, dict):
        return {k: state_to(v, device) for k, v in state.items()}
    return state


def plain(state: Any) -> Any:
    """A state_dict with each ClientStore as a dict {client: tensor}: what torch.save(weights_only loads) can hold
    (flexp's checkpoints write stores incrementally instead)."""
    if isinstance(state, ClientStore):
        return {c: state.peek(c) for c in state}
    if isinstance(state, dict):
        return {k: plain(v) for k, v in state.items()}
    return state


def stores_of(state: Any, path: str = "") -> dict[str, ClientStore]:
    """Every ClientStore in a state_dict (nested dicts), by where it sits: 'c_i', 'stages.compression.residual'."""
    if isinstance(state, ClientStore):
        return {path: state}
    if isinstance(state, dict):
        found: dict[str, ClientStore] = {}
        for key, value in state.items():
            found.update(stores_of(value, f"{path}.{key}" if path else str(key)))
        return found
    return {}


def configure_stores(algorithm: Any, budget_bytes: int | None, directory: Path | None) -> None:
    """Give every ClientStore in the algorithm's state its RAM budget and a spill directory under `directory`
    (None: a temporary one)."""
    for name, store in stores_of(algorithm.state_dict()).items():
        store.configure(budget_bytes, None if directory is None else directory / name)
