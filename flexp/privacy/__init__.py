"""Differential privacy: mechanisms as round stages (dp_fedavg, dp_sgd) and accounting over dp-accounting."""
