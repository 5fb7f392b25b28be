import pytest
import torch

from flexp.config import ConfigError
from flexp.models import build_model, count_parameters


@pytest.mark.parametrize("name, expected", [("2nn", 199_210), ("cnn", 1_663_370), ("logreg", 7_850)])
def test_parameter_counts_match_the_paper(name, expected):
    model = build_model(name, (1, 28, 28), 10)
    assert count_parameters(model) == expected
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_refuses_non_image_input():
    with pytest.raises(ConfigError, match="model.name"):
        build_model("cnn", (60,), 10)
