"""InfluenceExplorer: the pool as a clickable, sortable, filterable table with scores and what each
method selects, a histogram and the NICE-vs-LESS scatter (both with the selection cutoffs, both
following the filters), the full text of the selected example and why it got its score (the
target prompts and sampled completions behind it, :mod:`widgets.why`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from . import _html as H
from . import _theme
from ._display import ClickTable, LiveFallback, Pager, figure_html
from ._run import (FLAG_COLUMNS, RunLike, add_selection, add_text_columns, as_pipeline, cutoff, pool_answers,
                   pool_frame, pool_record, score_columns, selection_fraction)
from .plots import (FILTERED_OUT, series_color, hover_text, histogram_marks, influence_scatter, scatter_groups_like,
                    scatter_title, score_histogram, selected_color)
from .why import WhyPanel

ALL = "(all)"
# badge backgrounds dark enough for white text (the plot colours of LESS and NICE are too light)
BADGE_COLORS = {"NICE": "#1565c0", "LESS": "#a84300"}
SELECTION_FILTERS = (ALL, "NICE", "LESS", "both", "NICE only", "LESS only", "neither")
TEXT_COLUMNS = ("prompt", "response")


@dataclass
class DetailPanel:
    """An extra view of the selected example, drawn under its text: ``render(example_id, method)``
    returns a DataFrame (shown as a table), a plotly Figure, HTML, or a list of those."""

    title: str
    render: Callable[[str, str], Any]


def _sort_key(values: pd.Series) -> pd.Series:
    """Numbers as numbers, flags (yes/no) as 1/0, text case-blind; missing values sort last."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values
    non_null = values.dropna()
    if len(non_null) and all(isinstance(v, (bool, int, float)) for v in non_null):
        return values.map(lambda v: float(v) if pd.notna(v) else float("nan")).astype(float)
    return values.map(lambda v: str(v).lower() if pd.notna(v) else None)


class InfluenceExplorer(LiveFallback, w.VBox):
    """Browse a run's pool by influence score.

    Controls: task filter, harmful filter (when the pool is flagged), "selected by" filter (the top
    ``selection.fraction`` of each method's score, as the run selects), the score to sort by, top or
    bottom, rows per page, a text search over id / prompt / response. Click a row (or a scatter
    point) to read its example; click a header to sort by that column (again to reverse).

    Under the example's text, the "why" panel (``.why``, a :class:`widgets.why.WhyPanel`; opened and
    closed with ``.why_toggle``, open when ``why=True``) takes the selected example's score under the
    chosen method apart: the target prompts that pushed it up and down, and the sampled completions
    of the top prompt. Selecting never loads the model: NICE's per-completion gradients are only
    read, and when they are not stored yet the panel offers a button that computes them. What
    cannot be explained (no scores, a stale stage, another method) is said inside the panel.

    The prompt column shows the part of each prompt that tells it from its task's other prompts (the
    operands, not the shared instructions; the whole prompt in the tooltip), and, where the pool has
    an ``answer`` column, a "correct" column says whether the response gives it. ``add_what_if(wi)``
    shows a what-if's NICE scores as a ``what_if`` column beside ``nice`` and ``less`` (the metric
    picker does it when given the explorer). The export button (``export(path)``, ``to_dataset()``)
    takes the filtered view out as chat records (:mod:`nice_kit.export`).

    ``.table`` is the filtered, sorted DataFrame (the HTML table shows one page of it, ``.shown``);
    ``.selected_id`` the example whose text is shown. ``theme`` is "light", "dark" or "auto" (the
    page's JupyterLab theme). Displayed in a notebook, the explorer also writes a static copy of
    itself, the why panel included, that follows every change (see
    :class:`widgets._display.LiveFallback`).
    """

    PLOT_WIDTH = 400

    def __init__(self, run: RunLike, k: int = 15, method: str | None = None, theme: str | None = "auto",
                 why: bool = True):
        self.pipeline = p = as_pipeline(run)
        frame = pool_frame(p)
        self.methods = score_columns(frame)
        if not self.methods:
            raise ValueError(f"{p.run_dir}: the scores table has no method columns")
        if method is not None and method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, not {method!r}")
        self.run_methods = list(self.methods)  # the run's own scores (what-if columns come after them)
        self.what_ifs: dict[str, Any] = {}
        self.fraction = selection_fraction(p)
        self.frame = add_text_columns(add_selection(frame, self.methods, self.fraction), pool_answers(p))
        self.cutoffs = {m: cutoff(self.frame, m, self.fraction) for m in self.methods}
        self._theme_arg = _theme.check_theme(theme)
        self.theme = _theme.resolve_theme(theme)
        self._selected: str | None = None
        self._updating = False
        self._sort: tuple[str, bool] = (method or self.methods[0], True)  # (column, descending)
        self.panels: list[DetailPanel] = []

        f = self.frame
        tasks = sorted(str(t) for t in f["task"].dropna().unique()) if "task" in f.columns else []
        style = {"description_width": "initial"}
        self.task = w.Dropdown(options=[ALL] + tasks, value=ALL, description="task", style=style,
                               layout=w.Layout(width="200px"))
        self.flag = w.Dropdown(options=[ALL, "harmful", "clean"], value=ALL, description="harmful", style=style,
                               layout=w.Layout(width="150px"))
        self.flag.layout.display = None if "harmful" in f.columns and f["harmful"].notna().any() else "none"
        picks = [o for o in SELECTION_FILTERS if o == ALL or len(self.methods) > 1 or o in (self.methods[0].upper(),
                                                                                              "neither")]
        picks = [o for o in picks if not any(m.upper() in o for m in ("nice", "less") if m not in self.methods)]
        self.picked = w.Dropdown(options=picks, value=ALL, description=f"selected (top {self.fraction:.0%})",
                                 style=style, layout=w.Layout(width="230px"))
        self.picked.add_class("nice-explorer-picked")
        self.method = w.Dropdown(options=self.methods, value=self._sort[0], description="score", style=style,
                                 layout=w.Layout(width="130px"))
        self.order = w.ToggleButtons(options=["top", "bottom"], value="top", tooltips=["highest first", "lowest first"],
                                     style={"button_width": "76px"})
        self.k = w.BoundedIntText(value=min(k, len(f)), min=1, max=max(1, len(f)), description="rows", style=style,
                                  layout=w.Layout(width="110px"))
        self.search = w.Text(value="", placeholder="search id, prompt, response", description="search", style=style,
                             continuous_update=False, layout=w.Layout(width="260px"))
        self.table_view = ClickTable(on_click=self.select_example, on_sort=self.sort_by,
                                     layout=w.Layout(max_height="520px", overflow="auto", width="100%"))
        self.table_view.add_class("nice-explorer-table")
        self.pager = Pager(self.k.value, self._render_table)
        self.select = w.Dropdown(options=[], description="example", style=style, layout=w.Layout(width="98%"))
        self.select.add_class("nice-explorer-select")
        self.detail = w.HTML(layout=w.Layout(width="100%"))
        self.detail.add_class("nice-explorer-detail")
        self.panel_box = w.VBox(layout=w.Layout(width="100%"))
        self.panel_box.add_class("nice-explorer-panels")
        self.why = WhyPanel(p, method=self._sort[0], compute=False, theme=self.theme)
        self.why.on_change(self._on_why_change)
        self.why.layout.display = None if why else "none"
        self.why_toggle = w.ToggleButton(value=why, description="why this score?", icon="question-circle",
                                         tooltip="show or hide how the selected example's score decomposes into "
                                                 "target prompts and sampled completions",
                                         layout=w.Layout(width="auto", align_self="flex-start"))
        self.why_toggle.add_class("nice-explorer-why-toggle")
        self.why_toggle.observe(self._on_why_toggle, names="value")
        self._drawing_why = False
        self.status = w.HTML()
        self.export_path = w.Text(value=str(p.run_dir / "exports" / "explorer_view.jsonl"), description="to",
                                  style=style, layout=w.Layout(width="420px"))
        self.export_path.add_class("nice-explorer-export-path")
        self.export_button = w.Button(description="export the filtered view (JSONL)", icon="download",
                                      tooltip="the rows that pass the filters, in the table's order, as chat records "
                                              "(nice_kit.export: what TRL's SFTTrainer and datasets read)",
                                      layout=w.Layout(width="auto"))
        self.export_button.add_class("nice-explorer-export")
        self.export_button.on_click(lambda _: self._on_export())
        self.export_status = w.HTML()
        self.export_status.add_class("nice-explorer-export-status")

        size = dict(width=self.PLOT_WIDTH, autosize=False)
        m = self.method.value
        self.hist = go.FigureWidget(score_histogram(f, m, cutoff=self.cutoffs[m], fraction=self.fraction,
                                                    theme=self.theme).update_layout(**size))
        self.hist.add_class("nice-explorer-hist")
        self.has_scatter = {"nice", "less"} <= set(self.methods)
        self.scatter = None
        if self.has_scatter:
            self.scatter = go.FigureWidget(influence_scatter(f, cutoffs=self.cutoffs, fraction=self.fraction,
                                                             theme=self.theme).update_layout(**size))
            self.scatter.add_class("nice-explorer-scatter")
            for trace in self.scatter.data[1:-1]:
                trace.on_click(self._on_scatter_click)

        for c in (self.task, self.flag, self.picked, self.search):
            c.observe(self._refresh, names="value")
        self.method.observe(self._on_method, names="value")
        self.order.observe(self._on_order, names="value")
        self.k.observe(self._on_k, names="value")
        self.select.observe(self._on_select, names="value")

        self.probe = _theme.follow_page_theme(self) if self._theme_arg is None else None

        controls = w.HBox([self.task, self.flag, self.picked, self.method, self.order, self.k, self.search],
                          layout=w.Layout(flex_flow="row wrap", align_items="center"))
        left = w.VBox([self.table_view, self.pager, self.select, self.detail, self.why_toggle, self.why,
                       self.panel_box],
                      layout=w.Layout(flex="1 1 640px", min_width="0", margin="0 8px 0 0"))
        plots = [self.hist] + ([self.scatter] if self.scatter is not None else [])
        right = w.Box(plots, layout=w.Layout(flex="1 1 410px", flex_flow="row wrap", align_content="flex-start",
                                             min_width="0"))
        header = w.HTML(H.STYLE + self.hide_fallback_style() + "<span class='nice-kit-title'>Influence explorer</span> "
                        + H.muted(H.esc(p.run_dir)))
        export = w.HBox([self.export_button, self.export_path, self.export_status],
                        layout=w.Layout(flex_flow="row wrap", align_items="center"))
        super().__init__([header, *([self.probe] if self.probe else []), controls, self.status, export,
                          w.Box([left, right], layout=w.Layout(flex_flow="row wrap", width="100%"))],
                         layout=w.Layout(width="100%"))
        self.add_class("nice-explorer")
        self.add_class("nice-kit")
        self._refresh()

    # ------------------------------------------------------------------------------- state
    @property
    def table(self) -> pd.DataFrame:
        """The filtered pool, sorted by the chosen column (scores: top = highest first)."""
        return self._table

    @property
    def shown(self) -> pd.DataFrame:
        """The rows the HTML table shows (one page of :attr:`table`)."""
        return self._table.iloc[self.pager.slice()]

    @property
    def sort(self) -> tuple[str, bool]:
        """(column, descending) the table is sorted by."""
        return self._sort

    @property
    def selected_id(self) -> str | None:
        return self._selected

    @selected_id.setter
    def selected_id(self, rid: str) -> None:
        self.select_example(rid)

    def filtered(self) -> pd.DataFrame:
        """The pool rows that pass the task, harmful, selected-by and search filters, sorted."""
        df = self.frame
        if self.task.value != ALL:
            df = df[df["task"].astype(str) == self.task.value]
        if self.flag.value != ALL and "harmful" in df.columns:
            flag = df["harmful"].fillna(False).astype(bool)
            df = df[flag] if self.flag.value == "harmful" else df[~flag]
        df = df[self._picked_mask(df)]
        q = self.search.value.strip().lower()
        if q:
            hay = (df["id"].astype(str) + "\n" + df["prompt"].astype(str) + "\n" + df["response"].astype(str)).str.lower()
            df = df[hay.str.contains(q, regex=False)]
        col, descending = self._sort
        df = df.assign(_key=_sort_key(df[col])).sort_values("_key", ascending=not descending, kind="mergesort",
                                                             na_position="last")
        return df.drop(columns="_key").reset_index(drop=True)

    def _picked_mask(self, df: pd.DataFrame) -> pd.Series:
        choice = self.picked.value
        if choice == ALL:
            return pd.Series(True, index=df.index)
        if choice not in {m.upper() for m in self.run_methods} and choice.lower() in self.methods:
            return df[f"selected_{choice.lower()}"]  # a what-if column's top fraction
        by = {m.upper(): df[f"selected_{m}"] for m in self.run_methods}
        anyone = pd.concat(list(by.values()), axis=1).any(axis=1)
        if choice == "neither":
            return ~anyone
        if choice == "both":
            return pd.concat(list(by.values()), axis=1).all(axis=1)
        if choice.endswith(" only"):
            name = choice.split()[0]
            others = [v for k, v in by.items() if k != name]
            return by[name] & ~(pd.concat(others, axis=1).any(axis=1) if others else False)
        return by[choice]

    def columns(self) -> list[H.Column]:
        """The table's columns: id, what selected it, the scores with their ranks, the flags and the
        (wrapped, three-line) prompt and response."""
        n = len(self.frame)
        cols = [H.Column("id", width="78px"),
                H.Column("selected_by", "selected by", width="72px", cell=self._picked_cell)]
        for m in self.methods:
            cols.append(H.Column(m, m, width="76px", numeric=True, cell=self._score_cell(m, n)))
        if "task" in self.frame.columns:
            cols.append(H.Column("task", width="92px"))
        if "harmful" in self.frame.columns:
            cols.append(H.Column("harmful", width="74px", cell=self._harm_cell))
        cols += [H.Column("prompt_core", "prompt", cell=self._prompt_cell), H.Column("response", long=True)]
        if "correct" in self.frame.columns:
            cols.append(H.Column("correct", width="70px", cell=self._correct_cell))
        if "on_task" in self.frame.columns:
            cols.append(H.Column("on_task", "on task", width="48px"))
        if "source" in self.frame.columns:
            cols.append(H.Column("source", width="84px"))
        return cols

    @staticmethod
    def _score_cell(m: str, n: int) -> Callable[[pd.Series], str]:
        def cell(r: pd.Series) -> str:
            picked = ""
            if m.startswith("what_if") and bool(r.get(f"selected_{m}")):
                picked = " " + H.badge("top", "#5e35b1")
            return f"{H.esc(H.fmt(r[m]))}{picked}<br><span class='nice-kit-rank'>#{H.esc(r[f'{m}_rank'])} of {n}</span>"
        return cell

    @staticmethod
    def _prompt_cell(r: pd.Series) -> str:
        """The part of the prompt that tells it from its task's other prompts (the whole in the tooltip)."""
        full = H.fmt(r.get("prompt"))
        return (f'<div class="nice-kit-clamp" title="{H.esc(H.short(full, 600))}">'
                f'{H.esc(H.short(H.fmt(r.get("prompt_core")), 220))}</div>')

    @staticmethod
    def _correct_cell(r: pd.Series) -> str:
        ok = r.get("correct")
        if ok is None or (isinstance(ok, float) and pd.isna(ok)):
            return ""
        return H.badge("✓ right", "#2e7d32") if bool(ok) else H.badge("✗ wrong", "#c62828")

    @staticmethod
    def _picked_cell(r: pd.Series) -> str:
        names = [x for x in str(r.get("selected_by") or "").split("+") if x]
        return " ".join(H.badge(x, BADGE_COLORS.get(x, "#5e35b1")) for x in names)

    @staticmethod
    def _harm_cell(r: pd.Series) -> str:
        harmful = r.get("harmful")
        if harmful is None or pd.isna(harmful):
            return ""
        if bool(harmful):
            return H.badge((H.fmt(r.get("harm_kind")) or "yes").replace("_", " "), "#c62828")
        return "no"

    # ----------------------------------------------------------------------------- updates
    def _on_method(self, change=None) -> None:
        if self._updating:
            return
        self._sort = (self.method.value, self.order.value == "top")
        self._refresh()

    def _on_order(self, change=None) -> None:
        if self._updating:
            return
        col, _ = self._sort
        if col in self.methods:
            self._sort = (col, self.order.value == "top")
        else:
            self._sort = (col, not self._sort[1])
        self._refresh()

    def _on_k(self, change=None) -> None:
        self.pager.reset(len(self._table), self.k.value)
        self._render_table()

    def sort_by(self, column: str) -> None:
        """What a click on a header does: sort by ``column`` (scores highest first, text A-Z), or
        reverse the order when the table is already sorted by it."""
        if column not in self.frame.columns:
            raise KeyError(f"no column {column!r} to sort by")
        col, descending = self._sort
        if column == col:
            descending = not descending
        else:
            descending = column in self.methods or column in ("harmful", "selected_by")
        self._sort = (column, descending)
        self._updating = True
        try:
            if column in self.methods:
                self.method.value = column
                self.order.value = "top" if descending else "bottom"
        finally:
            self._updating = False
        self._refresh()

    def _refresh(self, change=None) -> None:
        self._table = self.filtered()
        self.pager.reset(len(self._table), self.k.value)
        keep = self._selected if self._selected in set(self._table["id"]) else (
            self._table["id"].iloc[0] if len(self._table) else None)
        col, descending = self._sort
        what = "highest" if descending else "lowest"
        if col not in self.methods:
            what = "Z-A" if descending else "A-Z"
        self.status.value = H.muted(
            f"{len(self._table)} of {len(self.frame)} examples match; sorted by <b>{H.esc(col)}</b> ({what} first). "
            f"Selected = the top {self.fraction:.0%} of the pool by each score (the run's selection). "
            "Click a row or a point to read the example, a header to sort.")
        m = self.method.value
        with self.hist.batch_update():
            self.hist.data[0].x = self.frame[m].tolist()
            self.hist.data[0].name = f"pool ({len(self.frame)})"
            self.hist.data[1].x = self._table[m].tolist()
            self.hist.data[1].name = f"filtered ({len(self._table)})"
            self.hist.data[1].marker.color = series_color(m)
            self.hist.layout.title.text = f"{m.upper()} influence scores of {len(self.frame)} pool examples"
            self.hist.layout.xaxis.title.text = f"{m} influence score (cosine)"
        if self.scatter is not None:
            self._update_scatter()
        self._show(keep)

    def _update_scatter(self) -> None:
        sub, f = self._table, self.frame
        rest = f[~f["id"].isin(set(sub["id"]))]
        with self.scatter.batch_update():
            t = self.scatter.data[0]
            t.x, t.y, t.customdata = rest["less"].tolist(), rest["nice"].tolist(), rest["id"].tolist()
            t.showlegend = len(rest) > 0
            for trace, (_, df) in zip(self.scatter.data[1:-1], scatter_groups_like(f, sub)):
                trace.x, trace.y = df["less"].tolist(), df["nice"].tolist()
                trace.customdata, trace.text = df["id"].tolist(), hover_text(df)
            self.scatter.layout.title.text = scatter_title(sub, "less", "nice")

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
        return f"#{r[f'{m}_rank']} {r['id']}{task} {m}={H.fmt(r[m])} · {H.short(r.get('prompt_core', r['prompt']), 60)}"

    def _on_select(self, change) -> None:
        if not self._updating and change["new"] is not None:
            self._show(change["new"])

    def _on_scatter_click(self, trace, points, state=None) -> None:
        if not points.point_inds:
            return
        rid = trace.customdata[points.point_inds[0]]
        self.select_example(str(rid))

    def select_example(self, rid: str) -> None:
        """Show example ``rid`` (what a row click or a scatter click does); it stays selected when the
        filters hide it from the table."""
        if rid not in set(self.frame["id"]):
            raise KeyError(f"no pool example with id {rid!r}")
        self._show(rid)

    def _render_table(self) -> None:
        self.table_view.html = self.table_html()
        self._sync_select()
        self.refresh_fallback()

    def table_html(self) -> str:
        """The shown page of the table as HTML (what the live table and the static copy show)."""
        return H.table(self.shown, self.columns(), selected=self._selected, max_chars=220, sort=self._sort,
                       clickable=True)

    def _sync_select(self) -> None:
        self._updating = True
        try:
            self.select.options = self._options(self.shown, self._selected)
            self.select.value = self._selected
        finally:
            self._updating = False

    def _show(self, rid: str | None) -> None:
        self._selected = rid
        self.table_view.html = self.table_html()
        self._sync_select()
        self.detail.value = self.detail_html(rid)
        m = self.method.value
        with self.hist.batch_update():
            shapes, notes = histogram_marks(self.frame, m, rid, self.cutoffs[m], self.fraction, self.theme)
            self.hist.layout.shapes = shapes
            self.hist.layout.annotations = notes
        if self.scatter is not None:
            sel = self.frame[self.frame["id"] == rid]
            with self.scatter.batch_update():
                self.scatter.data[-1].x = sel["less"].tolist()
                self.scatter.data[-1].y = sel["nice"].tolist()
                self.scatter.data[-1].customdata = sel["id"].tolist()
        self._update_why()
        self._render_panels()
        self.refresh_fallback()

    def detail_html(self, rid: str | None) -> str:
        if rid is None:
            return "<i>no example matches the filters</i>"
        r = self.frame[self.frame["id"] == rid].iloc[0]
        rec = pool_record(self.pipeline, rid)
        n = len(self.frame)
        scores = " · ".join(f"<b>{H.esc(m)}</b> {H.fmt(r[m])} (rank {r[f'{m}_rank']} of {n})" for m in self.methods)
        picked = r.get("selected_by") or ""
        picked_txt = (f"selected by {H.esc(picked.replace('+', ' and '))}" if picked
                      else f"not in any method's top {self.fraction:.0%}")
        flags = []
        for c in FLAG_COLUMNS:
            if c in r and H.fmt(r[c]) != "":
                flags.append(f"{c}: <b>{H.esc(H.fmt(r[c]))}</b>")
        if "correct" in r and r["correct"] is not None and not (isinstance(r["correct"], float) and pd.isna(r["correct"])):
            answer = rec.columns.get("answer")
            flags.append(f"response: <b>{'right' if r['correct'] else 'wrong'}</b> (answer {H.esc(H.fmt(answer))})")
        harm = ""
        if "harmful" in r and pd.notna(r["harmful"]) and bool(r["harmful"]):
            harm = " " + H.badge(f"harmful: {H.fmt(r.get('harm_kind')) or 'yes'}", "#c62828")
        chat = ""
        if len(rec.messages) > 1:
            chat = "".join(f"<div><b>{H.esc(m['role'])}</b></div>{H.pre(m['content'])}" for m in rec.messages[:-1])
        return (f"<div class='nice-explorer-text'><div><b>{H.esc(rid)}</b>{harm} {self._picked_cell(r)} "
                f"{H.muted(picked_txt)}</div><div>{scores}</div><div class='nice-kit-muted'>{' · '.join(flags)}</div>"
                f"{chat}<div><b>prompt</b></div>{H.pre(rec.prompt)}<div><b>response</b></div>{H.pre(rec.response or '')}</div>")

    # ------------------------------------------------------------------------ what-if
    def add_what_if(self, what_if: Any, name: str = "what_if") -> str:
        """Show a what-if's NICE scores (:func:`nice_kit.whatif.what_if`, e.g. from the metric
        picker) as a column ``name`` beside the run's scores: its score and rank per example, "top" on
        the examples of its selection; it can be sorted by, plotted and filtered on ("selected" = its
        top fraction). Adding one under the same name replaces it. Returns the column's name."""
        if not name.startswith("what_if"):
            raise ValueError(f"a what-if column's name starts with 'what_if', not {name!r}")
        scores = what_if.scores.set_index("id")["what_if"]
        f = self.frame
        f[name] = f["id"].map(scores).astype(float)
        f[f"{name}_rank"] = f[name].rank(ascending=False, method="first").astype("Int64")
        f[f"selected_{name}"] = f["id"].isin(set(what_if.selected))
        self.what_ifs[name] = what_if
        if name not in self.methods:
            self.methods.append(name)
        self.cutoffs[name] = float(f.loc[f[f"selected_{name}"], name].min()) if f[f"selected_{name}"].any() else float("nan")
        self._updating = True
        try:
            self.method.options = self.methods
            self.method.value = self._sort[0] if self._sort[0] in self.methods else self.methods[0]
            if name.upper() not in self.picked.options:
                self.picked.options = list(self.picked.options) + [name.upper()]
        finally:
            self._updating = False
        self._refresh()
        return name

    # ------------------------------------------------------------------------ export
    def export(self, path: str | Path | None = None) -> Path:
        """Write the filtered view (:attr:`table`: the rows that pass the filters, in its order) as
        JSONL chat records (:mod:`nice_kit.export`) to ``path`` (default: the path box, under the
        run's ``exports/``); what the export button does. Returns the path."""
        from nice_kit.export import selection_records, to_jsonl

        path = Path(path or self.export_path.value)
        try:
            out = to_jsonl(selection_records(self.pipeline, self._table), path)
        except Exception as err:  # noqa: BLE001 - shown beside the button, then raised to a caller
            self.export_status.value = f"<span class='nice-kit-error'>export failed: {H.esc(err)}</span>"
            raise
        self.export_status.value = H.muted(f"wrote {len(self._table)} examples to {H.esc(out)}")
        return out

    def _on_export(self) -> None:
        try:
            self.export()
        except Exception:  # noqa: BLE001 - the reason is shown beside the button
            pass
        self.refresh_fallback()

    def to_dataset(self):
        """The filtered view as a ``datasets.Dataset`` with a ``messages`` column (for TRL's
        SFTTrainer; needs the optional ``datasets`` package, see :func:`nice_kit.export.to_dataset`)."""
        from nice_kit.export import selection_records, to_dataset

        return to_dataset(selection_records(self.pipeline, self._table))

    # ------------------------------------------------------------------------ why panel
    def _update_why(self, force: bool = False) -> None:
        """Redraw the why panel for the selected example and method (when open, and when either
        changed): only stored vectors are read, never the model; errors are shown in the panel."""
        if not self.why_toggle.value:
            return
        rid, m = self._selected, self.method.value
        m = m if m in self.run_methods else ("nice" if "nice" in self.run_methods else self.run_methods[0])
        if rid is not None and not force and self.why.shown == (rid, m) and self.why.explanation is not None:
            return
        self._drawing_why = True
        try:
            if rid is None:
                self.why.clear("no example matches the filters")
            else:
                self.why.show(rid, m, compute=False, raise_errors=False)
        finally:
            self._drawing_why = False

    def _on_why_change(self) -> None:
        """The panel redrew by itself (a prompt chosen, a bar clicked, completions computed)."""
        if not self._drawing_why:
            self.refresh_fallback()

    def _on_why_toggle(self, change) -> None:
        self.why.layout.display = None if change["new"] else "none"
        self._update_why()
        self.refresh_fallback()

    def _why_html(self) -> str:
        if not self.why_toggle.value:
            return ""
        return f"<div class='nice-kit-title'>why this score?</div>{self.why.fallback_body()}"

    # --------------------------------------------------------------------------- panels
    def add_panel(self, title: str, render: Callable[[str, str], Any]) -> DetailPanel:
        """Add a view of the selected example under its text: ``render(example_id, method)`` returns a
        DataFrame, a plotly Figure, HTML, or a list of those; it is redrawn on every selection and
        is part of the static copy."""
        panel = DetailPanel(title, render)
        self.panels.append(panel)
        self._render_panels()
        self.refresh_fallback()
        return panel

    def _panel_parts(self, panel: DetailPanel) -> list[Any]:
        if self._selected is None:
            return []
        try:
            out = panel.render(self._selected, self.method.value)
        except Exception as err:  # a panel's failure is shown, not raised into the widget's callbacks
            return [f"<span class='nice-kit-error'>{H.esc(type(err).__name__)}: {H.esc(err)}</span>"]
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _render_panels(self) -> None:
        children = []
        for panel in self.panels:
            children.append(w.HTML(f"<div class='nice-kit-title'>{H.esc(panel.title)}</div>"))
            for part in self._panel_parts(panel):
                if isinstance(part, go.Figure):
                    children.append(go.FigureWidget(_theme.apply(go.Figure(part), self.theme)))
                else:
                    children.append(w.HTML(self._part_html(part)))
        self.panel_box.children = children

    @staticmethod
    def _part_html(part: Any) -> str:
        if isinstance(part, pd.DataFrame):
            return H.table(part, list(part.columns), key="", max_chars=120)
        return str(part)

    def _panels_html(self) -> str:
        out = []
        for panel in self.panels:
            out.append(f"<div class='nice-kit-title'>{H.esc(panel.title)}</div>")
            for part in self._panel_parts(panel):
                if isinstance(part, go.Figure):
                    out.append(figure_html(_theme.apply(go.Figure(part), self.theme)))
                else:
                    out.append(self._part_html(part))
        return "".join(out)

    # ----------------------------------------------------------------------------- theme
    def set_theme(self, theme: str) -> None:
        """Redraw the figures for "light" or "dark" (the page's theme, when ``theme="auto"``)."""
        theme = _theme.check_theme(theme) or "light"
        if theme == self.theme:
            return
        self.theme = theme
        for fig in (self.hist, self.scatter):
            if fig is not None:
                with fig.batch_update():
                    _theme.apply(fig, theme)
        if self.scatter is not None:
            with self.scatter.batch_update():
                self.scatter.data[0].marker.color = FILTERED_OUT[theme]
                self.scatter.data[-1].marker.color = selected_color(theme)
        self._drawing_why = True
        try:
            self.why.set_theme(theme)
        finally:
            self._drawing_why = False
        self._show(self._selected)

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        """The NICE-vs-LESS scatter (or the score histogram when only one method ran), as a static
        Figure showing what the widget shows (filters, cutoffs, the selected example)."""
        if self.has_scatter:
            return influence_scatter(self.frame, selected=self._selected, subset=self._table, cutoffs=self.cutoffs,
                                     fraction=self.fraction, theme=self.theme)
        return self.histogram()

    def histogram(self) -> go.Figure:
        m = self.method.value
        return score_histogram(self.frame, m, self._table, self._selected, cutoff=self.cutoffs[m],
                               fraction=self.fraction, theme=self.theme)

    def fallback_body(self) -> str:
        filters = [f"{c.description}: {H.esc(c.value)}" for c in (self.task, self.flag, self.picked)
                   if c.value != ALL]
        if self.search.value.strip():
            filters.append(f"search: “{H.esc(self.search.value.strip())}”")
        col, descending = self._sort
        lo = self.pager.slice().start
        head = (f"<div><span class='nice-kit-title'>Influence explorer</span> {H.muted(H.esc(self.pipeline.run_dir))}</div>"
                f"<div>{len(self._table)} of {len(self.frame)} examples"
                f"{' (' + '; '.join(filters) + ')' if filters else ''}, sorted by {H.esc(col)} "
                f"({'descending' if descending else 'ascending'}); rows {lo + 1 if len(self._table) else 0}–"
                f"{lo + len(self.shown)}</div>")
        plots = figure_html(self.histogram())
        if self.has_scatter:
            plots += figure_html(self.figure())
        return (head + self.table_html() + self.detail_html(self._selected) + self._why_html() + self._panels_html()
                + f"<div style='display:flex; flex-wrap:wrap; gap:8px'>{plots}</div>")

