"""The widgets (widgets/): controls change what they should, from a live pipeline or a run directory.

One fast-mode run (tiny model) is shared by the whole module; no browser is needed here (see
test_browser.py for the widgets rendered in JupyterLab)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from plotly.callbacks import Points

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")  # plotly's FigureWidget needs it

import widgets  # noqa: E402
from widgets import InfluenceExplorer, MetricPicker, RolloutViewer, loss_vs_metric, open_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from nice_kit.demo import demo_pipeline

    torch.set_num_threads(1)
    p = demo_pipeline(tmp_path_factory.mktemp("widgets") / "run", fast=True, verbose=False)
    p.run()
    return p


@pytest.fixture(scope="module")
def run_dir(run):
    return str(run.run_dir)


# ------------------------------------------------------------------------------------ open_run
def test_open_run_reads_a_finished_run_without_loading_the_model(run, run_dir):
    p = open_run(run_dir)
    assert [c.epoch for c in p.checkpoints] == [c.epoch for c in run.checkpoints]
    pd.testing.assert_frame_equal(widgets.load_scores(p), run.scores(), check_dtype=False, rtol=1e-6)
    InfluenceExplorer(p)
    MetricPicker(p)
    RolloutViewer(p)
    assert p._base_model is None  # everything came from the cached files


def test_open_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_run(tmp_path)
    with pytest.raises(TypeError):
        InfluenceExplorer(42)


# ------------------------------------------------------------------------------ InfluenceExplorer
@pytest.fixture(params=["pipeline", "path"])
def explorer(request, run, run_dir):
    return InfluenceExplorer(run if request.param == "pipeline" else run_dir)


def test_explorer_table_is_the_pool_sorted_by_the_chosen_method(explorer, run):
    scores = run.scores()
    assert len(explorer.table) == len(run.pool)
    assert explorer.method.value == "nice"
    assert explorer.table["id"].tolist() == scores.sort_values("nice", ascending=False, kind="mergesort")["id"].tolist()
    assert {"task", "source", "harmful", "nice", "less"} <= set(explorer.table.columns)
    html = explorer.table_html.value
    assert explorer.table["id"].iloc[0] in html and explorer.table["id"].iloc[explorer.k.value] not in html


def test_method_dropdown_changes_the_order_and_the_histogram(explorer, run):
    before = explorer.table["id"].tolist()
    explorer.method.value = "less"
    after = explorer.table["id"].tolist()
    assert after != before
    assert after == run.scores().sort_values("less", ascending=False, kind="mergesort")["id"].tolist()
    assert list(explorer.hist.data[0].x) == pytest.approx(explorer.frame["less"].tolist())
    assert "less" in explorer.hist.layout.title.text


def test_top_bottom_toggle_reverses_the_order(explorer):
    top = explorer.table
    explorer.order.value = "bottom"
    bottom = explorer.table
    assert bottom["nice"].is_monotonic_increasing and top["nice"].is_monotonic_decreasing
    assert bottom["id"].iloc[0] == top["id"].iloc[-1]
    assert bottom["id"].iloc[0] in explorer.table_html.value


def test_filters_reduce_the_rows(explorer):
    n = len(explorer.table)
    task = sorted(explorer.frame["task"].unique())[0]
    explorer.task.value = task
    assert 0 < len(explorer.table) < n and set(explorer.table["task"]) == {task}
    assert f"{len(explorer.table)} of {n}" in explorer.status.value
    explorer.task.value = "(all)"
    explorer.flag.value = "harmful"
    assert 0 < len(explorer.table) < n and explorer.table["harmful"].all()
    explorer.flag.value = "(all)"
    rid = explorer.frame["id"].iloc[5]
    explorer.search.value = rid
    assert explorer.table["id"].tolist() == [rid]
    explorer.search.value = "no such text anywhere"
    assert explorer.table.empty and explorer.selected_id is None
    assert "no example" in explorer.detail.value


def test_choosing_an_example_changes_the_text(explorer, run):
    first = explorer.selected_id
    assert first == explorer.table["id"].iloc[0]
    before = explorer.detail.value
    other = explorer.select.options[3][1]
    explorer.select.value = other
    assert explorer.selected_id == other and explorer.detail.value != before
    rec = next(r for r in run.pool if r.id == other)
    import html

    assert html.escape(rec.prompt) in explorer.detail.value and html.escape(rec.response) in explorer.detail.value
    assert 'class="nice-kit-selected"' in explorer.table_html.value
    assert list(explorer.scatter.data[-1].customdata) == [other]


def test_clicking_a_scatter_point_selects_its_example(explorer):
    trace = explorer.scatter.data[1]  # the harmful group: examples the table may not show
    i = len(trace.customdata) - 1
    rid = trace.customdata[i]
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]], trace_name=trace.name,
                                    trace_index=1), None)
    assert explorer.selected_id == rid and explorer.select.value == rid
    assert rid in explorer.detail.value
    assert list(explorer.scatter.data[-1].customdata) == [rid]


def test_scatter_title_has_the_spearman_correlation(explorer, run):
    s = run.scores()
    rho = s["nice"].rank().corr(s["less"].rank())
    assert f"ρ = {rho:.2f}" in explorer.scatter.layout.title.text
    assert widgets.spearman(s["nice"], s["less"]) == pytest.approx(rho)
    names = [t.name for t in explorer.scatter.data]
    assert names == ["clean", "harmful", "selected"]
    assert sum(len(t.x) for t in explorer.scatter.data[:2]) == len(run.pool)


def test_explorer_static_fallbacks(explorer):
    fig = explorer.figure()
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    html = explorer._repr_html_()
    assert explorer.selected_id in html and "<table" in html and "plotly" in html


# --------------------------------------------------------------------------------- MetricPicker
def test_metric_picker_starts_on_the_runs_metric(run, run_dir):
    picker = MetricPicker(run_dir)
    assert picker.name == run.cfg.metric.name
    assert picker.params == {**widgets.metric_picker.rewards.metric_info(picker.name).params, **run.cfg.metric.params}
    rollouts = run.rollouts(run.checkpoints[-1])
    assert picker.preview["score"].tolist() == pytest.approx(rollouts["reward"].tolist())
    assert callable(picker.value)


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
    assert picker.preview["completion"].iloc[0].split()[0] in picker.table_html.value


def test_metric_picker_shows_errors_instead_of_raising(run):
    picker = MetricPicker(run, name="reward_model")
    assert picker.value is None
    assert "needs model" in picker.status.value
    assert picker.preview["score"].isna().all()


def test_metric_picker_without_auto_waits_for_the_button(run):
    picker = MetricPicker(run, name="length", auto=False)
    assert picker.preview.empty
    picker.button.click()
    assert len(picker.preview) == len(run.rollouts(run.checkpoints[-1]))
    assert isinstance(picker.figure(), go.Figure) and "<table" in picker._repr_html_()


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
    import html

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
    assert [t.type for t in fig.data] == ["bar", "bar"]


# ------------------------------------------------------------------------------------- plots
def test_loss_vs_metric_across_checkpoints():
    curve = pd.DataFrame({"epoch": [0, 1, 2], "lr": [0.0, 1e-3, 5e-4], "metric": [0.1, 0.1, 0.05],
                          "loss": [2.0, 1.5, 1.2], "n_test": [8] * 3})
    fig = loss_vs_metric(curve)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert [t.name for t in fig.data] == ["reference loss (LESS proxy)", "metric (NICE target)"]
    assert list(fig.data[0].y) == [2.0, 1.5, 1.2] and fig.data[1].yaxis == "y2"


def test_loss_vs_metric_across_subsets_has_error_bars_per_method():
    rows = [{"method": m, "fraction": 1.0 if m == "full" else 0.1, "seed": s, "metric": v + 0.01 * s,
             "loss": l - 0.01 * s, "n_train": 4, "n_test": 8}
            for m, v, l in (("random", 0.2, 1.0), ("less", 0.15, 0.8), ("nice", 0.3, 0.95), ("full", 0.25, 0.7))
            for s in (0, 1, 2)]
    fig = loss_vs_metric(pd.DataFrame(rows))
    assert [t.text[0] for t in fig.data] == ["random", "less", "nice", "full"]
    assert [t.name for t in fig.data] == ["random (10%)", "less (10%)", "nice (10%)", "full"]
    nice = fig.data[2]
    assert nice.y[0] == pytest.approx(0.31) and nice.x[0] == pytest.approx(0.94)
    assert nice.error_y.array[0] == pytest.approx(0.01 / 3 ** 0.5)
    label_free = pd.DataFrame(rows).drop(columns=["loss"])
    fig = loss_vs_metric(label_free)
    assert [t.type for t in fig.data] == ["bar"] * 4
    with pytest.raises(ValueError):
        loss_vs_metric(pd.DataFrame({"x": [1]}))


def test_influence_plots_and_disagreements(run):
    frame = widgets.pool_frame(run)
    fig = widgets.score_histogram(frame, "nice", selected=frame["id"].iloc[0])
    assert [t.type for t in fig.data] == ["histogram", "histogram"] and len(fig.layout.shapes) == 1
    d = widgets.disagreements(frame, n=5)
    assert len(d) == 5 and d["rank_gap"].abs().is_monotonic_decreasing
