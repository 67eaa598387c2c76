"""Jupyter widgets for nice_kit runs (ipywidgets + plotly FigureWidget).

Every widget takes a live :class:`nice_kit.pipeline.Pipeline` or the path of a run directory::

    from widgets import InfluenceExplorer, MetricPicker, RolloutViewer, open_run
    InfluenceExplorer("runs/quickstart")

Each also has a static fallback (``.figure()`` and ``_repr_html_``) for places where widgets do not
render; the functions in :mod:`widgets.plots` return plain plotly Figures. nice_kit never imports
this package.
"""

from ._run import as_pipeline, load_scores, open_run, pool_frame, spearman
from .explorer import InfluenceExplorer
from .metric_picker import MetricPicker
from .plots import (disagreements, influence_scatter, loss_vs_metric, loss_vs_metric_checkpoints,
                    loss_vs_metric_subsets, rewards_figure, rollout_figure, score_histogram)
from .rollout_viewer import RolloutViewer

__all__ = [
    "InfluenceExplorer", "MetricPicker", "RolloutViewer", "open_run", "as_pipeline", "load_scores", "pool_frame",
    "spearman", "disagreements", "influence_scatter", "loss_vs_metric", "loss_vs_metric_checkpoints",
    "loss_vs_metric_subsets", "rewards_figure", "rollout_figure", "score_histogram",
]
