"""Policy-gradient weights: how much each sampled completion counts in a target prompt's gradient.

G_j = sum_k a_jk * grad NLL_sum(y_jk | x_j) (+ a_ref * grad NLL(y_ref | x_j) on fallback), where the
weights a come from the rewards (NICE.md, step 5):

* ``vanilla``: a_k = r_k (the reference's default: no baseline);
* ``rejection``: keep completions whose reward beats the reference answer's reward;
* ``topk``: keep the ``topk`` best completions;

then optionally subtract a baseline over the kept completions (``mean``, or leave-one-out ``loo``),
fall back to the reference answer when nothing is kept, and divide by the number kept.
A prompt whose completions all score the same carries no signal: it gets all-zero weights and
``signal=False``, and is left out of the influence aggregate (never a NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("vanilla", "rejection", "topk")
BASELINES = ("none", "mean", "loo")


@dataclass
class PromptWeights:
    completion: list[float]  # a_k, one per sampled completion
    reference: float  # weight on the reference answer's NLL (fallback), 0 if unused
    signal: bool
    note: str = ""


def policy_weights(rewards: list[float], *, variant: str = "vanilla", baseline: str = "mean", topk: int = 4,
                   reference_reward: float | None = None, fallback_to_reference: bool = True,
                   divide_by_kept: bool = True) -> PromptWeights:
    """The weights of one target prompt's completions given their rewards."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, not {baseline!r}")
    k = len(rewards)
    zero = [0.0] * k
    if k == 0:
        return PromptWeights(zero, 0.0, False, "no completions")
    if variant == "rejection":
        if reference_reward is None:
            raise ValueError("the rejection variant needs the reference answer's reward (it is not label-free)")
        kept = [i for i, r in enumerate(rewards) if r > reference_reward]
    elif variant == "topk":
        kept = sorted(range(k), key=lambda i: (-rewards[i], i))[: max(1, topk)]
    else:
        kept = list(range(k))
    if not kept:
        if fallback_to_reference and reference_reward is not None:
            return PromptWeights(zero, 1.0, True, "no completion beat the reference: fell back to it")
        return PromptWeights(zero, 0.0, False, "no completion kept")
    if max(rewards) == min(rewards):
        return PromptWeights(zero, 0.0, False, f"all {k} completions scored {rewards[0]:g}: no signal")
    kept_r = [rewards[i] for i in kept]
    n = len(kept)
    if baseline == "mean" and n > 1:
        mean = sum(kept_r) / n
        adv = [r - mean for r in kept_r]
    elif baseline == "loo" and n > 1:
        total = sum(kept_r)
        adv = [r - (total - r) / (n - 1) for r in kept_r]
    else:
        adv = kept_r
    if divide_by_kept:
        adv = [a / n for a in adv]
    weights = list(zero)
    for i, a in zip(kept, adv):
        weights[i] = float(a)
    if all(w == 0 for w in weights):
        return PromptWeights(zero, 0.0, False, "kept completions scored the same: no signal")
    return PromptWeights(weights, 0.0, True)
