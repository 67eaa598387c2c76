# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · When loss and metric disagree: the case NICE is built for
#
# On the first bundled benchmark (`data/arith`, notebooks 01-05) the reference answers are exactly what
# the metric rewards: bare numbers, scored on the first line. There the loss of the references (LESS's
# proxy) and the metric (NICE's target) mostly agree, and so do the two selections.
#
# The situation the NICE paper argues from is the other one, and it is common: the **references are
# written in one style** (an explanation around the answer, a solution in prose, code with commentary)
# while the **deployed metric rewards another** (the bare answer, passing tests, brevity). This notebook
# walks through the second bundled scenario, `data/verbose_refs`, built to be that case:
#
# * the target prompts ask for the bare result, but their **reference answers are a tutor's**: "Let me
#   work this out step by step.\n7 times 8 equals 56.\nSo the answer is 56.";
# * the **metric** (`configs/verbose_refs.toml`: `task_score`, `extract = "strict"`) reads the
#   completion's first line as the answer, as a program parsing the reply would: **every reference
#   scores 0 under it**;
# * the pool mixes concise and verbose examples, correct and wrong, on-task and off-task.
#
# **Be clear about what this is: the scenario is designed to show the discrepancy.** It shows what
# happens when loss and metric disagree; it does not show how often they do. For the case where they
# agree, see the first benchmark (README, "Results on the bundled benchmark").
#
# > **Fast mode.** With `NICE_KIT_FAST=1` the notebook runs on a tiny model with random weights, a slice
# > of the scenario and a stand-in metric (the length of the answer: a random model never gets arithmetic
# > right), in about a minute: every code path is the real one, every number is meaningless. Without it,
# > SmolLM2-135M-Instruct on the whole scenario; it shares `runs/verbose_refs` with the README's commands
# > and reuses what they finished (from nothing, on a shared 2-core machine: 5 CPU minutes for the run,
# > 2.3 for the three retrainings, both measured; NICE's per-completion gradients behind the why panel,
# > 512 completions as on the first benchmark, took 45 s there).

# %%
import warnings

import pandas as pd
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode
from nice_kit.scenarios import scenario_pipeline
from widgets import use_offline_renderer

warnings.filterwarnings("ignore", category=FutureWarning)
use_offline_renderer()
pd.set_option("display.max_colwidth", 90)
FAST = fast_mode()
p = scenario_pipeline(ROOT / "runs" / ("verbose_refs-fast" if FAST else "verbose_refs"), verbose=False)
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")
print("model:", p.cfg.model, "| metric:", p.cfg.metric.name, p.cfg.metric.params)
print(f"pool: {len(p.pool)} examples | target prompts: {len(p.target_val)} (selection), {len(p.target_test)} (test)")

# %% [markdown]
# ## The two styles
#
# A target prompt, its reference, and what the scenario's metric gives the reference and the bare
# answer. (In fast mode the metric is the stand-in, so its scores differ; the strict scorer below is
# the scenario's own in both modes.)

# %%
from nice_kit.metrics import get_metric

strict = get_metric("task_score", extract="strict")  # the scenario's metric (configs/verbose_refs.toml)
targets = p.target_val[:2] + p.target_test[:2]
cols = {k: [r.columns.get(k) for r in targets] for k in ("task", "answer", "metadata")}
prompts = [r.prompt for r in targets]
display(pd.DataFrame({
    "prompt": prompts,
    "reference (what LESS's loss is measured on)": [r.response for r in targets],
    "strict score of the reference": strict(prompts, [r.response for r in targets], **cols),
    "bare answer": cols["answer"],
    "strict score of the bare answer": strict(prompts, [str(a) for a in cols["answer"]], **cols),
}))

# %% [markdown]
# The pool by its diagnostic flags (the selectors never read them): `style` (concise or verbose),
# `correct` (the number is right), `on_task`. A verbose example's number comes after its first line, so
# the strict metric gives it 0 whether it is right or not; the flags call it `harm_kind = verbose`.

# %%
pool = pd.DataFrame([{"id": r.id, "task": r.columns.get("task"), "on_task": r.columns.get("on_task"),
                      "style": r.columns.get("style"), "correct": r.columns.get("correct"),
                      "harm_kind": r.columns.get("harm_kind"), "prompt": r.prompt, "response": r.response}
                     for r in p.pool])
display(pd.crosstab([pool["on_task"], pool["style"]], pool["correct"], margins=True))
display(pool.groupby(["style", "correct"]).head(1)[["style", "correct", "prompt", "response"]])

# %% [markdown]
# ## The run: LESS and NICE select
#
# `p.run()` does every stage (warmup on a random 15% of the pool, training gradients, rollouts scored by
# the metric, LESS's and NICE's target gradients, scores, the top 10%) and returns the selection
# diagnostics: the share of each kind of example in each selection, beside the pool and a random subset.

# %%
diagnostics = p.run()
display(diagnostics)

# %% [markdown]
# What each method picked, by style and correctness:

# %%
from nice_kit.diagnostics import reward_signal

chosen = p.select()
picked = pd.concat([pool.set_index("id").loc[ids].assign(method=m) for m, ids in chosen.items()])
display(pd.crosstab(picked["method"], [picked["style"], picked["correct"]]))
print("NICE's signal: target prompts whose sampled completions got mixed rewards, per warmup epoch")
display(reward_signal(p))

# %% [markdown]
# ## Why: one pick of each method
#
# `p.explain(id, method)` splits a score into one term per checkpoint and target prompt (and, for NICE,
# per sampled completion); `why_panel` draws it. First LESS's top pick: its score is the cosine between
# the example's gradient and the gradients of the **references' loss**, so it is high for an example that
# makes the tutor's wording more likely.

# %%
from nice_kit.explain import format_explanation
from widgets.why import why_panel

scores = p.read_scores()
less_id = scores.sort_values("less", ascending=False)["id"].iloc[0]
nice_id = scores.sort_values("nice", ascending=False)["id"].iloc[0]
show = ["style", "correct", "on_task", "prompt", "response"]
display(pool.set_index("id").loc[[less_id, nice_id], show].assign(top_pick_of=["LESS", "NICE"]))
print(format_explanation(p.explain(less_id, "less"), top=5))
display(why_panel(p, less_id, "less"))

# %% [markdown]
# NICE's top pick: its score is the cosine with the **policy gradient** of the metric over the model's
# own sampled completions. A rewarded completion (a bare, correct first line) pulls up an example whose
# training step makes it more likely; a punished one (a wrong number, or an explanation) pulls up an
# example whose step makes it less likely. The panel lists the completions of the prompt that
# contributed most.

# %%
print(format_explanation(p.explain(nice_id, "nice"), top=5))
display(why_panel(p, nice_id, "nice"))

# %% [markdown]
# ## Retrained: metric and loss side by side
#
# `compare` fine-tunes a fresh LoRA on the base model on each selection (and a random subset of the
# same size), decodes the held-out test prompts greedily, scores them with the metric and measures the
# loss of the (verbose) test references. Here `quick=True`: one selection, one fine-tuning seed (in full
# mode 3 trainings, reused from the README's `nice-kit evaluate` when it has run). The README's table
# has 3 selection seeds x 3 fine-tuning seeds and the full pool.

# %%
from nice_kit.evaluation import compare, summarize
from widgets import loss_vs_metric

results = compare(p, quick=True)
display(summarize(results)[["method", "metric_mean", "loss_mean", "n_runs"]])
loss_vs_metric(results).show()

# %% [markdown]
# On the x axis the loss LESS lowers, on the y axis the metric NICE raises. If the proxy were the goal,
# the lowest loss would have the highest metric.

# %% [markdown]
# ## What full mode shows, and the lesson
#
# Measured on this project's 2-core machine (README, "A scenario where loss and metric disagree",
# which has the commands, the spread over selection and fine-tuning seeds, the LDS table and the cost):
#
# | trained on (19 examples; 3 selections x 3 fine-tuning seeds) | metric (strict), mean ± s.e. | loss of the verbose test references | verbose share of the picks |
# |---|---|---|---|
# | random 10% | 0.086 ± 0.006 | 1.62 | 0.39 |
# | LESS 10% | 0.037 ± 0.011 | **1.42** (lowest) | 1.00 |
# | NICE 10% (nice_kit's estimator) | 0.121 ± 0.025 | 1.92 | 0.00 |
# | NICE 10% (the reference's estimator) | **0.141 ± 0.005** | 1.91 | 0.00 |
# | full pool (190; 3 fine-tuning seeds) | 0.104 ± 0.012 | 0.38 | 0.43 |
#
# LESS picks only verbose examples, and its models have the lowest loss on the references and the lowest
# metric: they answer in sentences. NICE picks no verbose example; its models have the highest loss on the
# references and the highest metric. The proxy ranks the three LESS < random < NICE, the metric the other
# way round (the full pool, with the references' own templates in it, has by far the lowest loss and a
# metric below NICE's). NICE beats LESS in every selection seed; against random it is ahead in two selection seeds of
# three and behind in one (0.070 against 0.094), so that gap is not established. In this notebook's quick
# run (one selection, one seed) expect the same direction, not the same numbers.
#
# **The lesson, in plain words.** LESS asks "which examples make the reference answers more likely?".
# When the references are written the way the metric wants, that is nearly the right question (the
# first benchmark). When they are not, it is the wrong one: here the references explain, the metric
# wants the bare number, and the examples that make explanations likely are the ones that teach the
# model to explain. NICE asks the metric directly, through the model's own samples, and never needs the
# references to be in the metric's style. The price is that NICE only sees what the model already
# samples: a prompt whose completions all score the same gives it no signal. And remember the scenario
# was built to show this; the first benchmark is the honest picture of the case where loss and metric
# agree.
