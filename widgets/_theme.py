"""Light or dark: which JupyterLab theme the widgets are drawn for, and the plotly template of each.

The HTML parts of the widgets take their colours from JupyterLab's CSS variables (``--jp-layout-color0``,
``--jp-ui-font-color1`` ...), so they follow any theme by themselves. Plotly figures cannot read CSS
variables, so each widget picks a template: ``theme="light"`` or ``"dark"`` when given, else the theme
in JupyterLab's user settings (read at start), then the theme the page really shows (reported by a
hidden probe in the widget, and followed when the user switches theme).
"""

from __future__ import annotations

import json
import os
import re
import weakref
from pathlib import Path
from typing import Any

import anywidget
import plotly.graph_objects as go
import plotly.io as pio
import traitlets

THEMES = ("light", "dark")
# JupyterLab's own backgrounds (--jp-layout-color0): figures drawn on them look like part of the page
PAPER = {"light": "#ffffff", "dark": "#111111"}


def check_theme(theme: str | None) -> str | None:
    """``theme`` if it is None, "auto", "light" or "dark" (None for auto), else a ValueError."""
    if theme in (None, "auto"):
        return None
    if theme not in THEMES:
        raise ValueError(f"theme must be 'light', 'dark' or 'auto', not {theme!r}")
    return theme


def _settings_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("JUPYTERLAB_SETTINGS_DIR"):
        dirs.append(Path(os.environ["JUPYTERLAB_SETTINGS_DIR"]))
    config = Path(os.environ.get("JUPYTER_CONFIG_DIR") or Path.home() / ".jupyter")
    dirs.append(config / "lab" / "user-settings")
    return dirs


def _strip_json_comments(text: str) -> str:
    """JupyterLab writes settings as JSON5-ish: drop // and /* */ comments outside strings."""
    pattern = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
    return pattern.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def lab_theme() -> str | None:
    """The theme in JupyterLab's user settings ("light" / "dark"), None when unknown (no settings
    file, or the adaptive theme that follows the operating system)."""
    for folder in _settings_dirs():
        path = folder / "@jupyterlab" / "apputils-extension" / "themes.jupyterlab-settings"
        if not path.exists():
            continue
        try:
            settings = json.loads(_strip_json_comments(path.read_text()))
        except (OSError, ValueError):
            return None
        if settings.get("adaptive-theme"):
            return None
        name = str(settings.get("theme", "JupyterLab Light"))
        return "dark" if "dark" in name.lower() else "light"
    return None


def resolve_theme(theme: str | None = None) -> str:
    """``theme`` when given, else the theme the page last reported (see :func:`follow_page_theme`),
    else the JupyterLab settings' theme, else "light"."""
    reported = _PROBE.theme if _PROBE is not None and _PROBE.theme in THEMES else None
    return check_theme(theme) or reported or lab_theme() or "light"


def template(theme: str) -> go.layout.Template:
    """plotly_white or plotly_dark, with the paper and plot backgrounds of JupyterLab's theme."""
    base = pio.templates["plotly_dark" if theme == "dark" else "plotly_white"]
    t = go.layout.Template(base)
    t.layout.paper_bgcolor = PAPER[theme]
    t.layout.plot_bgcolor = PAPER[theme]
    t.layout.hoverlabel.namelength = -1  # never cut a trace name in the hover box
    return t


def apply(fig: go.Figure, theme: str) -> go.Figure:
    """Set the template of ``fig`` (a Figure or FigureWidget) for ``theme``; returns ``fig``."""
    fig.layout.template = template(theme)
    return fig


class ThemeProbe(anywidget.AnyWidget):
    """An invisible widget that reports the page's theme ("light"/"dark", from the
    ``data-jp-theme-light`` attribute JupyterLab sets on the body) and reports it again whenever the
    user switches theme."""

    _esm = """
    function render({ model, el }) {
      el.style.display = "none";
      const read = () => {
        const flag = document.body.dataset.jpThemeLight;
        const theme = flag === undefined ? "" : (flag === "true" ? "light" : "dark");
        if (theme && model.get("theme") !== theme) {
          model.set("theme", theme);
          model.save_changes();
        }
      };
      read();
      const observer = new MutationObserver(read);
      observer.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light"] });
      return () => observer.disconnect();
    }
    export default { render };
    """
    theme = traitlets.Unicode("").tag(sync=True)


_PROBE: ThemeProbe | None = None
_FOLLOWERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


# the plotly templates ``fig.show()`` of a plain figure uses once widgets is imported (see use_theme_template)
TEMPLATE_NAMES = {"light": "nice_kit_light", "dark": "nice_kit_dark"}
_FOLLOW_TEMPLATE = False


def use_theme_template(theme: str | None = None) -> str:
    """Make plotly's default template JupyterLab's theme (``theme``, else :func:`resolve_theme`), so
    that a static ``fig.show()`` of a figure built without a template follows the theme as the
    widgets' figures do; from then on it follows the page's theme when a widget's probe reports a
    switch (re-run the cell to redraw a figure already shown). A default template the user chose
    (other than plotly's own) is left alone. Returns the template's name."""
    global _FOLLOW_TEMPLATE
    for name, key in TEMPLATE_NAMES.items():
        pio.templates[key] = template(name)
    current = pio.templates.default
    if current not in ("plotly", *TEMPLATE_NAMES.values()):
        return current
    _FOLLOW_TEMPLATE = True
    pio.templates.default = TEMPLATE_NAMES[resolve_theme(theme)]
    return pio.templates.default


def _tell_followers(change: dict) -> None:
    theme = change.get("new")
    if theme in THEMES and _FOLLOW_TEMPLATE and pio.templates.default in TEMPLATE_NAMES.values():
        pio.templates.default = TEMPLATE_NAMES[theme]
    if theme in THEMES:
        for widget in list(_FOLLOWERS):
            widget.set_theme(theme)


def follow_page_theme(widget: Any) -> ThemeProbe:
    """The kernel's one :class:`ThemeProbe` (one widget model, however many widgets show it), with
    ``widget.set_theme(theme)`` called whenever the page's theme changes. Returns the probe, for the
    widget to include among its children. The probe holds no strong reference to ``widget``."""
    global _PROBE
    if _PROBE is None:
        _PROBE = ThemeProbe()
        _PROBE.observe(_tell_followers, names="theme")
    _FOLLOWERS.add(widget)
    return _PROBE


def page_probe() -> ThemeProbe | None:
    """The probe shared by the widgets that follow the page's theme (None before the first)."""
    return _PROBE
