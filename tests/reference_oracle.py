"""An independent oracle of the NICE reference implementation's arithmetic (github.com/JTWang2000/NICE).

Written from the description of what the reference computes (docs/method.md, "The reference's
estimator"), not from its code and not from nice_kit's: a plain loop, one completion and one
example at a time, ordinary autograd, float64. It shares nothing with nice_kit but the model and
tokenizer it is handed, so a test that compares the two compares two implementations.

What it computes, per target prompt x_j at one checkpoint, for the reference's policy variants:

* every completion's text is encoded again, ``tokenizer.encode(text, add_special_tokens=False)``,
  after the prompt's ids; its loss is the mean token NLL of those tokens, times their number
  (``do_normalize=False``: the sum) and times its reward; the gradients are summed;
* ``vanilla`` keeps every completion and divides by nothing; ``rejection`` keeps reward > 0,
  ``hard_rejection`` reward > (reference answer's reward - 1e-5), both divide by the number kept;
  ``topk_rejection`` / ``topk_hard`` first take the 10 highest rewards (``argsort(r)[-10:][::-1]``,
  a stable sort: among ties the later samples) and then apply the rule of rejection / hard_rejection;
* a rejection variant that keeps nothing takes the reference answer's loss (its tokens as LESS
  tokenises them) times its reward when ``worst_case_protect``, times 0 otherwise;

and the influence of a training example z: Gamma_c(z) = Adam-preconditioned gradient of its mean
response NLL (no bias correction), cos(Gamma_c(z), G_cj) with a zero vector giving 0 (normalisation
leaves zero at zero; ``nan_to_num(0)`` of the checkpoint-weighted sum), summed over checkpoints with
weights lr_c / sum lr, then the mean over each subtask's prompts (every prompt counts, zero or not)
and the max over subtasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VARIANT_FLAGS = {  # variant: (rejection, topk, hard)
    "vanilla": (False, -1, False),
    "rejection": (True, -1, False),
    "hard_rejection": (True, -1, True),
    "topk_rejection": (True, 10, False),
    "topk_hard": (True, 10, True),
}


@dataclass
class OraclePrompt:
    prompt_ids: list[int]
    texts: list[str]  # the sampled completions' texts (what the metric scored)
    rewards: list[float]
    reference_ids: list[int]  # prompt + reference answer tokens as LESS tokenises them
    reference_labels: list[int]  # -100 on the prompt
    reference_reward: float | None
    subtask: str


def _params(model) -> list[torch.nn.Parameter]:
    return [p for _, p in model.named_parameters() if p.requires_grad]


def _flat_grad(model) -> torch.Tensor:
    """The LoRA parameters' gradients as one float64 vector (the oracle sums in float64 whatever the
    model's dtype)."""
    return torch.cat([p.grad.reshape(-1).double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                      for p in _params(model)])


def _mean_nll(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """The mean NLL of the tokens whose label is not -100 (the reference's ``model(**batch).loss``):
    0/0 = NaN when there is none."""
    x = torch.tensor([ids])
    y = torch.tensor([labels])
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    return F.cross_entropy(logits[0, :-1].double(), y[0, 1:], ignore_index=-100, reduction="mean")


def loss_gradient(model, ids: list[int], labels: list[int], scale: float, summed: bool,
                  cache: dict | None = None) -> torch.Tensor:
    """grad of (mean NLL x number of answer tokens if ``summed``) x ``scale``, one backward pass.

    With ``cache`` (a dict kept for one model state) the unscaled gradient of each sequence is
    computed once and multiplied by ``scale`` (the gradient is linear in it): for benchmarks that
    evaluate several variants on the same completions."""
    if cache is not None:
        key = (tuple(ids), tuple(labels), summed)
        if key not in cache:
            cache[key] = loss_gradient(model, ids, labels, 1.0, summed)
        return cache[key] * scale
    model.zero_grad(set_to_none=True)
    loss = _mean_nll(model, ids, labels)
    if summed:
        loss = loss * sum(1 for t in labels[1:] if t != -100)
    (loss * scale).backward()
    g = _flat_grad(model)
    model.zero_grad(set_to_none=True)
    return g


def prompt_gradient(model, tokenizer, p: OraclePrompt, variant: str, worst_case_protect: bool = False,
                    do_normalize: bool = False, cache: dict | None = None) -> torch.Tensor:
    """The reference's policy gradient G_j of one target prompt (float64, unprojected)."""
    rejection, topk, hard = VARIANT_FLAGS[variant]
    threshold = 0.0
    if hard:
        threshold = p.reference_reward - 1e-5
    texts, rewards = list(p.texts), list(p.rewards)
    if topk > 0:
        order = np.argsort(np.array(rewards), kind="stable")[-topk:][::-1]
        texts, rewards = [texts[i] for i in order], [rewards[i] for i in order]
    total = None
    for text, r in zip(texts, rewards):
        if rejection and r <= threshold:
            continue
        comp = tokenizer.encode(text, add_special_tokens=False) if len(text) else []
        ids = list(p.prompt_ids) + list(comp)
        labels = [-100] * len(p.prompt_ids) + list(comp)
        g = loss_gradient(model, ids, labels, r, summed=not do_normalize, cache=cache)
        total = g if total is None else total + g
    if rejection:
        if total is None:
            r_ref = p.reference_reward if worst_case_protect else 0.0
            total = loss_gradient(model, p.reference_ids, p.reference_labels, r_ref, summed=not do_normalize,
                                  cache=cache)
        else:
            total = total / sum(1 for r in rewards if r > threshold)
    return total


def train_gradient(model, ids: list[int], labels: list[int], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """Gamma(z): one Adam step's direction from the mean response NLL's gradient (no bias correction)."""
    g = loss_gradient(model, ids, labels, 1.0, summed=False)
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g * g
    return m / torch.sqrt(v + eps)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows at unit length; a zero row stays zero (a NaN row stays NaN: ``scores`` zeroes it after the
    checkpoint sum, as the reference's ``nan_to_num`` does)."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / torch.where(n > 0, n, torch.ones_like(n)), x * 0)


def scores(train: list[torch.Tensor], val: list[torch.Tensor], lrs: list[float], subtasks: list[str]) -> np.ndarray:
    """s(z) = max over subtasks of the mean over its prompts of sum_c w_c cos(Gamma_c(z), G_cj).

    ``train[c]`` (n, D) and ``val[c]`` (m, D) are unnormalised; ``lrs`` the checkpoints' learning rates."""
    w = np.asarray(lrs, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(lrs), 1.0 / len(lrs))
    total = sum(float(wc) * (unit(t.double()) @ unit(v.double()).T) for wc, t, v in zip(w, train, val))
    total = torch.nan_to_num(total, nan=0.0)
    names = sorted(set(subtasks))
    per = torch.stack([total[:, [i for i, s in enumerate(subtasks) if s == name]].mean(dim=1) for name in names], 1)
    return per.max(dim=1).values.numpy()
