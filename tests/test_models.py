import re

import pytest
import torch
from conftest import SMALL, run_cli

from flexp.config import ConfigError
from flexp.models import ModelFactory, build_model, count_parameters


@pytest.mark.parametrize("name, expected", [("2nn", 199_210), ("cnn", 1_663_370), ("logreg", 7_850)])
def test_parameter_counts_match_the_paper(name, expected):
    model = build_model(name, (1, 28, 28), 10)
    assert count_parameters(model) == expected
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_refuses_non_image_input():
    with pytest.raises(ConfigError, match="model.name"):
        build_model("cnn", (60,), 10)


class Wide(torch.nn.Module):
    """A user model taking the dataset's shape and one keyword argument of its own."""

    def __init__(self, input_shape, num_classes, width=4):
        super().__init__()
        self.width = width
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], width), torch.nn.ReLU(),
                                        torch.nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


def test_target_model_gets_its_arguments_and_the_dataset_shape():
    cfg = parse_model({"_target_": f"{__name__}.Wide", "width": 8})
    model = ModelFactory(cfg, (5,), 3)()
    assert isinstance(model, Wide) and model.width == 8 and cfg.name == "Wide"
    assert model(torch.zeros(2, 5)).shape == (2, 3)


def test_target_without_shape_parameters_is_called_with_its_own_arguments_only():
    cfg = parse_model({"_target_": "torch.nn.Linear", "in_features": 5, "out_features": 3})
    assert ModelFactory(cfg, (5,), 3)().weight.shape == (3, 5)


@pytest.mark.parametrize("node, match", [
    ({"name": "2nn", "hiden": 3}, "model.hiden: unknown key"),
    ({"_target_": "no_such_module.Net"}, "model._target_='no_such_module.Net': cannot be imported"),
    ({"_target_": "torch.nn.Linear", "in_features": 5, "out_features": 3, "wdth": 3}, "model.wdth: unknown key"),
    ({"_target_": "torch.nn.Linear", "in_features": 5}, "model.out_features: is missing"),
    ({"_target_": "math.sqrt"}, "model._target_='math.sqrt': failed to build"),
    ({"_target_": "builtins.dict"}, "returned dict, not a torch.nn.Module"),
    ({}, "model._target_: is missing"),
])
def test_bad_model_config_names_the_key(node, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        ModelFactory(parse_model(node), (5,), 3)()


def parse_model(node):
    from flexp.config import _model

    return _model({"model": node})


def test_cli_custom_model_from_a_user_package(tmp_path):
    """(A group option in a user config dir is run by tests/test_package.py.)"""
    (tmp_path / "userpkg.py").write_text(
        "from torch import nn\n"
        "def net(input_shape, num_classes, width):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))\n")
    small = [a for a in SMALL if a not in ("fl.rounds=3", "model=logreg")] + ["fl.rounds=1", "tracking.log_model=false"]
    proc = run_cli(["model=custom", "model._target_=userpkg.net", *small, "model.width=7"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = 60 * 7 + 7 + 7 * 10 + 10  # synthetic: 60 features, 10 classes
    assert f"{expected} parameters" in proc.stderr + proc.stdout
