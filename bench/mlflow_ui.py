"""Open an experiment in the MLflow UI in headless Chromium; check its runs and `test_accuracy` show; screenshot it.

    python bench/mlflow_ui.py                                  # outputs/mlflow.db, experiment "mnist"
    python bench/mlflow_ui.py --store /tmp/x/mlflow.db --experiment flexp --out shot.png

Needs Debian's chromium (`apt-get install chromium`) and Playwright (the dev extra; it drives that Chromium, no
browser download). Starts `mlflow server` on 127.0.0.1 (a free port) and stops it afterwards. Prints what it
found and writes JSON beside the screenshot; exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on the sqlite store, waited for until /health answers."""
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store.resolve()}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not come up within 90 s")


def api(port: int, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def render(url: str, run_names: list[str], out: Path) -> dict:
    """Open the runs page in headless Chromium (driven by Playwright), wait for every run, filter the charts to
    test_accuracy as a user would, and screenshot the result."""
    from playwright.sync_api import TimeoutError as Timeout
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        shown, accuracy = 0, False
        try:
            for name in run_names:
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
                shown += 1
            page.get_by_placeholder("Search metric charts").fill("test_accuracy")
            page.get_by_text("test_accuracy", exact=True).first.wait_for(timeout=60_000)
            accuracy = True
            page.wait_for_timeout(1500)  # let the chart lines draw before the screenshot
        except Timeout:
            pass
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    return {"runs_shown": shown, "test_accuracy_shown": accuracy}


def check(store: Path, experiment: str, out: Path) -> dict:
    """Start the server, read the runs over the API, render the experiment's runs page, and compare."""
    port = free_port()
    server = start_server(store, port)
    try:
        exp = api(port, f"experiments/get-by-name?experiment_name={urllib.request.quote(experiment)}")["experiment"]
        runs = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 50}).get("runs", [])
        names = [r["info"]["run_name"] for r in runs if r["info"].get("run_name")]
        url = f"http://127.0.0.1:{port}/#/experiments/{exp['experiment_id']}/runs?compareRunsMode=CHART"
        seen = render(url, names, out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"url": url, "runs": len(runs), **seen, "screenshot": str(out),
              "screenshot_bytes": out.stat().st_size if out.exists() else 0}
    result["ok"] = bool(runs) and seen["runs_shown"] == len(names) and seen["test_accuracy_shown"] \
        and result["screenshot_bytes"] > 10_000
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("outputs/mlflow.db"))
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/mlflow_ui.png"))
    args = parser.parse_args()
    result = check(args.store, args.experiment, args.out)
    for key, value in result.items():
        print(f"{key:22} {value}")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
