"""InfluenceExplorer: the pool as a sortable, filterable table with scores, a histogram, the full
text of one example and the NICE-vs-LESS scatter (click a point to select its example)."""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from . import _html as H
from ._run import FLAG_COLUMNS, RunLike, as_pipeline, pool_frame, score_columns
from .plots import _color, influence_scatter, score_histogram

ALL = "(all)"


class InfluenceExplorer(w.VBox):
    """Browse a run's pool by influence score.

    Controls: task filter, harmful filter (when the pool is flagged), the method to sort by, top or
    bottom, how many rows to show, a text search over id / prompt / response. ``.table`` is the
    filtered, sorted DataFrame (the HTML table shows its first ``k`` rows); ``.selected_id`` is the
    example whose text is shown. ``.figure()`` and ``_repr_html_`` are static fallbacks.
    """

    PLOT_WIDTH = 520

    def __init__(self, run: RunLike, k: int = 15, method: str | None = None):
        self.pipeline = as_pipeline(run)
        self.frame = pool_frame(self.pipeline)
        self.methods = score_columns(self.frame)
        if not self.methods:
            raise ValueError(f"{self.pipeline.run_dir}: the scores table has no method columns")
        self._selected: str | None = None
        self._updating = False

        f = self.frame
        tasks = sorted(str(t) for t in f["task"].dropna().unique()) if "task" in f.columns else []
        small = w.Layout(width="230px")
        self.task = w.Dropdown(options=[ALL] + tasks, value=ALL, description="task", layout=small)
        self.flag = w.Dropdown(options=[ALL, "harmful", "clean"], value=ALL, description="harmful",
                               layout=w.Layout(width="200px"))
        self.flag.layout.display = None if "harmful" in f.columns and f["harmful"].notna().any() else "none"
        self.method = w.Dropdown(options=self.methods, value=method or self.methods[0], description="sort by",
                                 layout=w.Layout(width="200px"))
        self.order = w.ToggleButtons(options=["top", "bottom"], value="top", tooltips=["highest first", "lowest first"],
                                     style={"button_width": "70px"})
        self.k = w.BoundedIntText(value=min(k, len(f)), min=1, max=max(1, len(f)), description="rows",
                                  layout=w.Layout(width="150px"))
        self.search = w.Text(value="", placeholder="search id, prompt, response", description="search",
                             continuous_update=False)
        self.table_html = w.HTML(layout=w.Layout(max_height="330px", overflow="auto"))
        self.table_html.add_class("nice-explorer-table")
        self.select = w.Dropdown(options=[], description="example", layout=w.Layout(width="98%"))
        self.select.add_class("nice-explorer-select")
        self.detail = w.HTML()
        self.detail.add_class("nice-explorer-detail")
        self.status = w.HTML()

        size = dict(width=self.PLOT_WIDTH, autosize=False)
        self.hist = go.FigureWidget(score_histogram(f, self.method.value).update_layout(**size))
        self.has_scatter = {"nice", "less"} <= set(self.methods)
        self.scatter = go.FigureWidget(influence_scatter(f).update_layout(**size)) if self.has_scatter else None
        if self.scatter is not None:
            for trace in self.scatter.data[:-1]:
                trace.on_click(self._on_scatter_click)

        for c in (self.task, self.flag, self.method, self.order, self.k, self.search):
            c.observe(self._refresh, names="value")
        self.select.observe(self._on_select, names="value")

        controls = w.HBox([self.task, self.flag, self.method, self.order, self.k, self.search],
                          layout=w.Layout(flex_flow="row wrap"))
        left = w.VBox([self.table_html, self.select, self.detail], layout=w.Layout(flex="1 1 auto", min_width="0"))
        plots = [self.hist] + ([self.scatter] if self.scatter is not None else [])
        right = w.VBox(plots, layout=w.Layout(flex=f"0 0 {self.PLOT_WIDTH + 10}px"))
        super().__init__([w.HTML(H.STYLE + "<b>Influence explorer</b> "
                                 f"<span style='color:#777'>{H.esc(self.pipeline.run_dir)}</span>"),
                          controls, self.status, w.HBox([left, right])])
        self.add_class("nice-explorer")
        self._refresh()

    # ------------------------------------------------------------------------------- state
    @property
    def table(self) -> pd.DataFrame:
        """The filtered pool, sorted by the chosen method (top: highest first)."""
        return self._table

    @property
    def shown(self) -> pd.DataFrame:
        """The rows the HTML table shows (the first ``k`` of :attr:`table`)."""
        return self._table.head(self.k.value)

    @property
    def selected_id(self) -> str | None:
        return self._selected

    @selected_id.setter
    def selected_id(self, rid: str) -> None:
        self.select_example(rid)

    def filtered(self) -> pd.DataFrame:
        df = self.frame
        if self.task.value != ALL:
            df = df[df["task"].astype(str) == self.task.value]
        if self.flag.value != ALL and "harmful" in df.columns:
            flag = df["harmful"].fillna(False).astype(bool)
            df = df[flag] if self.flag.value == "harmful" else df[~flag]
        q = self.search.value.strip().lower()
        if q:
            hay = (df["id"].astype(str) + "\n" + df["prompt"].astype(str) + "\n" + df["response"].astype(str)).str.lower()
            df = df[hay.str.contains(q, regex=False)]
        m = self.method.value
        return df.sort_values(m, ascending=self.order.value == "bottom", kind="mergesort",
                              na_position="last").reset_index(drop=True)

    def columns(self) -> list[str]:
        m = self.method.value
        others = [c for c in self.methods if c != m]
        cols = ["id", f"{m}_rank", m] + others + ["task", "harmful", "harm_kind", "prompt", "response", "on_task",
                                                  "source"]
        return [c for c in cols if c in self.frame.columns]

    # ----------------------------------------------------------------------------- updates
    def _refresh(self, change=None) -> None:
        self._table = self.filtered()
        shown = self.shown
        ids = shown["id"].tolist()
        m = self.method.value
        keep = self._selected if self._selected in set(self._table["id"]) else (ids[0] if ids else None)
        self._updating = True
        try:
            self.select.options = self._options(shown, keep)
            self.select.value = keep
        finally:
            self._updating = False
        self.status.value = (f"<span style='color:#555'>{len(self._table)} of {len(self.frame)} examples match; "
                             f"showing the {self.order.value} {len(shown)} by <b>{H.esc(m)}</b></span>")
        with self.hist.batch_update():
            self.hist.data[0].x = self.frame[m].tolist()
            self.hist.data[1].x = self._table[m].tolist()
            self.hist.data[1].marker.color = _color(m)
            self.hist.layout.title.text = f"{m} scores"
            self.hist.layout.xaxis.title.text = f"{m} influence score"
        self._show(keep)

    def _options(self, shown: pd.DataFrame, keep: str | None) -> list[tuple[str, str]]:
        m = self.method.value
        opts = [(self._label(r, m), r["id"]) for _, r in shown.iterrows()]
        if keep is not None and keep not in set(shown["id"]):
            r = self.frame[self.frame["id"] == keep].iloc[0]
            opts.insert(0, (self._label(r, m), keep))
        return opts

    @staticmethod
    def _label(r, m: str) -> str:
        task = f" [{r['task']}]" if "task" in r else ""
        return f"#{r[f'{m}_rank']} {r['id']}{task} {m}={H.fmt(r[m])} · {H.short(r['prompt'], 50)}"

    def _on_select(self, change) -> None:
        if not self._updating and change["new"] is not None:
            self._show(change["new"])

    def _on_scatter_click(self, trace, points, state=None) -> None:
        if not points.point_inds:
            return
        rid = trace.customdata[points.point_inds[0]]
        self.select_example(str(rid))

    def select_example(self, rid: str) -> None:
        """Show example ``rid`` (adding it to the dropdown when the filters hide it from the table)."""
        if rid not in set(self.frame["id"]):
            raise KeyError(f"no pool example with id {rid!r}")
        self._updating = True
        try:
            if rid not in {v for _, v in self.select.options}:
                self.select.options = self._options(self.shown, rid)
            self.select.value = rid
        finally:
            self._updating = False
        self._show(rid)

    def _show(self, rid: str | None) -> None:
        self._selected = rid
        self.table_html.value = H.table(self.shown, self.columns(), selected=rid, max_chars=48,
                                        css_class="nice-kit-nowrap")
        self.detail.value = self.detail_html(rid)
        m = self.method.value
        with self.hist.batch_update():
            shapes = score_histogram(self.frame, m, selected=rid).layout.shapes
            self.hist.layout.shapes = shapes
        if self.scatter is not None:
            sel = self.frame[self.frame["id"] == rid]
            with self.scatter.batch_update():
                self.scatter.data[-1].x = sel["less"].tolist()
                self.scatter.data[-1].y = sel["nice"].tolist()
                self.scatter.data[-1].customdata = sel["id"].tolist()

    def detail_html(self, rid: str | None) -> str:
        if rid is None:
            return "<i>no example matches the filters</i>"
        r = self.frame[self.frame["id"] == rid].iloc[0]
        rec = next(x for x in self.pipeline.pool if x.id == rid)
        n = len(self.frame)
        scores = " · ".join(f"<b>{H.esc(m)}</b> {H.fmt(r[m])} (rank {r[f'{m}_rank']} of {n})" for m in self.methods)
        flags = []
        for c in FLAG_COLUMNS:
            if c in r and H.fmt(r[c]) != "":
                flags.append(f"{c}: <b>{H.esc(H.fmt(r[c]))}</b>")
        harm = ""
        if "harmful" in r and pd.notna(r["harmful"]) and bool(r["harmful"]):
            harm = " " + H.badge(f"harmful: {H.fmt(r.get('harm_kind')) or 'yes'}", "#d62728")
        chat = ""
        if len(rec.messages) > 1:
            chat = "".join(f"<div><b>{H.esc(m['role'])}</b></div>{H.pre(m['content'])}" for m in rec.messages[:-1])
        return (f"<div class='nice-explorer-text'><div><b>{H.esc(rid)}</b>{harm}</div>"
                f"<div>{scores}</div><div style='color:#555'>{' · '.join(flags)}</div>{chat}"
                f"<div><b>prompt</b></div>{H.pre(rec.prompt)}<div><b>response</b></div>{H.pre(rec.response or '')}</div>")

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        """The NICE-vs-LESS scatter (or the score histogram when only one method ran), as a static Figure."""
        if self.has_scatter:
            return influence_scatter(self.frame, selected=self._selected)
        return score_histogram(self.frame, self.method.value, self._table, self._selected)

    def _repr_html_(self) -> str:
        fig = self.figure().to_html(include_plotlyjs="cdn", full_html=False)
        return (H.STYLE + f"<div>{len(self._table)} of {len(self.frame)} examples, sorted by {H.esc(self.method.value)} "
                f"({self.order.value})</div>" + H.table(self.shown, self.columns(), self._selected, max_chars=48,
                                                  css_class="nice-kit-nowrap")
                + self.detail_html(self._selected) + fig)
