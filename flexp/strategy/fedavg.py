"""FedAvg (McMahan et al. 2017): plain local SGD, then the n_k-weighted mean of the returned weights."""

from __future__ import annotations

from flexp.algorithm import Algorithm


class FedAvg(Algorithm):
    """The interface's defaults: sum_k n_k w_k / sum_k n_k over the clients that returned."""
