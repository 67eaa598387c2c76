"""MetricPicker: choose a registered reward metric and its parameters, and see it score real rollouts."""

from __future__ import annotations

import json
import typing
from typing import Any, Callable

import ipywidgets as w
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from nice_kit import metrics as rewards

from . import _html as H
from . import _theme
from ._display import LiveFallback, Pager, figure_html, run_in
from ._run import (RunLike, adopt_what_if, as_pipeline, available_columns, checkpoints, harmful_share, is_label_free,
                   model_problem, pool_labels, rescore, rollouts, run_metric, target_labels, what_if)
from .plots import rewards_figure

ALL = "(all prompts)"
# what a what-if changes besides the metric: the run's policy, or one of these (dotted settings)
POLICY_PRESETS: dict[str, dict[str, Any]] = {
    "the run's policy": {},
    "no baseline": {"policy.baseline": "none"},
    "leave-one-out baseline": {"policy.baseline": "loo"},
    "the reference's estimator": {"policy.estimator": "reference", "policy.variant": "vanilla",
                                  "policy.baseline": "none", "policy.token_normalize": False},
}

# Parameters with a fixed set of values, for metrics whose registry entry does not declare them
# (``MetricInfo.choices``) and whose factory does not annotate them with ``typing.Literal``. Each entry
# is checked against the metric itself by tests/test_widgets.py (every value builds, others fail).
KNOWN_CHOICES: dict[tuple[str, str], tuple[Any, ...]] = {
    ("task_score", "extract"): ("strict", "last_number"),
    ("exact_match", "extract"): ("strict", "last_number"),
    ("code_tests", "mode"): ("partial", "pass_fail"),
    ("humaneval", "mode"): ("partial", "pass_fail"),
}


def param_choices(info) -> dict[str, tuple[Any, ...]]:
    """The parameters of a registered metric that take one of a fixed set of values, and those values:
    from the registry (``info.choices``) when it declares them, else ``Literal[...]`` annotations of the
    factory, else :data:`KNOWN_CHOICES`."""
    out: dict[str, tuple[Any, ...]] = {}
    for (metric, param), values in KNOWN_CHOICES.items():
        if metric == info.name and param in info.params:
            out[param] = tuple(values)
    try:
        hints = typing.get_type_hints(info.factory)
    except Exception:  # unresolvable annotations: no choices from them
        hints = {}
    for param, hint in hints.items():
        if param in info.params and typing.get_origin(hint) is typing.Literal:
            out[param] = tuple(typing.get_args(hint))
    declared = getattr(info, "choices", None) or {}
    out.update({k: tuple(v) for k, v in dict(declared).items() if k in info.params})
    return out


# Metrics that score with a model of their own: the parameters of which one must be set, and what it is.
MODEL_PARAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "reward_model": (("model",), "a reward model: set model (a local folder or a name in the Hugging Face cache)"),
    "llm_judge": (("base_url", "local_model"), "a judge: set base_url (an OpenAI-compatible endpoint) or local_model"),
}


def unavailable_reason(info, params: dict[str, Any], columns: set[str], label_free: bool) -> str | None:
    """Why this run cannot use the metric (None when it can): a reward model or judge with no model
    configured, target columns it reads that the run's records lack, or reference answers in a
    label-free run."""
    if info.name in MODEL_PARAMS:
        keys, what = MODEL_PARAMS[info.name]
        if not any(params.get(k) for k in keys):
            return f"no model configured; it needs {what}"
    needed = info.needed_columns(params) if hasattr(info, "needed_columns") else ()
    missing = [c for c in needed if c not in columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        return f"needs the target column{'s' if len(missing) > 1 else ''} {names}, which this run's records lack"
    if label_free and info.needs_reference:
        return "reads reference answers, and this run is label-free"
    return None


def _short_reason(reason: str) -> str:
    """The gist of :func:`unavailable_reason` for a dropdown's option (the description says it all)."""
    if reason.startswith("no model configured"):
        return "no model configured"
    if reason.startswith("needs the target column"):
        return reason.split(", which")[0].replace("needs the target column", "no target column")
    if "label-free" in reason:
        return "the run is label-free"
    return reason


def _fit_width(chars: int, description: str = "", limit: int = 1000) -> str:
    """A dropdown width that holds a label of ``chars`` characters (JupyterLab's 13 px UI font, at
    most 7.4 px a character) after its ``description``, plus the arrow: no option is cut off."""
    return f"{min(limit, int(7.4 * chars + 7.4 * len(description) + 56))}px"


def _param_widget(name: str, default: Any, value: Any, choices: tuple[Any, ...] | None = None) -> w.Widget:
    style = {"description_width": "initial"}
    layout = w.Layout(width="250px")
    if choices:
        options = list(choices) + ([value] if value not in choices and value is not None else [])
        return w.Dropdown(options=options, value=value if value in options else options[0], description=name,
                          style=style, layout=layout)
    if isinstance(default, bool):
        return w.Checkbox(value=bool(value), description=name, indent=False, style=style)
    if isinstance(default, int):
        return w.IntText(value=int(value), description=name, style=style, layout=layout)
    if isinstance(default, float):
        return w.FloatText(value=float(value), description=name, style=style, layout=layout)
    if isinstance(default, str):
        return w.Text(value=str(value), description=name, style=style, layout=layout, continuous_update=False)
    # None or a structured default: free text, parsed as JSON when it is JSON (numbers, true, lists ...)
    text = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return w.Text(value=text, placeholder="None" if default is None else json.dumps(default), description=name,
                  style=style, layout=layout, continuous_update=False)


def _param_value(default: Any, widget: w.Widget) -> Any:
    v = widget.value
    if isinstance(widget, w.Dropdown) or isinstance(default, (bool, int, float, str)):
        return v
    if v.strip() == "":
        return None
    try:
        return json.loads(v)
    except ValueError:
        return v


class MetricPicker(LiveFallback, w.VBox):
    """Pick a reward metric: a dropdown of the registered metrics (those this run cannot use are
    marked unavailable, with the reason), the chosen one's description, inputs for its parameters
    (a dropdown where the values are a fixed set), and a preview that re-scores a checkpoint's
    sampled completions with it: a paged table (completion, the run's reward, the new score;
    optionally only the rows where they differ), a histogram and a box per prompt.

    "What would NICE select with this?" (``what_if()``) re-selects under the chosen metric and a
    policy preset (``.policy``: the run's, no baseline, leave-one-out, the reference's estimator)
    from stored vectors (:func:`nice_kit.whatif.what_if`, no model): the run's NICE selection and the
    what-if's side by side, their overlap, harmful shares where the pool is flagged, and the largest
    rank moves; with ``explorer=`` the explorer gets a ``what_if`` column. Missing per-completion
    parts are offered to be computed (a button; loads the model). "Adopt" (``adopt()``) makes the
    what-if the run's own through the checked stages (:func:`widgets._run.adopt_what_if`), or says
    why it cannot (no model, or one that does not fit the run) and leaves the run as it was. Reward
    model and judge metrics are marked unavailable until a model is configured in their parameters.

    A metric that fails to build or to score clears the preview and says why. ``.value`` is the
    built metric callable, ``.name`` / ``.params`` the choice and ``.config()`` the ``{"name",
    "params"}`` dict a run config's ``metric`` section takes. ``.preview`` is the scored rollouts
    table (empty when nothing is scored). With ``auto=False`` the preview waits for the "score"
    button, and any change clears the old scores.
    """

    def __init__(self, run: RunLike, name: str | None = None, params: dict[str, Any] | None = None,
                 n_preview: int = 12, auto: bool = True, theme: str | None = "auto", explorer: Any = None):
        self.pipeline = p = as_pipeline(run)
        self.explorer = explorer  # an InfluenceExplorer that shows each what-if as a column
        self._what_if = None
        self._what_if_for: dict[str, Any] | None = None
        self.catalog = rewards.list_metrics()
        names = self.catalog["name"].tolist()
        self.run_metric, run_params = run_metric(p)
        run_name = self.run_metric if self.run_metric in names else None
        name = name or (run_name or names[0])
        if name not in names:
            raise KeyError(f"unknown metric {name!r}; registered: {names}")
        self._run_params = dict(run_params) if run_name else {}
        self._initial = {name: dict(params or (run_params if name == run_name else {}))}
        self.columns_available = available_columns(p)
        self.label_free = is_label_free(p)
        self.n_preview = n_preview
        self._theme_arg = _theme.check_theme(theme)
        self.theme = _theme.resolve_theme(theme)
        self._metric: Callable | None = None
        self._error: str | None = None
        self._unavailable: str | None = None
        self._preview = pd.DataFrame()
        self._scored_for: dict[str, Any] | None = None

        ckpts = checkpoints(p)
        self.rollouts = {c.epoch: rollouts(p, c) for c in ckpts}
        style = {"description_width": "initial"}
        labels = [(self._option_label(n), n) for n in names]
        self.dropdown = w.Dropdown(options=labels, value=name, description="metric", style=style,
                                   layout=w.Layout(width=_fit_width(max(len(t) for t, _ in labels), "metric")))
        self.dropdown.add_class("nice-metric-dropdown")
        self.description = w.HTML()
        self.description.add_class("nice-metric-description")
        self.params_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.checkpoint = w.Dropdown(options=[(f"epoch {c.epoch}", c.epoch) for c in ckpts], value=ckpts[-1].epoch,
                                     description="rollouts of", style=style, layout=w.Layout(width="190px"))
        prompt_ids = list(dict.fromkeys(str(i) for df in self.rollouts.values() for i in df["prompt_id"]))
        self.prompt = w.Dropdown(options=[ALL] + prompt_ids, value=ALL, description="prompt", style=style,
                                 layout=w.Layout(width="260px"))
        self.differs = w.Checkbox(value=False, description="only where it differs from the run's reward", indent=False,
                                  layout=w.Layout(width="300px"))
        self.differs.add_class("nice-metric-differs")
        self.auto = w.Checkbox(value=auto, description="score automatically", indent=False, layout=w.Layout(width="170px"))
        self.button = w.Button(description="score", icon="play", layout=w.Layout(width="90px"))
        self.status = w.HTML()
        self.status.add_class("nice-metric-status")
        self.table_html = w.HTML(layout=w.Layout(max_height="360px", overflow="auto", width="100%"))
        self.table_html.add_class("nice-metric-preview")
        self.pager = Pager(n_preview, self._render_table)
        self.fig = go.FigureWidget(rewards_figure(pd.DataFrame(), "score", metric=name, theme=self.theme,
                                                  title=f"{name}: nothing scored yet").update_layout(width=760, autosize=False))
        self._subplot_titles = [dict(a.to_plotly_json()) for a in self.fig.layout.annotations]
        self.policy = w.Dropdown(options=list(POLICY_PRESETS), value="the run's policy", description="with",
                                 style=style, layout=w.Layout(width=_fit_width(max(map(len, POLICY_PRESETS)), "with")))
        self.policy.add_class("nice-whatif-policy")
        self.policy.observe(self._on_policy, names="value")
        self.whatif_button = w.Button(description="what would NICE select with this?", icon="question",
                                      tooltip="NICE's scores and selection under this metric (and policy), from the "
                                              "stored per-completion gradients: no model, no new samples",
                                      layout=w.Layout(width="auto"))
        self.whatif_button.add_class("nice-whatif-run")
        self.whatif_button.on_click(lambda _: self._on_what_if())
        self.compute_button = w.Button(description="compute the per-completion gradients", icon="cogs",
                                       tooltip="loads the model once; stored for every later what-if",
                                       layout=w.Layout(width="auto", display="none"))
        self.compute_button.add_class("nice-whatif-compute")
        self.compute_button.on_click(lambda _: self._on_what_if(compute=True))
        self.adopt_button = w.Button(description="adopt it: recompute NICE with this", icon="check", disabled=True,
                                     tooltip="writes the config change, NICE's validation gradients, the scores and "
                                             "the selections into the run directory (needs the model)",
                                     layout=w.Layout(width="auto"))
        self.adopt_button.add_class("nice-whatif-adopt")
        self.adopt_button.on_click(lambda _: self._on_adopt())
        self.whatif_status = w.HTML()
        self.whatif_status.add_class("nice-whatif-status")
        self.whatif_progress = w.Output(layout=w.Layout(width="100%"))
        self.whatif_html = w.HTML(layout=w.Layout(width="100%", overflow="auto"))
        self.whatif_html.add_class("nice-whatif-result")
        self._labels = pool_labels(p)
        self._target_labels = target_labels(p)

        self.dropdown.observe(self._on_metric, names="value")
        self.checkpoint.observe(self._maybe_score, names="value")
        self.prompt.observe(lambda _: self._on_view(), names="value")
        self.differs.observe(lambda _: self._on_view(), names="value")
        self.auto.observe(self._maybe_score, names="value")
        self.button.on_click(lambda _: self.score())
        self.probe = _theme.follow_page_theme(self) if self._theme_arg is None else None
        header = w.HTML(H.STYLE + self.hide_fallback_style() + "<span class='nice-kit-title'>Metric picker</span> "
                        + H.muted(f"the run's metric: {H.esc(self.run_metric)}"))
        super().__init__([
            header, *([self.probe] if self.probe else []), self.dropdown, self.description, self.params_box,
            w.HBox([self.checkpoint, self.prompt, self.differs, self.auto, self.button],
                   layout=w.Layout(flex_flow="row wrap", align_items="center")),
            self.status, self.table_html, self.pager, self.fig,
            w.HTML("<div class='nice-kit-title'>What would NICE select with this?</div>"),
            w.HBox([self.policy, self.whatif_button, self.compute_button, self.adopt_button],
                   layout=w.Layout(flex_flow="row wrap", align_items="center")),
            self.whatif_status, self.whatif_progress, self.whatif_html,
        ], layout=w.Layout(width="100%"))
        self.add_class("nice-metric-picker")
        self.add_class("nice-kit")
        self._on_metric()

    # ------------------------------------------------------------------------------ choice
    @property
    def name(self) -> str:
        return self.dropdown.value

    @property
    def info(self):
        return rewards.metric_info(self.name)

    @property
    def params(self) -> dict[str, Any]:
        defaults = self.info.params
        return {k: _param_value(defaults[k], wid) for k, wid in self._param_widgets.items()}

    @property
    def value(self) -> Callable | None:
        """The metric built with the chosen parameters (None, with the error in ``.status``, if it fails
        or the run cannot use it)."""
        if self._metric is None and self._error is None:
            self._build()
        return self._metric

    @property
    def error(self) -> str | None:
        """Why the chosen metric has no scores (failed to build or score, or unavailable), else None."""
        return self._error

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "params": ...}``: the chosen metric as a run config's ``metric`` section
        (parameters left at their defaults are omitted)."""
        defaults = self.info.params
        return {"name": self.name, "params": {k: v for k, v in self.params.items() if v != defaults[k]}}

    @property
    def preview(self) -> pd.DataFrame:
        """The previewed rollouts: epoch, prompt_id, sample, completion, reward (the run's metric) and
        score (the chosen metric; NaN when it failed). Empty before scoring and after a change made
        with automatic scoring off."""
        return self._preview

    @property
    def rows(self) -> pd.DataFrame:
        """The preview rows the table pages through (after the prompt and "differs" filters)."""
        df = self._preview
        if df.empty:
            return df
        if self.prompt.value != ALL:
            df = df[df["prompt_id"] == self.prompt.value]
        if self.differs.value:
            df = df[~np.isclose(df["score"].astype(float), df["reward"].astype(float), rtol=1e-6, atol=1e-9)]
        return df

    def unavailable(self, name: str | None = None, params: dict[str, Any] | None = None) -> str | None:
        """Why this run cannot use metric ``name`` with ``params`` (default: the current choice)."""
        name = name or self.name
        info = rewards.metric_info(name)
        if params is None:
            params = self.params if name == self.name and hasattr(self, "_param_widgets") else info.params
        return unavailable_reason(info, {**info.params, **params}, self.columns_available, self.label_free)

    def _option_label(self, name: str) -> str:
        info = rewards.metric_info(name)
        start = {**info.params, **self._initial.get(name, {})}
        reason = unavailable_reason(info, start, self.columns_available, self.label_free)
        return f"{name} — unavailable: {_short_reason(reason)}" if reason else name

    # ----------------------------------------------------------------------------- updates
    def _on_metric(self, change=None) -> None:
        info = self.info
        needs = H.badge("needs reference answers", "#e65100") if info.needs_reference else H.badge("label-free", "#2e7d32")
        cols = info.needed_columns(info.params) if hasattr(info, "needed_columns") else ()
        reads = H.muted(f" reads: {', '.join(cols)}") if cols else ""
        self._desc = f"<div>{needs} {H.esc(info.description)}{reads}</div>"
        again = self._run_params if self.name == self.run_metric else {}  # back to the run's metric: its settings
        start = {**info.params, **self._initial.pop(self.name, again)}
        choices = param_choices(info)
        self._param_widgets = {k: _param_widget(k, info.params[k], start.get(k), choices.get(k)) for k in info.params}
        for wid in self._param_widgets.values():
            wid.observe(self._maybe_score, names="value")
        self.params_box.children = list(self._param_widgets.values()) or [w.HTML("<i>no parameters</i>")]
        self._maybe_score()

    def _describe(self) -> None:
        reason = self._unavailable
        warn = f"<div class='nice-kit-error'>unavailable for this run: {H.esc(reason)}</div>" if reason else ""
        self.description.value = self._desc + warn

    def _on_policy(self, change=None) -> None:
        self._mark_stale()
        self.refresh_fallback()

    def _mark_stale(self) -> None:
        """A what-if on screen whose settings are no longer the chosen ones cannot be adopted."""
        if getattr(self, "_what_if", None) is not None and self._what_if_for != self.what_if_changes():
            self.adopt_button.disabled = True
            self.whatif_status.value = H.muted("the settings changed since this what-if: ask again to see theirs")

    def _maybe_score(self, change=None) -> None:
        self._mark_stale()
        self._metric, self._error = None, None
        self._unavailable = self.unavailable()
        self._describe()
        if self._unavailable:
            self._fail(f"{self.name} is unavailable for this run: {self._unavailable}")
        elif self.auto.value:
            self.score()
        else:
            self._clear("settings changed: press <b>score</b> to preview" if self._scored_for is not None
                        else "press <b>score</b> to preview")

    def _build(self) -> None:
        if self._unavailable:
            self._metric, self._error = None, f"unavailable: {self._unavailable}"
            return
        try:
            self._metric, self._error = rewards.get_metric(self.name, **self.params), None
        except Exception as err:  # shown to the user: any metric may fail to build
            self._metric, self._error = None, f"{type(err).__name__}: {err}"

    def _base(self) -> pd.DataFrame:
        return self.rollouts[self.checkpoint.value][["epoch", "prompt_id", "sample", "completion", "reward"]].copy()

    def score(self) -> pd.DataFrame:
        """Re-score the chosen checkpoint's rollouts with the chosen metric and redraw the preview; on a
        failure the preview is cleared and the reason shown."""
        self._unavailable = self.unavailable()
        self._describe()
        self._build()
        df = self._base()
        self._scored_for = {"name": self.name, "params": self.params, "epoch": self.checkpoint.value}
        if self._metric is None:
            verb = "is unavailable" if self._unavailable else "could not be built"
            self._fail(f"{self.name} {verb}: {self._error.removeprefix('unavailable: ')}")
            return self._preview
        try:
            df["score"] = rescore(self.pipeline, df, self._metric)
        except Exception as err:  # a metric may need a column or a service this run lacks
            self._error = f"{type(err).__name__}: {err}"
            self._fail(f"{self.name} failed on these rollouts: {self._error}")
            return self._preview
        self._preview = df
        s = df["score"]
        differs = ~np.isclose(s.astype(float), df["reward"].astype(float), rtol=1e-6, atol=1e-9)
        self.status.value = H.muted(
            f"{H.esc(self.name)} on {len(df)} completions of {df['prompt_id'].nunique()} prompts (epoch "
            f"{self.checkpoint.value}): mean {s.mean():.3g}, {(s != 0).mean():.0%} non-zero, "
            f"{df.groupby('prompt_id')['score'].nunique().gt(1).sum()} prompts with differing scores (only those "
            f"carry a NICE signal); differs from the run's reward ({H.esc(self.run_metric)}) on {int(differs.sum())}")
        self.pager.reset(len(self.rows), self.n_preview)
        self._render_table()
        self._draw(df)
        return df

    def _draw(self, df: pd.DataFrame) -> None:
        fig = rewards_figure(df, "score", metric=self.name, theme=self.theme,
                             title=f"{self.name} scores of {len(df)} sampled completions (epoch {self.checkpoint.value})")
        with self.fig.batch_update():
            self.fig.data[0].x = df["score"].tolist()
            self.fig.data[0].hovertemplate = fig.data[0].hovertemplate
            self.fig.data[1].x = df["prompt_id"].tolist()
            self.fig.data[1].y = df["score"].tolist()
            self.fig.data[1].hovertemplate = fig.data[1].hovertemplate
            self.fig.layout.title.text = fig.layout.title.text
            self.fig.layout.xaxis.title.text = fig.layout.xaxis.title.text
            self.fig.layout.yaxis2.title.text = fig.layout.yaxis2.title.text
            self.fig.layout.xaxis2.showticklabels = fig.layout.xaxis2.showticklabels
            self._axes(visible=len(df) > 0)

    def _axes(self, visible: bool, message: str = "") -> None:
        """Show the axes (scores drawn), or hide them behind ``message`` (nothing scored)."""
        for axis in ("xaxis", "yaxis", "xaxis2", "yaxis2"):
            self.fig.layout[axis].visible = visible
        notes = list(self._subplot_titles)
        if not visible and message:
            notes.append(dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                              font=dict(size=13)))
        self.fig.layout.annotations = notes

    def _fail(self, message: str) -> None:
        """No scores: say why, and clear the table and the figure (nothing stale stays on screen)."""
        self._preview = self._base().assign(score=float("nan")) if self._error else pd.DataFrame()
        self._clear(f"<span class='nice-kit-error'>{H.esc(message)}</span>")

    def _clear(self, message: str) -> None:
        if not self._error:
            self._preview = pd.DataFrame()
        self.status.value = message
        self.pager.reset(0, self.n_preview)
        self.table_html.value = "<i class='nice-kit-muted'>no scores to show</i>"
        self._draw(pd.DataFrame(columns=["prompt_id", "score"]))
        with self.fig.batch_update():
            self.fig.layout.title.text = f"{self.name}: no scores (see the message above)"
            self._axes(visible=False, message="nothing scored")
        self.refresh_fallback()

    def _on_view(self) -> None:
        self.pager.reset(len(self.rows), self.n_preview)
        self._render_table()

    def _render_table(self) -> None:
        df = self.rows
        if self._preview.empty or self._preview["score"].isna().all():
            self.table_html.value = "<i class='nice-kit-muted'>no scores to show</i>"
        elif df.empty:
            self.table_html.value = "<i class='nice-kit-muted'>no completion matches (the scores agree with the " \
                                    "run's reward everywhere)</i>" if self.differs.value else "<i>no completions</i>"
        else:
            page = df.iloc[self.pager.slice()].rename(columns={"reward": "run reward", "score": self.name})
            cols = [H.Column("prompt_id", "prompt", width="170px", cell=self._prompt_cell),
                    H.Column("sample", width="64px", numeric=True),
                    H.Column("completion", long=True), H.Column("run reward", f"run reward ({self.run_metric})",
                                                               width="110px", numeric=True),
                    H.Column(self.name, width="100px", numeric=True)]
            self.table_html.value = H.table(page, cols, key="prompt_id", max_chars=300)
        self.refresh_fallback()

    # ----------------------------------------------------------------------------- what if
    def what_if_changes(self) -> dict[str, Any]:
        """The dotted settings a what-if with the current choice changes: the metric (when it is not
        the run's, with its parameters) and the chosen policy preset."""
        changes: dict[str, Any] = {}
        cfg = self.config()
        run_name, run_params = run_metric(self.pipeline)
        if cfg["name"] != run_name or {**self.info.params, **cfg["params"]} != {**self.info.params, **run_params}:
            changes = {"metric.name": cfg["name"], "metric.params": cfg["params"]}
        return {**changes, **POLICY_PRESETS[self.policy.value]}

    @property
    def what_if_result(self):
        """The last what-if (:class:`nice_kit.whatif.WhatIf`), None before the first."""
        return self._what_if

    def what_if(self, compute: bool = False):
        """NICE's scores and selection under the chosen metric and policy, from stored vectors
        (:func:`nice_kit.whatif.what_if`); shows them (the two top fractions side by side, their
        overlap, harmful shares, rank moves) and, with an explorer, adds a ``what_if`` column there.
        ``compute=True`` first computes the per-completion gradients when they are not stored
        (loads the model). Raises what the what-if raises; the buttons show it instead."""
        if self.unavailable():
            raise ValueError(f"{self.name} is unavailable for this run: {self.unavailable()}")
        changes = self.what_if_changes()
        wi = run_in(self.whatif_progress, what_if, self.pipeline, changes, compute=compute)
        self.whatif_progress.clear_output()
        self._what_if, self._what_if_for = wi, changes
        self.compute_button.layout.display = "none"
        self.whatif_html.value = what_if_html(self.pipeline, wi, self._labels)
        self.whatif_status.value = H.muted(
            f"answered in {wi.seconds:.2f} s from stored vectors (no model loaded, no new samples)"
            + ("" if model_problem(self.pipeline) is None else "; adopting it needs the model, which is not available"))
        self.adopt_button.disabled = False
        if self.explorer is not None:
            self.explorer.add_what_if(wi)
        self.refresh_fallback()
        return wi

    def _on_what_if(self, compute: bool = False) -> None:
        self.whatif_status.value = H.muted("computing the per-completion gradients (loads the model):" if compute
                                           else "asking ...")
        try:
            self.what_if(compute=compute)
        except Exception as err:  # noqa: BLE001 - shown beside the button
            self.whatif_progress.clear_output()
            self._what_if = None
            self.adopt_button.disabled = True
            missing = isinstance(err, RuntimeError) and "per-completion gradients for what-ifs" in str(err)
            self.compute_button.layout.display = None if missing and not compute else "none"
            hint = " Press <b>compute the per-completion gradients</b> (once; loads the model)." if missing else ""
            self.whatif_status.value = f"<span class='nice-kit-error'>{H.esc(type(err).__name__)}: {H.esc(err)}</span>{hint}"
            self.whatif_html.value = ""
            self.refresh_fallback()

    def adopt(self):
        """Make the last what-if the run's own (:func:`widgets._run.adopt_what_if`: the config change,
        NICE's validation gradients, the scores and the selections, through the checked stages; needs
        the model). Returns the run's pipeline under the new config, which the picker then shows."""
        if self._what_if is None:
            raise ValueError("no what-if to adopt: ask one first (what_if())")
        adopted = run_in(self.whatif_progress, adopt_what_if, self.pipeline, self._what_if)
        self.whatif_progress.clear_output()
        changes = self._what_if_for
        self.pipeline = adopted
        self.run_metric, self._run_params = run_metric(adopted)
        self.rollouts = {c.epoch: rollouts(adopted, c) for c in checkpoints(adopted)}
        self.adopt_button.disabled = True
        self.whatif_status.value = H.muted(
            f"adopted {H.esc(json.dumps(changes, default=str))}: {H.esc(adopted.run_dir)} now holds the new config.json, "
            "NICE's validation gradients, scores.csv and the selections")
        self.refresh_fallback()
        return adopted

    def _on_adopt(self) -> None:
        self.adopt_button.disabled = True
        self.whatif_status.value = H.muted("adopting: recomputing NICE's validation gradients ...")
        try:
            self.adopt()
        except Exception as err:  # noqa: BLE001 - shown beside the button
            self.whatif_progress.clear_output()
            self.adopt_button.disabled = False
            self.whatif_status.value = (f"<span class='nice-kit-error'>not adopted: {H.esc(type(err).__name__)}: "
                                        f"{H.esc(err)}</span>")
            self.refresh_fallback()

    def _prompt_cell(self, r: pd.Series) -> str:
        """A target prompt by the part of its text that tells it apart, its id below."""
        pid = str(r["prompt_id"])
        text = self._target_labels.get(pid, "")
        return (f"{H.esc(H.short(text, 40))}<br><span class='nice-kit-muted'>{H.esc(pid)}</span>" if text
                else H.esc(pid))

    # ----------------------------------------------------------------------------- theme
    def set_theme(self, theme: str) -> None:
        self.theme = _theme.check_theme(theme) or "light"
        with self.fig.batch_update():
            _theme.apply(self.fig, self.theme)
        self.refresh_fallback()

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        """The preview's figure as a static Figure (empty axes when nothing is scored)."""
        df = self._preview
        if df.empty or df["score"].isna().all():
            return rewards_figure(pd.DataFrame(columns=["prompt_id", "score"]), "score", metric=self.name,
                                  title=f"{self.name}: no scores", theme=self.theme)
        return rewards_figure(df, "score", metric=self.name, theme=self.theme,
                              title=f"{self.name} scores of {len(df)} sampled completions (epoch {self.checkpoint.value})")

    def fallback_body(self) -> str:
        return (f"<div><span class='nice-kit-title'>Metric picker</span> <b>{H.esc(self.name)}</b> "
                f"{H.esc(json.dumps(self.params, default=str))}</div>" + self.description.value
                + f"<div>{self.status.value}</div>" + self.table_html.value + self.pager.label.value
                + figure_html(self.figure()) + f"<div>{self.whatif_status.value}</div>" + self.whatif_html.value)


def _selection_cell(rid: str, labels: dict[str, str], harmful: dict[str, Any], other: set[str], note: str = "") -> str:
    flag = " " + H.badge("harmful", "#c62828") if harmful.get(rid) else ""
    cls = "nice-whatif-shared" if rid in other else "nice-whatif-own"
    return (f"<span class='{cls}'><b>{H.esc(rid)}</b>{flag} {H.esc(H.short(labels.get(rid, ''), 40))}"
            f"{H.muted(' ' + H.esc(note)) if note else ''}</span>")


def what_if_html(p, wi, labels: dict[str, str]) -> str:
    """A what-if's answer as HTML: overlap and harmful shares, the run's NICE selection and the
    what-if's side by side (rank by rank; examples in both in bold, others marked new or dropped),
    and the largest rank moves."""
    harmful = {r.id: r.columns.get("harmful") for r in p.pool}
    k = len(wi.selected)
    now, new = set(wi.current), set(wi.selected)
    share_now, share_new = harmful_share(p, wi.current), harmful_share(p, wi.selected)
    harm = ""
    if share_now is not None and share_new is not None:
        harm = f"; flagged harmful: {share_now:.0%} of the run's selection, {share_new:.0%} of the what-if's"
    signal = ", ".join(f"epoch {e}: {n}" for e, n in wi.signal.items())
    head = (f"<div class='nice-whatif-summary'>With <b>{H.esc(json.dumps(wi.changes, default=str) if wi.changes else 'the run settings')}</b>: "
            f"NICE's top {k} shares <b>{wi.overlap} of {k}</b> with the run's selection{harm}. "
            f"{H.muted(f'Target prompts with signal: {signal}.')}</div>")
    ranks = wi.scores.set_index("id")
    rows = []
    for i in range(max(len(wi.current), k)):
        cur = wi.current[i] if i < len(wi.current) else None
        nxt = wi.selected[i] if i < k else None
        left = _selection_cell(cur, labels, harmful, new, "" if cur in new else "dropped") if cur else ""
        note = ""
        if nxt:
            was = ranks.loc[nxt, "rank_current"]
            note = "new" if nxt not in now else ""
            note = (note + f" (was #{was})").strip() if pd.notna(was) else note
        right = _selection_cell(nxt, labels, harmful, now, note) if nxt else ""
        rows.append(f"<tr><td class='nice-kit-num'>{i + 1}</td><td>{left}</td><td>{right}</td></tr>")
    side = ("<table class='nice-kit-table nice-whatif-side'><colgroup><col style='width:36px'><col><col></colgroup>"
            "<thead><tr><th>#</th><th>the run's NICE selection</th><th>what NICE would select</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    moves = wi.moves.assign(prompt=[H.short(labels.get(i, ""), 40) for i in wi.moves["id"]])
    moves = moves[["id", "prompt", "rank_current", "rank_what_if", "rank_move", "current", "what_if"]]
    move_html = H.table(moves, [H.Column("id", width="90px"), H.Column("prompt"),
                                H.Column("rank_current", "rank (run)", width="74px", numeric=True),
                                H.Column("rank_what_if", "rank (what-if)", width="74px", numeric=True),
                                H.Column("rank_move", "move", width="60px", numeric=True),
                                H.Column("current", "score (run)", width="86px", numeric=True),
                                H.Column("what_if", "score (what-if)", width="86px", numeric=True)],
                        key="id", css_class="nice-whatif-moves")
    diag = ""
    if wi.diagnostics is not None:
        d = wi.diagnostics
        diag = "<div><b>the benchmark's flags of both selections</b></div>" + H.table(
            d, [H.Column(c, c.replace("_", " ")) for c in d.columns], key="", css_class="nice-whatif-diagnostics")
    return head + side + diag + "<div><b>largest rank moves</b></div>" + move_html
