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
# # 02 · Loss is not the metric
#
# LESS, the method NICE builds on, picks training data by how much it lowers the **next-token
# loss** of reference answers to the target prompts. That is a proxy. What we care about is a
# **metric** of the model's own outputs: exact answers, passed tests, a reward model's score.
# This notebook shows, on the bundled arithmetic data, that the two can disagree, and by how much:
#
# 1. fine-tune the base model on three hand-picked subsets of the pool (correct answers only,
#    half wrong answers, verbose answers) and measure both the reference answers' loss and the
#    metric on held-out prompts;
# 2. follow loss and metric through the warmup checkpoints (`checkpoint_curve`);
# 3. score the same completions with a strict and a lenient metric: the choice of metric is
#    itself a decision.
#
# The pool carries diagnostic flags that no selector ever reads: `harm_kind` is `wrong_answer`
# (a plausible wrong number), `verbose` (the right number inside sentences of reasoning),
# `bad_format` (the value spelled out) or empty (a correct, bare answer). Here we use them to
# build the subsets by hand.

# %% [markdown]
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` this notebook runs on a tiny
# > model with random weights and a slice of the data, in about a minute: every code path is the real
# > one, but the numbers mean nothing. Without it, it uses the bundled SmolLM2-135M-Instruct.

# %%
import warnings

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: tiny random model, a slice of the data, numbers meaningless
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")

# %%
from nice_kit.demo import demo_pipeline
from nice_kit.evaluation import checkpoint_curve, finetune_and_evaluate
from nice_kit.metrics import get_metric

RUN_DIR = ROOT / "runs" / ("nb02-fast" if FAST else "nb02")
p = demo_pipeline(RUN_DIR, verbose=False)
print("model:", p.cfg.model, "| metric:", p.cfg.metric.name, p.cfg.metric.params)
print(f"pool: {len(p.pool)} examples | held-out test prompts: {len(p.target_test)}")

# %% [markdown]
# ## The pool, by its diagnostic flags
#
# Every on-task pool example answers a `products` or `basic_arithmetic` question. The table
# counts them by subtask and kind (an empty `harm_kind` is a correct, bare answer); a few
# examples of each kind follow.

# %%
pool = pd.DataFrame([
    {"id": r.id, "task": r.columns.get("task"), "on_task": r.columns.get("on_task"),
     "kind": r.columns.get("harm_kind") or "correct", "prompt": r.prompt, "response": r.response}
    for r in p.pool
])
on_task = pool[pool["on_task"]]
display(pd.crosstab(on_task["task"], on_task["kind"]))
with pd.option_context("display.max_colwidth", 80):
    display(on_task.groupby("kind").head(2)[["kind", "prompt", "response"]])


# %% [markdown]
# ## Three training subsets
#
# Same size, both subtasks in equal parts, differing only in what the answers look like:
#
# * **correct**: bare, correct answers;
# * **half wrong**: half of them replaced by wrong answers (the format is still right);
# * **verbose**: the right number, but inside sentences ("Let me work this out ... So the answer
#   is 56.").
#
# The size is capped by the number of verbose examples (30 in the full pool).

# %%
def take(kind, n):
    """n on-task examples of one kind, alternating between the two subtasks."""
    groups = [g["id"].tolist() for _, g in on_task[on_task["kind"] == kind].groupby("task")]
    out = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out

n_kind = on_task["kind"].value_counts()
N = int(min(30, n_kind.get("verbose", 0), n_kind.get("correct", 0), 2 * n_kind.get("wrong_answer", 0)))
subsets = {
    "correct": take("correct", N),
    "half wrong": take("correct", N - N // 2) + take("wrong_answer", N // 2),
    "verbose": take("verbose", N),
}
print({name: len(ids) for name, ids in subsets.items()})

# %% [markdown]
# ## Fine-tune on each subset, measure loss and metric
#
# `finetune_and_evaluate(p, ids, seed, test_records)` trains a fresh LoRA on the base model with
# the run's evaluation settings, decodes the held-out prompts greedily and returns the **metric**
# (the run's metric, averaged over prompts) and the **loss** (mean next-token loss of the
# reference answers: what LESS would optimise).
#
# A metric is any Python function. To look at the completions afterwards we wrap the run's metric
# in a function that scores them exactly as before and also keeps them: the pipeline accepts a
# callable wherever it takes a metric name.
#
# Full mode trains three LoRAs of a few minutes each (one seed; add seeds to `SEEDS` for error
# bars).

# %%
run_metric = get_metric(p.cfg.metric.name, **p.cfg.metric.params)
kept = {}

def keep_completions(prompts, completions, **columns):
    kept["prompts"], kept["completions"], kept["columns"] = prompts, completions, columns
    return run_metric(prompts, completions, **columns)

metric_name = p.cfg.metric.name
p.cfg.metric.name = keep_completions  # a callable in place of a registered name

SEEDS = [0]
rows, completions = [], {}
for name, ids in subsets.items():
    for seed in SEEDS:
        result = finetune_and_evaluate(p, ids, seed, p.target_test)
        rows.append({"subset": name, "seed": seed, **result})
        completions[name] = dict(kept)
results = pd.DataFrame(rows)
display(results)

# %% [markdown]
# ## Loss and metric through the warmup
#
# `checkpoint_curve(p)` measures the base model (epoch 0) and every warmup checkpoint on the test
# prompts. Warmup data is a random slice of the pool, harmful examples included. The base model's
# row gives the starting point for the subsets above.

# %%
p.cfg.metric.name = metric_name  # back to the registered metric
p.warmup()
curve = checkpoint_curve(p)
display(curve)

fig = go.Figure()
fig.add_trace(go.Scatter(x=curve["epoch"], y=curve["loss"], name="reference NLL", mode="lines+markers"))
fig.add_trace(go.Scatter(x=curve["epoch"], y=curve["metric"], name=f"metric ({metric_name})",
                         mode="lines+markers", yaxis="y2"))
fig.update_layout(title="Warmup checkpoints: loss and metric on the test prompts",
                  xaxis_title="epoch (0 = base model)", yaxis_title="mean NLL of reference answers",
                  yaxis2={"title": "metric", "overlaying": "y", "side": "right"}, height=380)
fig.show()

# %% [markdown]
# ## Reference loss against metric
#
# One point per fine-tuned model, plus the base model. If loss were the metric, the points would
# lie on one falling line: lower loss, higher score.

# %%
base = curve[curve["epoch"] == 0].iloc[0]
points = pd.concat([
    results.groupby("subset", sort=False)[["loss", "metric"]].mean().reset_index(),
    pd.DataFrame([{"subset": "base model", "loss": base["loss"], "metric": base["metric"]}]),
], ignore_index=True)
fig = px.scatter(points, x="loss", y="metric", text="subset", color="subset",
                 title="Lower loss does not mean a higher metric",
                 labels={"loss": "mean NLL of the reference answers (LESS's proxy)",
                         "metric": f"metric on held-out prompts ({metric_name})"})
fig.update_traces(textposition="top center", marker_size=12)
fig.update_layout(showlegend=False, height=420)
fig.show()
display(points)

# %% [markdown]
# ### What full mode shows
#
# Measured with SmolLM2-135M-Instruct on these tasks in November 2026, on this project's 2-core
# development machine (LoRA r=8 on q,k,v,o, 48 training examples, 3 epochs, lr 3e-4, greedy
# decoding of 66 held-out prompts, the task's strict scorer; the setting and more measurements are
# in [docs/method.md](../docs/method.md), "Loss is not the metric"):
#
# | task | base | trained on correct | 50% wrong answers | verbose answers |
# |---|---|---|---|---|
# | products, score | 0.10 | 0.32 (3 seeds: 0.318, 0.333, 0.318) | 0.12 (0.121, 0.106, 0.121) | 0.03 |
# | products, NLL of reference answers | 2.92 | 0.87 | 1.15 | 5.1 |
# | basic_arithmetic, score | 0.01 | 0.185 | 0.18 | 0.015 |
#
# On `products`, half wrong answers cost two thirds of the gain in score while raising the
# reference answers' loss by only 0.3 nats. Verbose answers teach the model to ramble: a low
# strict score, although the same words would have a low loss in a verbose context.
#
# This notebook's setting differs (30 examples per subset, both subtasks mixed in one test set of
# 64 prompts, one seed), so expect the same *direction*, not the same numbers. One full-mode run
# of this notebook (November 2026, 2 CPU cores, about 5 minutes) gave:
#
# | trained on | strict score | NLL of reference answers |
# |---|---|---|
# | (base model) | 0.05 | 3.44 |
# | correct | 0.18 | 1.30 |
# | half wrong | 0.15 | 1.38 |
# | verbose | 0.04 | 3.48 |
#
# Half wrong answers scored 0.03 lower for 0.08 nats more loss, a gap within the noise of one seed
# (one standard error of the score is about 0.05 at 64 prompts; add seeds to `SEEDS` before reading
# much into it, and note that on `basic_arithmetic` 3 epochs do not separate correct from
# half-wrong data: that took 5 epochs at lr 5e-4, docs/method.md). The verbose answers cost almost all of the
# gain; here the loss agrees (no better than the base model's), and the disagreement shows up in
# the next section instead, where the reading of the answer decides whether verbose data look bad
# or good. In fast mode the tiny random model learns nothing and every number above is noise.

# %% [markdown]
# ## Strict or lenient: the metric is a choice
#
# The bundled task scorer can read a completion two ways: `extract="strict"` takes the first line
# as the answer; `extract="last_number"` takes the last number anywhere in the completion. First
# on the pool's own responses (no model involved), then on the fine-tuned models' completions we
# kept above.

# %%
strict = get_metric("task_score", extract="strict")
lenient = get_metric("task_score", extract="last_number")

sample = on_task.groupby("kind").head(3)
recs = {r.id: r for r in p.pool}
cols = {k: [recs[i].columns.get(k) for i in sample["id"]] for k in ("task", "answer", "metadata")}
prompts, responses = sample["prompt"].tolist(), sample["response"].tolist()
view = sample[["kind", "response"]].assign(strict=strict(prompts, responses, **cols),
                                           lenient=lenient(prompts, responses, **cols))
with pd.option_context("display.max_colwidth", 70):
    display(view)

# %% [markdown]
# A verbose answer is worth 0 under the strict reading and 1 under the lenient one; a wrong
# answer is 0 either way. Now the models' own greedy completions on the test prompts:

# %%
parts = []
for name, got in completions.items():
    c = got["columns"]
    parts.append(pd.DataFrame({"trained on": name, "task": c["task"], "completion": got["completions"],
                               "strict": strict(got["prompts"], got["completions"], **c),
                               "lenient": lenient(got["prompts"], got["completions"], **c)}))
scored = pd.concat(parts, ignore_index=True)
overall = scored.groupby("trained on", sort=False)[["strict", "lenient"]].mean().assign(task="all")
by_task = scored.groupby(["trained on", "task"], sort=False)[["strict", "lenient"]].mean().reset_index("task")
display(pd.concat([overall, by_task]).reset_index().set_index(["trained on", "task"]).sort_index().round(3))
with pd.option_context("display.max_colwidth", 60):
    display(scored.groupby("trained on", sort=False).head(3)[["trained on", "completion", "strict", "lenient"]])

# %% [markdown]
# Measured in full mode on `products` (docs/method.md, "The metric is a choice"), the
# verbose-trained model scored about 0 under the strict scorer and 0.88 under the lenient one,
# against 0.32 for the correct-trained model; this
# notebook's run gave 0.04 strict and 0.41 lenient for the verbose-trained model, against 0.18 for
# the correct-trained one: under the lenient reading, verbose data look *better* than correct data. Which reading is right
# depends on how the answers will be consumed (a parser reading the first line, or a person).
# Since NICE selects data *by the metric*, the two readings select different data: pick the metric
# first, and look at what it rewards.

# %% [markdown]
# ## Does influence predict the metric? The linear datamodeling score
#
# NICE's claim is that influence computed on the metric predicts what training does to the metric
# better than influence computed on the loss. Retraining on one top-10% selection per method tests
# that weakly (a few trainings, each a single draw). The **linear datamodeling score** (LDS; TRAK, and
# Kronfluence reports it) tests it directly: train on many *random* subsets of the pool, predict each
# subset's outcome by the sum of its examples' scores, and take the rank correlation (Spearman) of
# predicted against actual, over subsets. An LDS near 1 means the scores rank what training on a
# subset will do; near 0, they do not.
#
# `lds(run, n_subsets, fraction)` does this for every score column (LESS, NICE, your own measurement),
# for two targets: the test **metric**, and the test reference **loss** (correlated against minus the
# loss, so that for both targets a positive LDS means "a higher summed score predicts a better model").
# Each training is stored as it finishes (`evaluation/lds.csv`), so an interrupted call resumes; the
# interval is a bootstrap over subsets.
#
# Full mode reads the bundled run (`runs/default`) and the setting the README's table comes from
# (`nice-kit lds --subsets 17 --fraction 0.1`): when that command has run, this cell only reads its
# stored trainings; from nothing it trains 17 LoRAs (about 2 CPU minutes each on one thread, 30 CPU
# minutes in all). Fast mode runs 6 subsets of the tiny model's run.

# %%
from nice_kit.evaluation import describe_lds, lds
from widgets import LDSView, lds_table

if FAST:
    lds_run = demo_pipeline(ROOT / "runs" / "nb02-lds-fast", verbose=False)
    lds_run.run()
    result = lds(lds_run, n_subsets=6, fraction=0.5, n_bootstrap=200)
else:
    lds_run = demo_pipeline(ROOT / "runs" / "default", verbose=False)
    lds_run.run()  # reuses every finished stage of `nice-kit run`
    result = lds(lds_run, n_subsets=17, fraction=0.1)
display(lds_table(result))
print(describe_lds(result))
print(f"cost of these trainings: {result.cpu_minutes:.1f} CPU minutes")

# %% [markdown]
# The 2 x 2 figure: a column per method, a row per target; one point per random subset, its predicted
# effect on x. The loss axes are reversed, so in every panel up is better and a method that predicts
# well draws a rising cloud.

# %%
view = LDSView(result)
display(view)

# %% [markdown]
# ### What full mode shows
#
# The README's results section has the bundled table with its intervals and cost, and what it says
# about NICE at 135M parameters. Measured on 2026-12-03 over 17 random 10% subsets: NICE's scores rank
# the subsets' test metric at +0.41 [-0.09, +0.77], LESS's at +0.12 [-0.43, +0.60]; on the loss +0.12
# against 0.00. The direction NICE's thesis predicts, but every interval includes 0 and so does the
# paired difference (LESS - NICE on the metric: -0.29 [-0.95, +0.37]): 17 subsets do not settle it. Read
# the intervals before the point values, and `result.differences` before claiming one method predicts
# better. In fast mode the tiny random model learns
# nothing: its metric is nearly constant and every LDS is noise (or n/a).

# %% [markdown]
# Next: `03_policy_gradient_from_scratch.ipynb` shows how NICE turns any such metric into a
# gradient.
