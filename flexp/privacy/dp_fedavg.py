"""DP-FedAvg (McMahan et al. 2018): user-level central differential privacy around any mean-aggregating algorithm.

Each usable reply's update (its weights minus the global ones) is clipped to L2 norm `clip` and weighted equally.
The server adds Gaussian noise of std `noise_multiplier * clip` to their sum and divides by a fixed denominator D,
the expected number of clients per round (m, or C K with Poisson sampling), so one client moves the result by at
most clip / D whatever the others do. The algorithm then aggregates that one noised mean update (FedAvg takes it
as is; FedAvgM and FedAdam apply their server optimizer to it). Epsilon comes from dp-accounting for the sampling
the run actually uses. With `noise_cohort_size` N the noise is that of a cohort of N (std noise_multiplier * clip
* D / N on the sum), and epsilon is that of a deployment sampling N clients per round at the same rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flexp.algorithm import Algorithm, hook_owner, overrides
from flexp.client import ClientResult
from flexp.component import Invalid
from flexp.config import ConfigError
from flexp.privacy import accountant, checks
from flexp.privacy import accountant as accountant_module
from flexp.privacy.clip import clipped
from flexp.stage import Plan, Stage

log = logging.getLogger("flexp")
MEAN_BASED = "fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad"
LARGE_DELTA = 1e-2  # a default delta above this (K < 66) gets a warning
NOISE_STREAM = 0xD9  # the server's noise stream: (seed, round, NOISE_STREAM)


RECLIP_SLACK = 1e-9  # the norm of a vector clipped to c, recomputed in float64, is c within n eps (n < 9e6 values)


def sampling_of(plan: Plan, cohort: int | None = None) -> accountant.Sampling:
    """The client sampling the accountant must assume: the run's own, or that of a deployment drawing `cohort`
    clients per round at the same rate."""
    size = max(int(round(plan.per_round)), 1)
    if cohort is None:
        return accountant.Sampling(plan.sampling, plan.clients, size)
    return accountant.Sampling(plan.sampling, max(int(round(cohort * plan.clients / size)), cohort), cohort)


def default_delta(clients: int) -> float:
    """K^-1.1: below 1/K, as the usual rule for user-level delta asks."""
    return float(clients) ** -1.1


def refuse_leaks(model: nn.Module, algorithm: Algorithm) -> None:
    """Refuse what DP-FedAvg cannot privatise: model buffers (BatchNorm statistics, averaged outside the algorithm),
    extra tensors clients send (SCAFFOLD's control variates), and aggregates of individual replies (median, Krum)."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError("privacy", "dp_fedavg", f"the model has buffers ({', '.join(buffers[:3])}) that clients "
                                                  "would send unprivatised; use a model without BatchNorm")
    name = type(hook_owner(algorithm, "step")).__name__
    if overrides(algorithm, "client_final"):
        raise ConfigError("strategy", name, "its clients send extra tensors (client_final) that privacy=dp_fedavg "
                                            "cannot privatise")
    if not algorithm.mean_aggregate:
        raise ConfigError("strategy", name, f"aggregates individual replies, but privacy=dp_fedavg hands it one noised "
                                            f"mean; use a mean-based strategy ({MEAN_BASED})")


class DPFedAvg(Stage):
    """Clip on the client's side, noise and a fixed denominator on the server's, accounting per round."""

    empty_rounds = True  # the noise is added every round, whoever returned

    def __init__(self, clip: float = 1.0, noise_multiplier: float | None = None,
                 target_epsilon: float | str | None = None, delta: float | None = None,
                 max_epsilon: float | str | None = None, accountant: str = "rdp", adaptive: bool = False,
                 target_quantile: float = 0.5, clip_lr: float = 0.2, clip_count_stddev: float | None = None,
                 noise_cohort_size: int | None = None, plan: Plan | None = None) -> None:
        accountant_module.require("privacy", "dp_fedavg")
        self.plan = plan or Plan(clients=1, per_round=1, sampling="fixed", rounds=1, seed=0)
        self.clip = checks.clip_norm(clip)
        self.accountant = checks.accountant(accountant)
        self.delta = checks.delta(default_delta(self.plan.clients) if delta is None else delta)
        if delta is None and self.delta > LARGE_DELTA:
            log.warning("privacy.delta defaults to K^-1.1 = %.3g for K=%d clients: a delta this large protects "
                        "little (set privacy.delta, or use more clients)", self.delta, self.plan.clients)
        self.max_epsilon = checks.epsilon_value("max_epsilon", max_epsilon)
        self.denominator = self.plan.per_round
        self.cohort = cohort_size(noise_cohort_size)
        self.sampling = sampling_of(self.plan, self.cohort)
        self.noise_multiplier = self.resolved_noise(checks.noise_multiplier(noise_multiplier),
                                                    checks.epsilon_value("target_epsilon", target_epsilon))
        self.check_accountable()
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.count_stddev = self.checked_adaptive(clip_count_stddev)
        self.update_noise = self.split_noise()
        self.rounds = 0  # mechanism applications so far: what the accountant composes
        self.below = math.nan  # adaptive clipping: the noised fraction of updates within the clip last round

    def resolved_noise(self, given: float | None, target: float | None) -> float:
        """The noise multiplier: as given, 1.0 by default, or calibrated to `target` for the planned rounds."""
        if target is None:
            return 1.0 if given is None else given
        if given is not None:
            raise Invalid("target_epsilon", target, "and privacy.noise_multiplier are both set: set one")
        if math.isinf(target):
            return 0.0
        try:
            return accountant.calibrate(target, self.sampling, self.plan.rounds, self.delta, self.accountant)
        except (accountant.Unreachable, accountant.Unsupported) as err:
            raise Invalid("target_epsilon", target, str(err)) from None

    def check_accountable(self) -> None:
        """Refuse an accountant that cannot account the run's sampling before the first round, not after it."""
        try:
            self.epsilon(1)
        except accountant.Unsupported as err:
            raise Invalid("accountant", self.accountant, str(err)) from None

    def checked_adaptive(self, count_stddev: float | None) -> float:
        """The clipped-count noise std (adaptive clipping; Andrew et al. suggest m / 20), its arguments checked."""
        if not self.adaptive:
            return 0.0
        if not 0 < self.target_quantile < 1:
            raise Invalid("target_quantile", self.target_quantile, "must be in (0, 1)")
        if not self.clip_lr > 0:
            raise Invalid("clip_lr", self.clip_lr, "must be > 0")
        stddev = self.denominator / 20 if count_stddev is None else count_stddev
        if not stddev > 0:
            raise Invalid("clip_count_stddev", count_stddev, "must be > 0")
        return float(stddev)

    def split_noise(self) -> float:
        """The noise multiplier of the update sum: all of it, or with adaptive clipping what the count leaves."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        try:
            return accountant.update_noise_multiplier(self.noise_multiplier, self.count_stddev, self.denominator)
        except accountant.Unreachable as err:
            raise Invalid("clip_count_stddev", self.count_stddev, str(err)) from None

    def check(self, model: nn.Module, algorithm: Algorithm) -> None:
        refuse_leaks(model, algorithm)

    def client(self, round_: int, params: Tensor, reply: ClientResult) -> ClientResult:
        """The update clipped (kept in float64), weighted 1, its training loss withheld; whether it was within the
        clip is kept for adaptive clipping, which noises the count."""
        delta, norm = clipped(reply.params.to(torch.float64) - params.to(torch.float64), self.clip)
        within = torch.tensor(float(norm <= self.clip), dtype=torch.float64)
        return replace(reply, params=params.to(torch.float64) + delta, num_samples=1, loss=math.nan,
                       extra={"within_clip": within}, sent_bytes=params.numel() * params.element_size())

    def server(self, round_: int, params: Tensor, replies: Sequence[ClientResult]) -> list[ClientResult]:
        """One reply: the global weights plus the noised mean of the clipped updates (clipped again as received,
        since a codec after the clip, compression=, may have lengthened them)."""
        base = params.to(torch.float64)
        total = torch.zeros_like(base)
        for reply in replies:
            total += within_clip(reply.params.to(torch.float64) - base, self.clip)
        generator = torch.Generator().manual_seed(noise_seed(self.plan.seed, round_))
        std = self.noise_std_of_sum(self.update_noise)
        noise = torch.randn(base.shape, generator=generator, dtype=torch.float64) * std
        mean = (total + noise) / self.denominator
        self.adapt(replies, generator)
        self.rounds += 1
        merged = ClientResult(-1, (base + mean.to(base.device)).to(params.dtype), 1, math.nan,
                              steps=max((r.steps for r in replies), default=0))
        return [merged]

    def noise_std_of_sum(self, multiplier: float) -> float:
        """std of the noise on the clipped sum: multiplier * clip, scaled to a cohort of noise_cohort_size."""
        scale = self.denominator / self.cohort if self.cohort else 1.0
        return multiplier * self.clip * scale

    def adapt(self, replies: Sequence[ClientResult], generator: torch.Generator) -> None:
        """Adaptive clipping (Andrew et al. 2021): move the clip toward the target quantile of update norms, from the
        noised sum of centred bits (within the clip or not, minus 1/2), as accountant.update_noise_multiplier
        assumes."""
        if not self.adaptive:
            return
        centred = sum(float(r.extra.get("within_clip", 0.0)) - 0.5 for r in replies)  # one client moves it by 1/2
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.count_stddev
        self.below = (centred + noise) / self.denominator + 0.5
        self.clip = accountant.adaptive_clip(self.clip, self.below, self.target_quantile, self.clip_lr)

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after `rounds` applications of the mechanism."""
        return accountant.epsilon(self.noise_multiplier, self.sampling, rounds, self.delta, self.accountant)

    def round_metrics(self, round_: int) -> dict[str, float]:
        out = {"epsilon": self.epsilon(self.rounds), "clip": self.clip,
               "noise_std": self.noise_std_of_sum(self.update_noise) / self.denominator}
        if self.adaptive:
            out["below_clip"] = self.below
        return out

    def halt(self, round_: int) -> str | None:
        """Stop before the round whose epsilon would exceed max_epsilon."""
        if self.max_epsilon is None:
            return None
        spent = self.epsilon(self.rounds + 1)
        if spent <= self.max_epsilon:
            return None
        return (f"privacy budget: round {round_} would spend epsilon {spent:.3g} > privacy.max_epsilon="
                f"{self.max_epsilon:g}; stopped after round {round_ - 1}")

    def run_params(self) -> dict[str, Any]:
        """What the accounting assumed, with the noise multiplier as resolved (given, default or calibrated)."""
        out = {"mechanism": "gaussian (DP-FedAvg, user level)", "noise_multiplier_used": self.noise_multiplier,
               "delta_used": self.delta, "sampling_accounted": f"{self.sampling.kind} {self.sampling.size} of "
               f"{self.sampling.population}", "accountant_used": self.accountant, "denominator": self.denominator}
        if self.cohort:
            out["noise_of_cohort"] = f"noise and epsilon of a cohort of {self.cohort} clients per round"
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clip": self.clip, "below": self.below}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"rounds", "clip", "below"})
        if unknown:
            raise ValueError(f"dp_fedavg state has unknown entries {unknown}")
        self.rounds = int(state.get("rounds", 0))
        self.clip = float(state.get("clip", self.clip))
        self.below = float(state.get("below", math.nan))


def cohort_size(value: int | None) -> int | None:
    """privacy.noise_cohort_size: an integer >= 1, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid("noise_cohort_size", value, "must be an integer >= 1 (the cohort whose noise to simulate)")
    return value


def noise_seed(seed: int, round_: int) -> int:
    """The seed of the server's noise in one round: (seed, round) alone, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, round_, NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


def within_clip(delta: torch.Tensor, clip: float) -> torch.Tensor:
    """`delta` (float64) clipped to `clip` unless its norm exceeds it by rounding only (RECLIP_SLACK), so an update
    the client stage clipped passes unchanged, bit for bit, and one a codec lengthened is clipped again."""
    if float(torch.linalg.vector_norm(delta)) <= clip * (1 + RECLIP_SLACK):
        return delta
    return clipped(delta, clip)[0]
