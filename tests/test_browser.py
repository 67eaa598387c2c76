"""The widgets rendered for real: JupyterLab + Debian's Chromium driven by Playwright.

The session's fast-mode run (``fast_run`` in conftest.py, with NICE's per-completion gradients) is
copied into a temporary root (``runs/quickstart-fast``, where notebook 05 looks for it). JupyterLab
starts on 127.0.0.1 (free port, token, its own config and settings folders; widget state saved with
notebooks) and opens a notebook that shows the three widgets and a loss-vs-metric plot, in a
1280 x 800 window with the file browser open. The test drives each widget in the light theme,
switches JupyterLab to the dark theme and checks again. Each time it asserts that text differs
clearly from its background (contrast ratio), and that the explorer's "why" panel draws the selected
example's bars and its top prompt's rewarded and punished completions, with chart text that stands
out from the chart's background; it checks that a row click selects its example (and redraws the
why panel), that the metric picker's figure is cleared after a failed metric, and that the saved
notebook's static copy of a filtered explorer holds the filter's rows and the why panel. A second test executes
notebook 05, exports it to HTML (nbconvert) and opens that file with every network request blocked:
its figures must draw from the inline plotly.js.

Screenshots go to ``test-output/browser/`` at the repo root. Needs ``chromium`` on PATH
(``scripts/install_browser.sh``). Without it the test fails: it never skips.
"""

from __future__ import annotations

import json
import os
import re
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
VIEWPORT = {"width": 1280, "height": 800}
RUN = "runs/quickstart-fast"  # relative to the root; notebook 05 (in root/notebooks) finds it as ../runs/...

NOTEBOOK_CELLS = [
    f"""from widgets import InfluenceExplorer, MetricPicker, RolloutViewer, open_run, loss_vs_metric
import pandas as pd
p = open_run("{RUN}")  # the finished run, from disk alone""",
    """explorer = InfluenceExplorer(p, k=8)
explorer""",
    """viewer = RolloutViewer(p)
viewer""",
    """picker = MetricPicker(p, n_preview=6, explorer=explorer)  # its what-ifs become a column of the explorer
picker""",
    """curve = pd.DataFrame({"epoch": [0, 1, 2], "lr": [0.0, 1e-2, 5e-3], "metric": [0.0472, 0.0652, 0.1171875],
                      "loss": [10.84, 10.79, 10.74], "n_test": [8, 8, 8]})
loss_vs_metric(curve, metric="length").update_layout(width=700)""",
]

# Contrast of every visible text element of a widget against the background it is drawn on (the
# backgrounds of its ancestors composited, translucent tints included). WCAG's formula.
CONTRAST_JS = """
(root) => {
  const parse = (c) => {
    const m = c && c.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const p = m[1].split(',').map((x) => parseFloat(x));
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const blend = (top, bottom) => ({ r: top.r * top.a + bottom.r * (1 - top.a), g: top.g * top.a + bottom.g * (1 - top.a),
                                     b: top.b * top.a + bottom.b * (1 - top.a), a: 1 });
  const background = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0) { layers.push(c); if (c.a >= 1) break; }
    }
    let bg = { r: 255, g: 255, b: 255, a: 1 };
    for (let i = layers.length - 1; i >= 0; i--) bg = blend(layers[i], bg);
    return bg;
  };
  const lum = (c) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
  };
  const out = [];
  for (const el of root.querySelectorAll('*')) {
    if (el.closest('.js-plotly-plot') || el.closest('svg')) continue;
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (box.width === 0 || box.height === 0 || style.visibility === 'hidden' || style.opacity === '0') continue;
    const bg = background(el);
    const fg = blend(parse(style.color), bg);
    const l1 = lum(fg), l2 = lum(bg);
    out.push({ text: el.textContent.trim().slice(0, 50), tag: el.tagName, cls: String(el.className).slice(0, 60),
               ratio: (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05), color: style.color,
               background: `rgb(${Math.round(bg.r)}, ${Math.round(bg.g)}, ${Math.round(bg.b)})` });
  }
  return out;
}
"""

MIN_CONTRAST = 3.0  # WCAG AA for large text; body text here is well above it

# Every option of every visible dropdown inside a widget, measured in the dropdown's own font: the
# labels wider than the room the dropdown gives them (its width less its padding and arrow).
CUT_LABELS_JS = """
(root) => {
  const ctx = document.createElement('canvas').getContext('2d');
  const out = [];
  for (const sel of root.querySelectorAll('select')) {
    if (sel.getBoundingClientRect().width === 0) continue;
    const st = getComputedStyle(sel);
    ctx.font = `${st.fontStyle} ${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
    const room = sel.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight);
    for (const o of sel.options) {
      const width = ctx.measureText(o.text).width;
      if (width > room) out.push({ text: o.text.slice(0, 70), width: Math.round(width), room: Math.round(room),
                                   widget: sel.closest('.widget-dropdown')?.className.slice(0, 80) });
    }
  }
  return out;
}
"""


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
    """Settings for a quiet Lab: no news feed, no update checks, no toast asking about them; the
    notebook's kernel starts by itself; widget state is saved with the notebook."""
    config.mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))

    def write(plugin: str, name: str, value: dict) -> None:
        target = folder / plugin
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{name}.jupyterlab-settings").write_text(json.dumps(value))

    write("@jupyterlab/apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False})
    write("@jupyterlab/notebook-extension", "tracker", {"autoStartDefaultKernel": True})
    write("@jupyter-widgets/jupyterlab-manager", "plugin", {"saveState": True})


def _env(base_dir: Path) -> dict[str, str]:
    return {**os.environ, "NICE_KIT_FAST": "1", "JUPYTER_CONFIG_DIR": str(base_dir / "config"),
            "JUPYTERLAB_SETTINGS_DIR": str(base_dir / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(base_dir / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(base_dir / "runtime"), "IPYTHONDIR": str(base_dir / "ipython"),
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            "OMP_NUM_THREADS": "1"}


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
def base_dir(fast_run, tmp_path_factory) -> Path:
    """A root folder holding a copy of the session's finished fast-mode run (what notebook 01 makes,
    plus NICE's per-completion gradients) and a notebooks/ folder, plus Lab's config and settings.
    (The run's data paths point at the session's copy of the data; notebook 05 rewrites them.)"""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    (root / "notebooks").mkdir(parents=True)
    _settings(base / "settings", base / "config")
    shutil.copytree(fast_run.run_dir, root / RUN)
    from nice_kit.whatif import completion_parts

    # the per-completion parts a what-if reads, computed here with the run's own (tiny) model: the
    # picker's what-if then reads stored vectors only, as on a finished run
    completion_parts(fast_run.sibling(root / RUN, fast_run.cfg))
    return base


@pytest.fixture(scope="module")
def lab(base_dir):
    """A running JupyterLab: (base url, token, root dir, log path)."""
    root = base_dir / "root"
    _write_notebook(root / "widgets.ipynb")
    port, token = _free_port(), "nice-kit-browser-test"
    log = base_dir / "lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=_env(base_dir), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
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


def _assert_readable(widget, what: str, theme: str) -> None:
    items = widget.evaluate(CONTRAST_JS)
    assert len(items) > 5, f"{what}: no visible text found"
    bad = [i for i in items if i["ratio"] < MIN_CONTRAST]
    assert not bad, f"{what} ({theme} theme): text too close to its background: {bad[:5]}"


def _choose(select, prefix: str) -> None:
    """Choose the option of an ipywidgets dropdown whose label starts with ``prefix``."""
    labels = select.locator("option").all_inner_texts()
    select.select_option(index=next(i for i, t in enumerate(labels) if t.startswith(prefix)))


def _tall(page, locator) -> None:
    """Make the window tall enough to show all of ``locator`` (the width stays 1280 px, so the layout
    is the laptop's): JupyterLab paints only what is in its window."""
    height = locator.evaluate("(e) => e.getBoundingClientRect().height")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": int(min(max(VIEWPORT["height"], height + 260), 5000))})
    locator.scroll_into_view_if_needed()
    page.wait_for_timeout(400)


def _shoot(page, locator, name: str) -> None:
    _tall(page, locator)
    locator.screenshot(path=str(OUT / name))
    page.set_viewport_size(VIEWPORT)


# The contrast of a plotly chart's text (title, tick labels) against the chart's own background.
CHART_CONTRAST_JS = """
(svg) => {
  const parse = (c) => { const p = c.match(/[\\d.]+/g).map(Number); return { r: p[0], g: p[1], b: p[2] }; };
  const lum = (c) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
  };
  const bg = parse(getComputedStyle(svg).backgroundColor);
  const plot = svg.closest('.js-plotly-plot');
  return [...plot.querySelectorAll('.gtitle, .xtick text, .ytick text, .g-xtitle text')].map((t) => {
    const fg = parse(getComputedStyle(t).fill);
    const l1 = lum(fg), l2 = lum(bg);
    return { text: t.textContent.slice(0, 40), fill: getComputedStyle(t).fill, background: getComputedStyle(svg).backgroundColor,
             ratio: (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05) };
  });
}
"""


def _plot(widget, cls: str):
    """The plotly chart of the FigureWidget with class ``cls`` inside ``widget`` (the class is on the
    widget's element, which may be the chart's own)."""
    return widget.locator(f".{cls}.js-plotly-plot, .{cls} .js-plotly-plot").first


def _check_why(page, explorer, theme: str, run_dir: Path) -> None:
    """The explorer's why panel for the selected example: one bar per contributing target prompt
    (as nice_kit.explain computes them), the top prompt's completions split into rewarded and
    punished groups (each present when that prompt has such completions), chart text readable on the
    chart's background; then a screenshot."""
    from playwright.sync_api import expect

    from nice_kit.explain import explain
    from widgets import open_run
    from widgets.why import prompt_bars

    why = explorer.locator(".nice-why").first
    expect(why).to_be_visible()
    rid = explorer.locator(".nice-explorer-detail b").first.inner_text().strip()
    expect(why.locator(".nice-why-header")).to_contain_text(f"{rid}: NICE score", timeout=20_000)
    e = explain(open_run(run_dir), rid, "nice", compute=False)
    n_bars = len(prompt_bars(e))
    assert n_bars > 0
    expect(why.locator(".nice-why-bars .trace.bars .point")).to_have_count(n_bars, timeout=20_000)
    comp = e.completions_of(e.top_prompt())
    rewarded, punished = int((comp["policy_weight"] > 0).sum()), int((comp["policy_weight"] < 0).sum())
    assert rewarded and punished, "under the mean baseline a prompt with signal has both kinds of completion"
    for cls, n in (("nice-why-rewarded", rewarded), ("nice-why-punished", punished)):
        group = why.locator(f".nice-why-completions .{cls}")
        expect(group).to_have_count(1)
        expect(group.locator("tbody tr")).to_have_count(n)
    chart = why.locator(".nice-why-bars .main-svg").first
    texts = chart.evaluate(CHART_CONTRAST_JS)
    assert len(texts) > 3, texts
    bad = [t for t in texts if t["ratio"] < MIN_CONTRAST]
    assert not bad, f"why chart ({theme} theme): text too close to its background: {bad[:5]}"
    _assert_readable(why, "why panel", theme)
    box = why.bounding_box()
    assert box["x"] + box["width"] <= VIEWPORT["width"], f"the why panel overflows 1280 px: {box}"
    widths = why.evaluate("(e) => [e.scrollWidth, e.clientWidth]")
    assert widths[0] <= widths[1] + 1, f"the why panel scrolls sideways: {widths}"
    _shoot(page, why, f"why_panel-{theme}.png")


def _assert_labels_fit(widget, what: str) -> None:
    cut = widget.evaluate(CUT_LABELS_JS)
    assert not cut, f"{what}: dropdown labels cut off: {cut[:5]}"


def _check_what_if(page, picker, explorer, theme: str) -> None:
    """The picker's "what would NICE select with this?" under "no baseline": both top fractions side by
    side (as nice_kit.whatif computes them), overlap and harmful shares, and a what_if column in the
    explorer; readable; a screenshot."""
    from playwright.sync_api import expect

    from nice_kit.whatif import what_if
    from widgets import open_run

    picker.locator(".nice-whatif-policy select").select_option("no baseline")
    picker.locator("button.nice-whatif-run").click()
    result = picker.locator(".nice-whatif-result")
    expect(result.locator(".nice-whatif-summary")).to_contain_text("with the run's selection", timeout=30_000)
    expected = what_if(open_run(RUN_DIR[0]), {"policy.baseline": "none"}, compute=False)
    k = len(expected.selected)
    rows = result.locator(".nice-whatif-side tbody tr")
    expect(rows).to_have_count(k)
    right = [rows.nth(i).locator("td").nth(2).locator("b").first.inner_text() for i in range(k)]
    assert right == expected.selected
    expect(result.locator(".nice-whatif-summary")).to_contain_text(f"shares {expected.overlap} of {k}")
    expect(result.locator(".nice-whatif-summary")).to_contain_text("flagged harmful")
    expect(picker.locator(".nice-whatif-status")).to_contain_text("answered in")
    expect(picker.locator("button.nice-whatif-adopt")).to_be_enabled()
    expect(explorer.locator(".nice-explorer-table th[data-sort='what_if']")).to_have_count(1, timeout=20_000)
    block = picker.locator(".nice-whatif-result")
    _assert_readable(block, "what-if answer", theme)
    _assert_labels_fit(picker, f"metric picker ({theme})")
    widths = block.evaluate("(e) => [e.scrollWidth, e.clientWidth]")
    assert widths[0] <= widths[1] + 1, f"the what-if answer scrolls sideways: {widths}"
    _shoot(page, block, f"metric_picker-what_if-{theme}.png")


def _check_compare(page, explorer, theme: str) -> None:
    """The side-by-side NICE-vs-LESS why of the selected example: two panels of bars over the same
    target prompts, labelled by their text (as widgets.why computes them); fits 1280 px; readable."""
    from playwright.sync_api import expect

    from nice_kit.explain import explain
    from widgets import open_run
    from widgets._run import target_labels
    from widgets.why import compare_table

    why = explorer.locator(".nice-why").first
    toggle = why.locator(".nice-why-compare-toggle")
    if "mod-active" not in (toggle.get_attribute("class") or ""):
        toggle.click()
    rid = explorer.locator(".nice-explorer-detail b").first.inner_text().strip()
    run = open_run(RUN_DIR[0])
    table = compare_table({m: explain(run, rid, m, compute=False) for m in ("nice", "less")},
                          target_labels(run), top=12)
    chart = _plot(why, "nice-why-compare-bars")
    expect(chart.locator(".trace.bars")).to_have_count(2, timeout=30_000)
    nonzero = int((table["nice"] != 0).sum() + (table["less"] != 0).sum())
    expect(chart.locator(".trace.bars .point").nth(nonzero - 1)).to_be_attached(timeout=30_000)
    assert chart.locator(".trace.bars .point").count() <= 2 * len(table)  # (a zero bar may draw no point)
    ticks = [t.replace("\xa0", " ") for t in chart.locator(".ytick text").all_text_contents()]  # (svg text)
    assert set(ticks) == set(table["label"]), (ticks, table["label"].tolist())  # bars labelled by their text
    expect(chart.locator(".gtitle")).to_contain_text(f"why {rid}")
    expect(chart.locator(".main-svg").first).to_have_css(
        "background-color", "rgb(17, 17, 17)" if theme == "dark" else "rgb(255, 255, 255)", timeout=30_000)
    texts = chart.locator(".main-svg").first.evaluate(CHART_CONTRAST_JS)
    bad = [t for t in texts if t["ratio"] < MIN_CONTRAST]
    assert texts and not bad, f"side-by-side why ({theme}): text too close to its background: {bad[:5]}"
    box = why.locator(".nice-why-compare").bounding_box()
    assert box["x"] + box["width"] <= VIEWPORT["width"], f"the comparison overflows 1280 px: {box}"
    _assert_readable(why.locator(".nice-why-compare"), "side-by-side why", theme)
    _assert_labels_fit(explorer, f"explorer ({theme})")
    _shoot(page, why.locator(".nice-why-compare"), f"why_compare-{theme}.png")


RUN_DIR: list = []  # the lab's run directory (set by the test)


def _drive_and_check(page, theme: str) -> None:
    """Screenshots and checks of every widget in the current theme."""
    explorer = page.locator(".nice-explorer").first
    viewer = page.locator(".nice-rollout-viewer").first
    picker = page.locator(".nice-metric-picker").first
    plot = page.locator(".jp-Cell").nth(4).locator(".js-plotly-plot").first
    paper = "rgb(17, 17, 17)" if theme == "dark" else "rgb(255, 255, 255)"
    from playwright.sync_api import expect

    # the figures follow the page's theme (the probe reports it to the kernel, which re-templates)
    for fig in (_plot(explorer, "nice-explorer-hist"), _plot(explorer, "nice-why-bars"),
                picker.locator(".js-plotly-plot").first):
        expect(fig.locator(".main-svg").first).to_have_css("background-color", paper, timeout=30_000)
    for widget, name in ((explorer, "explorer"), (viewer, "rollout_viewer"), (picker, "metric_picker")):
        _tall(page, widget)
        _assert_readable(widget, name, theme)
        widget.screenshot(path=str(OUT / f"{name}-{theme}.png"))
        page.set_viewport_size(VIEWPORT)
    _shoot(page, plot, f"loss_vs_metric-{theme}.png")
    explorer.evaluate("(e) => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(800)
    page.screenshot(path=str(OUT / f"page-{theme}.png"))  # what the laptop's window shows


def test_widgets_in_jupyterlab_light_and_dark(chromium, lab):
    from playwright.sync_api import expect, sync_playwright

    base, token, root, log = lab
    RUN_DIR[:] = [root / RUN]
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        console: list[str] = []
        phase = ["load"]
        page.on("pageerror", lambda e: errors.append(f"{e} (during {phase[0]})"))
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        try:
            page.goto(f"{base}/lab/tree/widgets.ipynb?token={token}", wait_until="domcontentloaded", timeout=60_000)
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
            _wait_for_kernel(page)
            browser_panel = page.locator("#filebrowser")
            if not browser_panel.is_visible():  # a laptop screen with the file browser open
                page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='filebrowser']").click()
            expect(browser_panel).to_be_visible()
            # run the cells one by one, each widget drawn before the next starts (anywidget gives a
            # model 2 s to initialize; several plotly bundles parsed at once on a loaded 2-core
            # machine can take longer)
            explorer = page.locator(".nice-explorer").first
            table = explorer.locator(".nice-explorer-table table")
            ready = [None, explorer.locator(".js-plotly-plot .scatterlayer .point").first,
                     page.locator(".nice-rollout-viewer .nice-rollout-table"),
                     page.locator(".nice-metric-picker .js-plotly-plot .boxlayer .point").first,
                     page.locator(".jp-Cell").nth(4).locator(".js-plotly-plot .scatterlayer .point").first]
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})  # JupyterLab paints what is in view
            for i, done in enumerate(ready):
                phase[0] = f"running cell {i}"
                cell = page.locator(".jp-Cell").nth(i)
                cell.scroll_into_view_if_needed()
                cell.locator(".jp-InputArea-prompt").click()
                page.keyboard.press("Control+Enter")  # run the cell, stay on it (no new cell at the end)
                if done is None:
                    continue
                try:
                    deadline = time.time() + 100
                    while not done.count() and time.time() < deadline:
                        cell.evaluate("(c) => c.scrollIntoView({block: 'start'})")
                        page.wait_for_timeout(500)
                    done.wait_for(state="attached", timeout=1_000)
                except Exception:
                    page.screenshot(path=str(OUT / "failure.png"))
                    outputs = page.locator(".jp-OutputArea").all_inner_texts()
                    pytest.fail(f"cell {i} did not render; outputs: {outputs}\npage errors: {errors}\n"
                                f"console: {console[-10:]}\nlab log: {log.read_text()[-2000:]}", pytrace=False)
            page.set_viewport_size(VIEWPORT)
            expect(explorer.locator(".js-plotly-plot")).to_have_count(3, timeout=60_000)  # why chart, hist, scatter
            expect(explorer.locator(".js-plotly-plot .scatterlayer .point").first).to_be_attached(timeout=60_000)
            expect(explorer.locator(".gtitle", has_text="Spearman")).to_have_count(1)
            assert table.locator("tbody tr").count() == 8
            # the static copies are on the page but hidden while the live widgets are
            assert page.locator(".nice-kit-fallback").count() == 3
            assert not [v for v in page.locator(".nice-kit-fallback").all() if v.is_visible()]

            # fits 1280 px with the file browser open: no column off-screen, plots below the table
            _tall(page, explorer)
            wrap = explorer.locator(".nice-explorer-table")
            widths = wrap.evaluate("(e) => [e.scrollWidth, e.clientWidth]")
            assert widths[0] <= widths[1] + 1, f"the table scrolls sideways: {widths}"
            headers = table.locator("th").evaluate_all("(ths) => ths.map((t) => t.textContent.trim())")
            assert {"id", "selected by", "nice", "less", "prompt", "response", "on task", "source"} <= set(headers)
            table_box = wrap.bounding_box()
            hist_box = _plot(explorer, "nice-explorer-hist").bounding_box()
            assert hist_box["y"] >= table_box["y"] + table_box["height"] - 1, "plots should wrap below the table"
            assert explorer.bounding_box()["width"] <= VIEWPORT["width"]
            page.set_viewport_size(VIEWPORT)

            phase[0] = "light checks"
            _drive_and_check(page, "light")
            phase[0] = "explorer clicks"

            # a row click selects its example
            detail = explorer.locator(".nice-explorer-detail")
            row = table.locator("tbody tr").nth(3)
            chosen = row.get_attribute("data-key")
            assert not detail.text_content().startswith(chosen)
            row.scroll_into_view_if_needed()
            row.click()
            expect(detail).to_contain_text(chosen, timeout=20_000)
            assert detail.text_content().startswith(chosen)
            expect(explorer.locator("tr.nice-kit-selected")).to_have_attribute("data-key", chosen, timeout=20_000)
            # ... and redraws the why panel for it
            phase[0] = "why panel (light)"
            _check_why(page, explorer, "light", root / RUN)
            # a header click sorts by that column
            table.locator("th[data-sort='task']").click()
            expect(table.locator("th.nice-kit-sorted-asc")).to_have_attribute("data-sort", "task", timeout=20_000)

            phase[0] = "rollout viewer"
            # rollout viewer: next, and only prompts with signal
            viewer = page.locator(".nice-rollout-viewer").first
            expect(viewer.locator(".nice-rollout-body")).to_contain_text("val-", timeout=20_000)
            first = viewer.locator(".nice-rollout-body b").first.inner_text()
            viewer.locator(".nice-rollout-next button, button.nice-rollout-next").first.click()
            expect(viewer.locator(".nice-rollout-body b").first).not_to_have_text(first, timeout=20_000)
            expect(viewer).to_contain_text("prompt 2 of")
            expect(viewer.locator(".nice-rollout-explain")).to_contain_text("reward − the mean reward")

            phase[0] = "metric picker"
            # metric picker: a working metric, then one this run cannot use -> figure and table cleared
            picker = page.locator(".nice-metric-picker").first
            metric = picker.locator(".nice-metric-dropdown select")
            _choose(metric, "sentiment")
            expect(picker.locator(".gtitle")).to_contain_text("sentiment scores of", timeout=30_000)
            expect(picker.locator(".js-plotly-plot .boxlayer .point").first).to_be_attached(timeout=30_000)
            _choose(metric, "code_tests")
            expect(picker.locator(".gtitle")).to_contain_text("code_tests: no scores", timeout=30_000)
            expect(picker.locator(".js-plotly-plot .boxlayer .point")).to_have_count(0, timeout=30_000)
            assert "sentiment" not in picker.locator(".js-plotly-plot").first.inner_text()
            expect(picker.locator(".nice-metric-preview")).to_contain_text("no scores to show")
            expect(picker.locator(".nice-metric-status")).to_contain_text("unavailable")
            _shoot(page, picker, "metric_picker-failed-light.png")
            _choose(metric, "length")
            expect(picker.locator(".gtitle")).to_contain_text("length scores of", timeout=30_000)
            labels = [t.replace("\xa0", " ") for t in metric.locator("option").all_inner_texts()]  # (nbsp in options)
            assert {"reward_model — unavailable: no model configured", "llm_judge — unavailable: no model configured"} \
                <= set(labels), labels

            phase[0] = "what if (light)"
            _check_what_if(page, picker, explorer, "light")
            phase[0] = "side-by-side why (light)"
            _check_compare(page, explorer, "light")

            # filter the explorer, then save: the notebook's static copy holds the filter's rows
            explorer.locator(".nice-explorer-picked select").select_option("NICE")
            expect(explorer.locator(".nice-explorer-table tbody tr")).to_have_count(4, timeout=20_000)
            live_ids = [r.get_attribute("data-key") for r in explorer.locator(".nice-explorer-table tbody tr").all()]

            phase[0] = "dark theme"
            # dark theme: Settings > Theme > JupyterLab Dark
            page.locator(".lm-MenuBar-item", has_text="Settings").first.click()
            page.locator(".lm-Menu-item", has_text="Theme").first.hover()
            page.locator(".lm-Menu-item", has_text="JupyterLab Dark").first.click()
            expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "false", timeout=30_000)
            plot_cell = page.locator(".jp-Cell").nth(4)  # re-run the plot cell: a static figure reads the new theme
            plot_cell.scroll_into_view_if_needed()
            plot_cell.locator(".jp-InputArea-prompt").click()
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-item", has_text="Run Selected Cell").first.click()
            expect(page.locator(".jp-Cell").nth(4).locator(".js-plotly-plot .main-svg").first).to_have_css(
                "background-color", "rgb(17, 17, 17)", timeout=30_000)
            _drive_and_check(page, "dark")
            phase[0] = "why panel (dark)"
            _check_why(page, explorer, "dark", root / RUN)
            phase[0] = "what if (dark)"
            _check_what_if(page, picker, explorer, "dark")
            phase[0] = "side-by-side why (dark)"
            _check_compare(page, explorer, "dark")
            why_header = explorer.locator(".nice-why-header").first.inner_text()

            phase[0] = "saving"
            before = (root / "widgets.ipynb").stat().st_mtime
            page.keyboard.press("Control+s")
            deadline = time.time() + 20
            while (root / "widgets.ipynb").stat().st_mtime == before and time.time() < deadline:
                page.wait_for_timeout(250)
            page.wait_for_timeout(500)
        finally:
            browser.close()
    # anywidget gives a model 2 s to initialize and reports a page error when that passes, even
    # when the model then renders; on a loaded 2-core machine that happens. Every widget is checked
    # above for having rendered and reacted, so that one message is not counted here.
    slow_init = "[anywidget] Failed to initialize model."
    assert not [e for e in errors if ("widget" in e.lower() or "plotly" in e.lower()) and slow_init not in e], \
        (errors, console[-10:])

    saved = nbformat.read(root / "widgets.ipynb", as_version=4)
    copies = [o for o in saved.cells[1].outputs if "nice-kit-fallback" in o.get("data", {}).get("text/html", "")]
    assert len(copies) == 1, "the explorer's static copy is missing from the saved notebook"
    copy = copies[0]["data"]["text/html"]
    assert re.findall(r'data-key="([^"]+)"', copy) == live_ids
    assert "selected (top 10%): NICE" in copy and "cdn.plot.ly" not in copy
    assert "why this score?" in copy and why_header.split(":")[0] in copy  # the why panel, as last seen
    state = saved.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert len(state) > 10, "JupyterLab saved no widget state with the notebook"


VERBOSE_RUN = "runs/verbose_refs-fast"  # the second scenario's fast-mode run, relative to the lab's root


@pytest.fixture(scope="module")
def verbose_refs_run(lab):
    """The second bundled scenario (data/verbose_refs: verbose references, strict metric) run in fast mode
    inside the lab's root, with NICE's per-completion gradients (the explorer's why panel reads them), and a
    notebook that opens the explorer on it from disk alone."""
    from nice_kit.explain import completion_vectors
    from nice_kit.scenarios import scenario_pipeline

    root = lab[2]
    run = scenario_pipeline(root / VERBOSE_RUN, fast=True, verbose=False)
    run.run()
    completion_vectors(run, "nice")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (
        f"""from widgets import InfluenceExplorer, open_run
p = open_run("{VERBOSE_RUN}")  # the second scenario's finished run""",
        """explorer = InfluenceExplorer(p, method="nice", k=8)
explorer""")])
    nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, root / "verbose_refs.ipynb")
    return run


def test_explorer_opens_on_the_verbose_refs_run(chromium, lab, verbose_refs_run):
    """The explorer on the second scenario's run: its table lists that run's pool (the scenario's own
    examples, verbose ones flagged), and its why panel draws the selected example's decomposition."""
    from playwright.sync_api import expect, sync_playwright

    base, token, root, log = lab
    run_dir = root / VERBOSE_RUN
    pool = {r.id: r for r in verbose_refs_run.pool}
    scenario_responses = {r.response for r in verbose_refs_run.pool}
    assert {r.columns.get("style") for r in pool.values()} == {"concise", "verbose"}  # the slice has both styles
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            # a workspace of its own, reset: the other test's notebook is not restored beside this one
            page.goto(f"{base}/lab/workspaces/verbose-refs/tree/verbose_refs.ipynb?reset&token={token}",
                      wait_until="domcontentloaded", timeout=60_000)
            panel = page.locator(".jp-NotebookPanel:visible").first
            panel.locator(".jp-Cell").first.wait_for(timeout=60_000)
            _wait_for_kernel(page)
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})
            for i in range(2):
                cell = panel.locator(".jp-Cell").nth(i)
                cell.scroll_into_view_if_needed()
                cell.locator(".jp-InputArea-prompt").click()
                page.keyboard.press("Control+Enter")
            explorer = panel.locator(".nice-explorer").first
            table = explorer.locator(".nice-explorer-table table")
            try:
                expect(explorer.locator(".js-plotly-plot .scatterlayer .point").first).to_be_attached(timeout=100_000)
            except AssertionError:
                page.screenshot(path=str(OUT / "verbose_refs-failure.png"))
                pytest.fail(f"the explorer did not render on the verbose_refs run; outputs: "
                            f"{page.locator('.jp-OutputArea').all_inner_texts()}\nlab log: {log.read_text()[-2000:]}",
                            pytrace=False)
            page.set_viewport_size(VIEWPORT)
            expect(table.locator("tbody tr")).to_have_count(8, timeout=30_000)
            ids = [r.get_attribute("data-key") for r in table.locator("tbody tr").all()]
            assert set(ids) <= set(pool), ids  # this run's pool, not the first benchmark's
            # ranked by NICE, as the run's scores rank them
            top = verbose_refs_run.read_scores().sort_values("nice", ascending=False)["id"].head(8).tolist()
            assert ids[0] == top[0] and set(ids) == set(top), (ids, top)
            detail = explorer.locator(".nice-explorer-detail")
            assert any(text in detail.inner_text() for text in scenario_responses if len(text) > 3)
            # the harmful filter shows the scenario's flags: verbose examples among them
            explorer.locator(".widget-dropdown", has_text="harmful").first.locator("select").select_option("harmful")
            harmful_ids = [i for i, r in pool.items() if r.columns.get("harmful")]
            deadline = time.time() + 30  # the kernel redraws the table after the filter's change
            while True:
                shown = [r.get_attribute("data-key") for r in table.locator("tbody tr").all()]
                if (set(shown) <= set(harmful_ids) and len(shown) == min(8, len(harmful_ids))) or time.time() > deadline:
                    break
                page.wait_for_timeout(250)
            assert set(shown) <= set(harmful_ids) and len(shown) == min(8, len(harmful_ids)), shown
            rows = table.locator("tbody tr").all_inner_texts()
            assert any("verbose" in t for t in rows) == any(pool[i].columns.get("harm_kind") == "verbose"
                                                            for i in shown), rows
            _tall(page, explorer)
            _check_why(page, explorer, "light", run_dir)
            explorer.screenshot(path=str(OUT / "explorer-verbose_refs.png"))
        finally:
            browser.close()


def test_notebook_05_exported_to_html_draws_its_figures_offline(chromium, base_dir):
    """Notebook 05, executed and exported with nbconvert, draws every figure with no network: the
    plotly.js it needs is inline, and no plotly CDN is referenced."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExecutePreprocessor
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    folder = base_dir / "root" / "notebooks"
    nb = nbformat.read(ROOT / "notebooks" / "05_inspecting_influence.ipynb", as_version=4)
    env_keys = ("NICE_KIT_FAST", "PYTHONPATH", "OMP_NUM_THREADS", "JUPYTERLAB_SETTINGS_DIR", "IPYTHONDIR")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: _env(base_dir)[k] for k in env_keys})
    os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(base_dir / "no-settings")  # default (light) theme, whatever Lab did
    try:
        ExecutePreprocessor(timeout=300, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(folder)}})
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    body, _ = HTMLExporter().from_notebook_node(nb)
    page_path = OUT / "05_inspecting_influence.html"
    page_path.write_text(body)
    # (plotly.js itself mentions cdn.plot.ly as a default topojson URL: only script sources count)
    assert not re.search(r"<script[^>]+src=[\"'][^\"']*(plot\.ly|plotly)", body)
    assert body.count("* plotly.js v") == 1, "plotly.js should be inlined exactly once"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        blocked: list[str] = []

        def no_network(route):
            if route.request.url.startswith("file:"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        page.route("**/*", no_network)
        try:
            page.goto(page_path.as_uri(), wait_until="load", timeout=60_000)
            # every figure of the page draws its data: the notebook's own fig.show() figures and those of
            # the widgets' static copies (explorer: histogram and scatter; rollout viewer: bars)
            page.wait_for_function("() => document.querySelectorAll('.plotly-graph-div').length >= 6 && "
                                   "[...document.querySelectorAll('.plotly-graph-div')].every("
                                   "(d) => d.querySelector('.main-svg'))", timeout=60_000)
            plots = page.locator(".plotly-graph-div")
            drawn = plots.evaluate_all("(ps) => ps.filter((p) => p.querySelector('.point, .bars path, .boxlayer path'))"
                                       ".length")
            assert drawn == plots.count(), f"only {drawn} of {plots.count()} figures drew data"
            assert page.locator(".nice-kit-fallback .nice-kit-table tbody tr").count() > 0
            page.locator(".nice-kit-fallback").first.scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / "nb05-offline-explorer.png"))
        finally:
            browser.close()
    assert all("plot.ly" not in u for u in blocked), blocked
