"""RolloutViewer: a target prompt's sampled completions at one checkpoint, with their rewards and
policy-gradient weights (what NICE's validation gradient is made of)."""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from . import _html as H
from . import _theme
from ._display import LiveFallback, figure_html
from ._run import (RunLike, as_pipeline, checkpoints, is_label_free, policy_settings, rollout_k, rollout_weights,
                   run_metric, target_records)
from .plots import rollout_figure

# Policy settings that change the weights, per variant (token_normalize changes the gradient of each
# completion, not its weight, but applies to every variant).
APPLIES = {
    "vanilla": ("baseline", "divide_by_kept", "token_normalize"),
    "rejection": ("baseline", "divide_by_kept", "fallback_to_reference", "token_normalize"),
    "topk": ("topk", "baseline", "divide_by_kept", "token_normalize"),
}


def policy_summary(policy) -> str:
    """The policy settings that apply to the configured variant, e.g. "vanilla, baseline=mean,
    divide_by_kept=True, token_normalize=False" (``topk`` only for the topk variant,
    ``fallback_to_reference`` only for rejection)."""
    if getattr(policy, "estimator", "nice_kit") == "reference":
        names = ("do_normalize",) + (("worst_case_protect",) if policy.variant != "vanilla" else ())
        return ", ".join([f"reference estimator: {policy.variant}"] + [f"{k}={getattr(policy, k)}" for k in names])
    names = APPLIES.get(policy.variant, tuple(k for k in policy.__dict__ if k != "variant"))
    return ", ".join([str(policy.variant)] + [f"{k}={getattr(policy, k)}" for k in names])


def weight_explanation(policy, k: int) -> str:
    """One line saying how a completion's weight is computed under ``policy`` with ``k`` completions
    per prompt (plain text)."""
    variant, baseline = policy.variant, policy.baseline
    if getattr(policy, "estimator", "nice_kit") == "reference":
        return reference_weight_explanation(policy, k)
    if variant == "rejection":
        kept, count = "the completions whose reward beats the reference answer's reward", "the number kept"
    elif variant == "topk":
        n_keep = max(1, int(policy.topk))
        kept, count = f"the {n_keep} best of the {k} completions", str(n_keep)
    else:
        kept, count = f"the prompt's {k} completions", f"K = {k}"
    if baseline == "mean":
        core = f"(reward − the mean reward of {kept})"
    elif baseline == "loo":
        core = f"(reward − the mean reward of the other kept completions; kept: {kept})"
    else:
        core = f"reward (no baseline; kept: {kept})"
    divide = f" / {count}" if policy.divide_by_kept else ""
    line = f"weight = {core}{divide}"
    if variant != "vanilla":
        line += "; completions not kept get 0"
    if variant == "rejection" and policy.fallback_to_reference:
        line += "; when none is kept the reference answer gets weight 1"
    return line + ": positive weights push a completion up, negative ones down."


def reference_weight_explanation(policy, k: int) -> str:
    """:func:`weight_explanation` for the reference's estimator (``policy.estimator = "reference"``)."""
    variant = policy.variant
    if variant == "vanilla":
        return (f"weight = reward (the reference's vanilla: all {k} completions, no baseline, no division): "
                "positive weights push a completion up, negative ones down.")
    rule = "reward > 0" if variant in ("rejection", "topk_rejection") else "reward > the reference answer's − 1e-5"
    pool = "the 10 best (ties: the later samples)" if variant.startswith("topk") else f"the {k} completions"
    line = f"weight = reward / the number kept, for {pool} with {rule}; the others get 0"
    line += ("; when none is kept the reference answer gets its reward as weight (worst_case_protect)"
             if policy.worst_case_protect else "; when none is kept the prompt's gradient is zero, counted as 0")
    return line + "."


def _signed(x: float) -> str:
    return "0" if x == 0 else f"{x:+.3g}"


class RolloutViewer(LiveFallback, w.VBox):
    """Choose a warmup checkpoint and a target prompt (dropdown or previous / next, optionally only
    the prompts that carry signal); see the prompt, its reference answer, each sampled completion
    with its reward and policy-gradient weight (green pushes the completion up, red down, none not at
    all), what a weight is under the run's policy, and whether the prompt carries any signal.

    ``.completions`` is the shown prompt's rollouts table; ``.figure()`` a static bar chart.
    ``theme`` is "light", "dark" or "auto" (the page's JupyterLab theme).
    """

    def __init__(self, run: RunLike, epoch: int | None = None, prompt_id: str | None = None,
                 signal_only: bool = False, theme: str | None = "auto"):
        self.pipeline = p = as_pipeline(run)
        self.checkpoints = {c.epoch: c for c in checkpoints(p)}
        self._cache: dict[int, tuple[pd.DataFrame, dict]] = {}
        self.targets = {r.id: r for r in target_records(p)}
        self.policy = policy_settings(p)
        self.k = rollout_k(p)
        self.metric_name = run_metric(p)[0]
        self._theme_arg = _theme.check_theme(theme)
        self.theme = _theme.resolve_theme(theme)
        self._updating = False
        epochs = list(self.checkpoints)
        style = {"description_width": "initial"}
        self.checkpoint = w.Dropdown(options=[(f"epoch {e} (lr {self.checkpoints[e].lr:.2g})", e) for e in epochs],
                                     value=epoch if epoch is not None else epochs[-1], description="checkpoint",
                                     style=style, layout=w.Layout(width="210px"))
        self.signal_only = w.Checkbox(value=signal_only, description="only prompts with signal (●)", indent=False,
                                      layout=w.Layout(width="210px"))
        self.signal_only.add_class("nice-rollout-signal-only")
        self.prev = w.Button(description="◀ previous", layout=w.Layout(width="100px"))
        self.next = w.Button(description="next ▶", layout=w.Layout(width="90px"))
        self.prev.add_class("nice-rollout-prev")
        self.next.add_class("nice-rollout-next")
        self.position = w.HTML()
        self.prompt = w.Dropdown(description="prompt", style=style, layout=w.Layout(width="100%"))
        self.prompt.add_class("nice-rollout-prompt")
        self.summary = w.HTML()
        self.explain = w.HTML(f"<div class='nice-kit-explain'>{H.esc(weight_explanation(self.policy, self.k))}</div>")
        self.explain.add_class("nice-rollout-explain")
        self.body = w.HTML(layout=w.Layout(width="100%"))
        self.body.add_class("nice-rollout-body")
        self.checkpoint.observe(self._on_checkpoint, names="value")
        self.signal_only.observe(self._on_checkpoint, names="value")
        self.prompt.observe(self._on_prompt, names="value")
        self.prev.on_click(lambda _: self.step(-1))
        self.next.on_click(lambda _: self.step(1))
        self.probe = _theme.follow_page_theme(self) if self._theme_arg is None else None
        header = w.HTML(H.STYLE + self.hide_fallback_style() + "<span class='nice-kit-title'>Rollout viewer</span> "
                        + H.muted(f"policy: {H.esc(policy_summary(self.policy))} · metric: {H.esc(self.metric_name)}"))
        header.add_class("nice-rollout-header")
        nav = w.HBox([self.checkpoint, self.signal_only, self.prev, self.next, self.position],
                     layout=w.Layout(flex_flow="row wrap", align_items="center"))
        super().__init__([header, *([self.probe] if self.probe else []), nav, self.prompt, self.summary, self.explain, self.body],
                         layout=w.Layout(width="100%"))
        self.add_class("nice-rollout-viewer")
        self.add_class("nice-kit")
        self._on_checkpoint(keep=prompt_id)

    def weights(self, epoch: int) -> tuple[pd.DataFrame, dict]:
        """Rollouts with their policy-gradient weights at checkpoint ``epoch`` (cached)."""
        if epoch not in self._cache:
            self._cache[epoch] = rollout_weights(self.pipeline, self.checkpoints[epoch])
        return self._cache[epoch]

    @property
    def completions(self) -> pd.DataFrame:
        df, _ = self.weights(self.checkpoint.value)
        return df[df["prompt_id"] == self.prompt.value].reset_index(drop=True)

    @property
    def prompt_weights(self):
        return self.weights(self.checkpoint.value)[1].get(self.prompt.value)

    @property
    def prompt_ids(self) -> list[str]:
        """The prompts the dropdown offers (all, or only those with signal)."""
        return [v for _, v in self.prompt.options]

    def _on_checkpoint(self, change=None, keep: str | None = None) -> None:
        df, per_prompt = self.weights(self.checkpoint.value)
        keep = keep or self.prompt.value
        options = []
        all_ids = list(dict.fromkeys(df["prompt_id"]))
        for pid in all_ids:
            pw = per_prompt.get(pid)
            signal = pw is not None and pw.signal
            if self.signal_only.value and not signal:
                continue
            rewards = df.loc[df["prompt_id"] == pid, "reward"]
            rec = self.targets.get(pid)
            options.append((f"{'●' if signal else '○'} {pid}  mean reward {rewards.mean():.2f} · "
                            f"{H.short(rec.prompt if rec else '', 60)}", pid))
        n_signal = sum(1 for pw in per_prompt.values() if pw.signal)
        shown = "" if not self.signal_only.value else f"; showing the {len(options)} with signal"
        self.summary.value = H.muted(f"epoch {self.checkpoint.value}: {len(all_ids)} target prompts, {n_signal} carry "
                                     f"signal (●){shown}; mean {H.esc(self.metric_name)} reward "
                                     f"{df['reward'].mean():.3g} over {len(df)} completions")
        ids = [v for _, v in options]
        self._updating = True
        try:
            self.prompt.options = options
            self.prompt.value = keep if keep in ids else (ids[0] if ids else None)
        finally:
            self._updating = False
        self._render()

    def _on_prompt(self, change=None) -> None:
        if not self._updating:
            self._render()

    def step(self, delta: int) -> None:
        """Show the previous (-1) or next (+1) prompt of the dropdown (stops at the ends)."""
        ids = self.prompt_ids
        if not ids:
            return
        i = ids.index(self.prompt.value) if self.prompt.value in ids else 0
        self.prompt.value = ids[min(max(0, i + delta), len(ids) - 1)]

    def _render(self) -> None:
        pid = self.prompt.value
        ids = self.prompt_ids
        i = ids.index(pid) if pid in ids else -1
        self.prev.disabled = i <= 0
        self.next.disabled = i < 0 or i >= len(ids) - 1
        self.position.value = H.muted(f"prompt {i + 1} of {len(ids)}" if i >= 0 else "no prompt")
        if pid is None:
            self.body.value = "<i>no prompt to show (none carries signal at this checkpoint)</i>"
        else:
            self.body.value = self.html(pid)
        self.refresh_fallback()

    def html(self, pid: str | None = None) -> str:
        pid = pid or self.prompt.value
        if pid is None:
            return "<i>no prompt to show</i>"
        df, per_prompt = self.weights(self.checkpoint.value)
        rows = df[df["prompt_id"] == pid]
        rec, pw = self.targets.get(pid), per_prompt.get(pid)
        if pw is not None and pw.signal:
            signal = H.badge("carries signal", "#2e7d32")
        else:
            signal = H.badge("no signal: left out of the NICE score", "#616161")
        note = f" {H.muted(H.esc(pw.note))}" if pw is not None and pw.note else ""
        ref_w = (f" · reference answer weight {pw.reference:.3g} (fallback)" if pw is not None and pw.reference else "")
        if rec is None:
            prompt, ref = "", None
        else:
            prompt, ref = rec.prompt, rec.response
        if is_label_free(self.pipeline):
            ref_html = "<i>label-free run: no reference answer</i>"
        else:
            ref_html = H.pre(ref) if ref is not None else "<i>no reference answer</i>"
        scale = float(rows["weight"].abs().max() or 0.0)
        total = float(rows["weight"].sum())
        total = 0.0 if abs(total) <= 1e-9 * max(scale, 1e-12) else total  # a mean baseline sums to 0
        trs = []
        for _, r in rows.iterrows():
            color = H.weight_color(float(r["weight"]), scale)
            trs.append(f"<tr><td>#{int(r['sample'])}</td><td class='nice-kit-num'>{H.fmt(float(r['reward']))}</td>"
                       f"<td class='nice-kit-num' style='background:{color}'>{_signed(float(r['weight']))}</td>"
                       f"<td class='nice-kit-num'>{int(r['n_tokens'])}</td><td><div class='nice-kit-pre' style='margin:0'>"
                       f"{H.esc(r['completion'])}</div></td></tr>")
        table = ("<table class='nice-kit-table nice-rollout-table'><colgroup><col style='width:64px'>"
                 "<col style='width:70px'><col style='width:74px'><col style='width:60px'><col></colgroup><thead><tr>"
                 "<th>sample</th><th>reward</th><th>weight</th><th>tokens</th><th>completion</th></tr></thead><tbody>"
                 + "".join(trs) + "</tbody></table>")
        return (f"<div><b>{H.esc(pid)}</b> {signal}{note}{H.esc(ref_w)}</div><div><b>prompt</b></div>{H.pre(prompt)}"
                f"<div><b>reference answer</b></div>{ref_html}<div><b>{len(rows)} sampled completions</b> "
                f"{H.muted(f'(reward = {H.esc(self.metric_name)}; weights sum to {_signed(total)})')}</div>{table}")

    # ----------------------------------------------------------------------------- theme
    def set_theme(self, theme: str) -> None:
        self.theme = _theme.check_theme(theme) or "light"
        self.refresh_fallback()

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        return rollout_figure(self.completions, title=f"{self.prompt.value} at epoch {self.checkpoint.value}",
                              metric=self.metric_name, theme=self.theme)

    def fallback_body(self) -> str:
        head = (f"<div><span class='nice-kit-title'>Rollout viewer</span> "
                f"{H.muted('policy: ' + H.esc(policy_summary(self.policy)))}</div>{self.summary.value}"
                f"<div class='nice-kit-explain'>{H.esc(weight_explanation(self.policy, self.k))}</div>")
        if self.prompt.value is None:
            return head + self.html()
        return head + self.html() + figure_html(self.figure())
