"""FedAvg (McMahan et al.) on Flower 1.42's Ray-based simulation, timed per round, for bench/peers.py, which runs it
in the peers' venv as `python bench/peers/flower_round.py --data FILE --out FILE`: FILE is the torch.save'd dict
bench/peers.py exports (train/test tensors, the clients' index tensors, the initial model pickled whole, settings).
Each round Flower's FedAvg samples fraction*clients clients, each a NumPyClient running local epochs of plain SGD on
its own samples in a Ray actor (one CPU each), averages their weights by sample count and evaluates the global model
on the whole test set in evaluate_fn; the JSON written to --out gives Flower's version, the start-up seconds (script
start to the initial model's evaluation) and each round's seconds (train, eval, total) and test accuracy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here; set before flwr is imported

import flwr
import ray
import torch
import torch.nn.functional as F
from flwr.client import Client, NumPyClient
from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import start_simulation

_DATA: dict[str, dict[str, Any]] = {}  # per process: the exported file's contents, by path


def quiet() -> None:
    """Keep Flower's logging to errors (its warning that start_simulation is deprecated says nothing about the
    benchmark), and drop Ray's tip about GPU env vars (there are none)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def load(path: str) -> dict[str, Any]:
    """The exported dict, read once per process (memory-mapped) and kept for every client run there."""
    if path not in _DATA:
        quiet()
        _DATA[path] = torch.load(path, weights_only=False, mmap=True)
    return _DATA[path]


def get_weights(model: torch.nn.Module) -> NDArrays:
    """The model's state as numpy arrays, in state_dict order."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: NDArrays) -> None:
    """Load numpy arrays (state_dict order) into the model."""
    model.load_state_dict({k: torch.tensor(w) for k, w in zip(model.state_dict(), weights)}, strict=True)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          gen: torch.Generator) -> None:
    """Plain SGD on cross-entropy: `epochs` passes over (x, y) in a fresh shuffled order each, `batch` at a time."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


class MnistClient(NumPyClient):
    """One client: its own samples of the exported training set, trained with the exported settings."""

    def __init__(self, path: str, cid: int) -> None:
        torch.set_num_threads(1)
        self.data, self.cid = load(path), cid

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The exported initial model's weights (unused: the strategy has initial_parameters)."""
        return get_weights(self.data["model"])

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Local epochs from the global weights; the new weights and this client's sample count."""
        data, s = self.data, self.data["settings"]
        part = data["parts"][self.cid]
        x, y = data["train_x"][part], data["train_y"][part]
        model = data["model"]  # one model per process, reloaded with the global weights for each run
        set_weights(model, parameters)
        gen = torch.Generator().manual_seed(s["seed"] + 1000 * int(config["server_round"]) + self.cid)
        train(model, x, y, s["local_epochs"], s["batch_size"] or len(y), s["lr"], gen)
        return get_weights(model), len(y), {}


def client_fn(path: str, context: Context) -> Client:
    """Flower's client factory: partition-id k is client k of the exported partition."""
    return MnistClient(path, int(context.node_config["partition-id"])).to_client()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x, y), `batch` samples at a time."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return loss / len(y), correct / len(y)


class Timed:
    """evaluate_fn for FedAvg: the central test-set evaluation, with perf_counter at its entry and exit per round."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data, self.enter, self.exit, self.acc = data, {}, {}, {}
        self.fit_clients: list[int] = []  # updates averaged, per round

    def __call__(self, server_round: int, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, dict]:
        """Evaluate the global weights on the whole test set."""
        self.enter[server_round] = time.perf_counter()
        model = self.data["model"]
        set_weights(model, parameters)
        loss, acc = accuracy(model, self.data["test_x"], self.data["test_y"])
        self.acc[server_round] = acc
        self.exit[server_round] = time.perf_counter()
        return loss, {"accuracy": acc}

    def fit_round(self, server_round: int) -> dict[str, Scalar]:
        """on_fit_config_fn: tell the clients the round (it seeds their shuffles)."""
        return {"server_round": server_round}

    def rounds(self) -> list[dict[str, float]]:
        """Per round r >= 1: round_s from exit(r-1) to exit(r), eval_s inside evaluate_fn, train_s the rest."""
        out = []
        for r in sorted(k for k in self.exit if k > 0):
            round_s, eval_s = self.exit[r] - self.exit[r - 1], self.exit[r] - self.enter[r]
            out.append(dict(round=r, round_s=round_s, train_s=round_s - eval_s, eval_s=eval_s, accuracy=self.acc[r]))
        return out


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so start-up covers the interpreter and the imports."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


def importable_client_fn(path: str) -> partial:
    """client_fn bound to the data path, from this file imported as a module: Ray then pickles it by reference, so
    each worker imports it once and keeps its _DATA cache (pickled from __main__ it would travel by value)."""
    module = importlib.import_module(Path(__file__).stem) if __name__ == "__main__" else sys.modules[__name__]
    return partial(module.client_fn, path)


def simulate(path: str, rounds: int | None) -> tuple[Timed, dict[str, Any]]:
    """Run Flower's legacy start_simulation with FedAvg; the timings and the settings used."""
    data = load(path)
    s = data["settings"]
    random.seed(s["seed"])  # Flower's SimpleClientManager samples clients with the random module
    timed = Timed(data)
    strategy = FedAvg(fraction_fit=s["fraction"], min_fit_clients=round(s["fraction"] * s["clients"]),
                      min_available_clients=s["clients"], fraction_evaluate=0.0, evaluate_fn=timed,
                      on_fit_config_fn=timed.fit_round, fit_metrics_aggregation_fn=partial(count_fits, timed),
                      initial_parameters=ndarrays_to_parameters(get_weights(data["model"])))
    start_simulation(
        client_fn=importable_client_fn(str(Path(path).resolve())), num_clients=s["clients"],
        client_resources={"num_cpus": 1, "num_gpus": 0}, config=ServerConfig(num_rounds=rounds or s["rounds"]),
        strategy=strategy,
        ray_init_args={"ignore_reinit_error": True, "include_dashboard": False, "logging_level": logging.WARNING})
    return timed, s


def count_fits(timed: Timed, results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """fit_metrics_aggregation_fn: note how many clients' updates were averaged this round."""
    timed.fit_clients.append(len(results))
    return {}


def shutdown() -> None:
    """Stop Ray, and cancel start_simulation's pending 10 s resource-check timer (it would hold the exit)."""
    ray.shutdown()
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


def main() -> None:
    """Run the simulation, check every round averaged all its clients, write and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the dict bench/peers.py exported (torch.save)")
    parser.add_argument("--out", required=True, help="JSON to write")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to run (default: the exported settings')")
    args = parser.parse_args()
    start = time.perf_counter() - process_age()
    quiet()
    try:
        timed, s = simulate(args.data, args.rounds)
    finally:
        shutdown()
    per_round = round(s["fraction"] * s["clients"])
    if timed.fit_clients != [per_round] * len(timed.rounds()):
        raise SystemExit(f"client failures: updates averaged per round {timed.fit_clients}, not {per_round} each")
    result = {"peer": "flower", "version": flwr.__version__, "startup_s": timed.exit[0] - start,
              "rounds": timed.rounds()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
