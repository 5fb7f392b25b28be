"""Ctrl-C and SIGTERM that always stop a job, and never in the middle of something.

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be: inside an import of torch
(whose C++ then aborts the process), inside a library that catches it, or not at all when the job was started with
SIGINT ignored (a background job of a shell script inherits that, and Python keeps it). So the CLI installs its own
handlers. Until the job asks for an MLflow run there is nothing to keep, and a signal exits at once. From then on
(`keep_run`) the first signal only records the request, and the job stops at the next safe point (every local SGD
step, evaluation batch, round, data-loading stage and wait polls `check`), raising KeyboardInterrupt there, in the
main thread or a client's worker thread; the run then ends KILLED with every round logged so far. A second signal
exits at once: the tracking process still ends the run KILLED when its pipe closes, and checkpoints are written
atomically.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130
NOTHING_LOGGED = "interrupted before the run started; nothing was logged"
_requested = threading.Event()
_state = {"installed": False, "keep_run": False}


def install() -> None:
    """Handle SIGINT and SIGTERM (call from the main thread, before anything slow): exit at once until `keep_run`."""
    _handle()
    _state.update(installed=True, keep_run=False)


def keep_run() -> None:
    """A run is being started: from now on a signal stops the job at its next safe point, so the run ends KILLED."""
    _state["keep_run"] = True


def reclaim() -> None:
    """Take SIGINT and SIGTERM back after a library set its own handlers (ray.init's SIGTERM exits the process,
    leaving the run FAILED), where `install` was called."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        _handle()


def _handle() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    if not _state["keep_run"]:
        _exit_now(NOTHING_LOGGED)
    if _requested.is_set():
        _exit_now("stopped at once (second interrupt); the tracking process marks the run KILLED")
    _requested.set()
    print(f"flexp: {signal.Signals(signum).name} received: stopping at the next step (again to stop at once)",
          file=sys.stderr, flush=True)


def _exit_now(message: str) -> None:
    print(f"flexp: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def requested() -> bool:
    """Whether a stop was asked for."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for: the job's safe points call this."""
    if _requested.is_set():
        raise KeyboardInterrupt


def mapped(pool: Executor, fn: Callable[[T], R], items: Iterable[T], poll_s: float = 0.1) -> list[R]:
    """pool.map(fn, items) as a list, waking the main thread every `poll_s`: a thread blocked on a lock runs no
    signal handler, so a plain map would hear Ctrl-C only once the whole round is done. On a stop request the
    clients not yet started are cancelled, the running ones stop at their next step, and KeyboardInterrupt rises."""
    futures: Sequence[Future[R]] = [pool.submit(fn, item) for item in items]
    try:
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=poll_s)
            check()
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def reset() -> None:
    """Forget a stop request (tests, and a process that goes on after handling one)."""
    _requested.clear()
