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
# # NICE in one notebook
#
# **NICE** chooses instruction-tuning data for a target task by how much a training step on each example
# would raise the task's *real metric* (a test pass rate, a reward, an exact-match score), estimated with a
# policy gradient over the model's own sampled completions. **LESS**, the method it builds on, uses the
# next-token *loss* of reference answers instead, a proxy that can disagree with the metric.
#
# This notebook runs the whole pipeline on the bundled arithmetic benchmark (`data/arith`): a pool of
# instruction examples, some of them deliberately harmful (wrong answers, verbose answers, bad format), and a
# target task whose answers are scored by a non-differentiable metric.
#
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` the pipeline uses a tiny randomly
# > initialised model and a slice of the data, so the notebook runs top to bottom in about a minute. The
# > numbers are then meaningless, but every code path is the real one. Without it the bundled
# > SmolLM2-135M-Instruct runs on the full benchmark (6 min 16 s from an empty run directory on 2 CPU cores, measured).

# %%
import pandas as pd
from IPython.display import display

from nice_kit.demo import demo_pipeline, fast_mode
from nice_kit.evaluation import checkpoint_curve, compare, summarize
from widgets import use_offline_renderer

use_offline_renderer()  # figures also render in exported HTML and offline (plotly.js inline, once)

pd.set_option("display.max_colwidth", 80)
print("fast mode:", fast_mode())

# %% [markdown]
# ## The run
#
# `demo_pipeline` builds a `Pipeline`: a configuration plus a run directory. Every stage writes its results
# under the run directory and is skipped when they are already there, so re-running a cell is cheap and an
# interrupted run resumes.

# %%
# full mode shares the run directory of `nice-kit run` (runs/default) and reuses what it finished;
# fast mode has its own, so that a fast run never overwrites a full one
p = demo_pipeline("../runs/quickstart-fast" if fast_mode() else "../runs/default")
print("model:", p.cfg.model, "| pool:", len(p.pool), "examples | target prompts:", len(p.target_val),
      "| metric:", p.cfg.metric.name, p.cfg.metric.params)
p.prepare()

# %% [markdown]
# ## 1. Warmup
#
# A LoRA adapter is trained for a few epochs on a random slice of the pool. After each epoch the pipeline
# keeps the adapter, the Adam moments and the learning rate: the gradients below are taken at each of these
# checkpoints and weighted by their learning rate.

# %%
ckpts = p.warmup()
pd.DataFrame([{"epoch": c.epoch, "lr": c.lr} for c in ckpts])

# %% [markdown]
# ## 2. Training gradients
#
# For every pool example and checkpoint: the gradient of its response's loss, preconditioned like one Adam
# step, projected to a few hundred or thousand dimensions with a sparse random sketch and normalised.

# %%
p.train_gradients()

# %% [markdown]
# ## 3. Rollouts and rewards (NICE)
#
# NICE samples several completions for each target prompt from the warmed-up model and scores them with the
# metric. With the default mean baseline, a prompt whose completions all get the same reward carries no
# signal: its policy gradient is zero.

# %%
rollouts = p.rollouts()
rollouts[["epoch", "prompt_id", "sample", "completion", "reward"]].head(8)

# %% [markdown]
# The metric is any Python function `metric(prompts, completions, **columns) -> list[float]`; the
# registered ones can be tried on these very rollouts with the `MetricPicker` (its `.value` is the built
# metric, `.config()` the setting for a run's `metric` section).

# %%
from widgets import MetricPicker

picker = MetricPicker(p)
display(picker)

# %% [markdown]
# ## 4. Validation gradients: LESS and NICE
#
# * **LESS**: the gradient of the loss of each target prompt's *reference answer*.
# * **NICE**: the reward-weighted gradient of the model's *own completions* (REINFORCE with a mean baseline),
#   i.e. the direction that raises the expected metric.

# %%
p.validation_gradients("less")
p.validation_gradients("nice")

# %% [markdown]
# ## 5. Influence scores and selection
#
# An example's score is the learning-rate-weighted cosine between its training gradient and the target
# gradients (averaged within a subtask, maximum over subtasks). The top fraction of the pool is selected.

# %%
scores = p.scores()
chosen = p.select(scores)
scores.describe()

# %% [markdown]
# ## 6. Diagnostics
#
# The benchmark flags which pool examples are harmful and which are on-task; the selectors never see these
# flags, so the share of harmful examples each method picked is a free check of the selection (`pool` is
# the whole pool, `random` a random subset of the same size).
#
# `p.run()` does all of the above in one call; here every stage is already cached.

# %%
diagnostics = p.run()
display(diagnostics)

# %% [markdown]
# ## 7. Does the selection help?
#
# `compare` fine-tunes a fresh LoRA on each method's subset (and on a random subset and the full pool),
# then scores greedy completions of held-out test prompts with the metric and measures the reference
# answers' loss. `summarize` averages over fine-tuning seeds (and, with `selection_seeds`, over
# re-runs of the selection itself: `sd_selection` and `sd_finetune` say which varies more).
#
# `quick=True` is the notebook setting: one fine-tuning seed and no full-pool training (each costs about
# seven selections'; `full=True` adds it). In full mode that is 3 trainings of about 36 s each on a quiet
# 2-core machine; `compare(p)` runs the config's 3 seeds and the full pool (9 trainings of about 36 s and
# 3 full-pool ones of about 4 minutes: about 17 minutes). Each result is printed as it finishes, and the
# progress bar's estimate weights trainings by their size.
#
# Every row also records how varied the fine-tuned model's answers are: the share of test prompts that
# got its most common completion and the number of distinct completions (and the same for the training
# responses). A model that gives one answer to half the test prompts or more has **collapsed**: its
# "metric" is then the share of test answers equal to that one number, not a measure of the task.

# %%
from widgets import evaluation_table

results = compare(p, quick=True)
display(summarize(results))
display(evaluation_table(results))

# %% [markdown]
# Loss and metric side by side: LESS optimises the x axis, NICE the y axis. Where a subset has the
# lower loss but not the higher metric, the proxy and the goal disagree: the discrepancy NICE is built on.

# %%
from widgets import loss_vs_metric

loss_vs_metric(results).show()

# %%
curve = checkpoint_curve(p)
loss_vs_metric(curve).show()
display(curve)

# %% [markdown]
# ## 8. Explore the scores
#
# The pool sorted by either method's score, filterable by task, harmful flag and text; click an example (or a
# point of the NICE-vs-LESS scatter) to read it. `05_inspecting_influence.ipynb` goes further.

# %%
from widgets import InfluenceExplorer

explorer = InfluenceExplorer(p)
display(explorer)
