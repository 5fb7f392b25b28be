"""FedAvg round cost on MNIST: hand-written loops vs flexp's engines vs the round's FLOP floor.

    python bench/rounds.py                 # 2nn and cnn, 5 measured rounds after 1 warm-up
    python bench/rounds.py --models 2nn-fedsgd --variants vectorized    # B=inf, C=1 (FedSGD)
    python bench/rounds.py --models 2nn --rounds 10 --device cuda
    python bench/rounds.py --models 2nn --variants vectorized --compression none,quantize:8,topk:0.01,sign --repeat 3

Variants: `reference` (a DataLoader per client), `hand` (batches indexed out of tensors: the fastest plain loop),
`threads`, `vectorized`. The FLOP floor of a round is its arithmetic (local training, forward + backward as
PyTorch's FLOP counter counts it, plus the forward over the test set) at the fp32 matmul rate measured on the spot;
`% floor` is that floor over the measured round. Prints a table and writes JSON under outputs/bench/. Every variant
starts from the same initial weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from flexp.client import LocalSpec
from flexp.compression.stage import QuantizeUpdates, RandomMaskUpdates, SignUpdates, TopKUpdates
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_mnist_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import run_fedavg, sample_clients
from flexp.models import build_model
from flexp.partition import iid
from flexp.stage import Plan, with_stages
from flexp.strategy.fedavg import FedAvg

SETTINGS = {"2nn": dict(model="2nn", local_epochs=1, batch_size=10, lr=0.1, fraction=0.1),
            "cnn": dict(model="cnn", local_epochs=5, batch_size=10, lr=0.1, fraction=0.1),
            "2nn-fedsgd": dict(model="2nn", local_epochs=1, batch_size=None, lr=0.1, fraction=1.0),
            "cnn-fedsgd": dict(model="cnn", local_epochs=1, batch_size=None, lr=0.1, fraction=1.0)}
CLIENTS, SEED = 100, 0
CODECS = {"quantize": lambda plan, v: QuantizeUpdates(plan, bits=int(v or 8)),
          "topk": lambda plan, v: TopKUpdates(plan, ratio=float(v or 0.01)),
          "random_mask": lambda plan, v: RandomMaskUpdates(plan, ratio=float(v or 0.01)),
          "sign": lambda plan, v: SignUpdates(plan)}


@dataclass
class Row:
    """One variant's measurements."""

    model: str
    variant: str
    round_s: float
    train_s: float
    eval_s: float
    samples_per_s: float
    gflops: float
    floor_s: float
    floor_pct: float
    peak_rss_mib: float
    accuracy: list[float] = field(default_factory=list)


class PeakRSS:
    """Samples this process's resident set every 10 ms while active; `.peak` in MiB."""

    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page / 2**20)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5, trials: int = 7) -> float:
    """The fp32 n^3 matmul rate, the best of `trials` (the machine's rate, not its noise): the FLOP floor's."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(model: nn.Module, batch: int = 10, backward: bool = True) -> float:
    """Forward (+ backward) FLOPs of one sample, counted by PyTorch's FLOP counter."""
    model = copy.deepcopy(model).cpu()
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(torch.randn(batch, 1, 28, 28)), torch.zeros(batch, dtype=torch.int64))
        if backward:
            loss.backward()
    return counter.get_total_flops() / batch


def round_flops(model: nn.Module, train_samples: int, test_samples: int) -> float:
    """The arithmetic of one round: local training (forward + backward) and the forward over the test set."""
    return train_samples * flops_per_sample(model) + test_samples * flops_per_sample(model, backward=False)


def plain_fedavg(name: str, rounds: int, init: nn.Module, sizes: list[int],
                 batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                 test_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> list[dict]:
    """FedAvg as users write it by hand: per sampled client a deepcopy'd model and optim.SGD over `batches(c)` (one
    epoch's (x, y) batches), the n_k-weighted mean of the state_dicts, then the accuracy over `test_batches()`."""
    cfg = SETTINGS[name]
    model, out = copy.deepcopy(init), []
    for round_ in range(1, rounds + 1):
        start = time.perf_counter()
        states, chosen = [], sample_clients(CLIENTS, int(CLIENTS * cfg["fraction"]), SEED, round_)
        for c in chosen:
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=cfg["lr"])
            for _ in range(cfg["local_epochs"]):
                for x, y in batches(c):
                    opt.zero_grad()
                    F.cross_entropy(local(x), y).backward()
                    opt.step()
            states.append(local.state_dict())
        n = [sizes[c] for c in chosen]
        model.load_state_dict({k: sum(s[k] * m for s, m in zip(states, n)) / sum(n) for k in states[0]})
        trained = time.perf_counter()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_batches():
                correct, total = correct + int((model(x).argmax(1) == y).sum()), total + len(y)
        out.append(dict(train_s=trained - start, eval_s=time.perf_counter() - trained, accuracy=correct / total))
    return out


def hand_loop(name: str, data, parts: list[torch.Tensor], rounds: int, init: nn.Module) -> list[dict]:
    """The fastest plain loop: batches indexed out of the data tensors in a shuffled order each epoch."""
    batch = SETTINGS[name]["batch_size"]

    def batches(c: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = parts[c][torch.randperm(len(parts[c]))]
        for first in range(0, len(order), batch or len(order)):
            chosen = order[first:first + (batch or len(order))]
            yield data.train.x[chosen], data.train.y[chosen]

    def test_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return ((data.test.x[i:i + 1000], data.test.y[i:i + 1000]) for i in range(0, len(data.test), 1000))

    return plain_fedavg(name, rounds, init, [len(p) for p in parts], batches, test_batches)


def reference_loop(name: str, root: Path, parts: list[torch.Tensor], rounds: int, init: nn.Module) -> list[dict]:
    """The hand-written FedAvg many tutorials use: torchvision dataset, a DataLoader per client, deepcopy'd models."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    test = datasets.MNIST(str(root), train=False, download=False, transform=tf)
    batch = SETTINGS[name]["batch_size"]
    loaders = [DataLoader(Subset(train, p.tolist()), batch_size=batch or len(p), shuffle=True) for p in parts]
    return plain_fedavg(name, rounds, init, [len(p) for p in parts], lambda c: loaders[c],
                        lambda: DataLoader(test, batch_size=1000))


class Timed:
    """Wraps an engine to time its training part of each round."""

    def __init__(self, engine, device: torch.device) -> None:
        self.engine, self.device, self.times = engine, device, []

    def run_round(self, params, tasks, algorithm=None):
        start = time.perf_counter()
        out = self.engine.run_round(params, tasks, algorithm)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        return out


def codec_stage(spec: str, rounds: int, fraction: float):
    """The compression stage a --compression entry names (`quantize:8`, `topk:0.01`, `sign`), or None for none."""
    kind, _, value = spec.partition(":")
    if kind == "none":
        return None
    plan = Plan(CLIENTS, CLIENTS * fraction, "fixed", rounds, SEED)
    return CODECS[kind](plan, value)


def flexp_loop(name: str, engine_name: str, data, parts, rounds: int, init: nn.Module,
               device: torch.device, codec: str = "none") -> list[dict]:
    """flexp's own round loop with the chosen engine (and codec: the stage encodes and decodes every update)."""
    cfg = SETTINGS[name]
    spec = LocalSpec(cfg["local_epochs"], cfg["batch_size"], cfg["lr"])
    make = lambda: copy.deepcopy(init)  # noqa: E731
    engine = (ThreadEngine(make, data.train, spec, 2, device) if engine_name == "threads"
              else VectorizedEngine(make, data.train, spec, device=device, workers=2))
    timed = Timed(engine, device)
    fl = FLConfig(CLIENTS, cfg["fraction"], cfg["local_epochs"], cfg["batch_size"], cfg["lr"], rounds, 1, None, False)
    stage = codec_stage(codec, rounds, cfg["fraction"])
    algorithm = with_stages(FedAvg(), {"compression": stage} if stage else {})
    result = run_fedavg(copy.deepcopy(init).to(device), parts, data.test, fl, timed, SEED, strategy=algorithm)
    engine.close()
    return [dict(train_s=t, eval_s=r.round_seconds - t, accuracy=r.test_accuracy)
            for t, r in zip(timed.times, result.history)]


def summarise(model: str, variant: str, rounds: list[dict], warmup: int, samples: int, flops: float,
              roof: float, rss: float) -> Row:
    """Medians over the measured rounds; GFLOP/s and the floor over the whole round (training and evaluation)."""
    measured = rounds[warmup:]
    train_s = statistics.median(r["train_s"] for r in measured)
    eval_s = statistics.median(r["eval_s"] for r in measured)
    round_s = statistics.median(r["train_s"] + r["eval_s"] for r in measured)
    floor_s = flops / (roof * 1e9)
    return Row(model, variant, round_s, train_s, eval_s, samples / train_s, flops / round_s / 1e9, floor_s,
               100 * floor_s / round_s, rss, [round(r["accuracy"], 4) for r in rounds])


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    parser.add_argument("--models", default="2nn,cnn", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--variants", default="reference,hand,threads,vectorized",
                        help="comma-separated, of reference, hand, threads, vectorized (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and left out of the medians")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--root", default=os.environ.get("FLEXP_DATA", "~/.cache/flexp"),
                        help="MNIST's data folder (as dataset.root; $FLEXP_DATA when set)")
    parser.add_argument("--out", default="outputs/bench", help="where the JSON goes")
    parser.add_argument("--compression", default="none", help="codecs for the flexp variants, comma-separated: "
                        "none, quantize:BITS, topk:RATIO, random_mask:RATIO, sign")
    parser.add_argument("--repeat", type=int, default=1, help="run the variants this many times, interleaved "
                        "(each keeps its fastest run: timings drift on a shared machine)")
    args = parser.parse_args()
    device, root = torch.device(args.device), Path(args.root).expanduser()
    data = load_mnist_dataset(DatasetConfig(name="mnist", root=root), log=lambda s: None)
    cpu_parts = iid(len(data.train), CLIENTS, SEED)
    roof = matmul_gflops(device)
    print(f"matmul fp32 roofline: {roof:.1f} GFLOP/s on {device} ({torch.get_num_threads()} threads)", flush=True)
    rows, total = [], args.rounds + args.warmup
    for name in args.models.split(","):
        cfg = SETTINGS[name]
        torch.manual_seed(SEED)
        init = build_model(cfg["model"], (1, 28, 28), 10)
        samples = int(CLIENTS * cfg["fraction"]) * 600 * cfg["local_epochs"]
        flops = round_flops(init, samples, len(data.test))
        best: dict[str, Row] = {}
        for _ in range(args.repeat):
            for variant, codec in variants(args):
                if variant == "reference" and device.type != "cpu":
                    continue
                with PeakRSS() as rss:
                    if variant == "reference":
                        rounds = reference_loop(name, root, cpu_parts, total, init)
                    elif variant == "hand":
                        rounds = hand_loop(name, data.to(device), cpu_parts, total, init.to(device))
                    else:
                        rounds = flexp_loop(name, variant, data.to(device), cpu_parts, total, init.to(device), device,
                                            codec)
                label = variant if codec == "none" else f"{variant}+{codec}"
                row = summarise(name, label, rounds, args.warmup, samples, flops, roof, rss.peak)
                print(f"  {name} {label}: {row.round_s:.3f} s/round, acc {row.accuracy}", flush=True)
                if label not in best or row.round_s < best[label].round_s:
                    best[label] = row
        rows.extend(best.values())
    print_table(rows, roof)
    write_json(rows, roof, args)


def variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(engine variant, codec) pairs: the reference loop once, each flexp engine with each codec."""
    codecs = args.compression.split(",")
    return [(v, "none") if v == "reference" else (v, c) for v in args.variants.split(",")
            for c in (["none"] if v == "reference" else codecs)]


def print_table(rows: list[Row], roof: float) -> None:
    hand = {r.model: r.round_s for r in rows if r.variant == "hand"}
    head = f"{'model':10} {'variant':10} {'round s':>8} {'train s':>8} {'eval s':>7} {'vs hand':>8} " \
           f"{'samples/s':>10} {'GFLOP/s':>8} {'floor s':>8} {'% floor':>8} {'peak RSS MiB':>12} {'final acc':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        speed = f"{hand[r.model] / r.round_s:.2f}x" if r.model in hand else "-"
        print(f"{r.model:10} {r.variant:10} {r.round_s:8.3f} {r.train_s:8.3f} {r.eval_s:7.3f} {speed:>8} "
              f"{r.samples_per_s:10.0f} {r.gflops:8.1f} {r.floor_s:8.3f} {r.floor_pct:7.0f}% {r.peak_rss_mib:12.0f} "
              f"{r.accuracy[-1]:9.4f}")
    print(f"(floor: the round's FLOPs at the fp32 2048^3 matmul rate measured now, {roof:.1f} GFLOP/s; vs hand: the "
          "hand loop's round s / round s; GFLOP/s and samples/s: the whole round and local training)")
    base = {(r.model, r.variant): r.round_s for r in rows if "+" not in r.variant}
    for r in rows:
        if "+" in r.variant and (r.model, r.variant.split("+")[0]) in base:
            plain = base[(r.model, r.variant.split("+")[0])]
            print(f"{r.model} {r.variant}: {100 * (r.round_s / plain - 1):+.1f}% round time over no compression")


def cpu_model() -> str:
    """lscpu's model name (timings compare only within one machine)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def write_json(rows: list[Row], roof: float, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rounds-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                machine=platform.machine(), device=args.device, rounds=args.rounds, warmup=args.warmup,
                clients=CLIENTS, settings=SETTINGS, roofline_gflops=roof,
                compression=args.compression, repeat=args.repeat, cpu=cpu_model())
    path.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
