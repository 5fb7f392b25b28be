"""One 2NN round (K=100, C=0.1, E=1, B=10, MNIST IID) on each engine: threads, vectorized (the default), the Ray
pool on a local Ray instance (its actors running the thread engine, then the vectorized one: engine.actor_engine),
and the Ray pool on a two-node local cluster (ray.cluster_utils, loopback) with vectorized actors.

    python bench/ray_round.py [--rounds 5] [--repeat 3]        # needs the ray extra: pip install -e ".[ray]"

Median round seconds after one warm-up round; the first round's overhead over that median; Ray's start-up (ray.init,
or the cluster's nodes and the join) and the pool's start (its actors up) apart. Prints a table and writes JSON
under outputs/bench/; each Ray pool's final weights are checked bit for bit against the engine its actors run, and
every engine's are compared with the thread engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flexp.client import LocalSpec
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_mnist_dataset
from flexp.engine.ray_pool import RayEngine, import_ray
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import run_fedavg
from flexp.models import build_model
from flexp.partition import iid

SPEC = LocalSpec(1, 10, 0.1)


def measure(name: str, make_engine: Callable, data: Any, rounds: int, ray_up: Callable[[], Any] | None = None) -> dict:
    """Round seconds (median after a warm-up), the first round's overhead, start-up seconds and final weights."""
    fl = FLConfig(100, 0.1, 1, 10, 0.1, rounds + 1, 1, None, False)
    make = partial(build_model, "2nn", (1, 28, 28), 10)
    start = time.perf_counter()
    teardown = ray_up() if ray_up else None
    ray_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = make_engine(make, data.train, SPEC)
    engine_s = time.perf_counter() - start
    torch.manual_seed(0)
    try:
        result = run_fedavg(make(), iid(len(data.train), 100, 0), data.test, fl, engine, seed=0)
        nodes = len(set(engine.last_nodes.values())) if isinstance(engine, RayEngine) else 1
    finally:
        engine.close()
        if teardown:
            teardown()
    times = [r.round_seconds for r in result.history[1:]]
    median = statistics.median(times)
    return dict(engine=name, round_s=median, first_round_s=result.history[0].round_seconds,
                first_overhead_s=result.history[0].round_seconds - median, ray_startup_s=ray_s,
                engine_startup_s=engine_s, nodes=nodes, final_accuracy=result.history[-1].test_accuracy,
                params=result.params)


def fastest(runs: list[dict]) -> dict:
    """One engine's runs as one row: the run of the lowest median round, each timing the lowest over the runs."""
    row = dict(min(runs, key=lambda r: r["round_s"]))
    for key in ("first_round_s", "first_overhead_s", "ray_startup_s", "engine_startup_s"):
        row[key] = min(r[key] for r in runs)
    return row


def local_ray() -> Callable[[], None]:
    """Start a local Ray instance; return its shutdown."""
    ray = import_ray()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray.shutdown


def two_nodes() -> Callable[[], None]:
    """Start a two-node local cluster of one CPU per node and join it; return its teardown."""
    from ray.cluster_utils import Cluster

    ray = import_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)

    def down() -> None:
        ray.shutdown()
        cluster.shutdown()
    return down


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's machine."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine, interleaved; the table shows "
                        "each timing's lowest (other jobs on the machine only ever slow a run down)")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"))
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    pool = partial(RayEngine, address="local", num_cpus=1, most_actors=10)
    engines = [("threads", lambda m, t, s: ThreadEngine(m, t, s, workers=2), None, None),
               ("vectorized (default)", lambda m, t, s: VectorizedEngine(m, t, s, workers=2), None, None),
               ("ray pool, threads", pool, local_ray, "threads"),
               ("ray pool, vectorized", partial(pool, actor_engine="vectorized"), local_ray, "vectorized (default)"),
               ("ray 2 nodes, vectorized", partial(pool, actor_engine="vectorized"), two_nodes,
                "vectorized (default)")]
    runs = [measure(name, make, data, args.rounds, up) for _ in range(args.repeat) for name, make, up, _ in engines]
    rows = [fastest([r for r in runs if r["engine"] == name]) for name, *_ in engines]
    params = {r["engine"]: r.pop("params") for r in rows}
    for r, (name, _, _, same_as) in zip(rows, engines):
        r["max_abs_diff_to_threads"] = float((params[name] - params["threads"]).abs().max())
        r["identical_to"] = same_as
        r["identical"] = torch.equal(params[name], params[same_as]) if same_as else None
    default = rows[1]["round_s"]
    print(f"\n{'engine':<24} {'round s':>8} {'x threads':>9} {'x default':>9} {'1st-round overhead s':>20} "
          f"{'Ray up s':>8} {'engine up s':>11} {'nodes':>5} {'final acc':>9} {'bit-identical to':>21}")
    for r in rows:
        same = f"{r['identical_to'].split()[0]}: {r['identical']}" if r["identical_to"] else "-"
        print(f"{r['engine']:<24} {r['round_s']:>8.3f} {r['round_s'] / rows[0]['round_s']:>9.2f} "
              f"{r['round_s'] / default:>9.2f} {r['first_overhead_s']:>20.3f} {r['ray_startup_s']:>8.2f} "
              f"{r['engine_startup_s']:>11.2f} {r['nodes']:>5} {r['final_accuracy']:>9.4f} {same:>21}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray-round-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for r in runs:
        r.pop("params", None)
    path.write_text(json.dumps(dict(rows=rows, runs=runs, rounds=args.rounds, repeat=args.repeat,
                                    cpu=cpu_model(), cores=os.cpu_count(),
                                    load_average=os.getloadavg()), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
