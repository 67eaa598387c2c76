"""Static plotly figures: what the widgets draw, usable on their own where widgets cannot render
(GitHub, nbviewer, exported HTML). Every function returns a ``plotly.graph_objects.Figure``."""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._run import spearman

METHOD_COLORS = {"nice": "#1f77b4", "less": "#ff7f0e", "random": "#7f7f7f", "full": "#2ca02c"}
FLAG_COLORS = {"harmful": "#d62728", "clean": "#1f77b4", "all": "#1f77b4"}
SELECTED_COLOR = "#111111"


def _color(method: str, i: int = 0) -> str:
    palette = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return METHOD_COLORS.get(method, palette[i % len(palette)])


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------ influence
def score_histogram(frame: pd.DataFrame, method: str, subset: pd.DataFrame | None = None,
                    selected: str | None = None, nbins: int = 30) -> go.Figure:
    """Histogram of one method's scores over the pool (grey) and a filtered subset (colour), with a
    vertical line at the selected example's score."""
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=frame[method], name="pool", marker_color="#c7c7c7", nbinsx=nbins, opacity=0.8))
    sub = frame if subset is None else subset
    fig.add_trace(go.Histogram(x=sub[method], name="filtered", marker_color=_color(method), nbinsx=nbins,
                               opacity=0.75))
    fig.update_layout(barmode="overlay", title=f"{method} scores", xaxis_title=f"{method} influence score",
                      yaxis_title="examples", height=300, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    _mark_selected(fig, frame, method, selected)
    return fig


def _mark_selected(fig, frame: pd.DataFrame, method: str, selected: str | None) -> None:
    shapes = []
    if selected is not None and selected in set(frame["id"]):
        x = float(frame.loc[frame["id"] == selected, method].iloc[0])
        shapes.append(dict(type="line", x0=x, x1=x, y0=0, y1=1, yref="paper", line=dict(color=SELECTED_COLOR, dash="dash")))
    fig.update_layout(shapes=shapes)


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


def _hover(df: pd.DataFrame) -> list[str]:
    task = df["task"] if "task" in df.columns else [""] * len(df)
    return [f"{i}<br>{t}<br>{_short(p, 60)}" for i, t, p in zip(df["id"], task, df["prompt"])]


def influence_scatter(frame: pd.DataFrame, x: str = "less", y: str = "nice", selected: str | None = None) -> go.Figure:
    """NICE-vs-LESS scores of every pool example (harmful examples in red when flagged), the Spearman
    rank correlation in the title, the selected example as a black star. Each point's ``customdata``
    is its example id."""
    fig = go.Figure()
    for name, df in scatter_groups(frame):
        fig.add_trace(go.Scatter(x=df[x], y=df[y], mode="markers", name=name, customdata=df["id"],
                                 text=_hover(df), hovertemplate="%{text}<br>" + f"{x}=%{{x:.3g}} {y}=%{{y:.3g}}<extra></extra>",
                                 marker=dict(color=FLAG_COLORS[name], size=8, opacity=0.75)))
    sel = frame[frame["id"] == selected] if selected is not None else frame.iloc[:0]
    fig.add_trace(go.Scatter(x=sel[x], y=sel[y], mode="markers", name="selected", customdata=sel["id"],
                             hoverinfo="skip", marker=dict(color=SELECTED_COLOR, size=16, symbol="star")))
    fig.update_layout(title=scatter_title(frame, x, y), xaxis_title=f"{x} score", yaxis_title=f"{y} score",
                      height=380, margin=dict(l=50, r=20, t=50, b=40), clickmode="event")
    return fig


# ------------------------------------------------------------------------------------- rewards
def rewards_figure(df: pd.DataFrame, reward: str = "reward", title: str | None = None) -> go.Figure:
    """Rewards of sampled completions: a histogram over all of them and a box per target prompt."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.3, 0.7], subplot_titles=("all completions", "per prompt"))
    fig.add_trace(go.Histogram(x=df[reward], name="rewards", marker_color="#1f77b4", nbinsx=20, showlegend=False), 1, 1)
    fig.add_trace(go.Box(x=df["prompt_id"].astype(str), y=df[reward], name="per prompt", boxpoints="all", jitter=0.4,
                         pointpos=0, marker_color="#1f77b4", showlegend=False), 1, 2)
    fig.update_xaxes(title_text=reward, row=1, col=1)
    fig.update_yaxes(title_text="completions", row=1, col=1)
    fig.update_yaxes(title_text=reward, row=1, col=2)
    fig.update_xaxes(showticklabels=len(df["prompt_id"].unique()) <= 16, row=1, col=2)
    fig.update_layout(title=title or f"{reward} of {len(df)} sampled completions", height=330,
                      margin=dict(l=50, r=20, t=70, b=40))
    return fig


def rollout_figure(df: pd.DataFrame, title: str = "") -> go.Figure:
    """Reward and policy-gradient weight of each sampled completion of one prompt."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("reward", "policy-gradient weight"))
    x = [f"#{s}" for s in df["sample"]]
    fig.add_trace(go.Bar(x=x, y=df["reward"], marker_color="#1f77b4", name="reward", showlegend=False), 1, 1)
    colors = ["#2ca02c" if w > 0 else "#d62728" if w < 0 else "#c7c7c7" for w in df["weight"]]
    fig.add_trace(go.Bar(x=x, y=df["weight"], marker_color=colors, name="weight", showlegend=False), 1, 2)
    fig.update_layout(title=title, height=280, margin=dict(l=50, r=20, t=60, b=40))
    return fig


# ------------------------------------------------------------------------------ loss vs metric
def loss_vs_metric_checkpoints(curve: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Reference-answer loss (left axis) and the task metric (right axis) of the base model (epoch 0)
    and each warmup checkpoint, from :func:`nice_kit.evaluation.checkpoint_curve`. Where the loss falls
    but the metric does not rise, the loss is a poor proxy for what LESS selects by."""
    df = curve.sort_values("epoch")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if "loss" in df.columns:
        fig.add_trace(go.Scatter(x=df["epoch"], y=df["loss"], mode="lines+markers", name="reference loss (LESS proxy)",
                                 line=dict(color=METHOD_COLORS["less"])), secondary_y=False)
    fig.add_trace(go.Scatter(x=df["epoch"], y=df["metric"], mode="lines+markers", name="metric (NICE target)",
                             line=dict(color=METHOD_COLORS["nice"])), secondary_y=True)
    fig.update_xaxes(title_text="warmup epoch (0 = base model)", tickmode="array", tickvals=df["epoch"].tolist())
    fig.update_yaxes(title_text="next-token loss on references", secondary_y=False)
    fig.update_yaxes(title_text="mean metric on test prompts", secondary_y=True)
    fig.update_layout(title=title or "Loss and metric across warmup checkpoints", height=360,
                      margin=dict(l=60, r=60, t=60, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def _mean_se(x: Iterable[float]) -> tuple[float, float]:
    x = pd.Series(list(x), dtype=float).dropna()
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


def loss_vs_metric_subsets(results: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Metric against reference loss of the model fine-tuned on each method's subset, from
    :func:`nice_kit.evaluation.compare` (one trace per method; error bars are standard errors over
    seeds). Without a loss column (label-free runs) the metric alone is drawn per method."""
    has_loss = "loss" in results.columns and results["loss"].notna().any()
    fig = go.Figure()
    for i, (method, df) in enumerate(results.groupby("method", sort=False)):
        m, m_se = _mean_se(df["metric"])
        frac = df["fraction"].iloc[0] if "fraction" in df.columns else None
        label = method if frac is None or method == "full" else f"{method} ({frac:.0%})"
        if has_loss:
            l, l_se = _mean_se(df["loss"])
            fig.add_trace(go.Scatter(x=[l], y=[m], mode="markers", name=label, text=[method],
                                     hovertemplate="%{text}: loss %{x:.4g}, metric %{y:.4g}<extra></extra>",
                                     marker=dict(size=12, color=_color(method, i)),
                                     error_x=dict(type="data", array=[l_se], visible=True),
                                     error_y=dict(type="data", array=[m_se], visible=True)))
        else:
            fig.add_trace(go.Bar(x=[label], y=[m], name=label, marker_color=_color(method, i),
                                 error_y=dict(type="data", array=[m_se], visible=True)))
    if has_loss:
        fig.update_layout(xaxis_title="next-token loss on test references (lower is 'better' for LESS)",
                          yaxis_title="mean metric on test prompts (higher is better)")
    else:
        fig.update_layout(yaxis_title="mean metric on test prompts")
    fig.update_layout(title=title or "Metric vs loss of models fine-tuned on each selection", height=380,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def loss_vs_metric(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """:func:`loss_vs_metric_checkpoints` for a ``checkpoint_curve`` table (has ``epoch``), else
    :func:`loss_vs_metric_subsets` for a ``compare`` table (has ``method``)."""
    if "epoch" in df.columns:
        return loss_vs_metric_checkpoints(df, title)
    if "method" in df.columns:
        return loss_vs_metric_subsets(df, title)
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

