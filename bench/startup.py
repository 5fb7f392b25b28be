"""Seconds from `python -m flexp ...` to its first finished round, with the data already cached.

    python bench/startup.py [extra overrides...]      # default: +experiment=mnist_2nn_iid, 3 tries

Prints each try and the median (time to the first round's line minus that round's own seconds) and writes JSON
under outputs/bench/.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STORE = ""


def one_try(overrides: list[str]) -> float:
    """Launch the CLI into a fresh store; return start-up seconds (to the first round, less the round itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "flexp", *overrides, f"tracking.uri=sqlite:///{tmp}/m.db",
                                 "tracking.log_model=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=tmp)
        for line in proc.stdout:
            if line.startswith("round 1/"):
                elapsed = time.perf_counter() - start
                proc.terminate()  # SIGTERM: the job ends its run KILLED and waits for its tracking writer
                proc.wait()
                return elapsed - float(re.search(r"([0-9.]+)s\s*$", line).group(1))
        raise RuntimeError(f"no round finished (exit {proc.wait()})")


def main() -> None:
    global STORE
    overrides = sys.argv[1:] or ["+experiment=mnist_2nn_iid"]
    tries = [one_try(overrides) for _ in range(3)]
    with tempfile.TemporaryDirectory() as STORE:
        one_try(overrides)
        reused = [one_try(overrides) for _ in range(3)]
    print(f"new MLflow store each time: {' '.join(f'{t:.2f}' for t in tries)} s")
    print(f"existing MLflow store:      {' '.join(f'{t:.2f}' for t in reused)} s")
    print(f"median start-up: {statistics.median(tries):.2f} s (new store), {statistics.median(reused):.2f} s "
          f"(existing store) for {' '.join(overrides)}")
    out = Path("outputs/bench")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(overrides=overrides, new_store_s=tries, existing_store_s=reused), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
