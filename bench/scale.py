"""Round cost must grow with the work done, not with the number of clients that sit out the round.

    python bench/scale.py            # 2nn, n_k = 60: K=1,000 with C=0.1 vs K=10,000 with C=0.01 (100 clients/round)

Each client holds 60 MNIST indices (drawn with overlap, so K=10,000 keeps n_k = 60). Prints a table and writes
JSON under outputs/bench/; peak RSS is this process's, sampled while each setting runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import PeakRSS  # noqa: E402

from flexp.client import LocalSpec  # noqa: E402
from flexp.config import DatasetConfig, EngineConfig, FLConfig  # noqa: E402
from flexp.data import load_mnist_dataset  # noqa: E402
from flexp.engine import make_engine  # noqa: E402
from flexp.fedavg import run_fedavg  # noqa: E402
from flexp.models import build_model  # noqa: E402


def measure(data, clients: int, fraction: float, per_client: int, rounds: int, model_name: str) -> dict:
    """Median seconds per round (after one warm-up round) and peak RSS for one (K, C)."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randint(len(data.train), (per_client,), generator=gen) for _ in range(clients)]
    fl = FLConfig(clients, fraction, 1, 10, 0.1, rounds + 1, 1, None, False)
    spec = LocalSpec(1, 10, 0.1)
    torch.manual_seed(0)
    make = lambda: build_model(model_name, (1, 28, 28), 10)  # noqa: E731
    with PeakRSS() as rss:
        engine = make_engine(EngineConfig(name="auto"), make, data.train, spec, torch.device("cpu"))
        result = run_fedavg(make(), parts, data.test, fl, engine, seed=0)
        engine.close()
    times = [r.round_seconds for r in result.history[1:]]
    return dict(clients=clients, fraction=fraction, per_round=fl.clients_per_round, n_k=per_client,
                round_s=statistics.median(times), peak_rss_mib=rss.peak,
                final_accuracy=result.history[-1].test_accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="2nn")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"))
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    rows = [measure(data, k, c, 60, args.rounds, args.model) for k, c in ((1_000, 0.1), (10_000, 0.01))]
    print(f"\n{'K':>7} {'C':>5} {'m':>4} {'n_k':>4} {'round s':>8} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['clients']:7d} {r['fraction']:5.2f} {r['per_round']:4d} {r['n_k']:4d} {r['round_s']:8.3f} "
              f"{r['peak_rss_mib']:12.0f}")
    print(f"K=10,000 / K=1,000 round time: {rows[1]['round_s'] / rows[0]['round_s']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(model=args.model, rounds=args.rounds, rows=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
