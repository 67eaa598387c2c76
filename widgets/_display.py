"""How the widgets live in a notebook, with a kernel and without one.

* :class:`LiveFallback`: displaying a widget writes two outputs: the live widget, and a static HTML
  copy of what it shows (tables, text, figures). The copy is hidden while the live widget is on the
  page, and is *refreshed on every interaction* (``update_display_data``), so a notebook saved,
  exported or opened on GitHub shows the state the user left, not the state the cell first printed.
* Figures in that copy (and figures shown with ``fig.show()`` once :mod:`widgets` is imported) draw
  with a plotly.js bundled *inline* in the notebook, once per kernel: no CDN, so they render offline.
* :class:`ClickTable`: an HTML table whose row clicks and header clicks reach Python.
* :class:`Pager`: previous / next over a long table.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import anywidget
import ipywidgets as w
import plotly.graph_objects as go
import plotly.io as pio
import traitlets

from . import _html as H

OFFLINE_RENDERER = "nice_kit_offline"
_PLOTLYJS_SHOWN = False

try:  # plotly's renderer for classic notebooks and nbconvert: plotly.js inline, once per kernel
    from plotly.io._base_renderers import NotebookRenderer as _NotebookRenderer
except ImportError:  # pragma: no cover - plotly moved it; figures then keep plotly's own renderers
    _NotebookRenderer = None


if _NotebookRenderer is not None:
    class OfflineNotebookRenderer(_NotebookRenderer):
        """plotly's ``notebook`` renderer (plotly.js inlined once, when first used) without the
        MathJax CDN script it adds to every figure: the HTML of a figure needs no network."""

        def __init__(self) -> None:
            super().__init__(connected=False)

        def activate(self) -> None:
            """Inline plotly.js once per kernel. plotly activates a renderer again for every figure
            shown as a cell's value (``_repr_mimebundle_``), which would add 4.8 MB each time."""
            global _PLOTLYJS_SHOWN
            if _PLOTLYJS_SHOWN:
                return
            _PLOTLYJS_SHOWN = True
            super().activate()

        def to_mimebundle(self, fig_dict):
            html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                               full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html}


def use_offline_renderer() -> bool:
    """In a Jupyter kernel whose plotly renderer is plotly's default (``plotly_mimetype``: drawn by
    JupyterLab only, blank in exported HTML), add :data:`OFFLINE_RENDERER` so that ``fig.show()``
    also writes HTML that renders with no network. A renderer chosen by the user (or by
    ``PLOTLY_RENDERER``) is left alone. Returns whether the renderer is in use."""
    if _NotebookRenderer is None:
        return False
    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = OfflineNotebookRenderer()
    if pio.renderers.default == "plotly_mimetype" and not os.environ.get("PLOTLY_RENDERER"):
        pio.renderers.default = f"plotly_mimetype+{OFFLINE_RENDERER}"
    return OFFLINE_RENDERER in str(pio.renderers.default).split("+")


def plotlyjs_html() -> str:
    """plotly.js itself, as a script that defines ``window.Plotly``."""
    from plotly.offline import get_plotlyjs

    return ("<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script>")


def ensure_plotlyjs() -> None:
    """Put plotly.js in the notebook once per kernel (the figures of the static copies need it):
    through plotly's pending notebook renderer when it has one (so ``fig.show()`` does not add a
    second copy), else as an output of its own."""
    global _PLOTLYJS_SHOWN
    if _PLOTLYJS_SHOWN:
        return
    from IPython.display import HTML, display

    if _NotebookRenderer is not None:
        names = str(pio.renderers.default or "").split("+")
        if OFFLINE_RENDERER in names:
            pio.renderers[OFFLINE_RENDERER].activate()  # sets _PLOTLYJS_SHOWN
            return
        defaults = [pio.renderers[n] for n in names if n in pio.renderers]
        offline = [r for r in defaults if isinstance(r, _NotebookRenderer) and not r.connected]
        if offline:  # plotly's own "notebook" renderer, chosen by the user
            _PLOTLYJS_SHOWN = True
            pending = [r for r in getattr(pio.renderers, "_to_activate", []) if r in offline]
            if pending and hasattr(pio.renderers, "_activate_pending_renderers"):
                pio.renderers._activate_pending_renderers(cls=_NotebookRenderer)
            return  # activated now, or already by an earlier fig.show()
    _PLOTLYJS_SHOWN = True
    display(HTML(plotlyjs_html()))


def figure_html(fig: go.Figure, height: int | None = None) -> str:
    """A figure as HTML that draws with the page's plotly.js (inline, see :func:`ensure_plotlyjs`),
    waiting for it when the figure comes first on the page; not drawn while hidden (the static copy
    of a live widget), so refreshing the copy costs the page nothing."""
    div = f"nice-kit-fig-{uuid.uuid4().hex[:12]}"
    h = height or int(fig.layout.height or 400)
    spec = pio.to_json(fig, validate=False).replace("</", "<\\/")
    return (f'<div id="{div}" class="plotly-graph-div" style="height:{h}px; width:100%; max-width:{fig.layout.width or 900}px">'
            f"</div><script type=\"text/javascript\">(function(){{var spec={spec}, tries=0;"
            "var draw=function(){var gd=document.getElementById('" + div + "'); if(!gd){return;}"
            "if(!gd.getClientRects().length){return;}"  # hidden (the live widget is on the page): nothing to draw
            "if(window.Plotly){window.Plotly.newPlot(gd, spec.data, spec.layout, {responsive: true, displaylogo: false});}"
            "else if(tries++ < 600){setTimeout(draw, 100);}}; draw();})();</script>")


class LiveFallback:
    """Mixin for the widgets: a static copy of the widget beside the live view, kept up to date.

    Subclasses implement :meth:`fallback_body` (HTML, using :func:`figure_html` for figures) and call
    :meth:`refresh_fallback` after every change of what they show.
    """

    def fallback_body(self) -> str:  # pragma: no cover - every widget overrides it
        raise NotImplementedError

    def _fallback_class(self) -> str:
        """A class name unique to this widget (its static copy and the style hiding it share it)."""
        return "nice-kit-fallback-" + self.__dict__.setdefault("_fallback_token", uuid.uuid4().hex[:16])

    def fallback_html(self) -> str:
        """The static copy: what the widget shows now, as HTML with its figures."""
        note = ("<div class='nice-kit-fallback-note'>static copy of the widget as last seen (run the notebook "
                "for the live widget)</div>")
        return f'{H.STYLE}<div class="nice-kit-fallback {self._fallback_class()}">{note}{self.fallback_body()}</div>'

    def hide_fallback_style(self) -> str:
        """CSS that hides this widget's static copy while the live widget is on the page."""
        cls = self._fallback_class()
        return (f"<style>.{cls} {{display: none;}} .jp-OutputArea-child:has(.{cls}) {{display: none;}}"
                f" .output_area:has(.{cls}) {{display: none;}}</style>")

    def _repr_html_(self) -> str:
        return self.fallback_html()

    def _fallback_bundle(self) -> dict[str, str]:
        return {"text/html": self.fallback_html(), "text/plain": f"<{type(self).__name__}: static copy>"}

    def _ipython_display_(self, **kwargs: Any) -> None:
        """Display the live widget, then its static copy (with a display id, refreshed later)."""
        from IPython.display import display

        ensure_plotlyjs()
        display(self._repr_mimebundle_(**kwargs), raw=True)
        ids = self.__dict__.setdefault("_fallback_ids", [])
        display_id = f"{self._fallback_class()}-{len(ids)}"
        display(self._fallback_bundle(), raw=True, display_id=display_id)
        ids.append(display_id)

    def refresh_fallback(self) -> None:
        """Replace every displayed static copy with what the widget shows now."""
        ids = self.__dict__.get("_fallback_ids")
        if not ids:
            return
        from IPython.display import update_display

        bundle = self._fallback_bundle()
        for display_id in ids:
            update_display(bundle, raw=True, display_id=display_id)


class ClickTable(anywidget.AnyWidget):
    """An HTML table (``html``, made by :func:`widgets._html.table` with ``clickable=True``) whose row
    clicks (or Enter on a focused row) call ``on_click(key)`` and header clicks ``on_sort(column)``."""

    _esm = """
    function render({ model, el }) {
      const draw = () => { el.innerHTML = model.get("html"); };
      draw();
      model.on("change:html", draw);
      const pick = (tr) => {
        el.querySelectorAll("tr.nice-kit-selected").forEach((r) => r.classList.remove("nice-kit-selected"));
        tr.classList.add("nice-kit-selected");
        model.send({ event: "click", key: tr.dataset.key });
      };
      el.addEventListener("click", (e) => {
        const th = e.target.closest("th[data-sort]");
        if (th && el.contains(th)) { model.send({ event: "sort", column: th.dataset.sort }); return; }
        const tr = e.target.closest("tr[data-key]");
        if (tr && el.contains(tr)) { pick(tr); }
      });
      el.addEventListener("keydown", (e) => {
        const tr = e.target.closest("tr[data-key]");
        if (tr && el.contains(tr) && e.key === "Enter") { pick(tr); }
      });
      return () => model.off("change:html", draw);
    }
    export default { render };
    """
    html = traitlets.Unicode("").tag(sync=True)

    def __init__(self, on_click: Callable[[str], None] | None = None, on_sort: Callable[[str], None] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self._on_click, self._on_sort = on_click, on_sort
        self.on_msg(self._handle)

    def _handle(self, _widget, content: dict, _buffers) -> None:
        event = content.get("event") if isinstance(content, dict) else None
        if event == "click" and self._on_click is not None:
            self._on_click(str(content.get("key")))
        elif event == "sort" and self._on_sort is not None:
            self._on_sort(str(content.get("column")))

    def click(self, key: str) -> None:
        """What a click on the row with ``key`` does (for tests and scripts)."""
        self._handle(self, {"event": "click", "key": key}, [])

    def click_header(self, column: str) -> None:
        """What a click on the header of ``column`` does."""
        self._handle(self, {"event": "sort", "column": column}, [])


class Pager(w.HBox):
    """Previous / next buttons and "rows a-b of n" for a table of ``n`` rows shown ``size`` at a time;
    ``on_change()`` is called when the page changes."""

    def __init__(self, size: int, on_change: Callable[[], None]):
        self.size = max(1, int(size))
        self.page = 0
        self.n = 0
        self._on_change = on_change
        self.prev = w.Button(description="◀", tooltip="previous rows", layout=w.Layout(width="36px"))
        self.next = w.Button(description="▶", tooltip="next rows", layout=w.Layout(width="36px"))
        self.label = w.HTML()
        self.prev.on_click(lambda _: self.go(self.page - 1))
        self.next.on_click(lambda _: self.go(self.page + 1))
        super().__init__([self.prev, self.label, self.next], layout=w.Layout(align_items="center"))
        self.add_class("nice-kit-pager")

    @property
    def pages(self) -> int:
        return max(1, -(-self.n // self.size))

    def reset(self, n: int, size: int | None = None) -> None:
        """A new table of ``n`` rows: back to the first page (does not call ``on_change``)."""
        self.n, self.page = int(n), 0
        if size is not None:
            self.size = max(1, int(size))
        self._draw()

    def go(self, page: int) -> None:
        page = min(max(0, page), self.pages - 1)
        if page != self.page:
            self.page = page
            self._draw()
            self._on_change()

    def slice(self) -> slice:
        return slice(self.page * self.size, (self.page + 1) * self.size)

    def _draw(self) -> None:
        lo, hi = self.page * self.size, min(self.n, (self.page + 1) * self.size)
        self.label.value = H.muted(f"rows {lo + 1}–{hi} of {self.n}" if self.n else "no rows")
        self.prev.disabled = self.page == 0
        self.next.disabled = self.page >= self.pages - 1


def run_in(output, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``output`` (an ipywidgets Output) capturing what it draws (tqdm
    bars), its exception raised to the caller: an Output used as a context manager swallows
    exceptions when an IPython shell exists in the process."""
    failure: list[BaseException] = []
    result = None
    with output:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised below, outside the Output
            failure.append(err)
    if failure:
        raise failure[0]
    return result
