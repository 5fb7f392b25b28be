"""The paper's MNIST models (2NN, CNN) and a logistic regression, by name; or any nn.Module from a callable."""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from flexp.config import ConfigError, ModelConfig

SHAPE_ARGUMENTS = ("input_shape", "num_classes")


def two_nn(in_features: int, classes: int, hidden: int = 200) -> nn.Module:
    """MLP with two hidden ReLU layers; 199,210 parameters on MNIST with hidden=200."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def cnn(channels: int, classes: int) -> nn.Module:
    """Two 5x5 'same' convs (32, 64) each with 2x2 max-pool, FC 512, softmax; 1,663,370 parameters on MNIST."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, classes),
    )


def logreg(in_features: int, classes: int) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes))


def build_model(name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 200) -> nn.Module:
    """Build a freshly initialised model for inputs of `input_shape`; CNN needs 1x28x28 images."""
    features = math.prod(input_shape)
    if name == "2nn":
        return two_nn(features, classes, hidden)
    if name == "logreg":
        return logreg(features, classes)
    if name == "cnn":
        if len(input_shape) != 3 or input_shape[1:] != (28, 28):
            raise ConfigError("model.name", name, f"needs 28x28 images, the dataset's inputs have shape {input_shape}")
        return cnn(input_shape[0], classes)
    raise ConfigError("model.name", name, "unknown model")


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` has a parameter called `name` (a class: its __init__)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get(name)
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def shape_arguments(fn: Callable[..., Any], input_shape: tuple[int, ...], classes: int,
                    given: Mapping[str, Any]) -> dict[str, Any]:
    """input_shape and num_classes for the callables that take them, unless the config sets them already."""
    values = {"input_shape": tuple(input_shape), "num_classes": classes}
    return {k: v for k, v in values.items() if k not in given and accepts(fn, k)}


def checked(model: Any, key: str, value: Any) -> nn.Module:
    """`model` if it is an nn.Module, else a ConfigError naming what built it."""
    if not isinstance(model, nn.Module):
        raise ConfigError(key, value, f"returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_target(target: str, kwargs: Mapping[str, Any], input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Hydra's instantiate of `model._target_` with its keyword arguments (and the dataset's shape when taken)."""
    from hydra.utils import instantiate

    fn = locate(target, "model._target_")
    if not callable(fn):
        raise ConfigError("model._target_", target, "is not callable")
    node = {"_target_": target, **kwargs, **shape_arguments(fn, input_shape, classes, kwargs)}
    try:
        model = instantiate(node, _convert_="all")
    except Exception as err:
        raise ConfigError("model._target_", target, f"failed to build the model ({first_line(err)})") from None
    return checked(model, "model._target_", target)


def locate(target: str, key: str) -> Any:
    """The object a dotted path names (Hydra's lookup, without its multi-line error log), or a ConfigError."""
    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(target)
    except Exception as err:
        raise ConfigError(key, target, f"cannot be imported ({first_line(err)})") from None
    finally:
        hydra_log.disabled = disabled


def build_given(given: nn.Module | Callable[..., nn.Module], input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A fresh copy of a module handed over from Python, or what a callable returns (given the shape it takes)."""
    if isinstance(given, nn.Module):
        return copy.deepcopy(given)
    name = getattr(given, "__qualname__", repr(given))
    try:
        model = given(**shape_arguments(given, input_shape, classes, {}))
    except Exception as err:
        raise ConfigError("model", name, f"failed to build the model ({first_line(err)})") from None
    return checked(model, "model", name)


def first_line(err: BaseException) -> str:
    """An exception as one line: Hydra wraps the cause in pages of context."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class ModelFactory:
    """A picklable zero-argument model builder for the engines: the configured model for one dataset's shape."""

    cfg: ModelConfig
    input_shape: tuple[int, ...]
    classes: int

    def __call__(self) -> nn.Module:
        if self.cfg.factory is not None:
            return build_given(self.cfg.factory, self.input_shape, self.classes)
        if self.cfg.target is not None:
            return build_target(self.cfg.target, self.cfg.kwargs, self.input_shape, self.classes)
        return build_model(self.cfg.name, self.input_shape, self.classes, self.cfg.hidden)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
