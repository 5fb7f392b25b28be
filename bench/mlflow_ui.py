"""Open the MLflow UI as a new user would, in headless Chromium; check a click on the experiment lands on its runs.

    python bench/mlflow_ui.py                                  # outputs/mlflow.db, experiment "mnist"
    python bench/mlflow_ui.py --store /tmp/x/mlflow.db --experiment flexp --out shot.png

Needs Debian's chromium (`apt-get install chromium`) and Playwright (the dev extra; it drives that Chromium, no
browser download). Starts the UI as the README says (`python -m flexp.ui`, i.e. `mlflow server`) on 127.0.0.1 (a
free port) and stops it afterwards. In a fresh browser profile it opens the home page, clicks the experiment,
checks it lands on the runs table with every run and the knobs (K C E B) of each run name in view, switches to
the charts, filters them to `test_accuracy`, and screenshots that. Prints what it found and writes JSON beside
the screenshot; exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flexp.ui import view_route

KNOBS = re.compile(r"^.*?\bB(\d+|inf)\b")  # "K100 C0.1 E1 B10" of "K100 C0.1 E1 B10 fedavg 2nn mnist iid"
LANDED = "location.hash.split('?')[0].split('/').length > 3"  # past #/experiments/<id>, which redirects to a tab
DRAWN = "document.querySelector('.js-plotly-plot .scatterlayer .trace')"  # a line chart (test_accuracy) has a line
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`python -m flexp.ui` on the sqlite store, waited for until /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "flexp.ui", "--backend-store-uri", f"sqlite:///{store.resolve()}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"python -m flexp.ui exited with code {proc.returncode} (run it by hand to see why)")
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


VISIBLE_TEXT = """a => {
    const node = document.createTreeWalker(a, NodeFilter.SHOW_TEXT).nextNode(), range = document.createRange();
    if (!node) return "";
    range.selectNodeContents(node);
    let edge = Infinity;
    for (let e = node.parentElement; e && e !== document.body; e = e.parentElement)
        if (getComputedStyle(e).overflowX !== "visible") edge = Math.min(edge, e.getBoundingClientRect().right);
    if (range.getBoundingClientRect().right <= edge) return node.textContent;
    let n = node.length;
    for (; n > 0; n--) { range.setEnd(node, n); if (range.getBoundingClientRect().right <= edge - 12) break; }
    return node.textContent.slice(0, n);
}"""  # the text before the ellipsis: what fits left of the nearest clipping box, less ~12 px for the "..."


def visible_names(page, run_names: list[str]) -> dict[str, str]:
    """Each run's name as far as the runs table shows it before cutting it off with an ellipsis."""
    return {name: page.get_by_role("link", name=name, exact=True).first.evaluate(VISIBLE_TEXT) for name in run_names}


def read_runs(page, run_names: list[str], seen: dict, shot: Path) -> None:
    """Wait for every run in the runs table, note how much of each name it shows and whether the assistant panel
    covers part of the page, and screenshot it."""
    for name in run_names:
        page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=60_000)
        seen["runs_shown"] += 1
    seen["names_shown"] = visible_names(page, run_names)
    seen["assistant_open"] = page.get_by_placeholder("Ask a question").first.is_visible()
    page.screenshot(path=str(shot))


def show_accuracy(page, seen: dict) -> None:
    """Switch to the charts and filter them to test_accuracy, as a user would."""
    page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
    page.get_by_placeholder("Search metric charts").fill("test_accuracy")
    page.get_by_text("test_accuracy", exact=True).first.wait_for(timeout=60_000)
    page.wait_for_function(DRAWN, timeout=60_000)
    seen["test_accuracy_shown"] = True
    page.wait_for_timeout(1000)  # let the other charts finish drawing before the screenshot


def view_columns(page, url: str) -> list[str]:
    """The column titles of the runs table opened at `url` (flexp's saved view of the experiment)."""
    page.goto(url)
    page.get_by_role("columnheader", name="best_test_accuracy").first.wait_for(timeout=60_000)
    return sorted({h.strip() for h in page.get_by_role("columnheader").all_inner_texts()})


def render(home: str, experiment: str, run_names: list[str], out: Path, view: str = "") -> dict:
    """From the home page, click `experiment` as a new user would, wait for every run in the runs table, then
    switch to the charts, filter them to test_accuracy and screenshot the result; then open `view` (a route to the
    experiment's saved view) and read its columns."""
    from playwright.sync_api import TimeoutError as Timeout
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    seen: dict = {"landed": "", "runs_shown": 0, "names_shown": {}, "assistant_open": None,
                  "test_accuracy_shown": False, "view_columns": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # a new context: a fresh profile
        page.goto(home)
        try:
            page.get_by_role("link", name=experiment, exact=True).first.click(timeout=60_000)
            page.wait_for_function(LANDED, timeout=60_000)
            seen["landed"] = page.url
            if on_runs_table(page.url):
                read_runs(page, run_names, seen, runs_shot(out))
                show_accuracy(page, seen)
        except Timeout:
            seen["landed"] = seen["landed"] or page.url
        page.screenshot(path=str(out))
        if view:
            try:
                seen["view_columns"] = view_columns(page, f"{home}#{view}")
            except Timeout:
                pass
        browser.close()
    return seen


def runs_shot(out: Path) -> Path:
    """Where the runs table's screenshot goes, beside the charts' one."""
    return out.with_name(f"{out.stem}_runs{out.suffix}")


def on_runs_table(url: str) -> bool:
    """True for an experiment's runs page (#/experiments/<id>/runs...), not its GenAI overview or traces."""
    return re.match(r"/experiments/[^/?]+/runs\b", url.partition("#")[2]) is not None


def knobs_cut(shown: dict[str, str]) -> list[str]:
    """The run names whose knobs (up to the batch size B) the runs table cuts off."""
    return [name for name, text in shown.items() if (m := KNOBS.match(name)) and not text.startswith(m.group(0))]


def check(store: Path, experiment: str, out: Path) -> dict:
    """Start the UI, read the runs over the API, click through to them in a fresh browser, and compare."""
    port = free_port()
    server = start_server(store, port)
    try:
        exp = api(port, f"experiments/get-by-name?experiment_name={urllib.request.quote(experiment)}")["experiment"]
        runs = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 50}).get("runs", [])
        names = [r["info"]["run_name"] for r in runs if r["info"].get("run_name")]
        seen = render(f"http://127.0.0.1:{port}/", experiment, names, out, view_route(exp["experiment_id"]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"runs": len(runs), **seen, "landed_on_runs": on_runs_table(seen["landed"]),
              "knobs_cut": knobs_cut(seen["names_shown"]), "screenshot": str(out),
              "runs_screenshot": str(runs_shot(out)), "screenshot_bytes": out.stat().st_size if out.exists() else 0}
    result["ok"] = bool(runs) and result["landed_on_runs"] and seen["runs_shown"] == len(names) \
        and not result["knobs_cut"] and seen["assistant_open"] is False and seen["test_accuracy_shown"] \
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
