"""The algorithm interface: what the server sends each client, what a client does per local step, what it sends
back, and how the server turns the round's replies into the next global model. Its defaults are FedAvg.

An algorithm is one subclass overriding what it changes. The server side is plain Python on flat parameter
vectors, called once per round. The client side is written for ONE client as pure functions on dicts of tensors
(parameter name -> tensor, as `named_parameters()` gives them): the threads and Ray engines call them per client
with autograd, the vectorized engine `vmap`s them over the round's clients, so one definition runs everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flexp.aggregate import fedavg
from flexp.client import ClientResult
from flexp.client_state import ClientStore

Params = dict[str, Tensor]
TaskLoss = Callable[..., Tensor]  # torch's loss convention: loss(output, target, reduction="mean" | "none")
CLIENT_HOOKS = ("client_init", "batch", "loss", "step", "client_final", "gradient")
Forward = Callable[[dict[str, Tensor], Tensor], Tensor]  # forward(params, x): the model as a function of its weights


@dataclass(frozen=True)
class Batch:
    """One local step's batch as the `gradient` hook sees it: inputs, targets, which rows are real (1; padding rows
    of the vectorized engine are 0), the model's functional forward and the task loss."""

    x: Tensor
    y: Tensor
    mask: Tensor
    forward: Forward
    task_loss: TaskLoss

    def mean(self, losses: Tensor) -> Tensor:
        """The mean of per-sample `losses` over the real rows."""
        return (losses * self.mask).sum() / self.mask.sum().clamp_min(1)


@dataclass(frozen=True)
class StepTerms:
    """What an algorithm's local step adds to plain SGD on the mean task loss, declared so hand kernels can run it:
    w <- w - lr (g + proximal (w - w_start) + message[correction]), on the labels message[label_map][y]."""

    proximal: float = 0.0
    correction: str | None = None  # a message key: a flat [P] tensor added to every step's gradient
    label_map: str | None = None  # a message key: a [classes] tensor mapping each label to the one trained on


class RoundHooks:
    """What an algorithm and a round stage (flexp.stage) can tell the round besides their work: per-round metrics,
    a reason to stop, params fixed at the start, and their state for checkpoints."""

    def round_metrics(self, round_: int) -> dict[str, float]:
        """Metrics of the round just aggregated, logged with the round's own (e.g. epsilon spent)."""
        return {}

    def halt(self, round_: int) -> str | None:
        """A reason to end the run before `round_` (e.g. the privacy budget it would exceed); None to go on."""
        return None

    def run_params(self) -> dict[str, Any]:
        """Values fixed at the start that the config does not show (a calibrated noise multiplier), logged as params."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only, so checkpoints load with weights_only=True."""
        return {}


class Algorithm(RoundHooks):
    """FedAvg (McMahan et al. 2017): plain local SGD on the task loss, the n_k-weighted mean of the weights.

    Server side: `message` (what a sampled client receives besides the weights), `receive` (each reply as it
    arrives), `aggregate` (the next global weights, told the round number), `broadcast` and `upload_bytes` (what
    the weights cost on the wire each way), `state_dict`/`load_state_dict`
    (tensors and plain data only, so checkpoints load with weights_only=True).
    Client side: `client_init` (the client's state from the weights and its message), `batch` (what it trains
    on), `loss` (added to the task loss), `step` (one update from the gradients), `client_final` (extra tensors
    for the reply), `gradient` (a step's gradients from the batch and a functional forward of the model: override it
    for per-sample gradients or a loss on the model's outputs). Client hooks must not read server state: on Ray
    they run on a copy of the algorithm. With `random = True` each client's message holds "random", the key of its
    own stream for (seed, round, client): draw with flexp.rng.normal(key, counter, n), the counter kept in the
    client state, and every engine and worker count draws the same numbers.
    Per round: `round_metrics` (logged beside the round's), `halt` (a reason to end the run before a round).
    """

    random = False  # clients get message["random"], their stream's key (flexp.rng.client_key)
    mean_aggregate = True  # aggregate depends on the replies only through their n_k-weighted mean of weights
    empty_rounds = False  # aggregate is called for a round without usable replies too (a DP mechanism's noise)
    buffer_size: int | None = None  # set: asynchronous (flexp.asynchronous), a server step every buffer_size replies

    def message(self, client: int, round_: int, params: Tensor) -> dict[str, Tensor]:
        """Tensors a sampled client receives besides the global weights (same keys and shapes for every client)."""
        return {}

    def receive(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """A client's reply as the server takes it (attackers rewrite it here)."""
        return reply

    def aggregate(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> Tensor:
        """The next global weights from the current ones and the round's usable replies."""
        return fedavg([r.params for r in replies], [r.num_samples for r in replies])

    def broadcast(self, round_: int, params: Tensor) -> tuple[Tensor, int]:
        """(the weights the round's clients start from, the bytes each downloads for them): the global weights in
        full, unless a stage encodes the broadcast."""
        return params, tensor_bytes([params])

    def upload_bytes(self, reply: ClientResult) -> int:
        """Bytes of a client's reply on the wire: its weights as sent, its extra tensors and its buffers. Override to
        add what a deployment's client would send but the simulation computes on the server (SCAFFOLD's c_i delta)."""
        weights = reply.sent_bytes if reply.sent_bytes is not None else tensor_bytes([reply.params])
        return weights + tensor_bytes(reply.extra.values()) + tensor_bytes(reply.buffers.values())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors(state, type(self).__name__, ())

    def client_init(self, params: Params, message: Mapping[str, Tensor]) -> dict[str, Any]:
        """The client's state before its first step; `params` are its start weights, never changed in place."""
        return dict(message)

    def batch(self, x: Tensor, y: Tensor, cstate: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The inputs and targets the client trains on for one batch."""
        return x, y

    def loss(self, task_loss: Tensor, params: Params, cstate: Mapping[str, Any]) -> Tensor:
        """The loss the client differentiates: the task loss plus any term of the algorithm's."""
        return task_loss

    def step(self, params: Params, grads: Params, cstate: dict[str, Any], lr: float) -> tuple[Params, dict[str, Any]]:
        """One local update: plain SGD, w <- w - lr g. Returns new tensors (the engine keeps the old ones)."""
        return {name: p.add(grads[name], alpha=-lr) for name, p in params.items()}, cstate

    def client_final(self, start: Params, params: Params, cstate: Mapping[str, Any]) -> dict[str, Tensor]:
        """Extra tensors for the reply (`ClientResult.extra`), besides weights, n_k, loss and step count."""
        return {}

    def step_terms(self) -> StepTerms | None:
        """This class's client side as plain SGD plus StepTerms (None: something else), so hand kernels run it without
        knowing the class. Declare it beside the hooks it describes: it holds only for the hooks defined in the
        declaring class and its bases (flexp.algorithm.step_terms checks that)."""
        return StepTerms()

    def gradient(self, batch: Batch, params: Params, cstate: dict[str, Any]) -> tuple[Params, Tensor, dict[str, Any]]:
        """(the gradients one local step follows, its task loss, the client state): by default those of `loss` on
        the batch's mean task loss (engines compute that faster themselves unless this hook is overridden)."""
        def objective(p: Params) -> tuple[Tensor, Tensor]:
            x, y = self.batch(batch.x, batch.y, cstate)
            task = batch.mean(batch.task_loss(batch.forward(p, x), y, reduction="none"))
            return self.loss(task, p, cstate), task

        grads, task = torch.func.grad(objective, has_aux=True)(params)
        return grads, task.detach(), cstate


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes the tensors occupy (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def client_code(algorithm: Algorithm) -> tuple[Callable, ...]:
    """The functions behind an algorithm's client hooks: what a hand kernel must implement exactly to run it."""
    return tuple(getattr(getattr(algorithm, name), "__func__", getattr(algorithm, name)) for name in CLIENT_HOOKS)


def step_terms(algorithm: Algorithm) -> StepTerms | None:
    """`algorithm.step_terms()` where it covers every client hook the algorithm runs (each defined in the class that
    declares step_terms of the object the hook is bound to, or in one of its bases); None otherwise, so a subclass
    that overrides a hook without declaring its terms runs the generic path."""
    for hook in CLIENT_HOOKS:
        owner, function = hook_owner(algorithm, hook), getattr(getattr(algorithm, hook), "__func__", None)
        if function is None:
            return None
        declarer = next(c for c in type(owner).__mro__ if "step_terms" in vars(c))
        if not any(function is vars(c).get(name) for c in declarer.__mro__ for name in (hook, function.__name__)):
            return None
    return algorithm.step_terms()


def overrides(algorithm: Algorithm, hook: str) -> bool:
    """Whether the algorithm's `hook` (a client hook, possibly passed through a wrapper) is not the interface's own."""
    return getattr(getattr(algorithm, hook), "__func__", None) is not getattr(Algorithm, hook)


def hook_owner(algorithm: Algorithm, name: str) -> Any:
    """The object whose `name` hook runs (a wrapper passes client hooks through to the algorithm it wraps)."""
    return getattr(getattr(algorithm, name), "__self__", algorithm)


def unflatten(flat: Tensor, like: Params) -> Params:
    """A flat vector as views shaped like `like`'s tensors, in its order (the layout of the flat weights)."""
    parts = flat.split([p.numel() for p in like.values()])
    return {name: part.view(p.shape) for (name, p), part in zip(like.items(), parts)}


def client_tensors(state: Mapping[str, Any], key: str, owner: str, num_clients: int) -> ClientStore:
    """A loaded per-client store (`state[key]`: {client id: tensor}, ids 0..num_clients-1) as a ClientStore (the
    one given, when it is one: its entries stay where they are); else ValueError."""
    store = state.get(key, {})
    if not isinstance(store, Mapping) or not all(type(k) is int and 0 <= k < num_clients for k in store):
        raise ValueError(f"{owner} state {key} must map client ids 0..{num_clients - 1} to tensors")
    if isinstance(store, ClientStore):
        return store
    out = ClientStore()
    out.update(tensors(store, f"{owner} {key}", list(store)))
    out.changed.clear()
    return out


def tensors(state: Mapping[str, Any], owner: str, keys: Sequence[str]) -> dict[str, Tensor]:
    """The tensors in a loaded state_dict, each of `keys` optional; anything else is refused (ValueError)."""
    unknown = sorted(str(k) for k in state if k not in keys)
    if unknown:
        raise ValueError(f"{owner} state has unknown entries {unknown}")
    wrong = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if wrong:
        raise ValueError(f"{owner} state entries {wrong} are not tensors")
    return dict(state)


def held_tensors(algorithm: Algorithm, depth: int = 4) -> dict[str, Tensor]:
    """Every tensor among the algorithm's attributes, by where it sits: 'c', 'velocity[3]', 'inner.m' (in dicts,
    lists, tuples, modules and wrapped algorithms, `depth` levels down)."""
    found: dict[str, Tensor] = {}

    def visit(value: Any, path: str, left: int) -> None:
        if isinstance(value, Tensor):
            found[path] = value
        elif left <= 0 or isinstance(value, ClientStore):  # a store is checkpointed whole, by construction
            return
        elif isinstance(value, Algorithm):
            for name, item in vars(value).items():
                visit(item, f"{path}.{name}" if path else name, left - 1)
        elif isinstance(value, nn.Module):
            for name, item in value.state_dict(keep_vars=True).items():
                visit(item, f"{path}[{name!r}]", left - 1)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]", left - 1)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{path}[{i}]", left - 1)

    visit(algorithm, "", depth + 1)
    return found


def snapshot(algorithm: Algorithm) -> dict[str, Tensor]:
    """Detached copies of held_tensors(algorithm): what unsaved_attributes compares a later state against."""
    return {path: t.detach().clone() for path, t in held_tensors(algorithm).items()}


def unsaved_attributes(algorithm: Algorithm, before: Mapping[str, Tensor]) -> list[str]:
    """The attributes (as 'velocity', 'inner.m') holding a tensor that changed since `before` (a snapshot) and that
    state_dict() does not hold, by identity, storage or value: the state a resume would not restore. Tensors that
    never changed (hyperparameters, constant label maps) are not state and are left out."""
    saved = list(held_tensors_of(algorithm.state_dict()))
    ids = {id(t) for t in saved}
    places = {(t.data_ptr(), t.shape) for t in saved if t.numel()}
    out: list[str] = []
    for path, tensor in held_tensors(algorithm).items():
        attribute = path.split("[", 1)[0]
        if attribute in out or same(before.get(path), tensor) or id(tensor) in ids:
            continue
        if (tensor.data_ptr(), tensor.shape) in places or any(same(tensor, t) for t in saved):
            continue
        out.append(attribute)
    return out


def held_tensors_of(state: Any) -> list[Tensor]:
    """The tensors in a state_dict (in nested dicts, lists and tuples)."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, ClientStore):
        return []
    if isinstance(state, Mapping):
        return [t for v in state.values() for t in held_tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in held_tensors_of(v)]
    return []


def same(a: Tensor | None, b: Tensor) -> bool:
    """True when `a` holds `b`'s values (shape and values; `b` cast to `a`'s dtype and device)."""
    if a is None or a.shape != b.shape:
        return False
    return torch.equal(a.detach(), b.detach().to(a.device, a.dtype))
