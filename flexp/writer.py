"""Tracking in a child process: MLflow imports and opens its store while the job loads torch and data, and a
tracking fault mid-run never stops training.

The parent sends one JSON line per call on the child's stdin; the child answers `start` (and reports errors) on
its stdout. The child ignores Ctrl-C and SIGTERM so it can end the run KILLED after the parent says so, and it
ends the run KILLED itself if the parent vanishes (stdin closes without a `finish`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexp import interrupt
from flexp.config import TrackingConfig

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("flexp")
START_TIMEOUT_S = 120.0
POLL_S = 0.1  # how often a wait for the writer looks for Ctrl-C
FINISH_TIMEOUT_S = 600.0


class TrackingError(RuntimeError):
    """The tracking store could not be reached or refused the run (reported in one line at start)."""


class TrackingWriter:
    """The job's Tracker: forwards every call to a writer process started as soon as the config is known."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.started = False  # a run was started (or reopened) in the store
        self.asked = False  # `start` was sent: from then on the writer must be let finish
        self.failure: str | None = None
        self.resume_hint = ""  # how to resume the job, told when tracking fails mid-run
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", **os.environ,
               "PYTHONUNBUFFERED": "1"}  # a server that goes away mid-run costs seconds per call, not minutes
        self.proc = subprocess.Popen([sys.executable, "-m", "flexp.writer", json.dumps(cfg.__dict__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a reply: something in the writer printed to its stdout
            if "error" in reply and self.run_id is not None:
                self._failed(reply["error"])
            self.replies.put(reply)
        self.replies.put({"error": f"the tracking process ended (exit {self.proc.wait()})"})

    def _failed(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.warning("tracking failed: %s. Training goes on and checkpoints keep being written; nothing logged so "
                        "far is lost. %s", message, self.resume_hint)

    def _send(self, op: str, **fields: Any) -> None:
        if self.failure is not None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            self._failed(f"the tracking process is gone ({err})")

    def _answer(self) -> dict[str, Any]:
        for _ in range(int(START_TIMEOUT_S / POLL_S)):
            interrupt.check()
            try:
                return self.replies.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return {"error": f"no answer from {self.cfg.uri} in {START_TIMEOUT_S:.0f} s"}

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> str:
        """Start (or, given `run_id`, reopen) the run and wait for its id; TrackingError if the store fails."""
        self.asked = True
        interrupt.keep_run()
        self._send("start", run_name=run_name, tags=dict(tags), run_id=run_id)
        reply = self._answer()
        if "error" in reply:
            self.close()
            raise TrackingError(f"tracking.uri={self.cfg.uri}: {reply['error']}")
        self.run_id, self.started = reply["run_id"], True
        return self.run_id

    def logged_rounds(self) -> set[int]:
        """The rounds the run already has metrics for; empty if tracking has failed."""
        self._send("logged_rounds")
        reply = self._answer() if self.failure is None else {}
        return set(reply.get("rounds", []))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send("log_params", params={k: str(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._send("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._send("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, path: str) -> None:
        self._send("log_text", text=text, path=path)

    def log_model(self, model: nn.Module) -> None:
        """Hand the model over as a pickled file; the writer logs it and deletes the file."""
        import torch

        fd, path = tempfile.mkstemp(suffix=".pt", prefix="flexp-model-")
        os.close(fd)
        torch.save(model, path)
        self._send("log_model", path=path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` and wait until everything sent so far is written."""
        if self.run_id is not None:
            self._send("finish", status=status)
            self.run_id = None
        self.close()

    def close(self) -> None:
        """Let the writer drain and exit; never wait forever on a hung store. A writer never asked to start a run has
        nothing to write: it is stopped at once, not waited for while it still imports MLflow."""
        if not self.asked:
            self.proc.kill()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self._wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._failed(f"the tracking process did not finish in {FINISH_TIMEOUT_S:.0f} s and was stopped")


    def _wait(self) -> None:
        """Wait for the writer to exit, saying why when a stopping job waits for it (it may still be importing
        MLflow): a second Ctrl-C leaves it to end the run KILLED on its own."""
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if interrupt.requested():
                print("flexp: waiting for the tracking process to mark the run KILLED (Ctrl-C again leaves that to "
                      "it)", file=sys.stderr, flush=True)
            self.proc.wait(timeout=FINISH_TIMEOUT_S)


def one_line(err: BaseException) -> str:
    """An exception as one short line (MLflow's messages can be pages long)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def serve(cfg: TrackingConfig) -> None:
    """The writer's loop: one MlflowTracker call per line on stdin, errors answered on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # MLflow prints "View run ... at: <url>" to stdout; keep it off the replies
    from flexp.tracking import MlflowTracker, quiet_mlflow

    quiet_mlflow()

    tracker = MlflowTracker(cfg)
    tracker.warm_up()
    started = finished = False


    def answer(reply: dict[str, Any]) -> None:
        print(json.dumps(reply), file=replies, flush=True)

    for line in sys.stdin:
        message = json.loads(line)
        op = message.pop("op")
        try:
            if op == "start":
                answer({"run_id": tracker.start(**message)})
                started = True
            elif op == "log_model":
                path = Path(message["path"])
                try:
                    import torch

                    tracker.log_model(torch.load(path, weights_only=False))
                finally:
                    path.unlink(missing_ok=True)
            elif op == "logged_rounds":
                answer({"rounds": sorted(tracker.logged_rounds())})
            elif op == "finish":
                tracker.finish(message["status"])
                finished = True
            else:
                getattr(tracker, op)(**message)
        except Exception as err:  # reported to the parent, which goes on training
            answer({"error": one_line(err), "op": op})
    if started and not finished:
        tracker.finish("KILLED")


if __name__ == "__main__":
    serve(TrackingConfig(**json.loads(sys.argv[1])))
