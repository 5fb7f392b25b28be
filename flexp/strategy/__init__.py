"""The built-in algorithms (flexp.algorithm.Algorithm subclasses), one per module, and the attackers that wrap them.

Stateful ones (server momentum, adaptive optimizers, control variates) keep their state on the object and hand
it out as a state_dict of tensors and plain data, so a checkpoint loads with torch.load(weights_only=True).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.algorithm import Algorithm, tensors
from flexp.component import Component, build
from flexp.config import AttackConfig, ConfigError

__all__ = ["Algorithm", "make_algorithm", "make_strategy", "stacked", "tensors"]


def make_strategy(cfg: Component, num_clients: int = 0, lr: float = 0.0, seed: int = 0) -> Algorithm:
    """The configured algorithm, built from its `_target_` and arguments (a built-in's or the user's alike), given
    num_clients (K), lr (fl.lr) and seed where it takes them and the config does not set them (SCAFFOLD takes K, lr)."""
    algorithm = build(cfg, num_clients=num_clients, lr=lr, seed=seed)
    if not isinstance(algorithm, Algorithm):
        raise ConfigError(f"{cfg.section}._target_", cfg.target,
                          f"returned {type(algorithm).__name__}, not a flexp.algorithm.Algorithm")
    return algorithm


def make_algorithm(cfg: Component, attack: AttackConfig, num_clients: int, lr: float, seed: int,
                   num_classes: int) -> Algorithm:
    """The configured algorithm, wrapped in the configured attacker (its malicious clients drawn from the seed)."""
    algorithm = make_strategy(cfg, num_clients, lr, seed)
    if attack.name == "none":
        return algorithm
    from flexp.attack import malicious_clients
    from flexp.strategy import gaussian, label_flip, sign_flip

    malicious = malicious_clients(num_clients, attack.fraction, seed)
    if attack.name == "sign_flip":
        return sign_flip.SignFlip(algorithm, malicious, attack.scale)
    if attack.name == "gaussian":
        return gaussian.Gaussian(algorithm, malicious, attack.scale, seed)
    return label_flip.LabelFlip(algorithm, malicious, num_classes)


def stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[clients, P] in float64, so the server arithmetic adds no rounding of its own."""
    return torch.stack([p.to(torch.float64) for p in params])
