"""The "why" panel: why one pool example got its influence score.

A bar chart of the target prompts that pushed the example's score up (green) and down (red), each
bar the prompt's contribution summed over the warmup checkpoints and labelled with its subtask;
then, for one prompt (the top one unless you pick another, in the dropdown or by clicking a bar),
the sampled completions behind NICE's gradient with their reward, policy weight and contribution,
the rewarded completions (weight > 0) apart from the punished ones (weight < 0). The numbers come
from :func:`nice_kit.explain.explain` and add up to the stored score.

    from widgets import why_panel
    why_panel(run, "pool-0042", "nice")

Bars and the prompt dropdown name each target prompt by the part of its text that tells it from
the other prompts of its subtask ("8 * 4 · products"; :func:`widgets._run.target_labels`). The
"NICE vs LESS side by side" toggle (or ``panel.compare()``) draws both methods' contributions per
target prompt for the same example, in two panels over the same prompts (:func:`compare_table`,
:func:`compare_figure`), each method's adding up to its score. Computing the per-completion
gradients shows the stage's progress bar, then what was computed.

The influence explorer shows the same panel for its selected example (``InfluenceExplorer.why``).
A contribution > 0 means a training step on the example moves the model the way the metric wants on
that prompt or completion: a rewarded completion becomes more likely, a punished one less likely.

Text and tables take JupyterLab's theme colours (``var(--jp-...)`` CSS variables); the chart uses the
light or dark plotly template as the other widgets' figures do (``theme="light" | "dark" | "auto"``).
Displayed on its own, the panel also writes a static copy of itself (no CDN: see
:class:`widgets._display.LiveFallback`).
"""

from __future__ import annotations

import time
from typing import Callable

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nice_kit.explain import Explanation, explain

from . import _html as H
from . import _theme
from ._display import LiveFallback, figure_html, run_in
from ._run import RunLike, as_pipeline, target_labels

METHOD_COLORS = {"nice": "#1f77b4", "less": "#ff7f0e"}  # as widgets.plots draws the two methods

UP, DOWN = "#2ca02c", "#d62728"  # mid-tone green and red: readable on light and dark themes alike
WIDTH = 640  # px: the chart fits the explorer's text column on a 1280 px screen with the file browser open

STYLE = """
<style>
.nice-why {color: var(--jp-ui-font-color1, #1f1f1f); font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;
  line-height: 1.45; min-width: 0;}
.nice-why-muted {color: var(--jp-ui-font-color2, #5f5f5f);}
.nice-why-error {color: var(--jp-error-color1, #d32f2f);}
.nice-why-table {border-collapse: collapse; font-size: 12px; width: 100%; table-layout: fixed;}
.nice-why-table.nice-why-table th, .nice-why-table.nice-why-table td {border: none;
  border-bottom: 1px solid var(--jp-border-color2, #e0e0e0); padding: 2px 6px; text-align: left; vertical-align: top;
  color: var(--jp-ui-font-color1, #1f1f1f); line-height: 1.35; max-width: none;}
.nice-why-table.nice-why-table th {background: var(--jp-layout-color2, #eeeeee); font-weight: 600;}
.nice-why-table.nice-why-table td.nice-why-num {font-variant-numeric: tabular-nums; white-space: nowrap;}
.nice-why-group {border-left: 4px solid var(--jp-border-color1, #999); padding: 2px 0 2px 8px; margin: 8px 0;}
.nice-why-rewarded {border-left-color: var(--jp-success-color1, #2ca02c);}
.nice-why-punished {border-left-color: var(--jp-error-color1, #d62728);}
.nice-why-ignored {border-left-color: var(--jp-border-color1, #999);}
.nice-why-pos {color: var(--jp-success-color1, #2e7d32); font-weight: 600;}
.nice-why-neg {color: var(--jp-error-color1, #d32f2f); font-weight: 600;}
.nice-why-text {font-family: var(--jp-code-font-family, monospace); white-space: pre-wrap; word-break: break-word;
  color: var(--jp-content-font-color1, #1f1f1f); background: var(--jp-cell-editor-background, transparent);
  border: 1px solid var(--jp-border-color2, #e0e0e0); padding: 2px 4px;}
</style>
"""

def _number(x: float, digits: int = 4) -> str:
    """``x`` with its sign ("+0.0135", "-0.0208"), and plain "0" for zero."""
    return "0" if x == 0 else f"{x:+.{digits}g}"


def _signed(x: float) -> str:
    cls = "nice-why-pos" if x > 0 else "nice-why-neg" if x < 0 else "nice-why-muted"
    return f"<span class='{cls}'>{_number(x)}</span>"


def bar_labels(prompt_ids: list[str], subtasks: list[str], labels: dict[str, str] | None = None) -> list[str]:
    """One label per target prompt, by its text: the part that tells it from the other prompts of its
    subtask (``labels``, from :func:`widgets._run.target_labels`) and the subtask ("8 * 4 · products");
    "subtask · prompt id" where no text is known. Labels that would repeat get the prompt id."""
    labels = labels or {}
    out = []
    for pid, sub in zip(map(str, prompt_ids), map(str, subtasks)):
        text = H.short(labels[pid], 40) if labels.get(pid) else None
        out.append(f"{text} · {sub}" if text else (pid if sub in pid else f"{sub} · {pid}"))
    seen = pd.Series(out).duplicated(keep=False).tolist()
    return [f"{lab} ({pid})" if dup else lab for lab, dup, pid in zip(out, seen, map(str, prompt_ids))]


def prompt_bars(expl: Explanation, top: int = 10, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """The prompts the chart shows: those that contribute, at most ``top`` pushing up and ``top``
    pushing down (the largest), with a ``label`` (the prompt's text, see :func:`bar_labels`) and a
    ``color``."""
    per = expl.by_prompt()
    per = per[per["contribution"] != 0]
    up = per[per["contribution"] > 0].head(top)
    down = per[per["contribution"] < 0].tail(top)
    out = pd.concat([up, down]).sort_values("contribution", kind="mergesort").reset_index(drop=True)
    out["label"] = bar_labels(out["prompt_id"].tolist(), out["subtask"].tolist(), labels)
    out["color"] = [UP if c > 0 else DOWN for c in out["contribution"]]
    return out


def _chart(expl: Explanation, top: int, labels: dict[str, str] | None = None
           ) -> tuple[pd.DataFrame, list[str], str, int]:
    """The chart's bars (:func:`prompt_bars`), their hover texts, its title and its height."""
    bars = prompt_bars(expl, top, labels)
    cos = expl.prompts.pivot_table(index="prompt_id", columns="epoch", values="cosine", sort=False)
    hover = [f"<b>{H.esc(pid)}</b> ({H.esc(sub)})<br>{H.esc(H.short(text, 70))}<br>contribution {c:+.4g}"
             "<br>cosine by epoch: " + ", ".join(f"{e}: {v:+.3f}" for e, v in cos.loc[pid].items())
             for pid, sub, text, c in zip(bars["prompt_id"], bars["subtask"], bars["prompt"], bars["contribution"])]
    n = len(expl.by_prompt())
    title = f"{expl.method.upper()} score of {expl.example_id}: {len(bars)} of {n} target prompts contribute"
    return bars, hover, title, max(220, 90 + 24 * len(bars))


def _layout(title: str, height: int) -> dict:
    return dict(title=dict(text=title, font=dict(size=14), x=0, xanchor="left"),
                xaxis_title="contribution to the score (summed over checkpoints)", width=WIDTH, height=height,
                margin=dict(l=10, r=20, t=40, b=40), showlegend=False, yaxis=dict(automargin=True),
                xaxis=dict(zeroline=True, automargin=True))


def why_figure(expl: Explanation, top: int = 10, theme: str | None = None,
               labels: dict[str, str] | None = None) -> go.Figure:
    """Horizontal bars of the target prompts' contributions to ``expl``'s score (green up, red down),
    labelled by the prompts' text (``labels``: prompt id -> text, e.g. :func:`widgets._run.target_labels`);
    each bar's ``customdata`` is its prompt id. ``theme`` ("light" / "dark", default: JupyterLab's)
    picks the template, as for the other widgets' figures."""
    bars, hover, title, height = _chart(expl, top, labels)
    fig = go.Figure(go.Bar(x=bars["contribution"], y=bars["label"], orientation="h", customdata=bars["prompt_id"],
                           marker_color=bars["color"], hovertext=hover, hoverinfo="text"),
                    layout=_layout(title, height))
    return _theme.apply(fig, _theme.resolve_theme(theme))


def compare_table(explanations: dict[str, Explanation], labels: dict[str, str] | None = None,
                  top: int = 12) -> pd.DataFrame:
    """NICE and LESS (or any methods) side by side for one example: one row per target prompt that
    contributes to either score, at most ``top`` (largest in either method), with ``prompt_id``,
    ``subtask``, ``label`` (:func:`bar_labels`), ``prompt`` (its text) and one column of summed
    contributions per method (each method's contributions add up to its score)."""
    merged = None
    for method, expl in explanations.items():
        per = expl.by_prompt()[["prompt_id", "subtask", "prompt", "contribution"]].rename(
            columns={"contribution": method})
        merged = per if merged is None else merged.merge(per, on=["prompt_id", "subtask", "prompt"], how="outer")
    methods = list(explanations)
    merged[methods] = merged[methods].fillna(0.0)
    size = merged[methods].abs().max(axis=1)
    merged = merged[size > 0].assign(_size=size[size > 0])
    merged = merged.sort_values("_size", ascending=False, kind="mergesort").head(top).drop(columns="_size")
    merged = merged.sort_values(methods[0], kind="mergesort").reset_index(drop=True)
    merged.insert(2, "label", bar_labels(merged["prompt_id"].tolist(), merged["subtask"].tolist(), labels))
    return merged


def compare_figure(table: pd.DataFrame, explanations: dict[str, Explanation], theme: str | None = None) -> go.Figure:
    """:func:`compare_table` drawn side by side: one panel per method, the same target prompts on the
    shared vertical axis (labelled by their text), each bar a prompt's contribution to that method's
    score; ``customdata`` is the prompt id."""
    methods = list(explanations)
    titles = [f"{m.upper()} {explanations[m].score:+.4g}" for m in methods]
    fig = make_subplots(rows=1, cols=len(methods), shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=titles)
    for i, m in enumerate(methods, start=1):
        hover = [f"<b>{H.esc(pid)}</b> ({H.esc(sub)})<br>{H.esc(H.short(text, 70))}<br>{m.upper()} contribution {c:+.4g}"
                 for pid, sub, text, c in zip(table["prompt_id"], table["subtask"], table["prompt"], table[m])]
        fig.add_trace(go.Bar(x=table[m].tolist(), y=table["label"].tolist(), orientation="h", name=m.upper(),
                             customdata=table["prompt_id"].tolist(), marker_color=METHOD_COLORS.get(m, "#9467bd"),
                             hovertext=hover, hoverinfo="text"), row=1, col=i)
        fig.update_xaxes(zeroline=True, automargin=True, row=1, col=i)
    example = next(iter(explanations.values())).example_id
    fig.update_layout(title=dict(text=f"why {example}: each target prompt's contribution, "
                                      + " vs ".join(m.upper() for m in methods), font=dict(size=14), x=0, xanchor="left"),
                      width=WIDTH, height=max(240, 110 + 24 * len(table)), showlegend=False,
                      margin=dict(l=10, r=20, t=60, b=30), yaxis=dict(automargin=True))
    return _theme.apply(fig, _theme.resolve_theme(theme))


def compare_html(table: pd.DataFrame, explanations: dict[str, Explanation]) -> str:
    """The side-by-side contributions as a table (the prompt's text, each method's contribution)."""
    methods = list(explanations)
    scores = " · ".join(f"<b>{m.upper()}</b> {_signed(e.score)}" + (f" (subtask {H.esc(e.winner)} won)" if e.winner
                                                                       else "")
                        for m, e in explanations.items())
    heads = "".join(f"<th style='width:96px'>{m.upper()}</th>" for m in methods)
    rows = "".join(f"<tr><td><div class='nice-why-text'>{H.esc(r.label)}</div></td>"
                   + "".join(f"<td class='nice-why-num'>{_signed(float(getattr(r, m)))}</td>" for m in methods)
                   + "</tr>" for r in table.iloc[::-1].itertuples())
    return (f"<div class='nice-why-compare-head'>{scores}. <span class='nice-why-muted'>Per target prompt, both "
            "methods' contributions (summed over checkpoints; each method's add up to its score).</span></div>"
            f"<table class='nice-why-table nice-why-compare-table'><colgroup><col>"
            + "".join("<col style='width:96px'>" for _ in methods)
            + f"</colgroup><thead><tr><th>target prompt</th>{heads}</tr></thead><tbody>{rows}</tbody></table>")


def _header_html(expl: Explanation) -> str:
    subs = " · ".join(f"{H.esc(r.subtask)} {r.mean:+.4g} ({r.prompts} prompts)" for r in expl.subtasks.itertuples())
    if expl.aggregate == "mean":
        how = f"mean over every valid target prompt (subtask means: {subs})"
    else:
        how = f"subtask <b>{H.esc(expl.winner)}</b> won the max of subtask means ({subs})"
    return (f"<div><b>{H.esc(expl.example_id)}</b>: {H.esc(expl.method.upper())} score {_signed(expl.score)}; {how}. "
            f"<span class='nice-why-muted'>The contributions add up to {expl.total:+.6g}. Above 0: a training "
            "step on this example moves the model the way the metric wants.</span></div>")


# column widths that hold the bold headers in JupyterLab's font and in the wider fonts of exported HTML
COMPLETION_HEADERS = (("epoch", "54px"), ("sample", "64px"), ("reward", "64px"), ("weight", "68px"),
                      ("contribution", "106px"), ("completion", None))


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
    cols = "".join(f'<col style="width:{wd}">' if wd else "<col>" for _, wd in COMPLETION_HEADERS)
    heads = "".join(f"<th>{name}</th>" for name, _ in COMPLETION_HEADERS)
    parts = [head]
    for cls, title, df in groups:
        if df.empty:
            continue
        rows = "".join(
            f"<tr><td>{r.epoch}</td><td>{'reference' if r.kind == 'reference' else int(r.sample)}</td>"
            f"<td class='nice-why-num'>{H.fmt(float(r.reward))}</td><td class='nice-why-num'>{_number(float(r.policy_weight), 3)}</td>"
            f"<td class='nice-why-num'>{_signed(float(r.contribution))}</td>"
            f"<td><div class='nice-why-text'>{H.esc(' '.join(str(r.text).split()))}</div></td></tr>"
            for r in df.itertuples())
        parts.append(f"<div class='nice-why-group {cls}'><div><b>{len(df)} {H.esc(title)}</b></div>"
                     f"<table class='nice-why-table'><colgroup>{cols}</colgroup><thead><tr>{heads}</tr></thead>"
                     f"<tbody>{rows}</tbody></table></div>")
    return "".join(parts)


class WhyPanel(LiveFallback, w.VBox):
    """Why one pool example got its score: the target prompts' bars and one prompt's completions.

    ``show(example_id, method)`` explains another example (what an explorer calls when its selection
    changes). ``compute=False`` never computes NICE's per-completion gradients (they need the model):
    until they are stored the panel shows the prompts only, with a button that computes them
    (:meth:`compute_completions`).

    ``.explanation`` is the :class:`~nice_kit.explain.Explanation` shown (None after an error),
    ``.shown`` the (example id, method) last asked for, ``.bars`` the chart (a FigureWidget; click a
    bar to see its prompt's completions), ``.prompt`` the prompt dropdown, ``.completions`` the
    completions' HTML, ``.status`` what the compute button did. ``theme`` is "light", "dark" or
    "auto" (the page's JupyterLab theme). Displayed on its own in a notebook, the panel also writes a
    static copy of itself that follows every change (:class:`widgets._display.LiveFallback`);
    ``on_change(callback)`` tells an embedding widget whenever the panel redraws.
    """

    UP, DOWN = UP, DOWN

    def __init__(self, run: RunLike, example_id: str | None = None, method: str = "nice", top: int = 10,
                 compute: bool = True, theme: str | None = "auto", compare: bool = False):
        self.pipeline = as_pipeline(run)
        self.method, self.top, self.compute = method, top, compute
        try:
            self.labels = target_labels(self.pipeline)
        except Exception:  # noqa: BLE001 - unreadable target records: bars fall back to prompt ids
            self.labels = {}
        self.comparison: dict[str, Explanation] | None = None
        self.compare_frame = pd.DataFrame()
        self._theme_arg = _theme.check_theme(theme)
        self.theme = _theme.resolve_theme(theme)
        self.explanation: Explanation | None = None
        self.shown: tuple[str, str] | None = None
        self._updating = False
        self._listeners: list[Callable[[], None]] = []
        self.style = w.HTML(STYLE + self.hide_fallback_style())
        self.header = w.HTML()
        self.header.add_class("nice-why-header")
        self.bars = go.FigureWidget(_theme.apply(go.Figure(go.Bar(x=[], y=[], orientation="h", hoverinfo="text"),
                                                           layout=_layout("", 220)), self.theme))
        self.bars.data[0].on_click(self._on_bar_click)
        self.bars.add_class("nice-why-bars")
        self.chart = w.Box([self.bars], layout=w.Layout(width="100%", min_width="0"))  # hidden after an error
        self.prompt = w.Dropdown(options=[], description="prompt", layout=w.Layout(width="98%"))
        self.prompt.add_class("nice-why-prompt")
        self.prompt.observe(self._on_prompt, names="value")
        self.compute_button = w.Button(description="compute completion gradients", icon="cogs",
                                       tooltip="loads the model: one projected gradient per sampled completion, "
                                               "stored beside the prompt vectors", layout=w.Layout(width="auto"))
        self.compute_button.add_class("nice-why-compute")
        self.compute_button.on_click(lambda _: self.compute_completions())
        self.compute_button.layout.display = "none"
        self.status = w.HTML()
        self.status.add_class("nice-why-status")
        self.completions = w.HTML(layout=w.Layout(width="100%", margin="2px 0"))  # no sideways overflow
        self.completions.add_class("nice-why-completions")
        self.progress = w.Output()  # tqdm's bar while gradients are computed
        self.progress.add_class("nice-why-progress")
        self.compare_toggle = w.ToggleButton(value=compare, description="NICE vs LESS side by side", icon="columns",
                                             tooltip="both methods' contributions per target prompt for this example",
                                             layout=w.Layout(width="auto", align_self="flex-start"))
        self.compare_toggle.add_class("nice-why-compare-toggle")
        self.compare_toggle.observe(self._on_compare_toggle, names="value")
        self.compare_bars: go.FigureWidget | None = None
        self.compare_box = w.VBox(layout=w.Layout(min_width="0"))
        self.compare_box.add_class("nice-why-compare")
        self.compare_text = w.HTML()
        self.compare_text.add_class("nice-why-compare-text")
        self.probe = _theme.follow_page_theme(self) if self._theme_arg is None else None
        super().__init__([self.style, *([self.probe] if self.probe else []), self.header, self.compare_toggle,
                          self.compare_box, self.chart, self.prompt,
                          w.HBox([self.compute_button, self.status], layout=w.Layout(align_items="center",
                                                                                   flex_flow="row wrap")),
                          self.progress, self.completions], layout=w.Layout(width="100%", min_width="0"))
        self.add_class("nice-why")
        if example_id is not None:
            self.show(example_id, method)
        else:
            self.clear()

    def show(self, example_id: str, method: str | None = None, compute: bool | None = None,
             raise_errors: bool = True) -> Explanation | None:
        """Explain ``example_id`` under ``method`` (default: the last one) and redraw.

        ``raise_errors=False`` (for an embedding widget) shows what went wrong (no scores yet, a stale
        stage, a method that cannot be explained, an unknown example) in the panel instead of raising,
        and returns None."""
        self.method = method or self.method
        self.shown = (str(example_id), self.method)
        self.status.value = ""
        try:
            expl = explain(self.pipeline, example_id, self.method,
                           compute=self.compute if compute is None else compute)
        except Exception as err:  # noqa: BLE001 - an embedding widget's callbacks must not raise
            if raise_errors:
                raise
            self._show_error(example_id, err)
            return None
        self._draw(expl)
        if self.compare_toggle.value:
            self._draw_compare()
        return expl

    def compute_completions(self) -> Explanation | None:
        """What the button does: compute NICE's per-completion gradients (loads the model once;
        stored, so later views only read them) and show the completions. A failure is shown beside
        the button; the prompts stay on screen."""
        if self.shown is None:
            return None
        example_id, method = self.shown
        self.compute_button.disabled = True
        self.status.value = "<span class='nice-why-muted'>computing the per-completion gradients (loads the model):</span>"
        start = time.perf_counter()
        try:
            # the stage's tqdm.auto bar draws in the Output while it runs
            expl = run_in(self.progress, explain, self.pipeline, example_id, method, compute=True)
        except Exception as err:  # noqa: BLE001 - shown, not raised into the button's callback
            self.status.value = (f"<span class='nice-why-error'>could not compute them: {H.esc(type(err).__name__)}: "
                                 f"{H.esc(err)}</span>")
            return None
        finally:
            self.compute_button.disabled = False
            self.progress.clear_output()
        n = 0 if expl.completions is None else len(expl.completions)
        self.status.value = (f"<span class='nice-why-muted'>computed and stored: the gradients of {n} completions "
                             f"(every checkpoint) in {time.perf_counter() - start:.1f} s; later views only read them"
                             "</span>")
        self._draw(expl)
        return expl

    def clear(self, message: str = "no example selected") -> None:
        """Show nothing but ``message`` (plain text)."""
        self.shown = None
        self._blank(f"<i class='nice-why-muted'>{H.esc(message)}</i>")

    def _show_error(self, example_id: str, err: Exception) -> None:
        kind = "" if isinstance(err, (ValueError, RuntimeError, KeyError)) else f"{type(err).__name__}: "
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        self._blank(f"<div class='nice-why-error'>cannot explain the {H.esc(self.method)} score of "
                    f"{H.esc(example_id)}: {kind}{H.esc(msg)}</div>")

    def _blank(self, header: str) -> None:
        self.explanation = None
        self.header.value = header
        with self.bars.batch_update():
            self.bars.data[0].x, self.bars.data[0].y, self.bars.data[0].customdata = [], [], []
            self.bars.layout.title.text = ""
        self._updating = True
        try:
            self.prompt.options = []
        finally:
            self._updating = False
        self.chart.layout.display = "none"
        self.prompt.layout.display = "none"
        self.compute_button.layout.display = "none"
        self.completions.value = ""
        self.comparison, self.compare_frame = None, pd.DataFrame()
        self.compare_box.children = []
        self._changed()

    def _draw(self, expl: Explanation) -> None:
        self.explanation = expl
        self.header.value = _header_html(expl)
        bars, hover, title, height = _chart(expl, self.top, self.labels)
        with self.bars.batch_update():  # only what changes (re-sending the template would take 0.2 s)
            bar = self.bars.data[0]
            bar.x, bar.y, bar.customdata = bars["contribution"].tolist(), bars["label"].tolist(), bars["prompt_id"].tolist()
            bar.marker.color, bar.hovertext = bars["color"].tolist(), hover
            self.bars.layout.title.text = title
            self.bars.layout.height = height
        self.chart.layout.display = None
        self.prompt.layout.display = None
        per = expl.by_prompt()
        per = per[per["contribution"] != 0]
        per = per.reindex(per["contribution"].abs().sort_values(ascending=False, kind="mergesort").index)
        top = expl.top_prompt()
        self._updating = True
        try:
            self.prompt.options = [(f"{c:+.3g}  {label}  ({pid})", pid) for pid, c, label in
                                   zip(per["prompt_id"], per["contribution"],
                                       bar_labels(per["prompt_id"].tolist(), per["subtask"].tolist(), self.labels))]
            self.prompt.value = top
        finally:
            self._updating = False
        missing = expl.completions is None and "not available" in expl.note
        self.compute_button.layout.display = None if missing else "none"
        self._render(top)

    def _render(self, prompt_id: str | None) -> None:
        self.completions.value = completions_html(self.explanation, prompt_id)
        self._changed()

    def _on_prompt(self, change) -> None:
        if not self._updating and self.explanation is not None:
            self._render(change["new"])

    def _on_bar_click(self, trace, points, state=None) -> None:
        if points.point_inds:
            self.prompt.value = str(trace.customdata[points.point_inds[0]])

    # --------------------------------------------------------------------- side by side
    def compare(self, methods: tuple[str, ...] = ("nice", "less")) -> pd.DataFrame:
        """Show the shown example's contributions per target prompt under ``methods`` side by side
        (opens the comparison); returns :func:`compare_table`'s table (``.compare_frame``)."""
        self.compare_toggle.value = True
        self._draw_compare(methods)
        return self.compare_frame

    def _on_compare_toggle(self, change) -> None:
        if change["new"]:
            self._draw_compare()
        else:
            self.compare_box.children = []
            self._changed()

    def _draw_compare(self, methods: tuple[str, ...] = ("nice", "less")) -> None:
        if self.shown is None:
            self.compare_box.children = []
            return
        example_id = self.shown[0]
        try:
            expls = {m: explain(self.pipeline, example_id, m, compute=False) for m in methods}
        except Exception as err:  # noqa: BLE001 - shown in the panel, not raised into a callback
            self.comparison, self.compare_frame = None, pd.DataFrame()
            self.compare_text.value = (f"<div class='nice-why-error'>cannot compare {' and '.join(methods)} for "
                                       f"{H.esc(example_id)}: {H.esc(err)}</div>")
            self.compare_box.children = [self.compare_text]
            self._changed()
            return
        table = compare_table(expls, self.labels, top=self.top + 2)
        fig = compare_figure(table, expls, self.theme)
        if self.compare_bars is None or len(self.compare_bars.data) != len(methods):
            self.compare_bars = go.FigureWidget(fig)
            self.compare_bars.add_class("nice-why-compare-bars")
            for trace in self.compare_bars.data:
                trace.on_click(self._on_bar_click)
        else:
            with self.compare_bars.batch_update():
                for trace, new in zip(self.compare_bars.data, fig.data):
                    trace.x, trace.y, trace.customdata, trace.hovertext = new.x, new.y, new.customdata, new.hovertext
                self.compare_bars.layout.annotations = fig.layout.annotations
                self.compare_bars.layout.title.text = fig.layout.title.text
                self.compare_bars.layout.height = fig.layout.height
        self.comparison, self.compare_frame = expls, table
        self.compare_text.value = compare_html(table, expls)
        self.compare_box.children = [self.compare_bars, self.compare_text]
        self._changed()

    # ------------------------------------------------------------------------ embedding
    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the panel redraws (another example, prompt or theme)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self.refresh_fallback()
        for callback in list(self._listeners):
            callback()

    def set_theme(self, theme: str) -> None:
        """Redraw the chart for "light" or "dark" (the page's theme, when ``theme="auto"``)."""
        theme = _theme.check_theme(theme) or "light"
        if theme == self.theme:
            return
        self.theme = theme
        with self.bars.batch_update():
            _theme.apply(self.bars, theme)
        if self.compare_bars is not None:
            with self.compare_bars.batch_update():
                _theme.apply(self.compare_bars, theme)
        self._changed()

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        """The bar chart as a static Figure (an empty one when nothing is explained)."""
        if self.explanation is None:
            return _theme.apply(go.Figure(), self.theme)
        return why_figure(self.explanation, self.top, self.theme, self.labels)

    def fallback_body(self) -> str:
        """What the panel shows now, as HTML: the header, the side-by-side comparison when open, the
        chart and the chosen prompt's completions."""
        if self.explanation is None:
            return f"{STYLE}<div class='nice-why'>{self.header.value}</div>"
        side = ""
        if self.compare_toggle.value and self.comparison is not None:
            side = figure_html(compare_figure(self.compare_frame, self.comparison, self.theme)) + self.compare_text.value
        return (f"{STYLE}<div class='nice-why'>{self.header.value}{side}{figure_html(self.figure())}"
                f"{completions_html(self.explanation, self.prompt.value)}</div>")


def why_panel(run: RunLike, example_id: str, method: str = "nice", top: int = 10, compute: bool = True,
              theme: str | None = "auto", compare: bool = False) -> WhyPanel:
    """A :class:`WhyPanel` showing ``example_id`` (see the module docstring); ``compare=True`` opens
    the NICE-vs-LESS comparison."""
    return WhyPanel(run, example_id, method, top, compute, theme, compare)


__all__ = ["WhyPanel", "why_panel", "why_figure", "completions_html", "prompt_bars", "bar_labels", "compare_table",
           "compare_figure", "compare_html"]
