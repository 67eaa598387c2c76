"""Jupyter widgets for nice_kit runs (ipywidgets + plotly FigureWidget).

Every widget takes a live :class:`nice_kit.pipeline.Pipeline` or the path of a run directory::

    from widgets import InfluenceExplorer, MetricPicker, RolloutViewer, WhyPanel, open_run
    InfluenceExplorer("runs/quickstart")     # its "why" panel is a WhyPanel of the selected example
    WhyPanel("runs/quickstart", "pool-0042", "nice")

A selection leaves as JSONL or a ``datasets.Dataset`` through :mod:`nice_kit.export` (the explorer's
export button, or ``selection_records`` / ``to_jsonl`` / ``to_dataset``).

Colours follow JupyterLab's light or dark theme (``theme="light" | "dark" | "auto"``). Displayed in
a notebook, each widget also writes a static copy of itself (tables, text, figures) that follows
every interaction, so a saved, exported or GitHub-rendered notebook shows what the user last saw;
its figures use a plotly.js inlined once in the notebook (no CDN). Importing this package in a
kernel also makes ``fig.show()`` write such offline HTML beside plotly's JupyterLab output (see
:func:`widgets._display.use_offline_renderer`), and makes plotly's default template the theme's, so
that a plain ``fig.show()`` follows the theme too (:func:`widgets._theme.use_theme_template`). The functions in :mod:`widgets.plots` return plain
plotly Figures. nice_kit never imports this package.

Outside a live kernel, what a person sees:

* Exported HTML (nbconvert) and a notebook opened offline: every figure draws from the inline
  plotly.js; each widget's static copy shows the table, text and figures as last left.
* GitHub and other viewers that run no JavaScript: the static copies' tables and text render;
  figures do not (they need JavaScript; a static image would need kaleido, not a dependency).
* JupyterLab after a restart: with "Save Jupyter widget state in notebooks" on (Settings > Jupyter
  Widgets; ``saveState`` of ``@jupyter-widgets/jupyterlab-manager``) the widgets come back from the
  saved state and their static copies stay hidden. With it off (JupyterLab's default), JupyterLab
  itself prints "Error displaying widget: model not found" in place of the widget (no package can
  change that renderer) and the static copy right below it shows the widget's last state.
* Costs: the notebook holds plotly.js once (about 4.8 MB), each ``fig.show()`` output holds its
  figure twice (JupyterLab's plotly output and the offline HTML), and saved widget state includes
  plotly's FigureWidget code per figure widget.
"""

from ._display import ClickTable, Pager, figure_html, use_offline_renderer
from ._run import as_pipeline, load_scores, open_run, pool_frame, selected_ids, spearman
from ._theme import lab_theme, resolve_theme, use_theme_template
from .explorer import DetailPanel, InfluenceExplorer
from .lds import LDSView, evaluation_table, lds_figure, lds_table
from .metric_picker import MetricPicker, param_choices, unavailable_reason
from .plots import (disagreements, influence_scatter, loss_vs_metric, loss_vs_metric_checkpoints,
                    loss_vs_metric_subsets, nice_ticks, rewards_figure, rollout_figure, score_histogram)
from .rollout_viewer import RolloutViewer, policy_summary, weight_explanation
from .why import WhyPanel, why_figure, why_panel

use_offline_renderer()
use_theme_template()

__all__ = [
    "InfluenceExplorer", "MetricPicker", "RolloutViewer", "DetailPanel", "ClickTable", "Pager", "open_run",
    "as_pipeline", "load_scores", "pool_frame", "selected_ids", "spearman", "disagreements", "influence_scatter",
    "loss_vs_metric", "loss_vs_metric_checkpoints", "loss_vs_metric_subsets", "nice_ticks", "rewards_figure",
    "rollout_figure", "score_histogram", "figure_html", "use_offline_renderer", "lab_theme", "resolve_theme", "use_theme_template",
    "param_choices", "unavailable_reason", "policy_summary", "weight_explanation", "WhyPanel", "why_panel",
    "why_figure", "LDSView", "evaluation_table", "lds_figure", "lds_table",
]
