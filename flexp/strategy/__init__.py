"""The built-in algorithms (flexp.algorithm.Algorithm subclasses), one per module, and the attackers that wrap them.

Stateful ones (server momentum, adaptive optimizers, control variates) keep their state on the object and hand
it out as a state_dict of tensors and plain data, so a checkpoint loads with torch.load(weights_only=True).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexp.algorithm import Algorithm, tensors
from flexp.config import AttackConfig, ConfigError, StrategyConfig

__all__ = ["Algorithm", "make_algorithm", "make_strategy", "stacked", "tensors"]


def make_strategy(cfg: StrategyConfig, num_clients: int = 0, lr: float = 0.0, seed: int = 0) -> Algorithm:
    """The configured algorithm (SCAFFOLD needs K and the clients' learning rate; a _target_ gets what it takes)."""
    if cfg.target is not None:
        return build_target(cfg, num_clients, lr, seed)
    from flexp.strategy import fedavg, fedavgm, fedopt, fedprox, krum, median, scaffold, trimmed_mean

    if cfg.name == "fedavg":
        return fedavg.FedAvg()
    if cfg.name == "fedprox":
        return fedprox.FedProx(cfg.mu)
    if cfg.name == "scaffold":
        return scaffold.Scaffold(num_clients, lr, cfg.server_lr)
    if cfg.name == "fedavgm":
        return fedavgm.FedAvgM(cfg.server_lr, cfg.momentum)
    if cfg.name in ("fedadam", "fedyogi", "fedadagrad"):
        return fedopt.FedOpt(cfg.name[3:], cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau)
    if cfg.name == "median":
        return median.Median()
    if cfg.name == "trimmed_mean":
        return trimmed_mean.TrimmedMean(cfg.trim)
    return krum.Krum(cfg.byzantine, 1 if cfg.name == "krum" else cfg.keep)


def make_algorithm(cfg: StrategyConfig, attack: AttackConfig, num_clients: int, lr: float, seed: int,
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


def build_target(cfg: StrategyConfig, num_clients: int, lr: float, seed: int) -> Algorithm:
    """Hydra's instantiate of `strategy._target_` with its keyword arguments, plus num_clients, lr and seed where
    the callable takes them and the config does not set them."""
    from hydra.utils import instantiate

    from flexp.models import accepts, first_line, locate

    key = "strategy._target_"
    func = locate(cfg.target, key)
    supplied = {"num_clients": num_clients, "lr": lr, "seed": seed}
    node = {"_target_": cfg.target, **cfg.kwargs,
            **{k: v for k, v in supplied.items() if k not in cfg.kwargs and accepts(func, k)}}
    try:
        algorithm = instantiate(node, _convert_="all")
    except Exception as err:
        raise ConfigError(key, cfg.target, f"failed to build the algorithm ({first_line(err)})") from None
    if not isinstance(algorithm, Algorithm):
        raise ConfigError(key, cfg.target, f"returned {type(algorithm).__name__}, not a flexp.algorithm.Algorithm")
    return algorithm


def stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[clients, P] in float64, so the server arithmetic adds no rounding of its own."""
    return torch.stack([p.to(torch.float64) for p in params])
