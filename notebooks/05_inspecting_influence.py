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
# # Inspecting influence scores
#
# What did NICE and LESS like, what did they give the harmful examples, where do they disagree, and what
# did the model's sampled completions look like? This notebook opens the run of `01_quickstart.ipynb`
# (and makes it when it is missing: every stage is cached in the run directory).
#
# Set `NICE_KIT_FAST=1` for the one-minute version on a tiny model (its numbers are noise).

# %%
import pandas as pd
from IPython.display import display

from nice_kit.demo import demo_pipeline, fast_mode
from widgets import (
    InfluenceExplorer,
    RolloutViewer,
    disagreements,
    influence_scatter,
    pool_frame,
    spearman,
)

pd.set_option("display.max_colwidth", 70)
run_dir = "../runs/quickstart-fast" if fast_mode() else "../runs/default"  # the run of 01_quickstart (and of nice-kit run)
p = demo_pipeline(run_dir)
diagnostics = p.run()  # instant when 01_quickstart has run
# a finished run can also be opened from disk alone, without loading the model: widgets.open_run(run_dir)
frame = pool_frame(p)
frame.head()

# %% [markdown]
# ## Top and bottom examples
#
# `nice_rank` and `less_rank` count from 1 (most influential). The columns `harmful` and `harm_kind` come
# from the benchmark; the selectors never read them.

# %%
cols = ["id", "task", "harmful", "harm_kind", "nice", "less", "less_rank", "prompt", "response"]
frame.sort_values("nice", ascending=False)[cols].head(8)

# %%
frame.sort_values("nice")[cols].head(8)

# %% [markdown]
# ## What did the harmful examples get?
#
# A good selector ranks harmful examples low. The table gives each group's mean percentile (100 = top of the
# pool) under each method; the diagnostics table gives the share of harmful examples inside each selection.

# %%
n = len(frame)
groups = frame.assign(group=frame["harm_kind"].fillna("clean"))
summary = groups.groupby("group").agg(
    examples=("id", "size"),
    nice_percentile=("nice_rank", lambda r: float((1 - (r.astype(float) - 1) / n).mean() * 100)),
    less_percentile=("less_rank", lambda r: float((1 - (r.astype(float) - 1) / n).mean() * 100)),
)
display(summary)

# %%
display(diagnostics)

# %%
import plotly.express as px

long = groups.melt(id_vars=["id", "group"], value_vars=["nice", "less"], var_name="method", value_name="score")
px.box(long, x="group", y="score", color="method", points="all",
       title="Influence scores by kind of example").show()

# %% [markdown]
# ## NICE vs LESS
#
# Each point is a pool example (harmful ones in red). A rank correlation near 1 means the metric-driven
# gradient points the same way as the loss-driven one; the interesting examples are those far from the
# diagonal.

# %%
print(f"Spearman rank correlation between NICE and LESS: {spearman(frame['nice'], frame['less']):.3f}")
influence_scatter(frame).show()

# %%
disagreements(frame, "nice", "less", n=8)

# %% [markdown]
# How much do the two selections (the top fraction of the pool by each score) overlap?

# %%
chosen = p.select()
nice_ids, less_ids = set(chosen["nice"]), set(chosen["less"])
print(f"selected {len(nice_ids)} examples each; {len(nice_ids & less_ids)} in both")
only = frame[frame["id"].isin(nice_ids ^ less_ids)].assign(
    picked_by=lambda d: d["id"].map(lambda i: "NICE only" if i in nice_ids else "LESS only"))
only[["picked_by"] + cols].sort_values("picked_by")

# %% [markdown]
# The same, interactively: sort by either method, filter by task, harmful flag or text, and click a
# point of the scatter to read its example.

# %%
explorer = InfluenceExplorer(p, method="nice")
explorer.flag.value = "harmful"
display(explorer)

# %% [markdown]
# ## The completions behind NICE's gradient
#
# For each target prompt and checkpoint, the sampled completions, their rewards and their policy-gradient
# weights (reward minus the mean reward of the prompt's completions). Green completions are pushed up, red
# ones down; a prompt whose completions all scored the same carries no signal and is left out.

# %%
viewer = RolloutViewer(p)
display(viewer)

# %%
viewer.figure().show()  # static version of the selected prompt's rewards and weights
