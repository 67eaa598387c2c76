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

# %% [markdown]
# ## Why this example? A score taken apart
#
# An influence score is a weighted sum of cosines (docs/method.md, step 6): for each warmup checkpoint
# c and target prompt j, the cosine between the example's preconditioned gradient and the prompt's
# validation gradient, weighted by the checkpoint's learning-rate share w_c; then the mean over each
# subtask's prompts and the max over subtasks. Once the winning subtask is known that is linear, so
# the score is a sum of terms `weight x cosine`, one per checkpoint and prompt, with weight w_c / (number
# of the winning subtask's valid prompts) and 0 for the other subtasks' prompts.
#
# For NICE, a prompt's gradient is itself a sum over its sampled completions, sum_k a_k grad NLL(y_k),
# and the random projection is linear, so every completion gets its own share of the prompt's term.
# `p.explain(example_id, "nice")` returns all of it as tables: `prompts` (per checkpoint and prompt),
# `subtasks` (the means, and which won) and `completions` (per sampled completion: text, reward, policy
# weight a_k and contribution). The first call computes one projected gradient per sampled completion
# and stores it beside the prompt vectors; later calls only read.
#
# How to read a sign: a contribution above 0 means a training step on the example moves the model
# the way the metric wants. For a rewarded completion (a_k > 0) that means making it more likely; for
# a punished one (a_k < 0), making it less likely.
#
# First, the terms really add up to the stored scores, for every example:

# %%
from nice_kit.explain import check_decomposition, format_explanation
from widgets.why import why_panel

check = check_decomposition(p, "nice")
print(f"largest |sum of contributions - stored NICE score| over {len(check)} examples: "
      f"{check['difference'].abs().max():.2g}")
print(f"largest gap between a prompt's completions and its contribution: {check['completion_difference'].max():.2g} "
      f"({check['completion_ratio'].max():.0%} of what float16 storage allows)")

# %% [markdown]
# Two examples: a harmful one that NICE picked (or, when it picked none, the harmful example it ranked
# highest), and a good one (not harmful, and on the target's tasks when the pool says so) that it did not
# pick: the one it ranked lowest.

# %%
ranked = frame.sort_values("nice", ascending=False)
is_harmful = ranked["harmful"].fillna(False).astype(bool)
harmful_picked = ranked[is_harmful & ranked["id"].isin(nice_ids)]
if len(harmful_picked):
    bad_id = harmful_picked["id"].iloc[0]
    print(f"{bad_id}: harmful ({frame.set_index('id').loc[bad_id, 'harm_kind']}) and picked by NICE")
else:
    bad_id = ranked[is_harmful]["id"].iloc[0]
    print(f"NICE picked no harmful example; {bad_id} is the harmful example it ranked highest")
good = ranked[~is_harmful & ~ranked["id"].isin(nice_ids)]
if "on_task" in good.columns and good["on_task"].fillna(False).astype(bool).any():
    good = good[good["on_task"].fillna(False).astype(bool)]  # a correct answer of the target's own tasks
good_id = good["id"].iloc[-1]
print(f"{good_id}: not harmful, not picked (NICE rank {frame.set_index('id').loc[good_id, 'nice_rank']} of {n})")
frame.set_index("id").loc[[bad_id, good_id], ["task", "harmful", "harm_kind", "nice", "nice_rank", "prompt",
                                             "response"]]

# %%
def in_words(e) -> str:
    """One explanation as a few sentences, from its tables."""
    per = e.by_prompt()
    subs = e.subtasks.set_index("subtask")["mean"]
    if e.winner is None:
        how = "the mean over every target prompt"
    else:
        others = ", ".join(f"{s} {v:+.3g}" for s, v in subs.items() if s != e.winner)
        how = f"the mean of subtask {e.winner!r}, which won the max ({subs[e.winner]:+.3g}; {others or 'no other'})"
    out = [f"{e.example_id} scored {e.score:+.4g} under {e.method.upper()}: {how}."]
    up, down = per[per["contribution"] > 0], per[per["contribution"] < 0]
    if len(up):
        out.append(f"{len(up)} target prompt(s) pushed it up, most {up['prompt_id'].iloc[0]} "
                   f"({up['contribution'].iloc[0]:+.3g}: {up['prompt'].iloc[0][:60]!r}).")
    if len(down):
        out.append(f"{len(down)} pushed it down, most {down['prompt_id'].iloc[-1]} ({down['contribution'].iloc[-1]:+.3g}).")
    top = e.top_prompt()
    if top is not None and e.completions is not None:
        comp = e.completions_of(top)
        c = comp.loc[comp["contribution"].abs().idxmax()]
        kind = "rewarded" if c["policy_weight"] > 0 else "punished" if c["policy_weight"] < 0 else "unweighted"
        effect = ("more likely" if c["policy_weight"] > 0 else "less likely") if c["contribution"] > 0 else (
            "less likely" if c["policy_weight"] > 0 else "more likely")
        out.append(f"Within {top}, the largest share ({c['contribution']:+.3g}) comes from the {kind} completion "
                   f"{c['text'][:50]!r} (reward {c['reward']:.2g}, policy weight {c['policy_weight']:+.3g}, "
                   f"epoch {c['epoch']}): a training step on this example makes it {effect}.")
    return " ".join(out)


bad_why = p.explain(bad_id, "nice")
print(in_words(bad_why))
print()
print(format_explanation(bad_why, top=6))

# %% [markdown]
# The same as a panel: a bar per target prompt (green pushed the score up, red down; prompts of a
# subtask that lost the max do not count and have no bar), and the completions of the top prompt,
# rewarded ones apart from punished ones. Click a bar, or choose in the dropdown, for another prompt.

# %%
display(why_panel(p, bad_id, "nice"))

# %%
good_why = p.explain(good_id, "nice")
print(in_words(good_why))
display(why_panel(p, good_id, "nice"))

# %% [markdown]
# LESS's score of the same example decomposes the same way, over the reference answers instead of
# sampled completions (so there is nothing below the prompts):

# %%
less_why = p.explain(good_id, "less")
print(in_words(less_why))
less_why.by_prompt()[["prompt_id", "subtask", "similarity", "contribution", "prompt"]]

# %% [markdown]
# ## What if? The same run under another metric, estimator or baseline
#
# NICE's prompt vector is a sum over the prompt's sampled completions, and the random projection is
# linear, so once every completion's projected gradient is stored (computed once, beside the prompt
# vectors) any other policy weights give new prompt vectors by a small matrix product: `p.what_if(...)`
# re-selects without sampling again and without loading the model (a new metric only scores the stored
# completions). What it cannot answer is refused, never approximated: anything that changes the samples
# (`rollouts.*`), the warmup, the training gradients or the projection.
#
# Three questions: another metric, the reference implementation's estimator (raw rewards, re-encoded
# completions, no end-of-sequence token), and nice_kit's estimator without a baseline.

# %%
from nice_kit.export import selection_records, to_jsonl

other_metric = ({"metric.name": "length", "metric.params": {"max_words": 1}} if fast_mode()
                else {"metric.name": "task_score", "metric.params": {"extract": "last_number"}})
asks = {
    "another metric": other_metric,
    "the reference's estimator": {"policy.estimator": "reference", "policy.variant": "vanilla",
                                  "policy.baseline": "none", "policy.token_normalize": False},
    "no baseline": {"policy.baseline": "none"},
}
answers = {name: p.what_if(changes) for name, changes in asks.items()}  # the first call stores the parts


def harmful(ids) -> float:
    flags = frame.set_index("id")["harmful"].fillna(False).astype(bool)
    return float(flags.reindex(ids).mean())


reading = pd.DataFrame([{
    "what if": name, "changes": str(a.changes), "seconds": round(a.seconds, 3),
    "kept of the run's picks": f"{a.overlap} of {len(a.selected)}",
    "harmful share: run": harmful(a.current), "harmful share: what if": harmful(a.selected),
    "Spearman with the run's NICE": spearman(a.scores["current"], a.scores["what_if"]),
} for name, a in answers.items()])
reading

# %% [markdown]
# Reading the answers: "kept" is how many of the run's picks the what-if's top fraction keeps; the
# harmful shares say whether the change would pick more or fewer of the flagged examples (a cheap
# check, not the verdict: only fine-tuning on the subset says which is better, `nice-kit evaluate`);
# the rank correlation says whether the whole ranking moved or only its top. In fast mode the model is
# random and the numbers are noise; the sentences below are written from whatever the tables hold.

# %%
for name, a in answers.items():
    move = a.moves.iloc[0]
    print(f"{name}: NICE would keep {a.overlap} of its {len(a.selected)} picks "
          f"(harmful share {harmful(a.current):.0%} -> {harmful(a.selected):.0%}); the example that moves most "
          f"is {move['id']}, rank {move['rank_current']} -> {move['rank_what_if']}; "
          f"target prompts with signal per checkpoint: {a.signal}")

# %% [markdown]
# The metric picker asks the same question for the metric you choose ("what would NICE select with
# this?", with a policy preset), shows both selections side by side, and adds a `what_if` column to the
# explorer given to it. Its "adopt" button makes a what-if the run's own, through the checked stages
# (NICE's validation gradients, scores and selections recomputed; it needs the model). A selection, a
# what-if's or the explorer's filtered view, leaves as JSONL (and as a `datasets.Dataset` with a
# `messages` column for TRL's `SFTTrainer`: `nice_kit.export.to_dataset`, with `pip install
# 'nice_kit[export]'`).

# %%
from widgets import MetricPicker

picker = MetricPicker(p, explorer=explorer)
picker.policy.value = "no baseline"
picker.what_if()
display(picker)

# %%
out = to_jsonl(selection_records(p, answers["no baseline"]), f"{run_dir}/exports/what_if_no_baseline.jsonl")
print(f"wrote {sum(1 for _ in open(out))} examples to {out}")
