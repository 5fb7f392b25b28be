"""Checkpoint bytes per round with SCAFFOLD, and its per-client state in RAM or spilled to disk.

    python bench/client_state.py                       # the CNN, K=1,000, C=0.1, E=1, B=50, 4 rounds
    python bench/client_state.py --model 2nn --rounds 6 --budget-mb 64

Each client holds 60 MNIST samples. Every round is checkpointed (flexp.checkpoint.save) into a temporary output dir;
the table gives, per round, the bytes the checkpoint wrote (checkpoint.pt and the client-state files), the state of
the clients that took part that round (m x the model), what a checkpoint holding every c_i would write (the store
whole), the store's size, round seconds and this process's peak RSS. Writes JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import PeakRSS, cpu_model  # noqa: E402

from flexp import checkpoint  # noqa: E402
from flexp.client import LocalSpec  # noqa: E402
from flexp.client_state import configure_stores  # noqa: E402
from flexp.config import DatasetConfig, EngineConfig, FLConfig  # noqa: E402
from flexp.data import load_mnist_dataset  # noqa: E402
from flexp.engine import make_engine  # noqa: E402
from flexp.fedavg import run_fedavg  # noqa: E402
from flexp.models import build_model  # noqa: E402
from flexp.strategy.scaffold import Scaffold  # noqa: E402

SEED = 0


def checkpoint_files(directory: Path) -> dict[Path, float]:
    """The checkpoint's files under `directory` (not the spill area, which is working memory) -> their mtime."""
    spill = directory / checkpoint.STATE_DIR / "spill"
    return {p: p.stat().st_mtime for p in directory.rglob("*") if p.is_file() and spill not in p.parents}


def written_bytes(directory: Path, before: dict[Path, float]) -> int:
    """Bytes of the checkpoint files created or replaced since `before`."""
    return sum(p.stat().st_size for p, mtime in checkpoint_files(directory).items() if before.get(p) != mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--budget-mb", type=float, default=None, help="checkpoint.client_state_mb (None: all in RAM)")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"))
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    generator = torch.Generator().manual_seed(SEED)
    parts = [torch.randint(0, len(data.train), (60,), generator=generator) for _ in range(args.clients)]
    make = lambda: build_model(args.model, (1, 28, 28), 10)  # noqa: E731
    torch.manual_seed(SEED)
    model = make()
    fl = FLConfig(args.clients, args.fraction, 1, 50, 0.05, args.rounds, args.rounds, None, False)
    engine = make_engine(EngineConfig(name="threads"), make, data.train, LocalSpec(1, 50, 0.05), torch.device("cpu"))
    scaffold = Scaffold(args.clients, 0.05)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent if Path(args.out).parent.exists() else None) as tmp:
        out = Path(tmp)
        budget = None if args.budget_mb is None else int(args.budget_mb * 2**20)
        configure_stores(scaffold, budget, out / checkpoint.STATE_DIR / "spill")
        model_bytes = sum(p.numel() for p in model.parameters()) * 4
        clock = {"t": time.perf_counter()}

        def on_state(state):
            before = checkpoint_files(out)
            seconds = time.perf_counter() - clock["t"]
            checkpoint.save(out, checkpoint.Checkpoint(state, None, {}, checkpoint.rng_states()))
            store = scaffold.c_i
            rows.append(dict(round=state.round, written_mb=written_bytes(out, before) / 1e6,
                             took_part_mb=state.history[-1].clients * model_bytes / 1e6,
                             whole_store_mb=(store.nbytes() + 2 * model_bytes) / 1e6, store_clients=len(store),
                             in_ram_mb=store.held / 1e6, round_s=seconds))
            clock["t"] = time.perf_counter()

        with PeakRSS() as rss:
            run_fedavg(model, parts, data.test, fl, engine, SEED, strategy=scaffold, on_state=on_state,
                       evaluation=None)
        engine.close()
    print(f"{'round':>5} {'written MB':>11} {'took part MB':>13} {'ratio':>6} {'whole store MB':>15} "
          f"{'clients':>8} {'in RAM MB':>10} {'round s':>8}")
    for r in rows:
        print(f"{r['round']:5d} {r['written_mb']:11.1f} {r['took_part_mb']:13.1f} "
              f"{r['written_mb'] / r['took_part_mb']:6.2f} {r['whole_store_mb']:15.1f} {r['store_clients']:8d} "
              f"{r['in_ram_mb']:10.1f} {r['round_s']:8.2f}")
    print(f"peak RSS {rss.peak:.0f} MiB; {args.model}, K={args.clients}, C={args.fraction}, budget {args.budget_mb} MB")
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"client_state-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = dict(vars(args), cpu=cpu_model(), torch=torch.__version__, peak_rss_mib=rss.peak)
    target.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
