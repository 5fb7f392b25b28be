"""Differential privacy for DP-FedAvg and local DP-SGD: accounting and its mechanisms (needs the `privacy` extra)."""
