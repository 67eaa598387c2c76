"""Does influence predict the metric? The linear datamodeling score (LDS) and collapse, drawn.

* :func:`lds_figure`: the 2 x 2 figure (LESS / NICE x predicting the loss / predicting the metric) of a
  :class:`nice_kit.evaluation.LDSResult`: one point per random subset, its predicted effect (the sum
  of the method's scores over it) against what training on it did.
* :func:`lds_table`: the same as a table of LDS values with their bootstrap 95% intervals.
* :func:`evaluation_table`: :func:`nice_kit.evaluation.compare`'s results per method with the answer
  diversity beside the metric, a collapse called one.
* :class:`LDSView`: the figure, the table and the plain-words reading as one widget.
"""

from __future__ import annotations

import math

import ipywidgets as w
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nice_kit.evaluation import COLLAPSE_SHARE, describe_lds, diversity_summary, is_collapse

from . import _html as H
from . import _theme
from ._display import LiveFallback, figure_html
from .plots import LOSS_UNIT, series_color, themed

TARGET_LABELS = {"loss": "predicting the loss", "metric": "predicting the metric"}


def _label(method: str) -> str:
    return method.upper() if method in ("less", "nice") else method


def _interval(row) -> str:
    if not np.isfinite(row["lds"]):
        return "n/a"
    ci = (f" [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]" if np.isfinite(row["ci_low"]) else " [no interval]")
    return f"{row['lds']:+.2f}{ci}"


def lds_table(result) -> pd.DataFrame:
    """One row per method, one column per target ("predicting the loss", "predicting the metric"):
    the LDS and its bootstrap 95% interval over subsets, as text."""
    t = result.table
    out = {}
    for method in result.methods:
        out[_label(method)] = {TARGET_LABELS[r["target"]]: _interval(r) for _, r in t[t["method"] == method].iterrows()}
    df = pd.DataFrame.from_dict(out, orient="index")
    df.index.name = "scores of"
    return df[[c for c in TARGET_LABELS.values() if c in df.columns]]


def lds_figure(result, methods: list[str] | None = None, theme: str | None = None) -> go.Figure:
    """The 2 x 2 figure: a row per target (the test reference loss, the test metric), a column per
    method (default LESS and NICE where present, else every method); one point per subset, the
    method's predicted effect (sum of its scores over the subset) on x, the outcome on y. The loss axis
    is reversed, so in every panel *up is better* and a positive LDS is a rising cloud."""
    methods = methods or [m for m in ("less", "nice") if m in result.methods] or list(result.methods)
    targets = [t for t in ("loss", "metric") if t in set(result.table["target"])]
    t = result.table.set_index(["method", "target"])
    titles = [f"{_label(m)} {TARGET_LABELS[g]}: LDS {_interval(t.loc[(m, g)])}" for g in targets for m in methods]
    fig = make_subplots(rows=len(targets), cols=len(methods), subplot_titles=titles, horizontal_spacing=0.1,
                        vertical_spacing=0.16)
    sub = result.subsets
    for i, target in enumerate(targets, start=1):
        for j, m in enumerate(methods, start=1):
            hover = [f"subset {int(s)} ({int(n)} examples)" for s, n in zip(sub["subset"], sub["n_train"])]
            fig.add_trace(go.Scatter(x=sub[f"pred_{m}"], y=sub[target], mode="markers", text=hover, showlegend=False,
                                     marker=dict(size=8, color=series_color(m, j), opacity=0.8),
                                     hovertemplate=(f"%{{text}}<br>sum of {_label(m)} scores %{{x:.4g}}<br>{target} "
                                                    "%{y:.4g}<extra></extra>")), row=i, col=j)
            fig.update_xaxes(title_text=f"sum of {_label(m)} scores over the subset", row=i, col=j)
            if target == "loss":
                fig.update_yaxes(title_text=f"test reference loss ({LOSS_UNIT}; down = better)" if j == 1 else None,
                                 autorange="reversed", row=i, col=j)
            else:
                fig.update_yaxes(title_text=f"test {result.metric}" if j == 1 else None, row=i, col=j)
    n = len(sub)
    fig.update_annotations(font_size=12)
    fig.update_layout(title=dict(text=f"Does the sum of scores predict training's effect? {n} random subsets of "
                                      f"{result.fraction:.0%} of the pool<br><sup>LDS = Spearman over subsets, "
                                      "[bootstrap 95% interval]; loss axes reversed: up is better everywhere</sup>"),
                      height=330 * len(targets) + 60, margin=dict(l=70, r=20, t=110, b=50))
    return themed(fig, theme)


def evaluation_table(results: pd.DataFrame) -> pd.DataFrame:
    """:func:`nice_kit.evaluation.diversity_summary` of ``compare``'s results: per method the metric's mean
    beside the answer diversity of the fine-tuned models, a collapse called one."""
    return diversity_summary(results)


class LDSView(w.VBox, LiveFallback):
    """The LDS of an :class:`~nice_kit.evaluation.LDSResult`: the table, the reading in plain words and
    the 2 x 2 figure (:func:`lds_figure`), with a choice of the two methods the figure compares."""

    def __init__(self, result, theme: str | None = "auto"):
        self.result = result
        self.theme = _theme.resolve_theme(theme)
        pair = [m for m in ("less", "nice") if m in result.methods] or list(result.methods)[:2]
        self.methods = w.SelectMultiple(options=list(result.methods), value=tuple(pair), description="methods",
                                        rows=min(4, len(result.methods)))
        self.text = w.HTML()
        self.figure = go.FigureWidget(lds_figure(result, list(pair), theme=self.theme))
        self.methods.observe(lambda _: self._redraw(), names="value")
        super().__init__([self.text, self.methods, self.figure])
        self.add_class("nice-kit")
        self._draw_text()

    def _text_html(self) -> str:
        table = lds_table(self.result).reset_index()
        reading = "".join(f"<div>{H.esc(line)}</div>" for line in describe_lds(self.result).splitlines())
        return (f"{H.STYLE}<div class='nice-kit-title'>Linear datamodeling score (Spearman of predicted against "
                f"actual over {len(self.result.subsets)} subsets)</div>"
                + H.table(table, list(table.columns)) + f"<div class='nice-kit-muted'>{reading}</div>")

    def _draw_text(self) -> None:
        self.text.value = self._text_html()

    def _redraw(self) -> None:
        chosen = list(self.methods.value) or list(self.result.methods)[:1]
        fig = lds_figure(self.result, chosen, theme=self.theme)
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.layout = fig.layout
            self.figure.add_traces(list(fig.data))
        self.refresh_fallback()

    def fallback_body(self) -> str:
        return self._text_html() + figure_html(go.Figure(self.figure))


def collapse_note(share: float) -> str:
    """"COLLAPSE" when a model gave one completion to at least :data:`COLLAPSE_SHARE` of the test prompts."""
    return "COLLAPSE" if is_collapse(share) else ("" if not math.isfinite(share) else "varied")


__all__ = ["lds_figure", "lds_table", "evaluation_table", "LDSView", "collapse_note", "COLLAPSE_SHARE"]
