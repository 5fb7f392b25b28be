"""Local DP-SGD (Abadi et al. 2016) in every client: sample-level differential privacy around any algorithm.

Each local step takes per-sample gradients (torch.func: vmap of grad over the batch), clips each to L2 norm `clip`,
sums them, adds Gaussian noise of std `noise_multiplier * clip` drawn from the client's own stream (seed, round,
client) and divides by the batch size. The batches are the client's shuffled batches, as in plain local SGD; the
accountant treats each step as Poisson sampling at rate B / n_k, the approximation Opacus and TF Privacy make.
Epsilon is per client (its own steps so far); the round logs the largest. The client's training loss is withheld.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from flexp.algorithm import Algorithm, Batch, Params, hook_owner, overrides
from flexp.client import ClientResult
from flexp.component import Invalid
from flexp.config import ConfigError
from flexp.privacy import accountant, checks
from flexp.privacy import accountant as accountant_module
from flexp.privacy.clip import clip_factor, per_sample_norms
from flexp.rng import normal
from flexp.stage import Plan, Stage

COUNTER = 1 << 31  # DP-SGD's draws use counters from 2^31: an algorithm's own draws from the same key start at 0


class DPSGD(Stage):
    """Per-sample clipping and noise inside local training; per-client accounting on the server."""

    random = True

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                 accountant: str = "rdp", target_epsilon: float | None = None, max_epsilon: float | str | None = None,
                 plan: Plan | None = None) -> None:
        accountant_module.require("privacy", "dp_sgd")
        if target_epsilon is not None:
            raise Invalid("target_epsilon", target_epsilon, "calibrates privacy=dp_fedavg; privacy=dp_sgd takes "
                                                            "privacy.noise_multiplier")
        self.plan = plan or Plan(clients=1, per_round=1, sampling="fixed", rounds=1, seed=0)
        self.clip = checks.clip_norm(clip)
        given = checks.noise_multiplier(noise_multiplier)
        self.noise_multiplier = 1.0 if given is None else given
        self.delta, self.accountant = checks.delta(delta), checks.accountant(accountant)
        self.max_epsilon = checks.epsilon_value("max_epsilon", max_epsilon)
        self.last: dict[int, int] = {}  # client -> the steps of its last round (what one more round adds)
        self.steps: dict[int, int] = {}  # client -> local steps taken so far
        self.sizes: dict[int, int] = {}  # client -> its n_k when it last trained
        self.worst = 0.0  # the largest per-client epsilon so far

    def check(self, model: nn.Module, algorithm: Algorithm) -> None:
        """Per-sample gradients need a model without buffers (BatchNorm mixes samples), and an algorithm whose
        gradients come from its `batch` and `loss` hooks (one with its own `gradient` hook would be bypassed)."""
        buffers = [name for name, _ in model.named_buffers()]
        if buffers:
            raise ConfigError("privacy", "dp_sgd", f"per-sample gradients need a model without buffers; this one "
                                                   f"has {', '.join(buffers[:3])} (BatchNorm mixes samples)")
        if overrides(algorithm, "gradient"):
            raise ConfigError("privacy", "dp_sgd", f"clips per-sample gradients of the strategy's loss hook, but "
                                                   f"{type(hook_owner(algorithm, 'gradient')).__name__} computes its "
                                                   "own gradients (the gradient hook), which DP-SGD would bypass")

    def client_state(self, message: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"random": message["random"], "dp_step": torch.tensor(COUNTER, dtype=torch.int64)}

    def gradient(self, inner: Algorithm, batch: Batch, params: Params,
                 cstate: dict[str, Any]) -> tuple[Params, Tensor, dict[str, Any]]:
        """Clipped per-sample gradients of inner's loss, summed, noised and divided by the batch size."""
        def one(p: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            xb, yb = inner.batch(x.unsqueeze(0), y.unsqueeze(0), cstate)
            task = batch.task_loss(batch.forward(p, xb), yb)
            return inner.loss(task, p, cstate), task

        per_sample, tasks = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            params, batch.x, batch.y)  # Dropout: each sample its own mask, from the client's seeded generator
        weights = clip_factor(per_sample_norms(per_sample), self.clip) * batch.mask
        sizes = [p.numel() for p in params.values()]
        dtype = next(iter(params.values())).dtype
        noise = normal(cstate["random"], cstate["dp_step"], sum(sizes), dtype) * (self.noise_multiplier * self.clip)
        count = batch.mask.sum().clamp_min(1)
        grads = {}
        for (name, g), part in zip(per_sample.items(), noise.split(sizes)):
            summed = torch.tensordot(weights, g, dims=1)
            grads[name] = (summed + part.view(summed.shape)) / count
        return grads, batch.mean(tasks.detach()), {**cstate, "dp_step": cstate["dp_step"] + 1}

    def client(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """The reply without its training loss (computed on private samples, not privatised)."""
        return replace(reply, loss=math.nan)

    def server(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> list[ClientResult]:
        """Count each client's steps and update the largest epsilon."""
        for reply in replies:
            self.steps[reply.client] = self.steps.get(reply.client, 0) + reply.steps
            self.last[reply.client] = reply.steps
            self.sizes[reply.client] = reply.num_samples
            self.worst = max(self.worst, self.client_epsilon(reply.client))
        return list(replies)

    def client_epsilon(self, client: int, more: int = 0) -> float:
        """Epsilon a client has spent (after `more` further steps): its steps, each a subsampled Gaussian at rate
        B / n_k."""
        n = self.sizes[client]
        batch = min(self.plan.batch_size or n, n)
        sampling = accountant.Sampling("poisson", n, batch)
        steps = self.steps[client] + more
        return accountant.epsilon(self.noise_multiplier, sampling, steps, self.delta, self.accountant)

    def halt(self, round_: int) -> str | None:
        """Stop before a round in which a client that trained before would exceed max_epsilon by training as much
        as it did last time (clients yet to train are not foreseen: their first round is bounded by the noise)."""
        if self.max_epsilon is None or not self.steps:
            return None
        worst = max(self.client_epsilon(c, self.last[c]) for c in self.worst_clients())
        if worst <= self.max_epsilon:
            return None
        return (f"privacy budget: round {round_} could spend epsilon {worst:.3g} > privacy.max_epsilon="
                f"{self.max_epsilon:g} for a client; stopped after round {round_ - 1}")

    def worst_clients(self) -> list[int]:
        """For each (n_k, steps of its last round), the client with the most steps so far: the others spend less."""
        best: dict[tuple[int, int], int] = {}
        for client, steps in self.steps.items():
            key = (self.sizes[client], self.last[client])
            if key not in best or steps > self.steps[best[key]]:
                best[key] = client
        return list(best.values())

    def round_metrics(self, round_: int) -> dict[str, float]:
        return {"epsilon": self.worst}

    def run_params(self) -> dict[str, Any]:
        return {"mechanism": "gaussian (local DP-SGD, sample level, per client)",
                "noise_multiplier_used": self.noise_multiplier, "delta_used": self.delta,
                "sampling_accounted": "poisson at rate B / n_k per local step", "accountant_used": self.accountant}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps), "sizes": dict(self.sizes), "last": dict(self.last), "worst": self.worst}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"steps", "sizes", "last", "worst"})
        if unknown:
            raise ValueError(f"dp_sgd state has unknown entries {unknown}")
        self.steps = {int(k): int(v) for k, v in state.get("steps", {}).items()}
        self.sizes = {int(k): int(v) for k, v in state.get("sizes", {}).items()}
        self.last = {int(k): int(v) for k, v in state.get("last", {}).items()}
        self.worst = float(state.get("worst", 0.0))
