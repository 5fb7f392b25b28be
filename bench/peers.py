"""flexp beside the FL simulators users would otherwise pick, on the paper's MNIST setup, in one run.

    python bench/peers.py                   # 2nn and cnn: flexp, the hand loop, pfl-research, Flower
    python bench/peers.py --models cnn --rounds 4 --peers flower

Every contender trains the same model from the same initial weights on the same data and IID partition
(K=100, C=0.1, B=10; 2nn E=1, cnn E=5; lr 0.1) and evaluates on the whole 10k test set each round. flexp and
the hand loop run here (bench/rounds.py's code); pfl-research and Flower run in their own venv
(bench/peers/requirements.txt says how to make it; --peer-python points at its python), reading the data this
script exports. The first round of each is a warm-up; the table gives the median of the rest and each one's
slowdown against flexp. Prints the table and writes JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rounds import SETTINGS, Help, cpu_model, flexp_loop, hand_loop, matmul_gflops, round_flops  # noqa: E402

from flexp.config import DatasetConfig  # noqa: E402
from flexp.data import load_mnist_dataset  # noqa: E402
from flexp.models import build_model  # noqa: E402
from flexp.partition import iid  # noqa: E402

CLIENTS, SEED = 100, 0
PEERS = {"pfl": "pfl_round.py", "flower": "flower_round.py"}
NAMES = {"pfl": "pfl-research", "flower": "Flower"}


def export(name: str, data, parts: list[torch.Tensor], init: torch.nn.Module, rounds: int, path: Path) -> None:
    """The data, partition, initial model and settings a peer script reads (torch.save; the model pickled whole)."""
    cfg = SETTINGS[name]
    settings = dict(clients=CLIENTS, fraction=cfg["fraction"], local_epochs=cfg["local_epochs"],
                    batch_size=cfg["batch_size"], lr=cfg["lr"], rounds=rounds, seed=SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(train_x=data.train.x, train_y=data.train.y, test_x=data.test.x, test_y=data.test.y,
                    parts=[torch.as_tensor(p) for p in parts], model=init, settings=settings), path)


def run_peer(python: str, peer: str, data_path: Path, out: Path, timeout: int) -> list[dict]:
    """A peer script's rounds ({round_s, train_s, eval_s, accuracy}), run in the peers' venv."""
    script = Path(__file__).parent / "peers" / PEERS[peer]
    subprocess.run([python, str(script), "--data", str(data_path), "--out", str(out)], check=True, timeout=timeout)
    return json.loads(out.read_text())["rounds"]


def contenders(name: str, data, parts: list[torch.Tensor], init: torch.nn.Module, args: argparse.Namespace,
               out: Path) -> dict[str, Callable[[], list[dict]]]:
    """Who runs `name`'s setting, each as a function giving its rounds: flexp (the engine `auto` picks on the
    CPU), the hand loop, and each peer (after the setting is exported for it)."""
    engine = "vectorized" if SETTINGS[name]["model"] == "2nn" else "threads"
    runs = {"flexp": partial(flexp_loop, name, engine, data, parts, args.rounds, init, torch.device("cpu")),
            "hand loop": partial(hand_loop, name, data, parts, args.rounds, init)}
    data_path = out / "peers" / f"mnist-{name}.pt"
    export(name, data, parts, init, args.rounds, data_path)
    for peer in filter(None, args.peers.split(",")):
        runs[peer] = partial(run_peer, args.peer_python, peer, data_path, out / "peers" / f"{peer}-{name}.json",
                             args.timeout)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--models", default="2nn,cnn", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--rounds", type=int, default=4, help="rounds each; the first is a warm-up, the table gives "
                        "the median of the rest")
    parser.add_argument("--peers", default="pfl,flower", help=f"comma-separated, of {', '.join(PEERS)}; '' for none")
    parser.add_argument("--peer-python", default=str(Path(__file__).parent / "peers" / ".venv" / "bin" / "python"),
                        help="the python of the peers' venv (bench/peers/requirements.txt)")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"), help="MNIST's data root")
    parser.add_argument("--out", default="outputs/bench", help="where the JSON goes (and the data the peers read, "
                        "under peers/: ~220 MB a model)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a peer may take")
    args = parser.parse_args()
    if args.peers and not Path(args.peer_python).exists():
        parser.error(f"--peer-python {args.peer_python}: no such file; make the peers' venv with `python -m venv "
                     "bench/peers/.venv && bench/peers/.venv/bin/pip install -r bench/peers/requirements.txt`, or "
                     "pass --peers '' to run flexp and the hand loop only")
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=Path(args.root).expanduser()), log=lambda s: None)
    parts = iid(len(data.train), CLIENTS, SEED)
    roof = matmul_gflops(torch.device("cpu"))
    print(f"matmul fp32: {roof:.1f} GFLOP/s ({torch.get_num_threads()} threads) on {cpu_model()}", flush=True)
    out, rows = Path(args.out), []
    for name in args.models.split(","):
        cfg = SETTINGS[name]
        torch.manual_seed(SEED)
        init = build_model(cfg["model"], (1, 28, 28), 10)
        samples = int(CLIENTS * cfg["fraction"]) * 600 * cfg["local_epochs"]
        floor = round_flops(init, samples, len(data.test)) / roof / 1e9
        for who, run in contenders(name, data, parts, init, args, out).items():
            print(f"{name}: {who} ...", flush=True)
            try:
                rounds = [dict(r, round_s=r.get("round_s", r["train_s"] + r["eval_s"])) for r in run()]
            except subprocess.CalledProcessError as err:
                print(f"  {who} failed (exit {err.returncode}; its output is above): left out of the table", flush=True)
                continue
            except subprocess.TimeoutExpired:
                print(f"  {who} ran past --timeout {args.timeout} s: left out of the table", flush=True)
                continue
            measured = rounds[1:] or rounds
            rows.append(dict(model=name, who=who, round_s=statistics.median(r["round_s"] for r in measured),
                             eval_s=statistics.median(r["eval_s"] for r in measured), floor_s=floor,
                             accuracy=[round(r["accuracy"], 4) for r in rounds]))
            print(f"  {rows[-1]['round_s']:.3f} s/round, accuracy {rows[-1]['accuracy']}", flush=True)
    print_table(rows, roof)
    path = out / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(meta=dict(cpu=cpu_model(), torch=torch.__version__, roofline_gflops=roof,
                                              rounds=args.rounds, threads=torch.get_num_threads()), rows=rows),
                               indent=2))
    print(f"wrote {path}")


def print_table(rows: list[dict], roof: float) -> None:
    flexp = {r["model"]: r["round_s"] for r in rows if r["who"] == "flexp"}
    print("\n| model | contender | s/round | vs flexp | eval s | % of the FLOP floor | accuracy, round 1 / last |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {NAMES.get(r['who'], r['who'])} | {r['round_s']:.3f} | "
              f"{r['round_s'] / flexp[r['model']]:.2f}x | "
              f"{r['eval_s']:.3f} | {100 * r['floor_s'] / r['round_s']:.0f}% | "
              f"{r['accuracy'][0]} / {r['accuracy'][-1]} |")
    print(f"(floor: the round's FLOPs at the fp32 matmul rate measured now, {roof:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
