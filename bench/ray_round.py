"""One 2NN round (K=100, C=0.1, E=1, B=10, MNIST IID) on a local Ray instance against the thread engine.

    python bench/ray_round.py [--rounds 5]        # needs the ray extra: pip install -e ".[ray]"

Median round seconds after one warm-up round, with Ray's start-up reported apart. Prints a table and writes JSON
under outputs/bench/; the final weights of the two engines are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from flexp.client import LocalSpec
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_mnist_dataset
from flexp.engine.ray_tasks import RayEngine
from flexp.engine.threads import ThreadEngine
from flexp.fedavg import run_fedavg
from flexp.models import build_model
from flexp.partition import iid


def measure(name: str, make_engine, data, rounds: int) -> dict:
    """Round seconds (median after a warm-up), the engine's start-up seconds and the final weights."""
    fl = FLConfig(100, 0.1, 1, 10, 0.1, rounds + 1, 1, None, False)
    make = partial(build_model, "2nn", (1, 28, 28), 10)
    start = time.perf_counter()
    engine = make_engine(make, data.train, LocalSpec(1, 10, 0.1))
    startup = time.perf_counter() - start
    torch.manual_seed(0)
    try:
        result = run_fedavg(make(), iid(len(data.train), 100, 0), data.test, fl, engine, seed=0)
    finally:
        engine.close()
    times = [r.round_seconds for r in result.history[1:]]
    return dict(engine=name, round_s=statistics.median(times), first_round_s=result.history[0].round_seconds,
                startup_s=startup, final_accuracy=result.history[-1].test_accuracy, params=result.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"))
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    rows = [measure("threads", lambda m, t, s: ThreadEngine(m, t, s, workers=2), data, args.rounds),
            measure("ray (local)", lambda m, t, s: RayEngine(m, t, s, "local", num_cpus=1), data, args.rounds)]
    same = torch.equal(rows[0].pop("params"), rows[1].pop("params"))
    print(f"\n{'engine':<12} {'round s':>8} {'first round s':>13} {'start-up s':>10} {'final acc':>9}")
    for r in rows:
        print(f"{r['engine']:<12} {r['round_s']:>8.3f} {r['first_round_s']:>13.3f} {r['startup_s']:>10.2f} "
              f"{r['final_accuracy']:>9.4f}")
    print(f"final weights identical: {same}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray-round-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(rows=rows, identical=same, rounds=args.rounds), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
