"""A sweep's TensorBoard and HTML report as a user sees them: opened in a real browser (Debian's Chromium,
driven by playwright), with screenshots for docs/tutorial.md and what the pages show, for the browser test
(tests/sweep/test_tensorboard_server.py).

    apt-get install chromium && pip install playwright        # once
    python scripts/browser_views.py outputs/sweeps/norm_sweep_quick docs/images

Writes tensorboard_time_series.png, tensorboard_hparams.png and report_html.png into the output folder and
prints the runs TensorBoard lists and each run's Final/dice_mean as its data table shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 1000}


def browser_available() -> bool:
    """Chromium and playwright are installed (neither is a dependency of the project)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return shutil.which("chromium") is not None or Path(CHROMIUM).exists()


@dataclass
class Views:
    runs: list[str] = field(default_factory=list)  # TensorBoard's run list, in its order
    final_dice: dict[str, float] = field(default_factory=dict)  # run -> Final/dice_mean's "Value" column
    smoothed_dice: dict[str, float] = field(default_factory=dict)  # run -> its "Smoothed" column
    hparams_cells: list[str] = field(default_factory=list)  # the HParams table view's cells, in order
    report_text: str = ""  # report.html's text
    screenshots: list[Path] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir: Path, timeout: float = 60) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 for `logdir`; yields its address once it lists runs."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
        + ["--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as response:
                    if response.read().strip() not in (b"", b"[]"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def _data_table(text: str, tag: str) -> dict[str, tuple[float, float]]:
    """run -> (smoothed, value) from the page text of a Time Series card's data table (Run, Smoothed, Value,
    Step, Relative per row, tab-separated in the text the browser renders)."""
    group, name = tag.split("/", 1)
    start = text.find(f"{group}\n/{name}\n")
    if start < 0:
        return {}
    body = text[start:]
    body = body[body.find("Relative") + len("Relative") :]
    end = body.find(f"\n{group}\n/")  # the next card of the group
    tokens = [t.strip() for t in (body if end < 0 else body[:end]).split("\n") if t.strip()]
    rows: dict[str, tuple[float, float]] = {}
    i = 0
    while i + 2 < len(tokens):
        run, smoothed, value = tokens[i : i + 3]
        try:
            rows[run] = (float(smoothed), float(value))
        except ValueError:
            break
        i += 5  # run, smoothed, value, step, relative
    return rows


def capture(sweep_dir: Path, out_dir: Path | None = None) -> Views:
    """Open TensorBoard (Time Series, HParams) and report.html of `sweep_dir`; screenshots into out_dir."""
    from playwright.sync_api import sync_playwright

    views = Views()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("chromium") or CHROMIUM
    with tensorboard(sweep_dir) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{base}/#timeseries", wait_until="networkidle")
        page.get_by_text("Final/dice_mean", exact=True).first.wait_for(timeout=30000)
        page.wait_for_timeout(1500)  # the cards' charts finish drawing
        text = page.inner_text("body")
        views.runs = [line.strip() for line in text.split("Run\n", 1)[1].split("All\n", 1)[0].splitlines()]
        views.runs = [run for run in views.runs if run]
        table = _data_table(text, "Final/dice_mean")
        views.smoothed_dice = {run: smoothed for run, (smoothed, _) in table.items()}
        views.final_dice = {run: value for run, (_, value) in table.items()}
        _shoot(page, out_dir, "tensorboard_time_series.png", views)
        page.goto(f"{base}/#hparams", wait_until="networkidle")
        page.get_by_text("TABLE VIEW").first.wait_for(timeout=30000)
        page.wait_for_timeout(1500)
        views.hparams_cells = [t.strip() for t in page.locator("vaadin-grid-cell-content").all_inner_texts()]
        _shoot(page, out_dir, "tensorboard_hparams.png", views)
        report = sweep_dir / "report.html"
        if report.exists():
            page.goto(report.resolve().as_uri(), wait_until="load")
            views.report_text = page.inner_text("body")
            _shoot(page, out_dir, "report_html.png", views)
        browser.close()
    return views


def _shoot(page, out_dir: Path | None, name: str, views: Views) -> None:
    if out_dir is not None:
        page.screenshot(path=str(out_dir / name))
        views.screenshots.append(out_dir / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder (outputs/sweeps/NAME)")
    parser.add_argument("out_dir", type=Path, help="where the screenshots go")
    args = parser.parse_args()
    if not browser_available():
        sys.exit("error: needs Chromium (apt-get install chromium) and playwright (pip install playwright)")
    views = capture(args.sweep_dir, args.out_dir)
    print(
        f"TensorBoard lists {len(views.runs)} runs: {', '.join(views.runs[:6])}{' ...' if len(views.runs) > 6 else ''}"
    )
    for run, value in views.final_dice.items():
        print(f"  {run}: Final/dice_mean {value:.4f} (smoothed {views.smoothed_dice[run]:.4f})")
    for path in views.screenshots:
        print(f"screenshot: {path}")


if __name__ == "__main__":
    main()
