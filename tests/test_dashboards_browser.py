"""The report in the MLflow UI, seen by a browser: `dashboards/serve.py` serves the default
store on a free localhost port, headless Chromium opens the study's parent run on its
Artifacts tab, the report's files are in the rendered artifact tree, and a screenshot is saved.

Chromium is Debian's `chromium` (`make test` installs it when missing). Without it the test is
skipped, unless CBTLAB_REQUIRE_BROWSER=1 (CI) makes that a failure. CBTLAB_SCREENSHOT_DIR, when
set, receives a copy of the screenshot (the README figure's source)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from cbtlab.dashboards.report import HTML_FILE, REPORT_DIR, TABLE_FILE, build_report
from cbtlab.paths import default_tracking_uri
from synthetic_study import Outcome, write_study

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SERVE_TIMEOUT_S = 240
BROWSER_TIMEOUT_S = 120


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium once (a fresh profile, nothing fetched but the page), giving the
    React UI virtual time to fetch and render before the DOM dump or screenshot."""
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        f"--user-data-dir={profile}", "--virtual-time-budget=60000",
        "--run-all-compositor-stages-before-draw", "--window-size=1400,900", *args,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False
    )


class Served:
    """`dashboards/serve.py` in a subprocess, its output collected by a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "dashboards" / "serve.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"^MLflow UI: (http://\S+)$", self.output, re.MULTILINE)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"serve.py printed no address:\n{self.output[-3000:]}")

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C, as a terminal sends it; the exit status."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code


def test_mlflow_ui_lists_the_report_on_the_parent_run(tmp_path: Path, isolated_home: Path) -> None:
    browser = find_browser()
    if browser is None:
        if os.environ.get("CBTLAB_REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium on PATH (make test installs Debian's chromium)")
        pytest.skip("no chromium on PATH (make test installs Debian's chromium)")
    started = time.monotonic()
    # The project's default store (CBTLAB_HOME is this session's temporary home).
    uri = default_tracking_uri()
    study = write_study(
        tmp_path, name="browser_study", seeds=2, uri=uri, outcomes={0: Outcome(rc=True)}
    )
    report = build_report(uri, "browser_study", out_dir=tmp_path / "report")
    files = {TABLE_FILE, HTML_FILE, *report.figures}

    env = {**os.environ, "CBTLAB_HOME": str(isolated_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "platform"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    served = Served(env)
    try:
        base = served.address(SERVE_TIMEOUT_S)
        assert base.startswith("http://127.0.0.1:")
        page = (
            f"{base}/#/experiments/{study.experiment_id}/runs/{study.parent_run_id}"
            f"/artifacts/{REPORT_DIR}/variants.png"
        )
        dom = chromium(browser, tmp_path / "profile-dom", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-2000:]
        # The artifact tree the UI rendered: one node per file, the report folder expanded.
        listed = set(re.findall(r'data-testid="artifact-tree-node"[^>]*artifact-name="([^"]+)"',
                                dom.stdout))  # fmt: skip
        assert {REPORT_DIR, "summary.txt", "stats.parquet"} <= listed, sorted(listed)
        assert files <= listed, sorted(files - listed)

        shot = tmp_path / "mlflow_report.png"
        taken = chromium(browser, tmp_path / "profile-shot", f"--screenshot={shot}", page)
        assert taken.returncode == 0, taken.stderr[-2000:]
        with Image.open(shot) as image:
            assert image.size == (1400, 900)
            # Not a blank page: the UI, the tree and the figure give many colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
        if os.environ.get("CBTLAB_SCREENSHOT_DIR"):
            target = Path(os.environ["CBTLAB_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / shot.name)
    finally:
        code = served.interrupt() if served.process.poll() is None else served.process.returncode
    assert code == 0, served.output[-3000:]
    assert served.lines[-1] == "stopped"
    print(f"browser test: {time.monotonic() - started:.0f} s")
