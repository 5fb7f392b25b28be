"""The clients' devices: compute speed and bandwidth per client, drawn from a distribution or read from a trace.

A client's profile is fixed for the run (FedScale's device traces are too). Drawn profiles are log-normal around
the configured medians: value x exp(spread z), z standard normal, one row of draws per client from the stream
(seed, 11), so client k's device does not depend on K. `spread` 0 gives every client the medians; 1.0 is heavy
tailed (the slowest 5% are ~5x slower than the median, the fastest 5% ~5x faster).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexp.component import Invalid, number
from flexp.stage import Plan

MBPS = 125_000  # bytes per second in one megabit per second
DEVICES = 11  # the profiles' stream: (seed, DEVICES)
COLUMNS = ("client", "samples_per_second", "up_mbps", "down_mbps")


@dataclass(frozen=True)
class Profiles:
    """Per client: training speed (samples/s), upload and download bandwidth (bytes/s)."""

    speed: np.ndarray
    up: np.ndarray
    down: np.ndarray

    def seconds(self, client: int, download_bytes: int, samples: int, upload_bytes: int) -> float:
        """A client's round: download its messages, train on `samples` samples, upload its reply."""
        return (download_bytes / self.down[client] + samples / self.speed[client]
                + upload_bytes / self.up[client])


def drawn(clients: int, seed: int, samples_per_second: float, up_mbps: float, down_mbps: float,
          spread: float) -> Profiles:
    """Log-normal profiles around the medians (spread 0: every client at the medians)."""
    z = np.random.default_rng([seed, DEVICES]).standard_normal((clients, 3))
    factor = np.exp(spread * z)
    return Profiles(samples_per_second * factor[:, 0], up_mbps * MBPS * factor[:, 1],
                    down_mbps * MBPS * factor[:, 2])


def read_trace(path: str | Path, clients: int) -> Profiles:
    """Profiles from a CSV with the header `client,samples_per_second,up_mbps,down_mbps`, one row per device, ids
    0..n-1 in any order; client k runs on device k mod n. A malformed file is a one-line ConfigError naming the
    line."""
    from flexp.config import ConfigError

    def bad(line: int, why: str) -> ConfigError:
        return ConfigError("system.path", str(path), f"line {line}: {why}")

    try:
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("system.path", str(path), f"cannot be read ({err.strerror or err})") from None
    if not rows or tuple(c.strip() for c in rows[0]) != COLUMNS:
        raise bad(1, f"the header must be {','.join(COLUMNS)}")
    table: dict[int, tuple[float, float, float]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise bad(line, f"has {len(row)} fields, not {len(COLUMNS)}")
        try:
            client, *values = int(row[0]), *(float(v) for v in row[1:])
        except ValueError:
            raise bad(line, f"{','.join(row)!r} is not an integer client id and three numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise bad(line, "speeds and bandwidths must be positive numbers")
        if client in table:
            raise bad(line, f"client {client} is listed twice")
        table[client] = tuple(values)
    if not table:
        raise bad(2, "the trace lists no device")
    if sorted(table) != list(range(len(table))):
        missing = min(set(range(len(table))) - set(table))
        raise ConfigError("system.path", str(path), f"lists no device {missing} (ids must be 0..{len(table) - 1})")
    rows_of = np.array([table[k % len(table)] for k in range(clients)], dtype=np.float64).reshape(clients, 3)
    return Profiles(rows_of[:, 0], rows_of[:, 1] * MBPS, rows_of[:, 2] * MBPS)


class System:
    """The simulated deployment: each client's device, the round's deadline (seconds; None: wait for all) and
    over-selection (sample ceil(m (1 + over_select)) clients, keep the first m to report; Bonawitz et al. 2019)."""

    def __init__(self, plan: Plan, samples_per_second: float = 1000.0, up_mbps: float = 10.0,
                 down_mbps: float = 50.0, spread: float = 0.0, path: str | None = None,
                 deadline: float | None = None, over_select: float = 0.0) -> None:
        speeds = {"samples_per_second": samples_per_second, "up_mbps": up_mbps, "down_mbps": down_mbps}
        for name, value in speeds.items():
            number(name, value, low=0.0, strict_low=True)
        number("spread", spread, low=0.0)
        self.deadline = None if deadline is None else number("deadline", deadline, low=0.0, strict_low=True)
        self.over_select = number("over_select", over_select, low=0.0)
        if self.over_select and plan.sampling != "fixed":
            raise Invalid("over_select", over_select, "needs fl.sampling=fixed (Poisson sampling draws each client "
                                                      "with its own probability)")
        if path is not None and not isinstance(path, str):
            raise Invalid("path", path, "must be the path of a CSV trace")
        self.plan = plan
        self.profiles = (read_trace(path, plan.clients) if path is not None
                         else drawn(plan.clients, plan.seed, samples_per_second, up_mbps, down_mbps, spread))

    def per_round(self, wanted: int) -> int:
        """Clients to sample for `wanted` replies: ceil(wanted (1 + over_select)), at most K."""
        return min(self.plan.clients, math.ceil(round(wanted * (1 + self.over_select), 9)))

    def check_deadline(self, download_bytes: int, samples: Any, upload_bytes: int = 0) -> None:
        """Refuse (ConfigError) a deadline no client can meet: each client's download, local training (`samples[k]`:
        what client k trains on in a round) and upload (0 when a codec decides its size) take longer."""
        from flexp.config import ConfigError

        if self.deadline is None:
            return
        p = self.profiles
        fastest = float(np.min(download_bytes / p.down + np.asarray(samples, dtype=np.float64) / p.speed
                               + upload_bytes / p.up))
        if fastest > self.deadline:
            what = "download the model, train and upload its update" if upload_bytes else "download the model and train"
            raise ConfigError("system.deadline", self.deadline, f"no client can meet it: the fastest needs "
                                                                f"{fastest:.3g} s to {what}")

    def run_params(self) -> dict[str, Any]:
        """The medians of the K clients' devices as drawn (or read), logged with the run's params."""
        p = self.profiles
        medians = {"samples_per_second": np.median(p.speed), "up_mbps": np.median(p.up) / MBPS,
                   "down_mbps": np.median(p.down) / MBPS}
        return {f"system.drawn_median_{k}": float(f"{v:.4g}") for k, v in medians.items()}
