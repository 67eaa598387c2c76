"""Static plotly figures: what the widgets draw, usable on their own where widgets cannot render
(GitHub, nbviewer, exported HTML). Every function returns a ``plotly.graph_objects.Figure``.

``theme`` ("light" / "dark") picks the template; left out, it is JupyterLab's theme from the user's
settings (light when unknown). Titles and axes name the metric; hover text gives units and epochs.
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import _theme
from ._run import spearman

METHOD_COLORS = {"nice": "#1f77b4", "less": "#ff7f0e", "random": "#7f7f7f", "full": "#2ca02c"}
FLAG_COLORS = {"harmful": "#d62728", "clean": "#1f77b4", "all": "#1f77b4"}
FOREGROUND = {"light": "#111111", "dark": "#f2f2f2"}  # the selected example: black on light, white on dark
FILTERED_OUT = {"light": "rgba(150,150,150,0.25)", "dark": "rgba(150,150,150,0.3)"}
LOSS_UNIT = "nats/token"


def series_color(method: str, i: int = 0) -> str:
    palette = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return METHOD_COLORS.get(method, palette[i % len(palette)])


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def themed(fig: go.Figure, theme: str | None) -> go.Figure:
    return _theme.apply(fig, _theme.resolve_theme(theme))


def selected_color(theme: str | None) -> str:
    return FOREGROUND[_theme.resolve_theme(theme)]


def _metric_name(df: pd.DataFrame, metric: str | None) -> str:
    if metric:
        return str(metric)
    if df.attrs.get("metric"):
        return str(df.attrs["metric"])
    if "metric_name" in df.columns and df["metric_name"].notna().any():
        return str(df["metric_name"].dropna().iloc[0])
    return "metric"


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], list[str]]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering
    [lo, hi], and their labels with no more decimals than the step needs."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [], []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.1
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
        if len(ticks) > 50:  # pragma: no cover - guards a float pathology
            break
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / mag, 6) == 2.5 else 0))
    labels = [f"{v:.{decimals}f}" for v in ticks]
    return ticks, labels


def _tidy_axis(fig: go.Figure, values: Iterable[float], **where) -> None:
    v = pd.Series(list(values), dtype=float).dropna()
    if v.empty:
        return
    ticks, labels = nice_ticks(float(v.min()), float(v.max()))
    if ticks:
        fig.update_yaxes(tickmode="array", tickvals=ticks, ticktext=labels, range=[ticks[0], ticks[-1]], **where)


# ------------------------------------------------------------------------------------ influence
def histogram_marks(frame: pd.DataFrame, method: str, selected: str | None = None, cutoff: float | None = None,
                    fraction: float | None = None, theme: str | None = None) -> tuple[list[dict], list[dict]]:
    """Shapes and annotations of the score histogram: the selection cutoff (solid, the method's
    colour) and the selected example (dashed)."""
    shapes, notes = [], []
    if cutoff is not None and math.isfinite(cutoff):
        shapes.append(dict(type="line", x0=cutoff, x1=cutoff, y0=0, y1=1, yref="paper",
                           line=dict(color=series_color(method), width=2), name="cutoff"))
        label = f"top {fraction:.0%} cutoff" if fraction else "selection cutoff"
        notes.append(dict(x=cutoff, y=1, yref="paper", text=label, showarrow=False, xanchor="left", yanchor="bottom",
                          font=dict(size=10, color=series_color(method))))
    if selected is not None and selected in set(frame["id"]):
        x = float(frame.loc[frame["id"] == selected, method].iloc[0])
        shapes.append(dict(type="line", x0=x, x1=x, y0=0, y1=1, yref="paper", name="selected",
                           line=dict(color=selected_color(theme), dash="dash")))
    return shapes, notes


def score_histogram(frame: pd.DataFrame, method: str, subset: pd.DataFrame | None = None,
                    selected: str | None = None, nbins: int = 30, cutoff: float | None = None,
                    fraction: float | None = None, theme: str | None = None) -> go.Figure:
    """Histogram of one method's scores over the pool (grey) and a filtered subset (colour), with the
    selection cutoff (the lowest selected score) and a dashed line at the selected example's score."""
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=frame[method], name=f"pool ({len(frame)})", marker_color="#9e9e9e", nbinsx=nbins,
                               opacity=0.55, hovertemplate="score %{x}<br>%{y} examples<extra>pool</extra>"))
    sub = frame if subset is None else subset
    fig.add_trace(go.Histogram(x=sub[method], name=f"filtered ({len(sub)})", marker_color=series_color(method), nbinsx=nbins,
                               opacity=0.75, hovertemplate="score %{x}<br>%{y} examples<extra>filtered</extra>"))
    fig.update_layout(barmode="overlay", title=f"{method.upper()} influence scores of {len(frame)} pool examples",
                      xaxis_title=f"{method} influence score (cosine)", yaxis_title="examples", height=300,
                      margin=dict(l=50, r=20, t=60, b=40), legend=dict(orientation="h", y=1.02, x=1, xanchor="right",
                                                                       yanchor="bottom"))
    shapes, notes = histogram_marks(frame, method, selected, cutoff, fraction, theme)
    fig.update_layout(shapes=shapes, annotations=notes)
    return themed(fig, theme)


def scatter_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The point groups of the NICE-vs-LESS scatter: harmful / clean when the pool is flagged."""
    if "harmful" in frame.columns and frame["harmful"].notna().any():
        flag = frame["harmful"].fillna(False).astype(bool)
        return [("clean", frame[~flag]), ("harmful", frame[flag])]
    return [("all", frame)]


def scatter_title(frame: pd.DataFrame, x: str, y: str) -> str:
    rho = spearman(frame[x], frame[y])
    rho_txt = "n/a" if math.isnan(rho) else f"{rho:.2f}"
    return f"{y.upper()} vs {x.upper()}: Spearman ρ = {rho_txt} (n = {len(frame)})"


def hover_text(df: pd.DataFrame) -> list[str]:
    task = df["task"] if "task" in df.columns else [""] * len(df)
    sel = df["selected_by"] if "selected_by" in df.columns else [""] * len(df)
    return [f"<b>{i}</b> {t}{' · selected by ' + s if s else ''}<br>{_short(p, 60)}"
            for i, t, s, p in zip(df["id"], task, sel, df["prompt"])]


def _padded_range(values: pd.Series) -> list[float] | None:
    v = values.dropna().astype(float)
    if v.empty:
        return None
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * 0.06 or abs(hi) * 0.1 or 0.1
    return [lo - pad, hi + pad]


def scatter_marks(x_cut: float | None, y_cut: float | None, fraction: float | None, x: str = "less",
                  y: str = "nice") -> tuple[list[dict], list[dict]]:
    """Cutoff lines of the scatter: a vertical line at the x method's cutoff, a horizontal one at
    the y method's; the upper-right corner holds the examples both select."""
    shapes, notes = [], []
    pct = f"top {fraction:.0%}" if fraction else "selected"
    if x_cut is not None and math.isfinite(x_cut):
        shapes.append(dict(type="line", x0=x_cut, x1=x_cut, y0=0, y1=1, yref="paper", line=dict(color=series_color(x), dash="dot")))
        notes.append(dict(x=x_cut, y=0, yref="paper", text=f"{x.upper()} {pct} →", showarrow=False, xanchor="left",
                          yanchor="bottom", font=dict(size=10, color=series_color(x))))
    if y_cut is not None and math.isfinite(y_cut):
        shapes.append(dict(type="line", y0=y_cut, y1=y_cut, x0=0, x1=1, xref="paper", line=dict(color=series_color(y), dash="dot")))
        notes.append(dict(y=y_cut, x=0, xref="paper", text=f"{y.upper()} {pct} ↑", showarrow=False, xanchor="left",
                          yanchor="bottom", font=dict(size=10, color=series_color(y))))
    return shapes, notes


def influence_scatter(frame: pd.DataFrame, x: str = "less", y: str = "nice", selected: str | None = None,
                      subset: pd.DataFrame | None = None, cutoffs: dict[str, float] | None = None,
                      fraction: float | None = None, theme: str | None = None) -> go.Figure:
    """NICE-vs-LESS scores of the pool examples in ``subset`` (default: all; harmful ones in red
    when flagged, the rest of the pool in faint grey), the Spearman rank correlation of the shown
    examples in the title, dotted lines at each method's selection cutoff, the selected example as a
    star. Each point's ``customdata`` is its example id. The axes span the whole pool, so filtering
    does not move them."""
    sub = frame if subset is None else subset
    fig = go.Figure()
    rest = frame[~frame["id"].isin(set(sub["id"]))]
    fig.add_trace(go.Scatter(x=rest[x], y=rest[y], mode="markers", name="filtered out", customdata=rest["id"],
                             hoverinfo="skip", showlegend=len(rest) > 0,
                             marker=dict(color=FILTERED_OUT[_theme.resolve_theme(theme)], size=6)))
    for name, df in scatter_groups_like(frame, sub):
        fig.add_trace(go.Scatter(x=df[x], y=df[y], mode="markers", name=name, customdata=df["id"], text=hover_text(df),
                                 hovertemplate="%{text}<br>" + f"{x} %{{x:.3g}} · {y} %{{y:.3g}}<extra></extra>",
                                 marker=dict(color=FLAG_COLORS[name], size=8, opacity=0.8)))
    sel = frame[frame["id"] == selected] if selected is not None else frame.iloc[:0]
    fig.add_trace(go.Scatter(x=sel[x], y=sel[y], mode="markers", name="selected", customdata=sel["id"],
                             hoverinfo="skip", marker=dict(color=selected_color(theme), size=16, symbol="star")))
    cutoffs = cutoffs or {}
    shapes, notes = scatter_marks(cutoffs.get(x), cutoffs.get(y), fraction, x, y)
    fig.update_layout(title=scatter_title(sub, x, y), xaxis_title=f"{x.upper()} score (cosine)",
                      yaxis_title=f"{y.upper()} score (cosine)", height=420, margin=dict(l=55, r=20, t=50, b=95),
                      clickmode="event", shapes=shapes, annotations=notes,
                      legend=dict(orientation="h", y=-0.2, x=0, xanchor="left", yanchor="top"))
    fig.update_xaxes(range=_padded_range(frame[x]))
    fig.update_yaxes(range=_padded_range(frame[y]))
    return themed(fig, theme)


def scatter_groups_like(frame: pd.DataFrame, subset: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The groups of the whole ``frame`` (so the traces stay the same), with the rows of ``subset``."""
    names = [name for name, _ in scatter_groups(frame)]
    groups = dict(scatter_groups(subset)) if len(subset) else {}
    if names == ["all"]:
        return [("all", subset)]
    return [(name, groups.get(name, subset.iloc[:0])) for name in names]


# ------------------------------------------------------------------------------------- rewards
def rewards_figure(df: pd.DataFrame, reward: str = "reward", title: str | None = None, metric: str | None = None,
                   theme: str | None = None) -> go.Figure:
    """Scores of sampled completions under ``metric`` (named on the axes): a histogram over all of
    them and a box per target prompt. An empty ``df`` gives empty axes (nothing scored)."""
    name = metric or reward
    fig = make_subplots(rows=1, cols=2, column_widths=[0.3, 0.7], subplot_titles=("all completions", "per target prompt"),
                        horizontal_spacing=0.12)
    x = df[reward] if reward in df.columns else []
    pids = df["prompt_id"].astype(str) if "prompt_id" in df.columns else []
    fig.add_trace(go.Histogram(x=x, name="scores", marker_color="#1f77b4", nbinsx=20, showlegend=False,
                               hovertemplate=f"{name} %{{x}}<br>%{{y}} completions<extra></extra>"), 1, 1)
    fig.add_trace(go.Box(x=pids, y=x, name="per prompt", boxpoints="all", jitter=0.4, pointpos=0, marker_color="#1f77b4",
                         showlegend=False, hovertemplate=f"prompt %{{x}}<br>{name} %{{y:.3g}}<extra></extra>"), 1, 2)
    fig.update_xaxes(title_text=f"{name} score", row=1, col=1)
    fig.update_yaxes(title_text="completions", row=1, col=1)
    fig.update_yaxes(title_text=f"{name} score", row=1, col=2)
    fig.update_xaxes(title_text="target prompt", showticklabels=len(set(pids)) <= 16, row=1, col=2)
    fig.update_layout(title=title or f"{name} scores of {len(df)} sampled completions", height=330,
                      margin=dict(l=50, r=20, t=70, b=45))
    return themed(fig, theme)


def rollout_figure(df: pd.DataFrame, title: str = "", metric: str | None = None, theme: str | None = None) -> go.Figure:
    """Reward (under ``metric``) and policy-gradient weight of each sampled completion of one prompt."""
    name = metric or "reward"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"reward ({name})", "policy-gradient weight"))
    x = [f"#{s}" for s in df["sample"]]
    fig.add_trace(go.Bar(x=x, y=df["reward"], marker_color="#1f77b4", name="reward", showlegend=False,
                         hovertemplate=f"completion %{{x}}<br>{name} %{{y:.3g}}<extra></extra>"), 1, 1)
    colors = ["#2ca02c" if w > 0 else "#d62728" if w < 0 else "#9e9e9e" for w in df["weight"]]
    fig.add_trace(go.Bar(x=x, y=df["weight"], marker_color=colors, name="weight", showlegend=False,
                         hovertemplate="completion %{x}<br>weight %{y:+.3g}<extra></extra>"), 1, 2)
    fig.update_xaxes(title_text="sampled completion")
    fig.update_layout(title=title, height=280, margin=dict(l=50, r=20, t=60, b=45))
    return themed(fig, theme)


# ------------------------------------------------------------------------------ loss vs metric
def loss_vs_metric_checkpoints(curve: pd.DataFrame, title: str | None = None, metric: str | None = None,
                               theme: str | None = None) -> go.Figure:
    """Reference-answer loss (left axis) and the task metric (right axis) of the base model (epoch 0)
    and each warmup checkpoint, from :func:`nice_kit.evaluation.checkpoint_curve`. Where the loss falls
    but the metric does not rise, the loss is a poor proxy for what LESS selects by.

    ``metric`` names the metric (default: ``curve.attrs["metric"]``, else "metric")."""
    df = curve.sort_values("epoch")
    name = _metric_name(curve, metric)
    n_test = f" on {int(df['n_test'].iloc[0])} test prompts" if "n_test" in df.columns and len(df) else ""
    lr = df["lr"].tolist() if "lr" in df.columns else [float("nan")] * len(df)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if "loss" in df.columns:
        fig.add_trace(go.Scatter(x=df["epoch"], y=df["loss"], mode="lines+markers", name="reference loss (LESS's proxy)",
                                 customdata=lr, line=dict(color=METHOD_COLORS["less"]),
                                 hovertemplate=f"epoch %{{x}} (lr %{{customdata:.2g}})<br>reference loss %{{y:.3f}} "
                                               f"{LOSS_UNIT}<extra></extra>"), secondary_y=False)
        _tidy_axis(fig, df["loss"], secondary_y=False)
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["metric"], mode="lines+markers", name=f"{name} (NICE's target)",
                             customdata=lr, line=dict(color=METHOD_COLORS["nice"]),
                             hovertemplate=f"epoch %{{x}} (lr %{{customdata:.2g}})<br>mean {name} %{{y:.3f}}{n_test}"
                                           "<extra></extra>"), secondary_y=True)
    _tidy_axis(fig, df["metric"], secondary_y=True)
    fig.update_xaxes(title_text="warmup epoch (0 = base model)", tickmode="array", tickvals=df["epoch"].tolist())
    fig.update_yaxes(title_text=f"next-token loss on references ({LOSS_UNIT})", secondary_y=False)
    fig.update_yaxes(title_text=f"mean {name}{n_test}", secondary_y=True, showgrid=False)
    fig.update_layout(title=title or f"Reference loss and {name} across warmup checkpoints", height=380,
                      margin=dict(l=65, r=65, t=60, b=40), legend=dict(orientation="h", y=-0.22), hovermode="x unified")
    return themed(fig, theme)


def _mean_se(x: Iterable[float]) -> tuple[float, float, int]:
    x = pd.Series(list(x), dtype=float).dropna()
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se, int(len(x))


def seeds_note(seeds: list[int]) -> str:
    """What the error bars of :func:`loss_vs_metric_subsets` mean, given each method's seed count."""
    if not seeds or max(seeds) <= 1:
        return "one seed per method: no error bars (add seeds to see the spread)"
    if min(seeds) <= 1:
        return "error bars: ±1 standard error over seeds (none where a method has a single seed)"
    span = str(seeds[0]) if min(seeds) == max(seeds) else f"{min(seeds)}–{max(seeds)}"
    return f"error bars: ±1 standard error over {span} seeds"


def loss_vs_metric_subsets(results: pd.DataFrame, title: str | None = None, metric: str | None = None,
                           theme: str | None = None) -> go.Figure:
    """The metric against the reference loss of the model fine-tuned on each method's subset, from
    :func:`nice_kit.evaluation.compare` (one trace per method; error bars are standard errors over
    seeds, drawn only where a method has two or more seeds: the legend gives each method's seed
    count and the title says when there are no error bars). Without a loss column (label-free runs)
    the metric alone is drawn per method."""
    name = _metric_name(results, metric)
    has_loss = "loss" in results.columns and results["loss"].notna().any()
    fig = go.Figure()
    seeds = []
    for i, (method, df) in enumerate(results.groupby("method", sort=False)):
        m, m_se, n = _mean_se(df["metric"])
        seeds.append(n)
        frac = df["fraction"].iloc[0] if "fraction" in df.columns else None
        label = method if frac is None or method == "full" else f"{method} ({frac:.0%})"
        label += f", {n} seed{'s' if n != 1 else ''}"
        bars = n > 1
        se_txt = (lambda se: f" ± {se:.3g}" if bars else "")
        if has_loss:
            loss, l_se, _ = _mean_se(df["loss"])
            fig.add_trace(go.Scatter(x=[loss], y=[m], mode="markers", name=label, text=[method],
                                     hovertemplate=(f"<b>{label}</b><br>reference loss %{{x:.4g}}{se_txt(l_se)} {LOSS_UNIT}"
                                                    f"<br>mean {name} %{{y:.4g}}{se_txt(m_se)}<extra></extra>"),
                                     marker=dict(size=12, color=series_color(method, i)),
                                     error_x=dict(type="data", array=[l_se if bars else 0], visible=bars),
                                     error_y=dict(type="data", array=[m_se if bars else 0], visible=bars)))
        else:
            fig.add_trace(go.Bar(x=[label], y=[m], name=label, text=[method], marker_color=series_color(method, i),
                                 hovertemplate=f"<b>{label}</b><br>mean {name} %{{y:.4g}}{se_txt(m_se)}<extra></extra>",
                                 error_y=dict(type="data", array=[m_se if bars else 0], visible=bars)))
    note = seeds_note(seeds)
    if has_loss:
        fig.update_layout(xaxis_title=f"next-token loss on test references ({LOSS_UNIT}; lower is 'better' for LESS)",
                          yaxis_title=f"mean {name} on test prompts (higher is better)")
    else:
        fig.update_layout(yaxis_title=f"mean {name} on test prompts")
    head = title or f"{name} vs reference loss of models fine-tuned on each selection"
    fig.update_layout(title=dict(text=f"{head}<br><sup>{note}</sup>"), height=400,
                      margin=dict(l=65, r=20, t=75, b=50))
    return themed(fig, theme)


def loss_vs_metric(df: pd.DataFrame, title: str | None = None, metric: str | None = None,
                   theme: str | None = None) -> go.Figure:
    """:func:`loss_vs_metric_checkpoints` for a ``checkpoint_curve`` table (has ``epoch``), else
    :func:`loss_vs_metric_subsets` for a ``compare`` table (has ``method``)."""
    if "epoch" in df.columns:
        return loss_vs_metric_checkpoints(df, title, metric, theme)
    if "method" in df.columns:
        return loss_vs_metric_subsets(df, title, metric, theme)
    raise ValueError("expected checkpoint_curve output (epoch, metric, loss) or compare output (method, metric, loss)")


def disagreements(frame: pd.DataFrame, a: str = "nice", b: str = "less", n: int = 10) -> pd.DataFrame:
    """The examples whose ranks under methods ``a`` and ``b`` differ most (``rank_gap`` = rank under b
    minus rank under a: positive means ``a`` likes it more)."""
    df = frame.copy()
    df["rank_gap"] = df[f"{b}_rank"].astype(float) - df[f"{a}_rank"].astype(float)
    df = df.reindex(df["rank_gap"].abs().sort_values(ascending=False).index)
    cols = [c for c in ("id", "task", "harmful", "harm_kind", a, b, f"{a}_rank", f"{b}_rank", "rank_gap", "prompt",
                        "response") if c in df.columns]
    return df[cols].head(n).reset_index(drop=True)

