"""Small HTML helpers shared by the widgets (escaped text, tables, coloured numbers)."""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

STYLE = """
<style>
.nice-kit-table {border-collapse: collapse; font-size: 12px; font-family: var(--jp-ui-font-family, sans-serif);}
.nice-kit-table th, .nice-kit-table td {border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: left;
  vertical-align: top;}
.nice-kit-table th {background: #f3f3f3; position: sticky; top: 0;}
.nice-kit-nowrap td, .nice-kit-nowrap th {white-space: nowrap;}
.nice-kit-table tr.nice-kit-selected td {background: #fff3c4;}
.nice-kit-pre {white-space: pre-wrap; word-break: break-word; font-family: var(--jp-code-font-family, monospace);
  font-size: 12px; background: #f7f7f7; border: 1px solid #e2e2e2; padding: 6px; margin: 2px 0 8px 0;}
.nice-kit-badge {display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11px; color: white;}
</style>
"""


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
    """Green for positive, red for negative weights, intensity by size relative to ``scale``."""
    if not w or not scale:
        return "#eeeeee"
    a = min(1.0, abs(w) / scale) * 0.75 + 0.15
    return f"rgba(44,160,44,{a:.2f})" if w > 0 else f"rgba(214,39,40,{a:.2f})"


def table(df: pd.DataFrame, columns: list[str], selected: str | None = None, css_class: str = "",
          max_chars: int = 80, key: str = "id") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = []
    for _, r in df.iterrows():
        cls = ' class="nice-kit-selected"' if selected is not None and r.get(key) == selected else ""
        cells = "".join(f"<td>{esc(short(fmt(r[c]), max_chars))}</td>" for c in columns)
        rows.append(f"<tr{cls}>{cells}</tr>")
    return (f'<table class="nice-kit-table {css_class}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def pre(text: Any) -> str:
    return f'<div class="nice-kit-pre">{esc(text)}</div>'
