import pytest
import torch

from flexp.aggregate import fedavg, weighted_average


def test_weighted_average_exact_on_hand_made_tensors():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 6.0, -1.0])
    c = torch.tensor([0.0, 0.0, 8.0])
    out = fedavg([a, b, c], [100, 300, 100])  # weights 0.2, 0.6, 0.2
    assert torch.allclose(out, torch.tensor([2.0, 4.0, 1.6]), atol=1e-7, rtol=0)
    assert out.dtype == torch.float32


def test_weighted_average_single_client_is_identity_and_equal_weights_are_mean():
    a, b = torch.randn(50), torch.randn(50)
    assert torch.equal(weighted_average([a], [7]), a)
    assert torch.allclose(weighted_average([a, b], [5, 5]), (a + b) / 2, atol=1e-7)


def test_weighted_average_rejects_mismatch_and_zero_weights():
    with pytest.raises(ValueError):
        weighted_average([torch.zeros(2)], [1, 2])
    with pytest.raises(ValueError):
        weighted_average([torch.zeros(2)], [0])
