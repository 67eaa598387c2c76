"""The widgets (widgets/): controls change what they should, from a live pipeline or a run directory.

The module works on its own copy of the session's fast-mode run (tiny model; ``fast_run`` in
conftest.py); no browser is needed here (see test_browser.py for the widgets rendered in JupyterLab,
in the light and the dark theme)."""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from conftest import copy_run
from plotly.callbacks import Points

import nice_kit.models as models_mod
import widgets  # ipywidgets and anywidget (plotly's FigureWidget) come with nice_kit[widgets]: never skipped
from nice_kit.explain import explain
from widgets import (
    InfluenceExplorer,
    MetricPicker,
    RolloutViewer,
    _display,
    _html,
    _theme,
    loss_vs_metric,
    open_run,
)
from widgets import metric_picker as mp


@pytest.fixture(scope="module")
def run(fast_run, tmp_path_factory):
    """This module's copy of the session's fast run (with NICE's per-completion gradients): the tests
    write into it (selections)."""
    return copy_run(fast_run, tmp_path_factory.mktemp("widgets") / "run")


@pytest.fixture(scope="module")
def run_dir(run):
    return str(run.run_dir)


@pytest.fixture(scope="module")
def chosen(run):
    """The run's own selection (top fraction per method), as the pipeline writes it."""
    return run.select()


@pytest.fixture
def shell():
    """An IPython shell whose displays are captured (to test what a notebook would save)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    with capture_output() as captured:
        yield captured


def _row_ids(table_html: str) -> list[str]:
    return re.findall(r'data-key="([^"]+)"', table_html)


# ------------------------------------------------------------------------------------ open_run
def test_open_run_reads_a_finished_run_without_loading_the_model(run, run_dir):
    p = open_run(run_dir)
    assert [c.epoch for c in p.checkpoints] == [c.epoch for c in run.checkpoints]
    pd.testing.assert_frame_equal(widgets.load_scores(p), run.scores(), check_dtype=False, rtol=1e-6)
    InfluenceExplorer(p)
    MetricPicker(p)
    RolloutViewer(p)
    assert not p.holds_model  # everything came from the cached files


def test_open_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_run(tmp_path)
    with pytest.raises(TypeError):
        InfluenceExplorer(42)


# ------------------------------------------------------------------------------ InfluenceExplorer
@pytest.fixture
def explorer(run):
    return InfluenceExplorer(run, theme="light")


def test_explorer_from_a_run_directory(run, run_dir):
    from_disk, live = InfluenceExplorer(run_dir, theme="light"), InfluenceExplorer(run, theme="light")
    assert from_disk.table["id"].tolist() == live.table["id"].tolist()
    assert from_disk.table_html() == live.table_html() and from_disk.detail.value == live.detail.value


def test_explorer_table_is_the_pool_sorted_by_the_chosen_method(explorer, run):
    scores = run.scores()
    assert len(explorer.table) == len(run.pool)
    assert explorer.method.value == "nice"
    assert explorer.table["id"].tolist() == scores.sort_values("nice", ascending=False, kind="mergesort")["id"].tolist()
    assert {"task", "source", "harmful", "nice", "less", "selected_by"} <= set(explorer.table.columns)
    shown = _row_ids(explorer.table_view.html)
    assert shown == explorer.table["id"].head(explorer.k.value).tolist()
    # every essential column is in the table (no sideways scroll needed to reach them)
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", explorer.table_view.html)
    assert headers == ["id", "selected by", "nice", "less", "task", "harmful", "prompt", "response", "correct", "on task",
                       "source"]
    assert 'table-layout: fixed' in _html.STYLE and "nice-kit-clamp" in explorer.table_view.html


def test_method_dropdown_changes_the_order_and_the_histogram(explorer, run):
    before = explorer.table["id"].tolist()
    explorer.method.value = "less"
    after = explorer.table["id"].tolist()
    assert after != before
    assert after == run.scores().sort_values("less", ascending=False, kind="mergesort")["id"].tolist()
    assert list(explorer.hist.data[0].x) == pytest.approx(explorer.frame["less"].tolist())
    assert "LESS" in explorer.hist.layout.title.text
    cut = [s for s in explorer.hist.layout.shapes if s.name == "cutoff"]
    assert len(cut) == 1 and cut[0].x0 == pytest.approx(explorer.cutoffs["less"])


def test_top_bottom_toggle_reverses_the_order(explorer):
    top = explorer.table
    explorer.order.value = "bottom"
    bottom = explorer.table
    assert bottom["nice"].is_monotonic_increasing and top["nice"].is_monotonic_decreasing
    assert bottom["id"].iloc[0] == top["id"].iloc[-1]
    assert _row_ids(explorer.table_view.html)[0] == bottom["id"].iloc[0]


def test_pager_pages_through_the_table(explorer):
    k = explorer.k.value
    explorer.pager.next.click()
    assert _row_ids(explorer.table_view.html) == explorer.table["id"].iloc[k:2 * k].tolist()
    assert f"rows {k + 1}–" in explorer.pager.label.value
    explorer.pager.prev.click()
    assert _row_ids(explorer.table_view.html) == explorer.table["id"].iloc[:k].tolist()
    assert explorer.pager.prev.disabled


def test_clicking_a_header_sorts_by_that_column(explorer):
    explorer.table_view.click_header("task")
    assert explorer.sort == ("task", False)
    tasks = explorer.table["task"].str.lower().tolist()
    assert tasks == sorted(tasks)
    assert re.search(r'<th class="[^"]*nice-kit-sorted-asc" data-sort="task"', explorer.table_view.html)
    explorer.table_view.click_header("task")  # again: reversed
    assert explorer.table["task"].str.lower().tolist() == sorted(tasks, reverse=True)
    explorer.table_view.click_header("less")  # a score: highest first, and the score dropdown follows
    assert explorer.sort == ("less", True) and explorer.method.value == "less" and explorer.order.value == "top"
    assert explorer.table["less"].is_monotonic_decreasing
    explorer.table_view.click_header("less")
    assert explorer.order.value == "bottom" and explorer.table["less"].is_monotonic_increasing
    with pytest.raises(KeyError):
        explorer.sort_by("no such column")


def test_clicking_a_row_selects_its_example(explorer, run):
    rid = explorer.table["id"].iloc[3]
    assert explorer.selected_id != rid
    explorer.table_view.click(rid)  # what the front end sends on a row click
    assert explorer.selected_id == rid and explorer.select.value == rid
    rec = next(r for r in run.pool if r.id == rid)
    assert html.escape(rec.prompt) in explorer.detail.value and html.escape(rec.response) in explorer.detail.value
    assert re.search(rf'<tr class="nice-kit-clickable nice-kit-selected" data-key="{rid}"', explorer.table_view.html)
    assert list(explorer.scatter.data[-1].customdata) == [rid]
    sel_line = [s for s in explorer.hist.layout.shapes if s.name == "selected"]
    assert sel_line[0].x0 == pytest.approx(float(explorer.frame.set_index("id").loc[rid, "nice"]))


def test_selected_by_column_is_the_runs_selection(explorer, chosen):
    frame = explorer.frame.set_index("id")
    for m in ("nice", "less"):
        assert set(frame.index[frame[f"selected_{m}"]]) == set(chosen[m])
        assert explorer.cutoffs[m] == pytest.approx(frame.loc[chosen[m], m].min())
    explorer.picked.value = "NICE"
    assert set(explorer.table["id"]) == set(chosen["nice"])
    explorer.picked.value = "both"
    assert set(explorer.table["id"]) == set(chosen["nice"]) & set(chosen["less"])
    explorer.picked.value = "LESS only"
    assert set(explorer.table["id"]) == set(chosen["less"]) - set(chosen["nice"])
    explorer.picked.value = "neither"
    assert set(explorer.table["id"]) == set(frame.index) - set(chosen["nice"]) - set(chosen["less"])
    both = next(iter(set(chosen["nice"]) & set(chosen["less"])), None)
    if both is not None:
        assert frame.loc[both, "selected_by"] == "NICE+LESS"


def test_cutoff_lines_on_the_histogram_and_the_scatter(explorer):
    shapes = explorer.scatter.layout.shapes
    vertical = [s for s in shapes if s.x0 == s.x1 and s.yref == "paper"]
    horizontal = [s for s in shapes if s.y0 == s.y1 and s.xref == "paper"]
    assert vertical[0].x0 == pytest.approx(explorer.cutoffs["less"])
    assert horizontal[0].y0 == pytest.approx(explorer.cutoffs["nice"])
    hist_cut = [s for s in explorer.hist.layout.shapes if s.name == "cutoff"]
    assert hist_cut[0].x0 == pytest.approx(explorer.cutoffs["nice"])
    assert any("top 10%" in a.text for a in explorer.hist.layout.annotations)


def test_filters_reduce_the_rows_and_the_scatter_follows(explorer):
    n = len(explorer.table)
    task = sorted(explorer.frame["task"].unique())[0]
    explorer.task.value = task
    assert 0 < len(explorer.table) < n and set(explorer.table["task"]) == {task}
    assert f"{len(explorer.table)} of {n}" in explorer.status.value
    shown = {i for t in explorer.scatter.data[1:-1] for i in t.customdata}
    assert shown == set(explorer.table["id"])
    assert len(explorer.scatter.data[0].x) == n - len(explorer.table)  # the rest, in grey
    assert f"n = {len(explorer.table)}" in explorer.scatter.layout.title.text
    assert len(explorer.hist.data[1].x) == len(explorer.table)
    explorer.task.value = "(all)"
    explorer.flag.value = "harmful"
    assert 0 < len(explorer.table) < n and explorer.table["harmful"].all()
    assert {i for t in explorer.scatter.data[1:-1] for i in t.customdata} == set(explorer.table["id"])
    explorer.flag.value = "(all)"
    rid = explorer.frame["id"].iloc[5]
    explorer.search.value = rid
    assert explorer.table["id"].tolist() == [rid]
    explorer.search.value = "no such text anywhere"
    assert explorer.table.empty and explorer.selected_id is None
    assert "no example" in explorer.detail.value
    assert len(explorer.scatter.data[0].x) == n


def test_choosing_an_example_in_the_dropdown_changes_the_text(explorer, run):
    first = explorer.selected_id
    assert first == explorer.table["id"].iloc[0]
    before = explorer.detail.value
    other = explorer.select.options[3][1]
    explorer.select.value = other
    assert explorer.selected_id == other and explorer.detail.value != before
    rec = next(r for r in run.pool if r.id == other)
    assert html.escape(rec.prompt) in explorer.detail.value


def test_clicking_a_scatter_point_selects_its_example(explorer):
    trace = explorer.scatter.data[2]  # the harmful group: examples the table may not show
    i = len(trace.customdata) - 1
    rid = trace.customdata[i]
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]], trace_name=trace.name,
                                    trace_index=2), None)
    assert explorer.selected_id == rid and explorer.select.value == rid
    assert rid in explorer.detail.value
    assert list(explorer.scatter.data[-1].customdata) == [rid]


def test_scatter_title_has_the_spearman_correlation(explorer, run):
    s = run.scores()
    rho = s["nice"].rank().corr(s["less"].rank())
    assert f"ρ = {rho:.2f}" in explorer.scatter.layout.title.text
    assert widgets.spearman(s["nice"], s["less"]) == pytest.approx(rho)
    names = [t.name for t in explorer.scatter.data]
    assert names == ["filtered out", "clean", "harmful", "selected"]
    assert sum(len(t.x) for t in explorer.scatter.data[1:3]) == len(run.pool)


def test_explorer_panels_take_dataframes(explorer):
    calls = []

    def why(rid: str, method: str) -> pd.DataFrame:
        calls.append((rid, method))
        return pd.DataFrame({"target prompt": [f"why-{rid}"], "contribution": [0.5]})

    explorer.add_panel("why", why)
    assert calls[-1] == (explorer.selected_id, "nice")
    def text(h: str) -> str:
        return h.replace("<wbr>", "")

    assert f"why-{explorer.selected_id}" in text(explorer.panel_box.children[1].value)
    other = explorer.table["id"].iloc[2]
    explorer.table_view.click(other)
    assert f"why-{other}" in text(explorer.panel_box.children[1].value)
    assert f"why-{other}" in text(explorer.fallback_html())
    explorer.add_panel("broken", lambda rid, m: 1 / 0)  # a failing panel says so, the widget lives on
    assert "ZeroDivisionError" in explorer.panel_box.children[-1].value


# ------------------------------------------------------------------------ the why panel
def _bars(panel) -> dict[str, float]:
    bar = panel.bars.data[0]
    return dict(zip(bar.customdata, bar.x))


def _expected_bars(run, rid: str, method: str) -> dict[str, float]:
    per = explain(run, rid, method, compute=False).by_prompt()
    per = per[per["contribution"] != 0]
    return dict(zip(per["prompt_id"], per["contribution"]))


def test_selecting_a_row_redraws_the_why_panel_for_that_example(explorer, run):
    why = explorer.why
    assert explorer.why_toggle.value and why.layout.display is None  # open by default
    first = explorer.selected_id
    assert why.shown == (first, "nice") and why.explanation.example_id == first
    rid = explorer.table["id"].iloc[3]
    assert rid != first
    explorer.table_view.click(rid)  # a row click
    e = why.explanation
    assert why.shown == (rid, "nice") and e.example_id == rid and e.method == "nice"
    assert _bars(why) == pytest.approx(_expected_bars(run, rid, "nice"))
    assert html.escape(rid) in why.header.value and e.score == pytest.approx(explorer.frame.set_index("id").loc[rid, "nice"])
    top = e.top_prompt()
    assert why.prompt.value == top
    comp = e.completions_of(top)  # the run has its per-completion gradients: the completions are shown
    for cls, part in (("nice-why-rewarded", comp["policy_weight"] > 0), ("nice-why-punished", comp["policy_weight"] < 0)):
        assert (cls in why.completions.value) == bool(part.any())
    assert why.compute_button.layout.display == "none"
    # a scatter click and select_example redraw it too
    trace = explorer.scatter.data[1]
    i = next(j for j, x in enumerate(trace.customdata) if x != rid)
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]], trace_name=trace.name,
                                    trace_index=1), None)
    assert why.explanation.example_id == trace.customdata[i]
    other = explorer.frame["id"].iloc[-1]
    explorer.select_example(other)
    assert why.explanation.example_id == other and _bars(why) == pytest.approx(_expected_bars(run, other, "nice"))


def test_switching_the_method_redraws_the_why_panel(explorer, run):
    rid = explorer.table["id"].iloc[2]
    explorer.table_view.click(rid)
    nice_bars = _bars(explorer.why)
    explorer.method.value = "less"
    why = explorer.why
    assert why.shown == (rid, "less") and why.explanation.method == "less" and why.explanation.example_id == rid
    assert _bars(why) == pytest.approx(_expected_bars(run, rid, "less")) and _bars(why) != pytest.approx(nice_bars)
    assert "LESS score" in why.header.value and "no completions" in why.completions.value
    assert why.compute_button.layout.display == "none"  # LESS samples nothing: nothing to compute
    explorer.table_view.click_header("nice")  # sorting by a score column switches the method too
    assert why.shown == (rid, "nice") and _bars(why) == pytest.approx(nice_bars)


def test_closing_the_why_panel_stops_its_redraws(explorer):
    explorer.why_toggle.value = False
    assert explorer.why.layout.display == "none" and "why this score?" not in explorer.fallback_html()
    rid = explorer.table["id"].iloc[4]
    explorer.table_view.click(rid)
    assert explorer.why.shown[0] != rid  # closed: not redrawn
    explorer.why_toggle.value = True
    assert explorer.why.shown == (rid, "nice") and explorer.why.layout.display is None
    explorer.search.value = "no such text anywhere"
    assert explorer.why.explanation is None and "no example matches" in explorer.why.header.value


def test_selecting_never_loads_the_model(run, tmp_path, monkeypatch):
    """A run opened from disk whose per-completion gradients are not stored yet: rows, scatter points and
    methods are chosen, the panel explains each from the stored vectors alone and offers the button;
    only the button would load the model (here it cannot, and says so inside the panel)."""
    shutil.copytree(run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("val_nice_completions"))

    def no_model(*args, **kwargs):
        raise RuntimeError("the model must not be loaded")

    monkeypatch.setattr(models_mod, "load_model", no_model)
    p = open_run(tmp_path / "run")
    explorer = InfluenceExplorer(p, theme="light")
    for rid in explorer.table["id"].iloc[[1, 5]]:
        explorer.table_view.click(rid)
        why = explorer.why
        assert why.explanation.example_id == rid and why.explanation.completions is None
        assert _bars(why) == pytest.approx(_expected_bars(run, rid, "nice"))
        assert "per-completion gradients not available" in why.completions.value
        assert why.compute_button.layout.display is None
    explorer.method.value = "less"
    assert explorer.why.shown[1] == "less" and explorer.why.compute_button.layout.display == "none"
    explorer.method.value = "nice"
    assert not p.holds_model and not (tmp_path / "run" / "grads" / "val_nice_completions").exists()
    explorer.why.compute_button.click()  # the one thing that loads the model: here it fails, in the panel
    assert "could not compute them" in explorer.why.status.value and "must not be loaded" in explorer.why.status.value
    assert len(explorer.why.bars.data[0].x) > 0 and not explorer.why.compute_button.disabled  # prompts stay


def test_why_panel_errors_show_inside_the_panel(run, tmp_path, monkeypatch):
    q = copy_run(run, tmp_path / "run")
    explorer = InfluenceExplorer(q, theme="light")
    rid = explorer.table["id"].iloc[1]
    # a stale stage: the scores no longer match what the config describes
    monkeypatch.setattr(q, "scores_inputs", lambda methods: {"changed": True})
    explorer.table_view.click(rid)
    assert explorer.selected_id == rid and html.escape(rid) in explorer.detail.value  # the explorer lives on
    assert explorer.why.explanation is None and "cannot explain the nice score of" in explorer.why.header.value
    assert "computed from other vectors or settings" in explorer.why.header.value
    assert explorer.why.chart.layout.display == "none"
    assert "cannot explain" in explorer.fallback_html()
    monkeypatch.undo()
    # no scores yet
    (tmp_path / "run" / "scores.json").unlink()
    explorer.table_view.click(explorer.table["id"].iloc[2])
    assert "no influence scores yet" in explorer.why.header.value
    # a method the panel cannot explain (what the explorer calls for any score column)
    assert explorer.why.show(rid, "custom", raise_errors=False) is None
    assert "cannot explain the custom score" in explorer.why.header.value and "&#x27;custom&#x27;" in explorer.why.header.value
    with pytest.raises(ValueError):
        explorer.why.show(rid, "custom")


def test_the_static_copy_follows_the_why_panel(run, shell):
    explorer = InfluenceExplorer(run, k=5, theme="light")
    explorer._ipython_display_()
    display_id = next(o for o in shell.outputs if o.transient and o.transient.get("display_id")).transient["display_id"]

    def latest() -> str:
        return [o for o in shell.outputs if o.update and o.transient.get("display_id") == display_id][-1].data["text/html"]

    rid = explorer.table["id"].iloc[3]
    explorer.table_view.click(rid)
    copy = latest()
    assert "why this score?" in copy and explorer.why.header.value in copy
    assert copy.count("Plotly.newPlot") == 3 and "cdn.plot.ly" not in copy  # why chart, histogram, scatter
    e = explorer.why.explanation
    other = next(v for _, v in explorer.why.prompt.options if v != e.top_prompt())
    explorer.why.prompt.value = other  # the panel redraws by itself: the copy follows
    assert html.escape(other) in latest().split("why this score?")[1]
    assert completions_first_text(e, other) in latest()


def completions_first_text(e, prompt_id: str) -> str:
    comp = e.completions_of(prompt_id)
    return html.escape(" ".join(str(comp["text"].iloc[0]).split()))


def test_why_bars_are_labelled_with_their_subtask(run):
    e = explain(run, run.pool[0].id, "nice", compute=False)
    bars = widgets.why.prompt_bars(e)
    assert len(bars) and all(s in lab for s, lab in zip(bars["subtask"], bars["label"]))
    assert bars["label"].tolist() == bars["prompt_id"].tolist()  # these ids name their subtask: not repeated
    e.prompts["subtask"] = "other"
    assert widgets.why.prompt_bars(e)["label"].tolist() == [f"other · {p}" for p in bars["prompt_id"]]


def test_why_panel_exported_from_the_package(run):
    assert widgets.why_panel is widgets.why.why_panel and widgets.WhyPanel is widgets.why.WhyPanel
    panel = widgets.why_panel(run, run.pool[0].id, "nice", theme="dark")
    assert panel.bars.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
    assert panel.probe is None and "cdn.plot.ly" not in panel._repr_html_()


# ----------------------------------------------------------------------- theme and colours
def test_css_takes_colours_from_the_theme():
    """No hard-coded light background or dark text: every colour is a JupyterLab variable (with a
    fallback), a translucent tint, or white text on a coloured badge."""
    for prop, value in re.findall(r"(?<![-\w])(background|color)\s*:\s*([^;]+);", _html.STYLE):
        value = value.strip()
        ok = value.startswith("var(--jp-") or value.startswith("rgba(") or value == "transparent" or \
            (prop == "color" and value == "#fff")
        assert ok, f"{prop}: {value}"
    assert _html.weight_color(0.0, 1.0) == "transparent"
    assert _html.weight_color(1.0, 1.0).startswith("rgba(44,160,44")


def test_lab_theme_is_read_from_jupyterlab_settings(tmp_path, monkeypatch):
    folder = tmp_path / "@jupyterlab" / "apputils-extension"
    folder.mkdir(parents=True)
    monkeypatch.setenv("JUPYTERLAB_SETTINGS_DIR", str(tmp_path))
    path = folder / "themes.jupyterlab-settings"
    path.write_text('{\n  // the theme\n  "theme": "JupyterLab Dark", "url": "http://x//y"\n}')
    assert _theme.lab_theme() == "dark" and _theme.resolve_theme(None) == "dark"
    assert _theme.resolve_theme("light") == "light"
    path.write_text('{"theme": "JupyterLab Light"}')
    assert _theme.lab_theme() == "light"
    path.write_text('{"theme": "JupyterLab Dark", "adaptive-theme": true}')
    assert _theme.lab_theme() is None and _theme.resolve_theme(None) == "light"
    with pytest.raises(ValueError, match="theme"):
        _theme.check_theme("sepia")


def test_explorer_figures_follow_the_theme(run):
    dark = InfluenceExplorer(run, theme="dark")
    assert dark.hist.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
    assert dark.scatter.data[-1].marker.color == widgets.plots.FOREGROUND["dark"]
    assert dark.why.bars.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
    dark.set_theme("light")
    assert dark.scatter.layout.template.layout.paper_bgcolor == _theme.PAPER["light"]
    assert dark.why.bars.layout.template.layout.paper_bgcolor == _theme.PAPER["light"]
    assert dark.why.theme == "light" and dark.why.probe is None  # the explorer's theme, not a probe of its own
    assert dark.scatter.data[-1].marker.color == widgets.plots.FOREGROUND["light"]
    assert dark.probe is None  # an explicit theme does not follow the page
    auto, viewer, picker = InfluenceExplorer(run, theme="auto"), RolloutViewer(run), MetricPicker(run)
    assert auto.probe is viewer.probe is picker.probe  # one probe model per kernel
    try:
        auto.probe.theme = "dark"  # what the probe reports when the page switches to the dark theme
        assert auto.theme == viewer.theme == picker.theme == "dark"
        assert auto.hist.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
        assert picker.fig.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
        assert dark.theme == "light"  # set explicitly above: kept
        assert InfluenceExplorer(run).theme == "dark"  # a new widget starts in the page's theme
    finally:
        auto.probe.theme = "light"


# ---------------------------------------------------------------------- outside a live kernel
def test_display_writes_the_widget_and_a_static_copy_that_follows_changes(run, shell):
    explorer = InfluenceExplorer(run, k=5, theme="light")
    explorer._ipython_display_()
    outputs = [o for o in shell.outputs if "text/plain" in o.data or "text/html" in o.data]
    live = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    copies = [o for o in outputs if o.transient and o.transient.get("display_id")]
    assert len(live) == 1 and len(copies) == 1
    display_id = copies[0].transient["display_id"]
    assert _row_ids(copies[0].data["text/html"]) == explorer.table["id"].head(5).tolist()
    # hidden while the live widget (which carries the hiding style) is on the page
    cls = explorer._fallback_class()
    assert cls in copies[0].data["text/html"] and f".{cls} {{display: none;}}" in explorer.children[0].value

    task = sorted(explorer.frame["task"].unique())[1]
    explorer.task.value = task
    updates = [o for o in shell.outputs if o.update and o.transient.get("display_id") == display_id]
    assert updates, "the static copy was not refreshed"
    latest = updates[-1].data["text/html"]
    assert _row_ids(latest) == explorer.table["id"].head(5).tolist()
    assert set(explorer.table["task"]) == {task} and f"task: {task}" in latest
    assert "cdn.plot.ly" not in latest and "Plotly.newPlot" in latest


def test_static_figures_show_what_the_widget_shows(explorer):
    explorer.flag.value = "harmful"
    fig = explorer.figure()
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    shown = {i for t in fig.data[1:-1] for i in t.customdata}
    assert shown == set(explorer.table["id"]) and len(fig.data[0].x) == len(explorer.frame) - len(shown)
    html_copy = explorer._repr_html_()
    assert _row_ids(html_copy) == explorer.table["id"].head(explorer.k.value).tolist()
    assert html_copy.count("Plotly.newPlot") == 3 and "harmful: harmful" in html_copy  # with the why chart


def test_plotlyjs_is_inlined_once_per_kernel(shell, monkeypatch):
    monkeypatch.setattr(_display, "_PLOTLYJS_SHOWN", False)
    monkeypatch.setattr(pio.renderers, "default", "browser")  # no notebook renderer: our own copy
    _display.ensure_plotlyjs()
    _display.ensure_plotlyjs()
    scripts = [o.data.get("text/html", "") for o in shell.outputs]
    bundles = [s for s in scripts if "plotly" in s.lower() and len(s) > 1_000_000]
    assert len(bundles) == 1 and "https://" not in bundles[0][:500]


def test_plotlyjs_is_shared_with_fig_show(shell, monkeypatch):
    """With the offline renderer, the widgets' copies and ``fig.show()`` share one inline plotly.js."""
    monkeypatch.setattr(_display, "_PLOTLYJS_SHOWN", False)
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    _display.use_offline_renderer()  # a fresh default: the offline renderer is pending activation
    _display.ensure_plotlyjs()
    pio.show(go.Figure(go.Bar(y=[1, 2])))
    pio.show(go.Figure(go.Bar(y=[3, 4])))
    bundle = go.Figure(go.Bar(y=[5, 6]))._repr_mimebundle_()  # plotly activates its renderers again here
    html_parts = [o.data.get("text/html", "") for o in shell.outputs]
    assert sum("* plotly.js v" in h for h in html_parts) == 1
    assert sum("Plotly.newPlot" in h for h in html_parts) == 2 and "Plotly.newPlot" in bundle["text/html"]


def test_fig_show_writes_offline_html(monkeypatch):
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    assert _display.use_offline_renderer()
    assert pio.renderers.default == f"plotly_mimetype+{_display.OFFLINE_RENDERER}"
    bundle = pio.renderers[_display.OFFLINE_RENDERER].to_mimebundle(go.Figure(go.Bar(y=[1, 2])).to_dict())
    assert "Plotly.newPlot" in bundle["text/html"]
    assert not re.search(r"<script[^>]+src=", bundle["text/html"])  # no CDN script (plotly.js or MathJax)
    monkeypatch.setattr(pio.renderers, "default", "browser")
    assert not _display.use_offline_renderer() and pio.renderers.default == "browser"  # a user's choice stays


def test_figure_html_waits_for_the_inline_plotly():
    out = _display.figure_html(go.Figure(go.Scatter(x=[1], y=[2], text=["</script><b>"])))
    assert "window.Plotly" in out and "setTimeout" in out and "https://" not in out
    assert "</script><b>" not in out  # a string in the data cannot close the script


# --------------------------------------------------------------------------------- MetricPicker
def test_metric_picker_starts_on_the_runs_metric(run, run_dir):
    picker = MetricPicker(run_dir)
    assert picker.name == run.cfg.metric.name
    assert picker.params == {**mp.rewards.metric_info(picker.name).params, **run.cfg.metric.params}
    rollouts = run.rollouts(run.checkpoints[-1])
    assert picker.preview["score"].tolist() == pytest.approx(rollouts["reward"].tolist())
    assert callable(picker.value)


def test_back_to_the_runs_metric_restores_its_settings(run):
    picker = MetricPicker(run)
    assert picker.params == run.cfg.metric.params
    picker.dropdown.value = "format"
    picker.dropdown.value = run.cfg.metric.name
    assert picker.params == run.cfg.metric.params
    assert picker.preview["score"].tolist() == pytest.approx(picker.preview["reward"].tolist())
    assert picker.fig.layout.xaxis.visible is not False


def test_metric_dropdown_updates_description_params_and_preview(run):
    picker = MetricPicker(run, name="length", params={"max_words": 100})
    assert set(picker.preview["score"]) == {1.0}
    desc = picker.description.value
    picker.dropdown.value = "format"
    assert picker.description.value != desc and "regular expression" in picker.description.value
    assert list(picker._param_widgets) == ["pattern"]
    picker._param_widgets["pattern"].value = "(?s).*"
    assert set(picker.preview["score"]) == {1.0}
    picker._param_widgets["pattern"].value = "no completion is this"
    assert set(picker.preview["score"]) == {0.0}
    assert picker.params == {"pattern": "no completion is this"}
    assert picker.config() == {"name": "format", "params": {"pattern": "no completion is this"}}
    assert list(picker.fig.data[1].y) == picker.preview["score"].tolist()
    assert picker.value(["p"], ["no completion is this"]) == [1.0]
    picker.dropdown.value = "length"
    picker._param_widgets["max_words"].value = 1
    expected = [1.0 if len(c.split()) <= 1 else max(0.0, 1.0 - (len(c.split()) - 1)) for c in picker.preview["completion"]]
    assert picker.preview["score"].tolist() == pytest.approx(expected)
    assert html.escape(picker.preview["completion"].iloc[0].split()[0]) in picker.table_html.value


def test_axis_titles_name_the_metric(run):
    picker = MetricPicker(run, name="format")
    assert picker.fig.layout.xaxis.title.text == "format score"
    assert picker.fig.layout.yaxis2.title.text == "format score"
    assert picker.fig.layout.title.text.startswith("format scores of")


def _is_cleared(picker) -> bool:
    return (len(picker.fig.data[0].x) == 0 and len(picker.fig.data[1].y) == 0 and not picker.fig.layout.xaxis.visible
            and "scores of" not in picker.fig.layout.title.text and "no scores" in picker.table_html.value)


def test_a_failed_build_clears_the_figure_and_table(run):
    picker = MetricPicker(run, name="length")
    assert not _is_cleared(picker)
    picker._param_widgets["max_words"].value = 0  # the factory refuses it
    assert picker.value is None and "max_words must be at least 1" in picker.status.value
    assert _is_cleared(picker) and picker.preview["score"].isna().all()
    picker._param_widgets["max_words"].value = 2
    assert not _is_cleared(picker)
    picker.dropdown.value = "reward_model"  # needs a model name: unavailable until one is set
    assert picker.value is None and "no model configured" in picker.status.value and _is_cleared(picker)


def test_a_failed_scoring_clears_the_figure_and_table(run, monkeypatch):
    picker = MetricPicker(run, name="sentiment")
    assert "sentiment scores of" in picker.fig.layout.title.text

    def broken(*args, **kwargs):
        raise RuntimeError("the scoring service is down")

    monkeypatch.setattr(mp, "rescore", broken)
    picker.dropdown.value = "length"
    assert "failed on these rollouts" in picker.status.value and "service is down" in picker.status.value
    assert _is_cleared(picker) and picker.error.startswith("RuntimeError")


def test_metrics_the_run_cannot_use_are_marked_unavailable(run):
    picker = MetricPicker(run, name="sentiment")
    labels = dict((v, k) for k, v in picker.dropdown.options)
    assert "unavailable" in labels["code_tests"] and "'tests'" in labels["code_tests"]
    assert "unavailable" in labels["humaneval"] and "unavailable" not in labels["length"]
    assert not _is_cleared(picker)
    picker.dropdown.value = "code_tests"  # the case: sentiment, then a metric this run cannot use
    assert _is_cleared(picker) and "unavailable" in picker.status.value and "&#x27;tests&#x27;" in picker.description.value
    assert picker.value is None and picker.preview.empty
    picker.dropdown.value = "exact_match"
    assert not _is_cleared(picker)
    picker._param_widgets["column"].value = "no_such_column"  # needed columns depend on the parameters
    assert _is_cleared(picker) and "no_such_column" in picker.status.value


def test_parameters_with_fixed_values_are_dropdowns(run):
    picker = MetricPicker(run, name="task_score")
    extract = picker._param_widgets["extract"]
    assert extract.__class__.__name__ == "Dropdown" and set(extract.options) == {"strict", "last_number"}
    extract.value = "last_number"
    assert picker.params == {"extract": "last_number"} and picker.error is None
    assert picker.config() == {"name": "task_score", "params": {"extract": "last_number"}}


@pytest.mark.parametrize("metric,param", sorted(mp.KNOWN_CHOICES))
def test_known_choices_match_the_metrics(metric, param):
    """Every listed value builds the metric and a value outside the list is refused, so the table
    cannot drift from the metrics it describes."""
    from nice_kit import metrics

    info = metrics.metric_info(metric)
    for value in mp.KNOWN_CHOICES[(metric, param)]:
        assert callable(metrics.get_metric(metric, **{param: value}))
    with pytest.raises(ValueError):
        metrics.get_metric(metric, **{param: "not-a-choice"})
    assert mp.param_choices(info)[param] == mp.KNOWN_CHOICES[(metric, param)]


def test_param_choices_from_literal_annotations_and_the_registry():
    def factory(mode: Literal["a", "b"] = "a", n: int = 1):
        return None

    @dataclass
    class Info:
        name: str
        factory: Any
        params: dict
        choices: dict = field(default_factory=dict)

    assert mp.param_choices(Info("x", factory, {"mode": "a", "n": 1})) == {"mode": ("a", "b")}
    assert mp.param_choices(Info("x", factory, {"mode": "a", "n": 1}, {"n": (1, 2)})) == {"mode": ("a", "b"),
                                                                                          "n": (1, 2)}


def test_preview_pages_and_filters_rows_that_differ(run):
    picker = MetricPicker(run, name="length", params={"max_words": 1}, n_preview=5)
    df = picker.preview
    assert len(picker.rows) == len(df) and picker.pager.label.value.endswith(f"of {len(df)}</span>")
    first = picker.table_html.value
    picker.pager.next.click()
    assert picker.table_html.value != first
    assert html.escape(" ".join(df["completion"].iloc[5].split())[:15]) in picker.table_html.value
    picker.differs.value = True
    differs = ~np.isclose(df["score"], df["reward"])
    assert len(picker.rows) == int(differs.sum()) < len(df)
    assert (picker.rows["score"] != picker.rows["reward"]).all()


def test_metric_picker_without_auto_waits_for_the_button_and_clears_stale_scores(run):
    picker = MetricPicker(run, name="length", auto=False)
    assert picker.preview.empty
    picker.button.click()
    assert len(picker.preview) == len(run.rollouts(run.checkpoints[-1]))
    assert isinstance(picker.figure(), go.Figure) and "<table" in picker._repr_html_()
    picker._param_widgets["max_words"].value = 1  # old scores no longer match the settings
    assert picker.preview.empty and _is_cleared(picker) and "press" in picker.status.value
    picker.button.click()
    assert len(picker.preview) and not _is_cleared(picker)


# -------------------------------------------------------------------------------- RolloutViewer
@pytest.mark.parametrize("source", ["pipeline", "path"])
def test_rollout_viewer_prompt_change_changes_the_completions(run, run_dir, source):
    viewer = RolloutViewer(run if source == "pipeline" else run_dir)
    ids = [v for _, v in viewer.prompt.options]
    assert ids == [r.id for r in run.target_val]
    first = viewer.completions
    assert len(first) == run.cfg.rollouts.k and {"reward", "weight", "completion"} <= set(first.columns)
    body = viewer.body.value
    viewer.prompt.value = ids[-1]
    second = viewer.completions
    assert set(second["prompt_id"]) == {ids[-1]} and viewer.body.value != body
    for c in second["completion"]:
        assert html.escape(c) in viewer.body.value
    rec = run.target_val[-1]
    assert html.escape(rec.prompt) in viewer.body.value and html.escape(rec.response) in viewer.body.value


def test_rollout_viewer_shows_weights_and_signal(run):
    viewer = RolloutViewer(run)
    df, per_prompt = run.rollout_weights(run.checkpoints[-1])
    for pid, pw in per_prompt.items():
        viewer.prompt.value = pid
        assert viewer.completions["weight"].tolist() == pytest.approx(pw.completion)
        assert ("carries signal" in viewer.body.value) == pw.signal
    epochs = [v for _, v in viewer.checkpoint.options]
    viewer.checkpoint.value = epochs[0]
    assert set(viewer.completions["epoch"]) == {epochs[0]}
    fig = viewer.figure()
    assert [t.type for t in fig.data] == ["bar", "bar"] and "length" in fig.layout.annotations[0].text


def test_previous_next_and_signal_only(run):
    viewer = RolloutViewer(run)
    ids = viewer.prompt_ids
    assert viewer.prev.disabled and not viewer.next.disabled and "prompt 1 of" in viewer.position.value
    viewer.next.click()
    assert viewer.prompt.value == ids[1] and not viewer.prev.disabled
    for _ in ids:
        viewer.next.click()
    assert viewer.prompt.value == ids[-1] and viewer.next.disabled
    viewer.prev.click()
    assert viewer.prompt.value == ids[-2]
    _, per_prompt = run.rollout_weights(run.checkpoints[-1])
    with_signal = [pid for pid in ids if per_prompt[pid].signal]
    viewer.signal_only.value = True
    assert viewer.prompt_ids == with_signal
    assert viewer.prompt.value in with_signal


def test_the_weight_explanation_matches_the_weights(run):
    viewer = RolloutViewer(run)
    pol, k = run.cfg.policy, run.cfg.rollouts.k
    assert (pol.variant, pol.baseline, pol.divide_by_kept) == ("vanilla", "mean", True)
    explain = html.unescape(viewer.explain.value)
    assert "(reward − the mean reward of the prompt's" in explain and f"/ K = {k}" in explain
    _, per_prompt = run.rollout_weights(run.checkpoints[-1])
    pid = next(p for p, pw in per_prompt.items() if pw.signal)
    viewer.prompt.value = pid
    c = viewer.completions
    assert c["weight"].tolist() == pytest.approx(((c["reward"] - c["reward"].mean()) / k).tolist())


def test_only_the_policy_settings_that_apply_are_shown():
    from nice_kit.config import PolicySettings

    vanilla = widgets.policy_summary(PolicySettings(variant="vanilla"))
    assert "topk" not in vanilla and "fallback_to_reference" not in vanilla and "baseline=mean" in vanilla
    topk = widgets.policy_summary(PolicySettings(variant="topk", topk=3))
    assert "topk=3" in topk and "fallback_to_reference" not in topk
    rejection = widgets.policy_summary(PolicySettings(variant="rejection"))
    assert "fallback_to_reference=True" in rejection and "topk" not in rejection.replace("rejection", "")
    assert "/ 3" in widgets.weight_explanation(PolicySettings(variant="topk", topk=3), 8)
    assert "leave-one-out" not in widgets.weight_explanation(PolicySettings(baseline="loo"), 8)
    assert "other kept completions" in widgets.weight_explanation(PolicySettings(baseline="loo"), 8)
    assert "no baseline" in widgets.weight_explanation(PolicySettings(baseline="none"), 8)
    assert "/ K" not in widgets.weight_explanation(PolicySettings(divide_by_kept=False), 8)


# ------------------------------------------------------------------------------------- plots
def test_nice_ticks_are_round():
    ticks, labels = widgets.nice_ticks(0.0472, 0.1171875)
    step = ticks[1] - ticks[0]
    assert ticks[0] <= 0.0472 and ticks[-1] >= 0.1171875 and 3 <= len(ticks) <= 7
    assert min(abs(step - s) for s in (0.01, 0.02, 0.025)) < 1e-12
    assert all(abs(t / step - round(t / step)) < 1e-9 for t in ticks)
    assert labels == [f"{t:.{3 if abs(step - 0.025) < 1e-12 else 2}f}" for t in ticks]
    assert widgets.nice_ticks(2.0, 2.0)[0]  # a flat line still gets ticks


def test_loss_vs_metric_across_checkpoints():
    curve = pd.DataFrame({"epoch": [0, 1, 2], "lr": [0.0, 1e-3, 5e-4], "metric": [0.0472, 0.0652, 0.1171875],
                          "loss": [2.0, 1.5, 1.2], "n_test": [8] * 3})
    fig = loss_vs_metric(curve, metric="task_score")
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert [t.name for t in fig.data] == ["reference loss (LESS's proxy)", "task_score (NICE's target)"]
    assert list(fig.data[0].y) == [2.0, 1.5, 1.2] and fig.data[1].yaxis == "y2"
    assert "task_score" in fig.layout.title.text and "task_score" in fig.layout.yaxis2.title.text
    ticks = list(fig.layout.yaxis2.tickvals)
    assert all(len(t.rstrip("0").split(".")[-1]) <= 3 for t in fig.layout.yaxis2.ticktext)
    assert ticks[0] <= 0.0472 and ticks[-1] >= 0.1171875
    assert "epoch %{x}" in fig.data[1].hovertemplate and "task_score" in fig.data[1].hovertemplate
    assert "nats/token" in fig.data[0].hovertemplate and fig.layout.template.layout.hoverlabel.namelength == -1
    curve.attrs["metric"] = "exact_match"
    assert "exact_match" in loss_vs_metric(curve).layout.title.text


def _compare_rows(seeds):
    return [{"method": m, "fraction": 1.0 if m == "full" else 0.1, "seed": s, "metric": v + 0.01 * s,
             "loss": l - 0.01 * s, "n_train": 4, "n_test": 8}
            for m, v, l in (("random", 0.2, 1.0), ("less", 0.15, 0.8), ("nice", 0.3, 0.95), ("full", 0.25, 0.7))
            for s in seeds]


def test_loss_vs_metric_across_subsets_has_error_bars_per_method():
    fig = loss_vs_metric(pd.DataFrame(_compare_rows((0, 1, 2))), metric="task_score")
    assert [t.text[0] for t in fig.data] == ["random", "less", "nice", "full"]
    assert [t.name for t in fig.data] == ["random (10%), 3 seeds", "less (10%), 3 seeds", "nice (10%), 3 seeds",
                                          "full, 3 seeds"]
    nice = fig.data[2]
    assert nice.y[0] == pytest.approx(0.31) and nice.x[0] == pytest.approx(0.94)
    assert nice.error_y.array[0] == pytest.approx(0.01 / 3 ** 0.5) and nice.error_y.visible
    assert "over 3 seeds" in fig.layout.title.text and "task_score" in fig.layout.yaxis.title.text
    assert "nats/token" in nice.hovertemplate
    label_free = pd.DataFrame(_compare_rows((0, 1, 2))).drop(columns=["loss"])
    fig = loss_vs_metric(label_free)
    assert [t.type for t in fig.data] == ["bar"] * 4
    with pytest.raises(ValueError):
        loss_vs_metric(pd.DataFrame({"x": [1]}))


def test_one_seed_says_why_there_are_no_error_bars():
    fig = loss_vs_metric(pd.DataFrame(_compare_rows((0,))))
    assert all(not t.error_y.visible for t in fig.data) and all(", 1 seed" in t.name for t in fig.data)
    assert "one seed per method: no error bars" in fig.layout.title.text


def test_influence_plots_and_disagreements(run):
    frame = widgets.pool_frame(run)
    fig = widgets.score_histogram(frame, "nice", selected=frame["id"].iloc[0], cutoff=0.0, fraction=0.1, theme="dark")
    assert [t.type for t in fig.data] == ["histogram", "histogram"] and len(fig.layout.shapes) == 2
    assert fig.layout.template.layout.paper_bgcolor == _theme.PAPER["dark"]
    d = widgets.disagreements(frame, n=5)
    assert len(d) == 5 and d["rank_gap"].abs().is_monotonic_decreasing
    assert json.loads(pio.to_json(widgets.influence_scatter(frame, subset=frame.head(3))))["data"][0]["x"]


# ---- the linear datamodeling score and collapse (widgets/lds.py)

def _lds_result():
    from nice_kit.evaluation import lds_from_trainings

    ids = [f"e{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"less": rng.normal(size=8), "nice": rng.normal(size=8)}, index=ids)
    subsets = [sorted(rng.choice(ids, 4, replace=False).tolist()) for _ in range(10)]
    rows = [{"subset": i, "seed": 0, "metric": float(scores.loc[s, "nice"].sum()), "loss": 2.0 + 0.1 * i,
             "answer_top_share": 0.6 if i == 0 else 0.2, "answer_distinct": 5} for i, s in enumerate(subsets)]
    return lds_from_trainings(pd.DataFrame(rows), subsets, scores, n_bootstrap=100, metric="task_score", fraction=0.5)


def test_lds_figure_and_table_are_two_by_two():
    from widgets import LDSView, lds_figure, lds_table

    res = _lds_result()
    fig = lds_figure(res)
    assert len(fig.data) == 4  # (loss, metric) x (LESS, NICE)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("LESS predicting the loss") and titles[3].startswith("NICE predicting the metric")
    assert "LDS +1.00" in titles[3]  # the metric was built from NICE's sums
    assert fig.layout.yaxis.autorange == "reversed"  # loss row: up is better
    nice_metric = fig.data[3]
    assert list(nice_metric.x) == pytest.approx(res.subsets["pred_nice"].tolist())
    table = lds_table(res)
    assert list(table.index) == ["LESS", "NICE"] and list(table.columns) == ["predicting the loss", "predicting the metric"]
    assert table.loc["NICE", "predicting the metric"].startswith("+1.00 [")
    view = LDSView(res, theme="light")
    assert "Linear datamodeling score" in view.text.value and "1 of 10 subsets collapsed" in view.text.value
    view.methods.value = ("nice",)
    assert len(view.figure.data) == 2 and "nice-kit-fig" in view.fallback_html()


def test_evaluation_table_shows_diversity_beside_the_metric_and_calls_a_collapse_one():
    from widgets import evaluation_table

    rows = [{"method": "less", "fraction": 0.1, "seed": s, "metric": 0.3, "loss": 1.0, "answer_top_share": share,
             "answer_distinct": 2, "answer_top": "12", "train_top_share": 0.8} for s, share in enumerate((0.9, 0.95))]
    rows += [{"method": "nice", "fraction": 0.1, "seed": 0, "metric": 0.2, "loss": 1.1, "answer_top_share": 0.2,
              "answer_distinct": 30, "answer_top": "7", "train_top_share": 0.1}]
    rows += [{"method": "full", "fraction": 1.0, "seed": 0, "metric": 0.25, "loss": 0.9}]  # stored before diversity
    t = evaluation_table(pd.DataFrame(rows)).set_index("method")
    assert t.loc["less", "collapse"] == "COLLAPSE in 2 of 2" and t.loc["less", "most_common"] == "12"
    assert t.loc["nice", "collapse"] == "no (1 run)" and t.loc["nice", "answer_top_share"] == pytest.approx(0.2)
    assert pd.isna(t.loc["full", "answer_top_share"]) and t.loc["full", "metric"] == pytest.approx(0.25)
