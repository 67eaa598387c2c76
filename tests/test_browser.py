"""The InfluenceExplorer rendered for real: JupyterLab + Debian's Chromium driven by Playwright.

Starts JupyterLab on 127.0.0.1 (free port, token, own config and settings folders) in a temporary
root holding one small notebook (a fast-mode pipeline run, then the explorer), opens it in Chromium,
runs all cells from the Run menu, waits for the explorer's table and plots, chooses an example and
checks that the shown text changes. Screenshots go to pytest's tmp dir and to
``test-output/browser/`` at the repo root.

Needs ``chromium`` on PATH (``scripts/install_browser.sh``). Without it the test fails: it never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

NOTEBOOK_CELLS = [
    """import torch
torch.set_num_threads(1)
from nice_kit.demo import demo_pipeline
p = demo_pipeline("run", fast=True, verbose=False)
diagnostics = p.run()
print("pipeline done", len(p.pool))""",
    """from widgets import InfluenceExplorer
explorer = InfluenceExplorer(p, k=10)
explorer""",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, path)


def _settings(folder: Path, config: Path) -> None:
    """Settings for a quiet Lab: no news feed, no update checks, no toast asking about them."""
    config.mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))
    notif = folder / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True, exist_ok=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    tracker = folder / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True, exist_ok=True)  # no "Select Kernel" dialog: start the notebook's kernel
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))


def _wait_for_kernel(page, timeout_s: float = 90) -> None:
    """Wait until the notebook's kernel is idle (status bar), answering a "Select Kernel" dialog with
    the notebook's own kernel should Lab show one. Clicking elsewhere while such a dialog is open
    would dismiss it (no kernel), so nothing is clicked before this returns."""
    status = page.locator("#jp-main-statusbar .jp-StatusBar-TextItem", has_text="| Idle")
    select = page.locator(".jp-Dialog button", has_text="Select")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if select.count():
            select.first.click()
        elif status.count():
            page.wait_for_timeout(500)  # still idle and no dialog half a second later: ready
            if status.count() and not select.count():
                return
        page.wait_for_timeout(250)
    pytest.fail(f"the notebook's kernel did not become idle in {timeout_s:.0f} s", pytrace=False)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed (run scripts/install_browser.sh); the browser test "
                    "needs it and does not skip", pytrace=False)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab: (base url, token, root dir, log path)."""
    base_dir = tmp_path_factory.mktemp("lab")
    root = base_dir / "root"
    root.mkdir()
    _write_notebook(root / "explorer.ipynb")
    settings = base_dir / "settings"
    _settings(settings, base_dir / "config")
    port, token = _free_port(), "nice-kit-browser-test"
    env = {**os.environ, "NICE_KIT_FAST": "1", "JUPYTER_CONFIG_DIR": str(base_dir / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(base_dir / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(base_dir / "runtime"), "IPYTHONDIR": str(base_dir / "ipython"),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "OMP_NUM_THREADS": "1"}
    log = base_dir / "lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"JupyterLab did not answer within 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token, root, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # Lab and the kernels it started (its own session)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_explorer_renders_and_reacts_in_jupyterlab(chromium, lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, root, log = lab
    OUT.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "explorer.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1700, "height": 1300})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}", wait_until="domcontentloaded", timeout=60_000)
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
            _wait_for_kernel(page)
            # Run > Run All Cells
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()

            table = page.locator(".nice-explorer .nice-explorer-table table")
            try:
                table.wait_for(timeout=100_000)
            except Exception:
                page.screenshot(path=str(OUT / "failure.png"))
                outputs = page.locator(".jp-OutputArea").all_inner_texts()
                pytest.fail(f"the explorer's table did not render; outputs: {outputs}\npage errors: {errors}\n"
                            f"lab log: {log.read_text()[-2000:]}", pytrace=False)
            explorer = page.locator(".nice-explorer").first
            # plotly FigureWidgets (anywidget) drew the histogram bars and the scatter points
            expect(explorer.locator(".js-plotly-plot")).to_have_count(2, timeout=60_000)
            expect(explorer.locator(".js-plotly-plot .scatterlayer .point").first).to_be_attached(timeout=60_000)
            expect(explorer.locator(".js-plotly-plot .barlayer .point").first).to_be_attached(timeout=60_000)
            expect(explorer.locator(".gtitle").first).to_contain_text("scores")
            expect(explorer.locator(".gtitle", has_text="Spearman")).to_have_count(1)
            assert table.locator("tbody tr").count() == 10

            detail = explorer.locator(".nice-explorer-detail")
            before = detail.inner_text()
            assert "prompt" in before and "response" in before
            select = explorer.locator(".nice-explorer-select select")
            options = select.locator("option").all_inner_texts()
            assert len(options) == 10
            chosen = options[4].split()[1]  # "#5 pool-0012 [task] nice=... · prompt" -> the example id
            assert chosen not in before
            select.select_option(index=4)
            expect(detail).to_contain_text(chosen, timeout=20_000)
            after = detail.inner_text()
            assert after != before and after.splitlines()[0].startswith(chosen)
            expect(explorer.locator("tr.nice-kit-selected")).to_contain_text(chosen)

            explorer.scroll_into_view_if_needed()
            explorer.screenshot(path=str(shot))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    shutil.copy(shot, OUT / "explorer.png")
    shutil.copy(tmp_path / "page.png", OUT / "page.png")
    assert not [e for e in errors if "widget" in e.lower() or "plotly" in e.lower()], errors
