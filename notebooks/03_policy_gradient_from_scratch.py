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
# # 03 · Policy-gradient influence from scratch
#
# NICE scores a training example z by the cosine between two gradients:
#
# * **Γ(z)**: the gradient of z's next-token loss (NLL of its response), Adam-preconditioned;
# * **G_j**, for a target prompt x_j: `G_j = Σ_k a_k ∇ NLL_sum(y_k | x_j)` over K completions y_k
#   sampled from the model, with weights a_k computed from their rewards r_k = m(x_j, y_k).
#
# G_j needs no derivative of the metric m: m only scores samples. This notebook builds the
# estimator up from a toy you can check by hand, then checks nice_kit's implementation against a
# few lines of autograd:
#
# 1. a one-token "bandit": a softmax over four answers with explicit logits; the exact gradient of
#    expected reward;
# 2. the same gradient estimated from samples, with and without a baseline (variance);
# 3. the sign convention: a positive cosine means a step on z raises expected reward;
# 4. nice_kit's `policy_weights` and `group_gradients` on a LoRA model equal a hand-written
#    `Σ_k a_k ∇ NLL_sum(y_k)` (asserted: a mismatch fails CI), and the sign on a transformer;
# 5. random projections keep cosines.

# %% [markdown]
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` this notebook runs on a tiny
# > model with random weights and a slice of the data, in about a minute: every code path is the real
# > one, but the numbers mean nothing. Without it, it uses the bundled SmolLM2-135M-Instruct.

# %%
import warnings

import numpy as np
import pandas as pd
import plotly.express as px
import torch
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: tiny random model, a slice of the data, numbers meaningless
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")

# %% [markdown]
# ## 1 · A bandit with four answers
#
# The "model" is a vector of logits θ, one per answer; the policy is p = softmax(θ). Each answer
# has a reward. Rewards are all positive here, like a reward model's scores.
#
# Expected reward: E(θ) = Σ_a p_a r_a. Two facts do all the work:
#
# * ∂E/∂θ_i = p_i (r_i − E): answers better than average gain probability;
# * the NLL of one answer a is −log p_a, and ∇_θ NLL(a) = p − e_a (e_a: the one-hot vector of a).
#
# Hence the quantity NICE uses for a target prompt, **G = Σ_a p_a r_a ∇NLL(a) = E·p − p⊙r = −∇E**:
# the expected reward-weighted NLL gradient is *minus* the gradient of expected reward.

# %%
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

# %% [markdown]
# ## 2 · Estimating it from samples: REINFORCE and baselines
#
# In a language model we cannot sum over all answers; we sample K of them and weight each
# sample's NLL gradient: Ĝ = Σ_k a_k ∇NLL(y_k). nice_kit computes the weights with
# `policy_weights(rewards, variant=..., baseline=...)`:
#
# * `baseline="none"`: a_k = r_k / K (the weights of the reference implementation's vanilla
#   estimator, which sums without dividing by K: a scale that no cosine sees; its other details,
#   re-encoded text and prompts without signal counted as 0, are `policy.estimator = "reference"`);
# * `baseline="mean"`: a_k = (r_k − mean r) / K;
# * `baseline="loo"`: a_k = (r_k − mean of the *other* rewards) / K.
#
# With positive rewards and no baseline every sampled answer is pushed up (its a_k > 0), and
# the estimate only points the right way on average: it is noisy. Subtracting a baseline leaves
# the expectation unchanged (leave-one-out exactly; the plain mean shrinks it by (K−1)/K, which a
# cosine ignores) and removes most of the noise. With a baseline, when all K rewards are equal
# every weight is zero and `policy_weights` says `signal=False`: such a prompt carries no
# information and is left out. Without a baseline its gradient is not zero, and it counts.

# %%
from nice_kit.policy import policy_weights

K, DRAWS = 8, 2000 if FAST else 5000
rng = np.random.default_rng(0)
estimates = {b: [] for b in ("none", "mean", "loo")}
for _ in range(DRAWS):
    ys = rng.choice(len(answers), size=K, p=probs.numpy())
    rewards = r.numpy()[ys].tolist()
    for b, found in estimates.items():
        a = torch.tensor(policy_weights(rewards, variant="vanilla", baseline=b).completion, dtype=torch.float64)
        found.append(a @ grad_nll[ys])

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

# %% [markdown]
# All three point the right way on average (cosine of the mean ≈ 1), but a single vanilla estimate
# from 8 samples often points far off; with a baseline most estimates are close. nice_kit's default
# is `baseline="mean"` ([docs/method.md](../docs/method.md), "Departures from the reference").
#
# ## 3 · The sign convention
#
# A training example z is an answer we would train on; its gradient is g_z = ∇NLL(z) (the
# pipeline uses the Adam-preconditioned Γ(z), the direction of an Adam step, with the same logic).
# A gradient step on z moves θ by −η g_z, so to first order the expected reward changes by
#
# ΔE ≈ ∇E · (−η g_z) = η g_z · G.
#
# **A positive cosine between g_z and G means that a step on z raises expected reward.** Check it
# with each answer as a one-example training set: take a small step, recompute E exactly.

# %%
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

# %% [markdown]
# Training on an answer better than the current average (E) raises expected reward and has a
# positive cosine; training on a worse one lowers it. That is the whole idea: the score of z is
# how well its gradient lines up with the direction that raises the metric.
#
# ## 4 · The same thing on a transformer with LoRA
#
# Now the real machinery. A sequence's "answer" is a completion of several tokens, and
# ∇NLL_sum(y | x) is the gradient of the summed NLL of its tokens given the prompt (prompt tokens
# not counted). The completion is exactly what the model sampled: its tokens (`token_ids`), plus the
# end-of-sequence token when the model chose to stop (`ended_with_eos`); a completion cut by
# `max_new_tokens` or a stop string has no end-of-sequence token to differentiate. nice_kit batches many sequences through one forward/backward and splits the
# per-example LoRA gradients out of hooks (`group_gradients`), each sequence carrying its weight
# a_k on every completion token and the index of the target prompt it belongs to. We check that
# against the most direct computation: autograd on `Σ_k a_k · NLL_sum(y_k | x_j)`, one target
# prompt at a time.
#
# The LoRA weights are randomised first: a fresh LoRA has B = 0, which makes every gradient with
# respect to A vanish and the check half empty. Agreement is to floating-point precision: about
# 1e-7 relative on the tiny model, between 1e-7 and 1e-4 on SmolLM2 (fp32 rounding in the
# log-softmax over a 49k-token vocabulary, magnified because the weights sum to zero and the
# per-completion gradients largely cancel). A bug would show up as an error of order 1.

# %%
from nice_kit.config import RolloutSettings
from nice_kit.data import load_records, prompt_ids, tokenize_records
from nice_kit.gradients import (
    WeightedSequence,
    group_gradients,
    loop_gradients,
    mean_nll_sequence,
)
from nice_kit.models import (
    LoraSettings,
    add_lora,
    load_model,
    load_tokenizer,
    lora_parameters,
    tiny_model,
)
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
display(pd.DataFrame(rollouts)[["prompt_id", "sample", "completion", "ended_with_eos"]].assign(
    reward=[rw for t in targets for rw in rewards[t.id]]))

# %%
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
    # the sampled tokens, and the end-of-sequence token only where the model sampled it (a completion
    # cut by max_new_tokens or a stop string has none: no gradient through a token never sampled)
    comps = [row["token_ids"] + ([eos] if row["ended_with_eos"] else [])
             for row in rollouts if row["prompt_id"] == rec.id]
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

# %% [markdown]
# ### The sign on the transformer
#
# The bandit's sign check, now with a LoRA model. For one target prompt take a metric whose
# expectation we can compute exactly: the reward is 1 when the *first* token of the completion is
# a number, so E = Σ_v p(v | x) r(v) over the whole vocabulary, and G = −∇E by autograd. For a few
# pool examples z, take a small plain gradient step on z's mean NLL and recompute E: the sign of
# the change should be the sign of cos(g_z, G) (first order; up to numerical noise when the cosine
# is near 0).

# %%
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
assert clear.any(), "no pool example has |cos| > 0.05: the sign check would check nothing"
assert (np.sign(sign_table.loc[clear, "cos(g_z, G)"]) == np.sign(sign_table.loc[clear, "ΔE (measured)"])).all()
print(f"sign of the cosine = sign of the measured change for each of the {int(clear.sum())} (of {len(pool)}) examples "
      "with |cos| > 0.05")
print(f"E = P(first token is a number) = {E0.item():.3g}")
display(sign_table)

# %% [markdown]
# In full mode (SmolLM2) the pattern is readable: training on a bare-number answer raises the
# probability that the completion starts with a number, training on a verbose answer ("To solve
# this, ...") lowers it, and the measured change follows the first-order prediction closely.
#
# ## 5 · Random projections keep cosines
#
# A LoRA gradient of a 7B model has ~10^8 coordinates; NICE stores each gradient projected to
# d = 8192 dimensions with a random Johnson-Lindenstrauss matrix and compares the projected
# vectors. The cosine of two projected vectors is close to the exact cosine, with an error that
# shrinks like 1/√d. nice_kit's default is a sparse JL transform (`sjlt`, milliseconds); the
# reference uses a dense Rademacher matrix.
#
# First synthetic pairs of vectors with known cosines, then the real per-example gradients from
# above.

# %%
from nice_kit.projection import ProjectionSpec, Projector

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

# %%
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
fig.add_shape(type="line", x0=-1, y0=-1, x1=1, y1=1, line={"dash": "dot"})
fig.show()
print(f"D = {train_vecs.shape[1]:,} -> d = {d}: mean |error| {float((approx - exact).abs().mean()):.3f}")

# %% [markdown]
# ## Summary
#
# * G_j = Σ_k a_k ∇NLL_sum(y_k | x_j) is minus a sampled estimate of the gradient of expected reward;
#   the metric is only evaluated, never differentiated.
# * A baseline in the weights (`policy.baseline = "mean"` or `"loo"`) keeps the direction and cuts
#   the noise; the reference's vanilla weights (no baseline) are noisy when all rewards are positive.
# * Positive cosine between a training example's gradient and G_j: a step on that example raises
#   the expected metric on x_j.
# * `group_gradients` computes exactly the hand-written sum, for many sequences in one batch.
# * Projections to a few thousand dimensions keep cosines to within a few hundredths.
#
# Next: `04_reward_metrics.ipynb` for the metrics that produce the rewards.
