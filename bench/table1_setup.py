"""Is the gap to the paper's Table 1 our setup? Rounds to 97% for the 2NN (IID, E=1, B=10) under the setup the
paper may have had: MNIST pixels in [0, 1] instead of standardized, and TensorFlow-tutorial initialisation
(truncated normal, std 0.1, biases 0.1) instead of PyTorch's default.

    python bench/table1_setup.py                         # C=0.1, rates 0.0464 ... 0.464
    python bench/table1_setup.py --fraction 0.0 --lrs 0.0215,0.0464,0.1,0.215

Prints the best rate's interpolated rounds per variant (and every rate's) and writes JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import flexp
import flexp.data
from flexp.models import two_nn


def tf_init_2nn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The 2NN initialised as TensorFlow's 2016 MNIST tutorials did."""
    model = two_nn(784, num_classes)
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(layer.bias, 0.1)
    return model


@contextmanager
def unit_pixels():
    """MNIST pixels scaled to [0, 1] and not standardized, while inside."""
    standard = flexp.data._mnist_images
    flexp.data._mnist_images = lambda raw: (raw.float() / 255.0).unsqueeze(1).contiguous()
    try:
        yield
    finally:
        flexp.data._mnist_images = standard


VARIANTS: dict[str, tuple[bool, Callable | None]] = {
    "flexp (standardized, PyTorch init)": (False, None),
    "pixels in [0, 1], PyTorch init": (True, None),
    "pixels in [0, 1], TF-tutorial init": (True, tf_init_2nn),
}


def rounds(fraction: float, lr: float, unit: bool, model: Callable | None, budget: int) -> float | None:
    """Interpolated rounds to 97% of one run (None: not reached in `budget`)."""
    cfg = flexp.compose(["+experiment=mnist_2nn_iid", f"fl.fraction={fraction}", f"fl.lr={lr}",
                         f"fl.rounds={budget}"])
    if unit:
        with unit_pixels():
            result = flexp.run(cfg, model=model)
    else:
        result = flexp.run(cfg, model=model)
    return result.summary.get("rounds_to_target_interp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--lrs", default="0.0464,0.1,0.215,0.464")
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    found = {name: {lr: rounds(args.fraction, lr, unit, model, args.rounds) for lr in lrs}
             for name, (unit, model) in VARIANTS.items()}
    print(f"\n2NN, IID, C={args.fraction:g}, E=1, B=10: rounds to 97% ('-': not in {args.rounds})\n")
    print("| variant | best | " + " | ".join(f"η={lr:g}" for lr in lrs) + " |")
    print("|---|---|" + "---|" * len(lrs))
    for name, by_lr in found.items():
        reached = {lr: r for lr, r in by_lr.items() if r is not None}
        best = f"{min(reached.values()):.1f}" if reached else "-"
        cells = " | ".join("-" if r is None else f"{r:.1f}" for r in by_lr.values())
        print(f"| {name} | {best} | {cells} |")
    out = Path("outputs/bench") / f"table1_setup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fraction": args.fraction, "torch": torch.__version__,
                               "rounds": {n: {str(k): v for k, v in r.items()} for n, r in found.items()}}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
