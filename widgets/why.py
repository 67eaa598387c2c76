"""The "why" panel: why one pool example got its influence score.

A bar chart of the target prompts that pushed the example's score up (green) and down (red), each
bar the prompt's contribution summed over the warmup checkpoints and labelled with its subtask;
then, for one prompt (the top one unless you pick another, in the dropdown or by clicking a bar),
the sampled completions behind NICE's gradient with their reward, policy weight and contribution,
the rewarded completions (weight > 0) apart from the punished ones (weight < 0). The numbers come
from :func:`nice_kit.explain.explain` and add up to the stored score.

    from widgets.why import why_panel
    why_panel(run, "pool-0042", "nice")

A contribution > 0 means a training step on the example moves the model the way the metric wants on
that prompt or completion: a rewarded completion becomes more likely, a punished one less likely.

Colours follow the JupyterLab theme (``var(--jp-...)`` CSS variables); the chart's background is
transparent and its text and grid take the theme's colours.
"""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from nice_kit.explain import Explanation, explain

from . import _html as H
from ._run import RunLike, as_pipeline

UP, DOWN = "#2ca02c", "#d62728"  # mid-tone green and red: readable on light and dark themes alike

STYLE = """
<style>
.nice-why {color: var(--jp-ui-font-color1, inherit); font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;}
.nice-why .js-plotly-plot .main-svg text {fill: var(--jp-ui-font-color1, #333) !important;}
.nice-why .js-plotly-plot .gridlayer path, .nice-why .js-plotly-plot .zerolinelayer path {
  stroke: var(--jp-border-color2, #ddd) !important;}
.nice-why-muted {color: var(--jp-ui-font-color2, #777);}
.nice-why-table {border-collapse: collapse; font-size: 12px; width: 100%;}
.nice-why-table th, .nice-why-table td {border-bottom: 1px solid var(--jp-border-color2, #ddd); padding: 2px 6px;
  text-align: left; vertical-align: top; color: var(--jp-ui-font-color1, inherit);}
.nice-why-table th {background: var(--jp-layout-color2, transparent); font-weight: 600;}
.nice-why-group {border-left: 4px solid var(--jp-border-color1, #999); padding: 2px 0 2px 8px; margin: 8px 0;}
.nice-why-rewarded {border-left-color: var(--jp-success-color1, #2ca02c);}
.nice-why-punished {border-left-color: var(--jp-error-color1, #d62728);}
.nice-why-ignored {border-left-color: var(--jp-border-color1, #999);}
.nice-why-pos {color: var(--jp-success-color1, #2ca02c); font-weight: 600;}
.nice-why-neg {color: var(--jp-error-color1, #d62728); font-weight: 600;}
.nice-why-text {font-family: var(--jp-code-font-family, monospace); white-space: pre-wrap; word-break: break-word;
  background: var(--jp-cell-editor-background, transparent); border: 1px solid var(--jp-border-color2, #ddd);
  padding: 2px 4px;}
</style>
"""


def _signed(x: float) -> str:
    cls = "nice-why-pos" if x > 0 else "nice-why-neg" if x < 0 else "nice-why-muted"
    return f"<span class='{cls}'>{x:+.4g}</span>"


def prompt_bars(expl: Explanation, top: int = 10) -> pd.DataFrame:
    """The prompts the chart shows: those that contribute, at most ``top`` pushing up and ``top``
    pushing down (the largest), with a ``label`` (subtask · prompt id) and a ``color``."""
    per = expl.by_prompt()
    per = per[per["contribution"] != 0]
    up = per[per["contribution"] > 0].head(top)
    down = per[per["contribution"] < 0].tail(top)
    out = pd.concat([up, down]).sort_values("contribution", kind="mergesort").reset_index(drop=True)
    out["label"] = [f"{s} · {p}" for s, p in zip(out["subtask"], out["prompt_id"])]
    out["color"] = [UP if c > 0 else DOWN for c in out["contribution"]]
    return out


def why_figure(expl: Explanation, top: int = 10) -> go.Figure:
    """Horizontal bars of the target prompts' contributions to ``expl``'s score (green up, red down);
    each bar's ``customdata`` is its prompt id."""
    bars = prompt_bars(expl, top)
    cos = expl.prompts.pivot_table(index="prompt_id", columns="epoch", values="cosine", sort=False)
    hover = [f"<b>{pid}</b> ({sub})<br>{H.esc(H.short(text, 70))}<br>contribution {c:+.4g}<br>cosine by epoch: "
             + ", ".join(f"{e}: {v:+.3f}" for e, v in cos.loc[pid].items())
             for pid, sub, text, c in zip(bars["prompt_id"], bars["subtask"], bars["prompt"], bars["contribution"])]
    fig = go.Figure(go.Bar(x=bars["contribution"], y=bars["label"], orientation="h", customdata=bars["prompt_id"],
                           marker_color=bars["color"], hovertext=hover, hoverinfo="text"))
    n = len(expl.by_prompt())
    title = (f"Why {expl.example_id}: {expl.method} score {expl.score:+.4g} "
             f"({len(bars)} of {n} target prompts contribute)")
    fig.update_layout(title=title, xaxis_title="contribution to the score (summed over checkpoints)",
                      height=max(220, 70 + 22 * len(bars)), margin=dict(l=10, r=20, t=50, b=40),
                      paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", showlegend=False,
                      yaxis=dict(automargin=True), xaxis=dict(zeroline=True))
    return fig


def _header_html(expl: Explanation) -> str:
    subs = " · ".join(f"{H.esc(r.subtask)} {r.mean:+.4g} ({r.prompts} prompts)" for r in expl.subtasks.itertuples())
    if expl.aggregate == "mean":
        how = f"mean over every valid target prompt (subtask means: {subs})"
    else:
        how = f"subtask <b>{H.esc(expl.winner)}</b> won the max of subtask means ({subs})"
    return (f"<div><b>{H.esc(expl.example_id)}</b>: {H.esc(expl.method)} score {_signed(expl.score)}; {how}. "
            f"<span class='nice-why-muted'>The contributions add up to {expl.total:+.6g}. Above 0: a training "
            "step on this example moves the model the way the metric wants.</span></div>")


def completions_html(expl: Explanation, prompt_id: str | None) -> str:
    """One target prompt's completions (every checkpoint) in three groups: rewarded (policy weight
    > 0), punished (< 0) and without weight, each with reward, weight and contribution."""
    if prompt_id is None:
        return "<i class='nice-why-muted'>no target prompt contributes to this score</i>"
    text = H.esc(expl.target_text.get(prompt_id, ""))
    per = expl.by_prompt().set_index("prompt_id")
    head = (f"<div><b>{H.esc(prompt_id)}</b> ({H.esc(per.loc[prompt_id, 'subtask'])}), contribution "
            f"{_signed(float(per.loc[prompt_id, 'contribution']))}</div><div class='nice-why-text'>{text}</div>")
    if expl.completions is None:
        return head + f"<div class='nice-why-muted'>no completions: {H.esc(expl.note)}</div>"
    comp = expl.completions_of(prompt_id)
    groups = [("nice-why-rewarded", "rewarded (policy weight > 0): a positive contribution makes them more likely",
               comp[comp["policy_weight"] > 0]),
              ("nice-why-punished", "punished (policy weight < 0): a positive contribution makes them less likely",
               comp[comp["policy_weight"] < 0]),
              ("nice-why-ignored", "without weight (no share in the gradient)", comp[comp["policy_weight"] == 0])]
    parts = [head]
    for cls, title, df in groups:
        if df.empty:
            continue
        rows = "".join(
            f"<tr><td>{r.epoch}</td><td>{'reference' if r.kind == 'reference' else int(r.sample)}</td>"
            f"<td>{H.fmt(float(r.reward))}</td><td>{r.policy_weight:+.3g}</td><td>{_signed(float(r.contribution))}</td>"
            f"<td><div class='nice-why-text'>{H.esc(' '.join(str(r.text).split()))}</div></td></tr>"
            for r in df.itertuples())
        parts.append(f"<div class='nice-why-group {cls}'><div><b>{len(df)} {H.esc(title)}</b></div>"
                     "<table class='nice-why-table'><thead><tr><th>epoch</th><th>sample</th><th>reward</th>"
                     f"<th>weight</th><th>contribution</th><th>completion</th></tr></thead><tbody>{rows}</tbody>"
                     "</table></div>")
    return "".join(parts)


class WhyPanel(w.VBox):
    """Why one pool example got its score: the target prompts' bars and one prompt's completions.

    ``show(example_id, method)`` explains another example (what an explorer calls when its selection
    changes). ``compute=False`` never computes NICE's per-completion gradients (they need the model):
    until they are stored the panel shows the prompts only, with a button that computes them.

    ``.explanation`` is the :class:`~nice_kit.explain.Explanation` shown, ``.bars`` the chart
    (a FigureWidget; click a bar to see its prompt's completions), ``.prompt`` the prompt dropdown,
    ``.completions`` the completions' HTML. ``figure()`` and ``_repr_html_`` are static fallbacks.
    """

    UP, DOWN = UP, DOWN

    def __init__(self, run: RunLike, example_id: str | None = None, method: str = "nice", top: int = 10,
                 compute: bool = True):
        self.pipeline = as_pipeline(run)
        self.method, self.top, self.compute = method, top, compute
        self.explanation: Explanation | None = None
        self._updating = False
        self.style = w.HTML(STYLE)
        self.header = w.HTML()
        self.bars = go.FigureWidget(go.Figure(go.Bar(x=[], y=[], orientation="h")))
        self.bars.data[0].on_click(self._on_bar_click)
        self.bars.add_class("nice-why-bars")
        self.prompt = w.Dropdown(options=[], description="prompt", layout=w.Layout(width="98%"))
        self.prompt.add_class("nice-why-prompt")
        self.prompt.observe(self._on_prompt, names="value")
        self.compute_button = w.Button(description="compute completion gradients", icon="cogs",
                                       tooltip="needs the model: one gradient per sampled completion, stored")
        self.compute_button.on_click(lambda _: self.show(self.explanation.example_id, self.method, compute=True))
        self.compute_button.layout.display = "none"
        self.completions = w.HTML()
        self.completions.add_class("nice-why-completions")
        super().__init__([self.style, self.header, self.bars, self.prompt, self.compute_button, self.completions])
        self.add_class("nice-why")
        if example_id is not None:
            self.show(example_id, method)
        else:
            self.header.value = "<i class='nice-why-muted'>no example selected</i>"

    def show(self, example_id: str, method: str | None = None, compute: bool | None = None,
             raise_errors: bool = True) -> Explanation | None:
        """Explain ``example_id`` under ``method`` (default: the last one) and redraw.

        ``raise_errors=False`` (for an embedding widget) shows what went wrong (no scores yet, a stale
        stage, a method that cannot be explained) in the panel instead of raising, and returns None."""
        self.method = method or self.method
        try:
            expl = explain(self.pipeline, example_id, self.method,
                           compute=self.compute if compute is None else compute)
        except (ValueError, RuntimeError, KeyError) as err:
            if raise_errors:
                raise
            self.explanation = None
            self.header.value = f"<div class='nice-why-neg'>cannot explain {H.esc(example_id)}: {H.esc(err)}</div>"
            with self.bars.batch_update():
                self.bars.data[0].x, self.bars.data[0].y, self.bars.data[0].customdata = [], [], []
            self._updating = True
            try:
                self.prompt.options = []
            finally:
                self._updating = False
            self.compute_button.layout.display = "none"
            self.completions.value = ""
            return None
        self.explanation = expl
        self.header.value = _header_html(expl)
        fig = why_figure(expl, self.top)
        with self.bars.batch_update():
            bar = self.bars.data[0]
            bar.x, bar.y, bar.customdata = fig.data[0].x, fig.data[0].y, fig.data[0].customdata
            bar.marker.color, bar.hovertext, bar.hoverinfo = fig.data[0].marker.color, fig.data[0].hovertext, "text"
            self.bars.update_layout(fig.layout.to_plotly_json())
        per = expl.by_prompt()
        per = per[per["contribution"] != 0]
        per = per.reindex(per["contribution"].abs().sort_values(ascending=False, kind="mergesort").index)
        top = expl.top_prompt()
        self._updating = True
        try:
            self.prompt.options = [(f"{c:+.4g}  {pid} ({s}) · {H.short(t, 50)}", pid)
                                   for pid, s, c, t in zip(per["prompt_id"], per["subtask"], per["contribution"],
                                                           per["prompt"])]
            self.prompt.value = top
        finally:
            self._updating = False
        missing = expl.completions is None and "not available" in expl.note
        self.compute_button.layout.display = None if missing else "none"
        self._render(top)
        return expl

    def _render(self, prompt_id: str | None) -> None:
        self.completions.value = completions_html(self.explanation, prompt_id)

    def _on_prompt(self, change) -> None:
        if not self._updating and self.explanation is not None:
            self._render(change["new"])

    def _on_bar_click(self, trace, points, state=None) -> None:
        if points.point_inds:
            self.prompt.value = str(trace.customdata[points.point_inds[0]])

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        if self.explanation is None:
            return go.Figure()
        return why_figure(self.explanation, self.top)

    def _repr_html_(self) -> str:
        if self.explanation is None:
            return "<i>no example selected</i>"
        fig = self.figure().to_html(include_plotlyjs="cdn", full_html=False)
        return (STYLE + f"<div class='nice-why'>{self.header.value}{fig}"
                f"{completions_html(self.explanation, self.prompt.value)}</div>")


def why_panel(run: RunLike, example_id: str, method: str = "nice", top: int = 10, compute: bool = True) -> WhyPanel:
    """A :class:`WhyPanel` showing ``example_id`` (see the module docstring)."""
    return WhyPanel(run, example_id, method, top, compute)


__all__ = ["WhyPanel", "why_panel", "why_figure", "completions_html", "prompt_bars"]
