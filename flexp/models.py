"""The paper's MNIST models (2NN, CNN) and a logistic regression, by name."""

from __future__ import annotations

import math

from torch import nn

from flexp.config import ConfigError


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


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
