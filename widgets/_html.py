"""Small HTML helpers shared by the widgets (escaped text, tables, coloured numbers).

Every colour comes from JupyterLab's theme variables (with light fallbacks for pages without them:
GitHub, exported HTML), or is a translucent tint that reads on light and dark backgrounds alike.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

STYLE = """
<style>
.nice-kit, .nice-kit-fallback {color: var(--jp-ui-font-color1, #1f1f1f); font-family: var(--jp-ui-font-family, sans-serif);
  font-size: var(--jp-ui-font-size1, 13px);}
.nice-kit .widget-html-content, .nice-kit-fallback {line-height: 1.45;}
.nice-kit-muted {color: var(--jp-ui-font-color2, #5f5f5f);}
.nice-kit-error {color: var(--jp-error-color1, #d32f2f);}
.nice-kit-title {font-weight: 600; color: var(--jp-ui-font-color0, #000);}
.nice-kit-table {border-collapse: collapse; font-size: 12px; font-family: var(--jp-ui-font-family, sans-serif);
  color: var(--jp-content-font-color1, #1f1f1f); background: var(--jp-layout-color0, #fff); width: 100%;
  table-layout: fixed; line-height: 1.35;}
.nice-kit-table.nice-kit-table th, .nice-kit-table.nice-kit-table td {border: none;
  border-bottom: 1px solid var(--jp-border-color2, #e0e0e0); padding: 3px 5px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; max-width: none;}
.nice-kit-table th {background: var(--jp-layout-color2, #eeeeee); color: var(--jp-ui-font-color1, #1f1f1f);
  position: sticky; top: 0; z-index: 1; font-weight: 600; overflow-wrap: normal; word-break: normal;}
.nice-kit-table th.nice-kit-sortable {cursor: pointer; user-select: none;}
.nice-kit-table th.nice-kit-sortable:hover {background: var(--jp-layout-color3, #bdbdbd);}
.nice-kit-table th.nice-kit-sorted-desc::after {content: " \\25BC"; font-size: 9px;}
.nice-kit-table th.nice-kit-sorted-asc::after {content: " \\25B2"; font-size: 9px;}
.nice-kit-table tbody tr.nice-kit-clickable {cursor: pointer;}
.nice-kit-table tbody tr.nice-kit-clickable:hover td {background: var(--jp-rendermime-table-row-hover-background, rgba(3,169,244,.15));}
.nice-kit-table tbody tr.nice-kit-selected td {background: rgba(255, 179, 0, .30);}
.nice-kit-table td.nice-kit-num {font-variant-numeric: tabular-nums; white-space: nowrap;}
.nice-kit-clamp {display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden;}
.nice-kit-rank {color: var(--jp-ui-font-color2, #5f5f5f); font-size: 10px;}
.nice-kit-pre {white-space: pre-wrap; word-break: break-word; font-family: var(--jp-code-font-family, monospace);
  font-size: 12px; color: var(--jp-content-font-color1, #1f1f1f); background: var(--jp-cell-editor-background, #f5f5f5);
  border: 1px solid var(--jp-border-color2, #e0e0e0); padding: 6px; margin: 2px 0 8px 0; max-height: 18em; overflow: auto;
  line-height: 1.35;}
.nice-kit-badge {display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11px; color: #fff; max-width: 100%;
  line-height: 1.5; overflow-wrap: anywhere;}
.nice-kit-explain {color: var(--jp-ui-font-color1, #1f1f1f); background: var(--jp-layout-color1, #fafafa);
  border-left: 3px solid var(--jp-brand-color1, #1976d2); padding: 3px 8px; margin: 4px 0;}
.nice-kit-fallback-note {color: var(--jp-ui-font-color2, #5f5f5f); font-size: 11px; font-style: italic;}
</style>
"""

# Translucent tints: readable under light and dark text alike.
POSITIVE = "rgba(44,160,44,{a:.2f})"
NEGATIVE = "rgba(214,39,40,{a:.2f})"


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def short(text: Any, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    try:
        if pd.isna(x):
            return ""
    except (TypeError, ValueError):
        pass
    return str(x)


def badge(text: str, color: str) -> str:
    return f'<span class="nice-kit-badge" style="background:{color}">{esc(text)}</span>'


def weight_color(w: float, scale: float) -> str:
    """Green for positive, red for negative weights, intensity by size relative to ``scale``;
    transparent for zero (the theme's background shows through)."""
    if not w or not scale:
        return "transparent"
    a = min(1.0, abs(w) / scale) * 0.45 + 0.15
    return (POSITIVE if w > 0 else NEGATIVE).format(a=a)


@dataclass
class Column:
    """One column of :func:`table`: the DataFrame column, its header, width and how a cell is drawn."""

    name: str
    label: str | None = None
    width: str | None = None  # CSS width, e.g. "70px" or "18%"
    cell: Callable[[pd.Series], str] | None = None  # row -> cell HTML (escaped); default: the value
    numeric: bool = False
    long: bool = False  # wrapped, at most three lines (the full text in the tooltip)
    sortable: bool = True


def table(df: pd.DataFrame, columns: list[str] | list[Column], selected: str | None = None, css_class: str = "",
          max_chars: int = 80, key: str = "id", sort: tuple[str, bool] | None = None, clickable: bool = False) -> str:
    """An HTML table of ``df``. ``columns`` are names or :class:`Column` specs; the row whose ``key``
    equals ``selected`` is highlighted; ``sort`` = (column, descending) marks the sorted header;
    ``clickable`` rows carry ``data-key`` (the table widget turns a click into a selection)."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    colgroup = "".join(f'<col style="width:{c.width}">' if c.width else "<col>" for c in cols)
    head = []
    for c in cols:
        classes = []
        if clickable and c.sortable:
            classes.append("nice-kit-sortable")
        if sort is not None and sort[0] == c.name:
            classes.append("nice-kit-sorted-desc" if sort[1] else "nice-kit-sorted-asc")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        data = f' data-sort="{esc(c.name)}" title="sort by {esc(c.label or c.name)}"' if clickable and c.sortable else ""
        head.append(f"<th{cls}{data}>{esc(c.label or c.name)}</th>")
    rows = []
    for _, r in df.iterrows():
        classes = []
        if clickable:
            classes.append("nice-kit-clickable")
        if selected is not None and r.get(key) == selected:
            classes.append("nice-kit-selected")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        data = f' data-key="{esc(r.get(key))}" tabindex="0"' if clickable else ""
        cells = []
        for c in cols:
            if c.cell is not None:
                inner = c.cell(r)
            elif c.long:
                full = fmt(r.get(c.name))
                inner = f'<div class="nice-kit-clamp" title="{esc(short(full, 600))}">{esc(short(full, max_chars))}</div>'
            else:
                inner = breakable(short(fmt(r.get(c.name)), max_chars))
            td_cls = ' class="nice-kit-num"' if c.numeric else ""
            cells.append(f"<td{td_cls}>{inner}</td>")
        rows.append(f"<tr{cls}{data}>{''.join(cells)}</tr>")
    return (f'<table class="nice-kit-table {css_class}"><colgroup>{colgroup}</colgroup><thead><tr>{"".join(head)}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def breakable(text: Any) -> str:
    """Escaped ``text`` that may wrap after an underscore, dash or slash (identifiers like
    ``letter_counting`` or ``val-basic_arithmetic-001`` wrap there, not mid-word)."""
    return re.sub(r"([_/-])", r"\1<wbr>", esc(text))


def pre(text: Any) -> str:
    return f'<div class="nice-kit-pre">{esc(text)}</div>'


def muted(text_html: str) -> str:
    return f'<span class="nice-kit-muted">{text_html}</span>'
