"""Round cost must grow with the work done, not with the number of clients that sit out the round.

    python bench/scale.py                 # K = 10^3 .. 10^6 at m = 100 clients a round, synthetic and a mapped npz
    python bench/scale.py --max-k 100000  # stop at K = 10^5
    python bench/scale.py --suite mnist   # 2nn, n_k = 60: K=1,000 with C=0.1 vs K=10,000 with C=0.01

`million`: each (dataset, K) runs in a fresh process through the job's own path (prepare, then train, no
tracking), so setup seconds (data + partition + model) and peak RSS are that setting's alone. synthetic: K
generator users of 20 samples (10 features, 5 classes, logreg); npz: K clients of 10-60 samples each (10
float32 features), written once to a temp dir as an uncompressed .npz and read with dataset.mmap=true. Round
seconds: median (and minimum, the least disturbed on a shared machine) of rounds 2..R-1 (round 1 warms up; the
test set is scored only in round R, left out).

`mnist`: each client holds 60 MNIST indices (drawn with overlap, so K=10,000 keeps n_k = 60); peak RSS is this
process's, sampled while each setting runs. Both print a table and write JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
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


SIZES = (1_000, 10_000, 100_000, 1_000_000)
PER_ROUND = 100
FEATURES, CLASSES = 10, 5


def write_npz(path: Path, clients: int, seed: int = 0, test: int = 10_000) -> int:
    """An uncompressed npz of `clients` clients with 10-60 samples each, written array by array through .npy
    files so it never sits in memory whole; returns the number of training samples."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 61, clients)
    n = int(sizes.sum())
    centres = rng.normal(0, 1, (CLASSES, FEATURES)).astype(np.float32)
    folder = path.parent / f"{path.stem}-npy"
    folder.mkdir(exist_ok=True)
    x = np.lib.format.open_memmap(folder / "x_train.npy", "w+", np.float32, (n, FEATURES))
    y = np.lib.format.open_memmap(folder / "y_train.npy", "w+", np.int64, (n,))
    step = 1 << 22
    for at in range(0, n, step):
        rows = min(step, n - at)
        y[at:at + rows] = rng.integers(0, CLASSES, rows)
        x[at:at + rows] = centres[y[at:at + rows]] + rng.standard_normal((rows, FEATURES), dtype=np.float32)
    x.flush(), y.flush()
    np.save(folder / "client_train.npy", np.repeat(np.arange(clients, dtype=np.int64), sizes))
    y_test = rng.integers(0, CLASSES, test)
    np.save(folder / "y_test.npy", y_test)
    np.save(folder / "x_test.npy", centres[y_test] + rng.standard_normal((test, FEATURES), dtype=np.float32))
    del x, y
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in ("x_train", "y_train", "x_test", "y_test", "client_train"):
            archive.write(folder / f"{name}.npy", f"{name}.npy")
            (folder / f"{name}.npy").unlink()
    folder.rmdir()
    return n


def overrides(dataset: str, clients: int, rounds: int, npz: Path | None) -> list[str]:
    """The command-line overrides of one setting: m = PER_ROUND clients a round, one local epoch, B = 10."""
    data = (["dataset=synthetic", f"dataset.users={clients}", "dataset.samples_per_user=20",
             f"dataset.features={FEATURES}", f"dataset.classes={CLASSES}"] if dataset == "synthetic" else
            ["dataset=npz", f"dataset.path={npz}", "dataset.mmap=true"])
    return [*data, "partition=natural", "model=logreg", f"fl.clients={clients}", f"fl.fraction={PER_ROUND / clients}",
            "fl.local_epochs=1", "fl.batch_size=10", "fl.lr=0.1", f"fl.rounds={rounds}", f"fl.eval_every={rounds}",
            "tracking.log_model=false"]


def one(dataset: str, clients: int, rounds: int, npz: Path | None) -> dict:
    """Set up and run one setting in this process: setup seconds, round seconds, peak RSS."""
    from flexp.api import compose, experiment
    from flexp.job import prepare, train

    cfg = experiment(compose(overrides(dataset, clients, rounds, npz)))
    with PeakRSS() as rss:
        start = time.perf_counter()
        ready = prepare(cfg)
        setup = time.perf_counter() - start
        result = train(cfg, ready, lambda record: None)
    times = [r.round_seconds for r in result.history[1:-1]]
    return dict(dataset=dataset, clients=clients, per_round=cfg.fl.clients_per_round, samples=len(ready.data.train),
                setup_s=setup, round_s=statistics.median(times), round_min_s=min(times),
                first_round_s=result.history[0].round_seconds,
                peak_rss_mib=rss.peak, final_accuracy=result.history[-1].test_accuracy)


def in_child(dataset: str, clients: int, rounds: int, npz: Path | None) -> dict:
    """one(...) in a fresh interpreter, so its peak RSS is its own."""
    args = [sys.executable, __file__, "--one", dataset, str(clients), "--rounds", str(rounds)]
    done = subprocess.run([*args, "--npz", str(npz)] if npz else args, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{dataset} K={clients} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def million(args: argparse.Namespace) -> dict:
    """The K = 10^3 .. max_k table for synthetic and a memory-mapped npz."""
    rows = []
    sizes = [k for k in SIZES if k <= args.max_k]
    for k in sizes:
        rows.append(in_child("synthetic", k, args.rounds, None))
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for k in sizes:
            path = Path(tmp) / f"clients-{k}.npz"
            start = time.perf_counter()
            write_npz(path, k)
            rows.append({**in_child("npz", k, args.rounds, path), "write_s": time.perf_counter() - start,
                         "file_mib": path.stat().st_size / 2**20})
            print(json.dumps(rows[-1]), flush=True)
            path.unlink()
    print(f"\n{'dataset':>9} {'K':>9} {'m':>4} {'samples':>10} {'setup s':>8} {'round ms':>8} {'vs 1e3':>6} "
          f"{'min ms':>7} {'vs 1e3':>6} {'peak RSS MiB':>12}")
    for r in rows:
        base = next(b for b in rows if b["dataset"] == r["dataset"])
        print(f"{r['dataset']:>9} {r['clients']:9d} {r['per_round']:4d} {r['samples']:10d} {r['setup_s']:8.2f} "
              f"{1e3 * r['round_s']:8.2f} {r['round_s'] / base['round_s']:6.2f} {1e3 * r['round_min_s']:7.2f} "
              f"{r['round_min_s'] / base['round_min_s']:6.2f} {r['peak_rss_mib']:12.0f}")
    return dict(suite="million", rounds=args.rounds, cpu=cpu_model(), rows=rows)


def cpu_model() -> str:
    """lscpu's model name (platform's processor string where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")


def mnist(args: argparse.Namespace) -> dict:
    """K=1,000 with C=0.1 against K=10,000 with C=0.01 on MNIST indices."""
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    rows = [measure(data, k, c, 60, args.rounds, args.model) for k, c in ((1_000, 0.1), (10_000, 0.01))]
    print(f"\n{'K':>7} {'C':>5} {'m':>4} {'n_k':>4} {'round s':>8} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['clients']:7d} {r['fraction']:5.2f} {r['per_round']:4d} {r['n_k']:4d} {r['round_s']:8.3f} "
              f"{r['peak_rss_mib']:12.0f}")
    print(f"K=10,000 / K=1,000 round time: {rows[1]['round_s'] / rows[0]['round_s']:.2f}")
    return dict(suite="mnist", model=args.model, rounds=args.rounds, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("million", "mnist"), default="million")
    parser.add_argument("--rounds", type=int, default=None, help="rounds a setting (million: 25, mnist: 5)")
    parser.add_argument("--max-k", type=int, default=SIZES[-1])
    parser.add_argument("--tmp", default=None, help="where the npz files are written (default: the system's)")
    parser.add_argument("--model", default="2nn")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"))
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--one", nargs=2, metavar=("DATASET", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.rounds or 25, args.npz)))
        return
    args.rounds = args.rounds or (25 if args.suite == "million" else 5)
    found = million(args) if args.suite == "million" else mnist(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scale-{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(found, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
