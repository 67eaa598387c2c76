"""RolloutViewer: a target prompt's sampled completions at one checkpoint, with their rewards and
policy-gradient weights (what NICE's validation gradient is made of)."""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from . import _html as H
from ._run import RunLike, as_pipeline
from .plots import rollout_figure


class RolloutViewer(w.VBox):
    """Choose a warmup checkpoint and a target prompt; see the prompt, its reference answer, each
    sampled completion with its reward and policy-gradient weight (green pushes the completion up,
    red down, grey not at all), and whether the prompt carries any signal.

    ``.completions`` is the shown prompt's rollouts table; ``.figure()`` a static bar chart.
    """

    def __init__(self, run: RunLike, epoch: int | None = None, prompt_id: str | None = None):
        self.pipeline = p = as_pipeline(run)
        self.checkpoints = {c.epoch: c for c in p.checkpoints}
        self._cache: dict[int, tuple[pd.DataFrame, dict]] = {}
        self.targets = {r.id: r for r in p.target_val}
        epochs = list(self.checkpoints)
        self.checkpoint = w.Dropdown(options=[(f"epoch {e} (lr {self.checkpoints[e].lr:.2g})", e) for e in epochs],
                                     value=epoch if epoch is not None else epochs[-1], description="checkpoint")
        self.prompt = w.Dropdown(description="prompt", layout=w.Layout(width="70%"))
        self.prompt.add_class("nice-rollout-prompt")
        self.summary = w.HTML()
        self.body = w.HTML()
        self.body.add_class("nice-rollout-body")
        self.checkpoint.observe(self._on_checkpoint, names="value")
        self.prompt.observe(lambda _: self._render(), names="value")
        super().__init__([w.HTML(H.STYLE + "<b>Rollout viewer</b> "
                                 f"<span style='color:#777'>policy: {H.esc(self._policy_text())}</span>"),
                          w.HBox([self.checkpoint, self.prompt]), self.summary, self.body])
        self.add_class("nice-rollout-viewer")
        self._on_checkpoint(keep=prompt_id)

    def _policy_text(self) -> str:
        pol = self.pipeline.cfg.policy
        return ", ".join(f"{k}={v}" for k, v in pol.__dict__.items())

    def weights(self, epoch: int) -> tuple[pd.DataFrame, dict]:
        """Rollouts with their policy-gradient weights at checkpoint ``epoch`` (cached)."""
        if epoch not in self._cache:
            df, per_prompt = self.pipeline.rollout_weights(self.checkpoints[epoch])
            df = df.assign(prompt_id=df["prompt_id"].astype(str))
            self._cache[epoch] = (df, per_prompt)
        return self._cache[epoch]

    @property
    def completions(self) -> pd.DataFrame:
        df, _ = self.weights(self.checkpoint.value)
        return df[df["prompt_id"] == self.prompt.value].reset_index(drop=True)

    @property
    def prompt_weights(self):
        return self.weights(self.checkpoint.value)[1].get(self.prompt.value)

    def _on_checkpoint(self, change=None, keep: str | None = None) -> None:
        df, per_prompt = self.weights(self.checkpoint.value)
        keep = keep or self.prompt.value
        options = []
        for pid in dict.fromkeys(df["prompt_id"]):
            pw = per_prompt.get(pid)
            mark = "●" if pw is not None and pw.signal else "○"
            rewards = df.loc[df["prompt_id"] == pid, "reward"]
            rec = self.targets.get(pid)
            options.append((f"{mark} {pid}  mean reward {rewards.mean():.2f} · {H.short(rec.prompt if rec else '', 50)}", pid))
        n_signal = sum(1 for pw in per_prompt.values() if pw.signal)
        self.summary.value = (f"<span style='color:#555'>epoch {self.checkpoint.value}: {len(options)} target prompts, "
                              f"{n_signal} carry signal (●), mean reward {df['reward'].mean():.3g}</span>")
        ids = [v for _, v in options]
        self.prompt.options = options
        self.prompt.value = keep if keep in ids else (ids[0] if ids else None)
        self._render()

    def _render(self) -> None:
        pid = self.prompt.value
        if pid is None:
            self.body.value = "<i>no rollouts</i>"
            return
        self.body.value = self.html(pid)

    def html(self, pid: str | None = None) -> str:
        pid = pid or self.prompt.value
        df, per_prompt = self.weights(self.checkpoint.value)
        rows = df[df["prompt_id"] == pid]
        rec, pw = self.targets.get(pid), per_prompt.get(pid)
        if pw is not None and pw.signal:
            signal = H.badge("carries signal", "#2ca02c")
        else:
            signal = H.badge("no signal: left out of the NICE score", "#7f7f7f")
        note = f" <span style='color:#555'>{H.esc(pw.note)}</span>" if pw is not None and pw.note else ""
        ref_w = (f" · reference answer weight {pw.reference:.3g} (fallback)" if pw is not None and pw.reference else "")
        if rec is None:
            prompt, ref = "", None
        else:
            prompt, ref = rec.prompt, rec.response
        ref_html = H.pre(ref) if ref is not None else "<i>label-free run: no reference answer</i>"
        scale = float(rows["weight"].abs().max() or 0.0)
        trs = []
        for _, r in rows.iterrows():
            color = H.weight_color(float(r["weight"]), scale)
            trs.append(f"<tr><td>#{int(r['sample'])}</td><td>{H.fmt(float(r['reward']))}</td>"
                       f"<td style='background:{color}'>{float(r['weight']):+.3g}</td>"
                       f"<td>{int(r['n_tokens'])}</td><td><div class='nice-kit-pre' style='margin:0'>"
                       f"{H.esc(r['completion'])}</div></td></tr>")
        table = ("<table class='nice-kit-table nice-rollout-table'><thead><tr><th>sample</th><th>reward</th>"
                 "<th>weight</th><th>tokens</th><th>completion</th></tr></thead><tbody>" + "".join(trs) + "</tbody></table>")
        return (f"<div><b>{H.esc(pid)}</b> {signal}{note}{H.esc(ref_w)}</div><div><b>prompt</b></div>{H.pre(prompt)}"
                f"<div><b>reference answer</b></div>{ref_html}<div><b>{len(rows)} sampled completions</b></div>{table}")

    # ---------------------------------------------------------------------- static fallback
    def figure(self) -> go.Figure:
        return rollout_figure(self.completions, title=f"{self.prompt.value} at epoch {self.checkpoint.value}")

    def _repr_html_(self) -> str:
        return H.STYLE + self.summary.value + self.html() + self.figure().to_html(include_plotlyjs="cdn", full_html=False)
