"""MetricPicker: choose a registered reward metric and its parameters, and see it score real rollouts."""

from __future__ import annotations

import json
from typing import Any, Callable

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from nice_kit import metrics as rewards

from . import _html as H
from ._run import RunLike, as_pipeline, rescore
from .plots import rewards_figure

ALL = "(all prompts)"


def _param_widget(name: str, default: Any, value: Any) -> w.Widget:
    style = {"description_width": "initial"}
    layout = w.Layout(width="260px")
    if isinstance(default, bool):
        return w.Checkbox(value=bool(value), description=name, indent=False, style=style)
    if isinstance(default, int):
        return w.IntText(value=int(value), description=name, style=style, layout=layout)
    if isinstance(default, float):
        return w.FloatText(value=float(value), description=name, style=style, layout=layout)
    if isinstance(default, str):
        return w.Text(value=str(value), description=name, style=style, layout=layout, continuous_update=False)
    # None or a structured default: free text, parsed as JSON when it is JSON (numbers, true, lists ...)
    text = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return w.Text(value=text, placeholder="None" if default is None else json.dumps(default), description=name,
                  style=style, layout=layout, continuous_update=False)


def _param_value(default: Any, widget: w.Widget) -> Any:
    v = widget.value
    if isinstance(default, (bool, int, float, str)):
        return v
    if v.strip() == "":
        return None
    try:
        return json.loads(v)
    except ValueError:
        return v


class MetricPicker(w.VBox):
    """Pick a reward metric: a dropdown of the registered metrics, the chosen one's description,
    inputs for its parameters (from the defaults' types), and a preview that re-scores a checkpoint's
    sampled completions with it (completion beside its score, a histogram and a box per prompt).

    ``.value`` is the built metric callable, ``.name`` / ``.params`` the choice and ``.config()`` the
    ``{"name", "params"}`` dict a run config's ``metric`` section takes. ``.preview`` is the scored
    rollouts table. With ``auto=False`` the preview waits for the "score" button (for slow metrics).
    """

    def __init__(self, run: RunLike, name: str | None = None, params: dict[str, Any] | None = None,
                 n_preview: int = 12, auto: bool = True):
        self.pipeline = p = as_pipeline(run)
        self.catalog = rewards.list_metrics()
        names = self.catalog["name"].tolist()
        run_metric = p.cfg.metric.name if isinstance(p.cfg.metric.name, str) else None
        name = name or (run_metric if run_metric in names else names[0])
        if name not in names:
            raise KeyError(f"unknown metric {name!r}; registered: {names}")
        self._initial = {name: dict(params or (p.cfg.metric.params if name == run_metric else {}))}
        self.n_preview = n_preview
        self._metric: Callable | None = None
        self._error: str | None = None
        self._preview = pd.DataFrame()
        self._updating = False

        ckpts = p.checkpoints
        self.rollouts = {c.epoch: p.rollouts(c) for c in ckpts}
        self.dropdown = w.Dropdown(options=names, value=name, description="metric")
        self.description = w.HTML()
        self.description.add_class("nice-metric-description")
        self.params_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.checkpoint = w.Dropdown(options=[(f"epoch {c.epoch}", c.epoch) for c in ckpts], value=ckpts[-1].epoch,
                                     description="rollouts of")
        prompt_ids = list(dict.fromkeys(str(i) for df in self.rollouts.values() for i in df["prompt_id"]))
        self.prompt = w.Dropdown(options=[ALL] + prompt_ids, value=ALL, description="prompt")
        self.auto = w.Checkbox(value=auto, description="score automatically", indent=False)
        self.button = w.Button(description="score", icon="play")
        self.status = w.HTML()
        self.table_html = w.HTML(layout=w.Layout(max_height="320px", overflow="auto"))
        self.table_html.add_class("nice-metric-preview")
        self.fig = go.FigureWidget(rewards_figure(self.rollouts[self.checkpoint.value]))

        self.dropdown.observe(self._on_metric, names="value")
        self.checkpoint.observe(self._maybe_score, names="value")
        self.prompt.observe(lambda _: self._render_table(), names="value")
        self.button.on_click(lambda _: self.score())
        super().__init__([
            w.HTML(H.STYLE + "<b>Metric picker</b>"), self.dropdown, self.description, self.params_box,
            w.HBox([self.checkpoint, self.prompt, self.auto, self.button]), self.status, self.table_html, self.fig,
        ])
        self.add_class("nice-metric-picker")
        self._on_metric()

    # ------------------------------------------------------------------------------ choice
    @property
    def name(self) -> str:
        return self.dropdown.value

    @property
    def info(self):
        return rewards.metric_info(self.name)

    @property
    def params(self) -> dict[str, Any]:
        defaults = self.info.params
        return {k: _param_value(defaults[k], wid) for k, wid in self._param_widgets.items()}

    @property
    def value(self) -> Callable | None:
        """The metric built with the chosen parameters (None, with the error in ``.status``, if it fails)."""
        if self._metric is None and self._error is None:
            self._build()
        return self._metric

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "params": ...}``: the chosen metric as a run config's ``metric`` section
        (parameters left at their defaults are omitted)."""
        defaults = self.info.params
        return {"name": self.name, "params": {k: v for k, v in self.params.items() if v != defaults[k]}}

    @property
    def preview(self) -> pd.DataFrame:
        """The previewed rollouts: epoch, prompt_id, sample, completion, reward (the run's metric) and
        score (the chosen metric)."""
        return self._preview

    # ----------------------------------------------------------------------------- updates
    def _on_metric(self, change=None) -> None:
        info = self.info
        needs = H.badge("needs reference answers", "#ff7f0e") if info.needs_reference else H.badge("label-free", "#2ca02c")
        warn = ""
        if info.needs_reference and self.pipeline.cfg.data.label_free:
            warn = "<div style='color:#d62728'>this run is label-free: a metric that reads references cannot drive it</div>"
        self.description.value = f"<div>{needs} {H.esc(info.description)}</div>{warn}"
        start = {**info.params, **self._initial.pop(self.name, {})}
        self._param_widgets = {k: _param_widget(k, info.params[k], start.get(k)) for k in info.params}
        for wid in self._param_widgets.values():
            wid.observe(self._maybe_score, names="value")
        self.params_box.children = list(self._param_widgets.values()) or [w.HTML("<i>no parameters</i>")]
        self._metric, self._error = None, None
        self._maybe_score()

    def _maybe_score(self, change=None) -> None:
        self._metric, self._error = None, None
        if self.auto.value:
            self.score()
        else:
            self.status.value = "<i>press score to preview</i>"

    def _build(self) -> None:
        try:
            self._metric, self._error = rewards.get_metric(self.name, **self.params), None
        except Exception as err:  # shown to the user: any metric may fail to build
            self._metric, self._error = None, f"{type(err).__name__}: {err}"

    def score(self) -> pd.DataFrame:
        """Re-score the chosen checkpoint's rollouts with the chosen metric and redraw the preview."""
        self._build()
        df = self.rollouts[self.checkpoint.value][["epoch", "prompt_id", "sample", "completion", "reward"]].copy()
        df["prompt_id"] = df["prompt_id"].astype(str)
        if self._metric is None:
            self.status.value = f"<span style='color:#d62728'>could not build {H.esc(self.name)}: {H.esc(self._error)}</span>"
            self._preview = df.assign(score=float("nan"))
            self._render_table()
            return self._preview
        try:
            df["score"] = rescore(self.pipeline, df, self._metric)
        except Exception as err:  # a metric may need a column or a service this run lacks
            self._error = f"{type(err).__name__}: {err}"
            self.status.value = f"<span style='color:#d62728'>{H.esc(self.name)} failed on these rollouts: {H.esc(self._error)}</span>"
            self._preview = df.assign(score=float("nan"))
            self._render_table()
            return self._preview
        self._preview = df
        s = df["score"]
        self.status.value = (f"<span style='color:#555'>{H.esc(self.name)} on {len(df)} completions of "
                             f"{df['prompt_id'].nunique()} prompts (epoch {self.checkpoint.value}): mean {s.mean():.3g}, "
                             f"{(s != 0).mean():.0%} non-zero, {df.groupby('prompt_id')['score'].nunique().gt(1).sum()} "
                             "prompts with differing scores (only those carry a NICE signal)</span>")
        self._render_table()
        with self.fig.batch_update():
            self.fig.data[0].x = s.tolist()
            self.fig.data[1].x = df["prompt_id"].tolist()
            self.fig.data[1].y = s.tolist()
            self.fig.layout.title.text = f"{self.name} scores of {len(df)} sampled completions"
        return df

    def _render_table(self) -> None:
        df = self._preview
        if df.empty:
            self.table_html.value = ""
            return
        if self.prompt.value != ALL:
            df = df[df["prompt_id"] == self.prompt.value]
        df = df.head(self.n_preview).rename(columns={"reward": "run reward", "score": f"{self.name}"})
        self.table_html.value = H.table(df, ["prompt_id", "sample", "completion", "run reward", self.name],
                                        key="prompt_id", max_chars=120)

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        df = self._preview if not self._preview.empty else self.rollouts[self.checkpoint.value]
        col = "score" if "score" in df.columns else "reward"
        return rewards_figure(df, col, title=f"{self.name} scores of {len(df)} sampled completions")

    def _repr_html_(self) -> str:
        return (H.STYLE + f"<div><b>{H.esc(self.name)}</b> {H.esc(json.dumps(self.params))}</div>"
                + self.description.value + self.status.value + self.table_html.value
                + self.figure().to_html(include_plotlyjs="cdn", full_html=False))
