"""`python -m flexp.ui [mlflow server options]`: MLflow's UI on flexp's store, opening experiments on their runs.

MLflow 3.17's UI takes an experiment's landing page from a per-browser switch (GenAI / Model training, kept in
the browser's localStorage, GenAI unless the user flips it), not from the experiment's `mlflow.experimentKind`
tag; so a new browser opens every experiment on an empty GenAI overview. This runs `mlflow server` unchanged
except that its page starts that switch on Model training, and the assistant panel closed, in a browser that has
made no choice yet.

Each experiment also gets a saved view (MLflow's `mlflow.sharedViewState.<id>` experiment tag, listed under the
runs page's Views menu, opened by `?viewStateShareKey=flexp`) whose columns are the results (best and final test
accuracy, rounds to target) and every knob a run of it set on its command line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

APP = "flexp.ui:app"
DEFAULT_STORE = "sqlite:///outputs/mlflow.db"
# MLflow 3.17's localStorage keys (`<key>_v<version>`, JSON values): the sidebar's switch, and "the assistant panel
# has already opened itself once", which stops it from taking a third of the page on the first visit.
BROWSER_DEFAULTS = {"mlflow.workflowType_v1": "machine_learning",
                    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}
VIEW_ID = "flexp"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "flexp: results and knobs"
RESULTS = ("best_test_accuracy", "final_test_accuracy", "rounds_to_target_interp")
CHOICE_GROUPS = ("dataset", "model", "partition", "engine", "strategy")   # `model=cnn` sets the param model.name
NOT_KNOBS = ("hydra", "tracking", "experiment", "sweep", "resume", "report")
VIEW_LIMIT = 20_000   # MLflow's longest experiment tag value
Message = MutableMapping[str, Any]
Asgi = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def knob(override: str) -> str | None:
    """The param an override sets (`fl.lr=0.1` -> fl.lr, `model=cnn` -> model.name); None for presets and the
    keys of Hydra, tracking and the report."""
    key, sep, _ = override.lstrip("+~").partition("=")
    if not sep or not key or "/" in key or key.split(".")[0] in NOT_KNOBS:
        return None
    return f"{key}.name" if key in CHOICE_GROUPS else key


def view_columns(columns: list[str], overrides: str) -> list[str]:
    """`columns`, then the results and the knobs in `overrides` (a run's flexp.overrides tag) not among them."""
    wanted = [f"metrics.`{m}`" for m in RESULTS] + [f"params.`{k}`" for o in overrides.split() if (k := knob(o))]
    return list(dict.fromkeys([*columns, *wanted]))


def saved_view(value: str | None, overrides: str, now_ms: int) -> str | None:
    """The saved view's tag value with a run's knobs added (MLflow's envelope: name, times, state as JSON text);
    None when it already shows them or would outgrow the tag."""
    old = json.loads(value) if value else {"name": VIEW_NAME, "createdAt": now_ms, "state": "{}"}
    state = json.loads(old["state"])
    columns = view_columns(state.get("selectedColumns", []), overrides)
    if columns == state.get("selectedColumns"):
        return None
    new = json.dumps({**old, "updatedAt": now_ms, "state": json.dumps({**state, "selectedColumns": columns})})
    return new if len(new) <= VIEW_LIMIT else None


def view_route(experiment_id: str) -> str:
    """The UI's route (after `#`) to an experiment's runs in flexp's saved view."""
    return f"/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}"


def defaults_script() -> bytes:
    """An inline script that stores BROWSER_DEFAULTS where the browser holds no value for them yet."""
    sets = "".join(f"s.getItem({json.dumps(k)})===null&&s.setItem({json.dumps(k)},{json.dumps(json.dumps(v))});"
                   for k, v in BROWSER_DEFAULTS.items())
    return f"<script>try{{const s=window.localStorage;{sets}}}catch(e){{}}</script>".encode()


def with_defaults(html: bytes) -> bytes:
    """The page with the defaults script first in <head>, so it runs before MLflow's deferred bundle reads them."""
    return html.replace(b"<head>", b"<head>" + defaults_script(), 1)


def injecting(inner: Asgi) -> Asgi:
    """`inner` with every complete HTML page it sends (GET, 200, not encoded) passed through `with_defaults`."""

    async def serve(scope: Message, receive: Callable[[], Awaitable[Message]],
                    send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            await inner(scope, receive, send)
            return
        start: Message | None = None
        body: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"text/html") \
                        and b"content-encoding" not in headers:
                    start = message
                    return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = with_defaults(b"".join(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"etag")]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await inner(scope, receive, capture)

    return serve


def app() -> Asgi:
    """The uvicorn factory `mlflow server --app-name flexp` runs: MLflow's own ASGI app, its page injected."""
    from mlflow.server.fastapi_app import app as mlflow_app

    return injecting(mlflow_app)


def register() -> None:
    """Make `--app-name flexp` known to MLflow where flexp's `mlflow.app` entry point is not installed (a checkout
    on the path without `pip install`)."""
    from importlib.metadata import EntryPoint

    import mlflow.utils.plugins as plugins

    found = plugins._get_entry_points

    def entry_points(group: str) -> list[EntryPoint]:
        points = list(found(group))
        if group == "mlflow.app" and all(p.name != "flexp" for p in points):
            points.append(EntryPoint("flexp", APP, "mlflow.app"))
        return points

    plugins._get_entry_points = entry_points


def server_args(argv: list[str]) -> list[str]:
    """`mlflow server` arguments: the user's, on flexp's store unless they name one ($MLFLOW_TRACKING_URI where it
    names a database rather than a server, else outputs/mlflow.db)."""
    if any(a.startswith("--backend-store-uri") for a in argv):
        return ["server", *argv]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    store = uri if uri and not uri.startswith(("http://", "https://")) else DEFAULT_STORE
    return ["server", "--backend-store-uri", store, *argv]


def main(argv: list[str]) -> None:
    """Run `mlflow server` with flexp's app (plain `mlflow server` on MLflow 2, whose UI opens on the runs)."""
    from importlib.util import find_spec

    args = server_args(argv)
    if find_spec("mlflow.server.fastapi_app") is not None:
        register()
        args = [*args, "--app-name", "flexp"]
    from mlflow.cli import cli

    cli.main(args, prog_name="python -m flexp.ui")


if __name__ == "__main__":
    main(sys.argv[1:])
