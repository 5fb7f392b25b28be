"""Checkpoints of a federated run: everything needed to continue it bit for bit, written atomically.

On disk a checkpoint is tensors and plain data only (dicts, lists, str, int, float, bool, None), read back with
torch.load(weights_only=True): a file from someone else may be refused, but nothing in it runs.

Per-client state (flexp.client_state.ClientStore) is written beside it, under client_state/<where it sits>/: each
checkpoint adds one file of the clients that changed since the previous one, and the store is written whole again
once those files outgrow COMPACT times its size, so a round writes about what its clients changed, not K models.
checkpoint.pt names the files to replay; files are never rewritten, so a crash at any point leaves a checkpoint
whose files are all there.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexp.algorithm import Algorithm, snapshot, unsaved_attributes
from flexp.client_state import ClientStore, stores_of
from flexp.config import parse_config
from flexp.fedavg import RoundRecord, ServerState
from flexp.stage import build_stages, with_stages
from flexp.strategy import make_strategy, tensors

log = logging.getLogger("flexp")
FILE = "checkpoint.pt"
STATE_DIR = "client_state"
STORE_KEY = "flexp_client_store"  # a ClientStore's place in a saved state_dict: {STORE_KEY: [its files, in order]}
COMPACT = 4
FORMAT = "flexp-checkpoint"
VERSION = 2
SCALARS = (str, int, float, bool, type(None))
FIELDS: dict[str, type | tuple[type, ...]] = {"round": int, "params": torch.Tensor, "strategy": dict,
                                              "history": list, "run_id": (str, type(None)), "config": dict,
                                              "rng": dict}


class CheckpointError(ValueError):
    """A file that is not a checkpoint this flexp can continue; the message is one line."""


@dataclass
class Checkpoint:
    """The server after `state.round` rounds, the RNGs, the MLflow run id and the config the run was started with."""

    state: ServerState
    run_id: str | None
    config: Mapping[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)


def rng_states() -> dict[str, torch.Tensor]:
    """The global torch RNG state. NumPy's and Python's global RNGs are not kept: flexp draws nothing from them
    (sampling, batch orders and attacks use generators seeded by seed, round and client)."""
    return {"torch": torch.get_rng_state()}


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put back what rng_states() took."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])


def is_plain(value: Any) -> bool:
    """True for tensors and plain data all the way down: what torch.load(weights_only=True) reads back."""
    if type(value) is dict:
        return all(type(k) in (str, int) and is_plain(v) for k, v in value.items())
    if type(value) in (list, tuple):
        return all(is_plain(v) for v in value)
    return type(value) in SCALARS or isinstance(value, torch.Tensor)


def to_payload(checkpoint: Checkpoint, strategy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint as one dict of tensors and plain data, tagged with the format and its version (`strategy`: the
    algorithm's state with its stores written out, by save)."""
    state = checkpoint.state
    strategy = state.strategy.state_dict() if strategy is None else strategy
    payload = {"format": FORMAT, "version": VERSION, "round": state.round, "params": state.params,
               "strategy": strategy, "history": [asdict(r) for r in state.history],
               "run_id": checkpoint.run_id, "config": dict(checkpoint.config), "rng": dict(checkpoint.rng),
               "model_state": dict(state.model_state), "loop": dict(state.loop)}
    if not is_plain(payload):
        raise TypeError("a checkpoint holds only tensors and plain data; the strategy state or config has more")
    return payload


def from_payload(payload: Any, directory: Path | None = None) -> Checkpoint:
    """The Checkpoint a loaded payload describes, its strategy rebuilt from its config (its client stores read from
    `directory`); CheckpointError if none."""
    if type(payload) is not dict or payload.get("format") != FORMAT:
        raise CheckpointError(f"not a flexp checkpoint (no format={FORMAT!r} entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint format version {payload.get('version')!r}; this flexp reads {VERSION}")
    bad = [key for key, kind in FIELDS.items() if not isinstance(payload.get(key), kind)]
    if bad:
        raise CheckpointError(f"flexp checkpoint entries {bad} are missing or of the wrong type")
    try:
        history = [RoundRecord(**record) for record in payload["history"]]
        config = parse_config(payload["config"])
        strategy = with_stages(make_strategy(config.strategy, config.fl.clients, config.fl.lr, config.seed),
                               build_stages(config))
        strategy.load_state_dict(read_stores(payload["strategy"], directory))
        rng = tensors(payload["rng"], "rng", ("torch",))
        saved = payload.get("model_state", {})  # buffers and frozen parameters; absent before they were kept
        model_state = tensors(saved, "model_state", tuple(saved)) if isinstance(saved, dict) else None
        if model_state is None:
            raise ValueError("model_state is not a dict of tensors")
        if "torch" in rng and rng["torch"].dtype != torch.uint8:
            raise ValueError("rng torch state is not a uint8 tensor")
        loop = payload.get("loop", {})  # an asynchronous run's clock; absent in rounds and before there was one
        if type(loop) is not dict:
            raise ValueError("loop is not a dict")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"not a checkpoint flexp can continue ({one_line(err)})") from None
    state = ServerState(payload["round"], payload["params"], strategy, history, model_state, loop)
    return Checkpoint(state, payload["run_id"], payload["config"], rng)


class UnsavedStateWarning:
    """Warns once, when called at the first checkpoint, if the algorithm keeps tensors in its attributes that changed
    since this object was made (at the run's start) and that its state_dict() leaves out: a resume would continue
    without them, from different weights, and say nothing."""

    def __init__(self, algorithm: Algorithm | None) -> None:
        self.before = snapshot(algorithm) if algorithm is not None else None

    def __call__(self, algorithm: Algorithm) -> None:
        if self.before is None:
            return
        before, self.before = self.before, None
        attributes = unsaved_attributes(algorithm, before)
        if attributes:
            log.warning("%s keeps tensors in %s that its state_dict() does not return: a resume from this "
                        "checkpoint will not restore them and will go on from different weights (return them from "
                        "state_dict() and set them in load_state_dict())", algorithm_name(algorithm),
                        ", ".join(attributes))


def algorithm_name(algorithm: Algorithm) -> str:
    """The algorithm's class name, with the one it wraps (an attacker's inner algorithm)."""
    inner = getattr(algorithm, "inner", None)
    name = type(algorithm).__name__
    return f"{name} (around {type(inner).__name__})" if isinstance(inner, Algorithm) else name


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write directory/checkpoint.pt via a temp file, fsync and rename (a crash leaves the old one or the new one),
    after the client stores' new files; then remove store files no checkpoint names any more."""
    directory.mkdir(parents=True, exist_ok=True)
    strategy = written_stores(checkpoint.state.strategy.state_dict(), directory, checkpoint.state.round)
    path = directory / FILE
    atomic_save(to_payload(checkpoint, strategy), path)
    prune_store_files(directory, strategy)
    return path


def atomic_save(obj: Any, path: Path) -> int:
    """torch.save to `path` via a temp file, fsync and rename; the bytes written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def written_stores(strategy: dict[str, Any], directory: Path, round_: int) -> dict[str, Any]:
    """`strategy` (a state_dict) with each ClientStore replaced by {STORE_KEY: its files}, after writing the clients
    that changed since the last save as one new file (all of the store, once its files outgrow COMPACT times it)."""
    out = strategy
    for where, store in stores_of(strategy).items():
        whole = not store.files or store.file_bytes > COMPACT * store.nbytes()
        entries = {c: store.peek(c) for c in store} if whole else store.take_changes()
        if whole:
            store.take_changes()
            store.files, store.file_bytes = [], 0
        if whole or entries:
            folder = directory / STATE_DIR / where
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{'base' if whole else 'delta'}-r{round_}.pt"
            store.file_bytes += atomic_save(entries, folder / name)
            store.files.append(f"{STATE_DIR}/{where}/{name}")
        out = replaced(out, where.split("."), {STORE_KEY: list(store.files)})
    return out


def replaced(state: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of nested dicts `state` with the entry at `path` set to `value` (the rest shared, not copied)."""
    head, *rest = path
    return {**state, head: replaced(state[head], rest, value) if rest else value}


def read_stores(state: Any, directory: Path | None) -> Any:
    """A saved state_dict with each {STORE_KEY: files} read back into a ClientStore (its files replayed in order)."""
    if not isinstance(state, dict):
        return state
    if set(state) != {STORE_KEY}:
        return {k: read_stores(v, directory) for k, v in state.items()}
    files = state[STORE_KEY]
    if directory is None or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError("a client store's files cannot be found")
    store = ClientStore()
    for name in files:
        try:
            entries = torch.load(directory / name, weights_only=True, map_location="cpu")
        except OSError as err:
            raise ValueError(f"client state file {name} cannot be read ({err.strerror or err})") from None
        for client, tensor in entries.items():
            if tensor is None:
                store.pop(client, None)
            else:
                store[client] = tensor
        store.file_bytes += (directory / name).stat().st_size
    store.files = list(files)
    store.changed.clear()
    return store


def prune_store_files(directory: Path, strategy: dict[str, Any]) -> None:
    """Remove the files under client_state/ that the checkpoint just written no longer names."""
    kept = {directory / name for name in store_files(strategy)}
    for path in (directory / STATE_DIR).rglob("*") if (directory / STATE_DIR).exists() else ():
        if path.is_file() and path not in kept and path.suffix in (".pt", ".tmp"):
            path.unlink(missing_ok=True)


def store_files(state: Any) -> list[str]:
    """Every file a saved state_dict's store references name."""
    if not isinstance(state, dict):
        return []
    if set(state) == {STORE_KEY}:
        return list(state[STORE_KEY])
    return [f for value in state.values() for f in store_files(value)]


def load(directory: Path) -> Checkpoint:
    """Read directory/checkpoint.pt with weights_only=True, so nothing in the file executes, onto the CPU whatever
    device wrote it (a resumed run moves it to its own: job.on_device); CheckpointError (one line) for a file that
    holds objects, is not a flexp checkpoint or has another format version."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols; the error says enough
            payload = torch.load(directory / FILE, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refused: it is not only tensors and plain data ({refusal(err)}); nothing in it ran") \
            from None
    except Exception as err:
        raise CheckpointError(f"not a flexp checkpoint ({one_line(err)})") from None
    return from_payload(payload, directory)


def refusal(err: pickle.UnpicklingError) -> str:
    """What torch's weights_only unpickler refused, without its boilerplate or its advice to allowlist it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((line for line in lines if "nsupported" in line), lines[0] if lines else "unpickling refused")
    return line.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0].split(". Please")[0]


def one_line(err: BaseException) -> str:
    """An exception as `Type: message` on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def history_rounds(history: list[RoundRecord]) -> list[int]:
    """The rounds a history holds, in order."""
    return [r.round for r in history]
