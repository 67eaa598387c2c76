"""Policy-gradient weights: how much each sampled completion counts in a target prompt's gradient.

G_j = sum_k a_jk * grad NLL_sum(y_jk | x_j) (+ a_ref * grad NLL_sum(y_ref | x_j) on fallback), where
the weights a come from the rewards r_jk (docs/method.md, step 5):

* ``vanilla``: a_k = r_k, every completion kept. With ``baseline="none"`` this is the reference
  implementation's estimator (github.com/JTWang2000/NICE, ``policy=vanilla``).
* ``rejection``: keep the completions whose reward reaches the reference answer's, ties included
  (r_k > r_ref - 1e-5, the reference's ``hard_rejection``); when none is kept and
  ``fallback_to_reference`` is set, the prompt's gradient is the reference answer's summed NLL
  weighted by its reward (the reference's ``worst_case_protect``).
* ``topk``: keep the ``topk`` best completions.

Options beyond the reference (named, off in ``configs/paper.toml``): a ``baseline`` subtracted over
the kept completions (``mean``, or leave-one-out ``loo``), which makes a prompt whose completions
all score the same carry no gradient at all; ``divide_by_kept`` (the reference divides by the number
kept for rejection only; for the cosine it is a positive factor and changes nothing).

A prompt whose weights are all zero carries no signal: ``signal=False``, and it is left out of the
influence aggregate (never a NaN). Without a baseline, equal non-zero rewards are *not* zero: such a
prompt keeps its gradient, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VARIANTS = ("vanilla", "rejection", "topk")
BASELINES = ("none", "mean", "loo")
TIE_TOLERANCE = 1e-5  # the reference keeps completions whose reward is within this of the reference's


@dataclass
class PromptWeights:
    completion: list[float]  # a_k, one per sampled completion
    reference: float  # weight on the reference answer's summed NLL (fallback), 0 if unused
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
        kept = [i for i, r in enumerate(rewards) if r > reference_reward - TIE_TOLERANCE]
    elif variant == "topk":
        kept = sorted(range(k), key=lambda i: (-rewards[i], i))[: max(1, topk)]
    else:
        kept = list(range(k))
    if not kept:
        if fallback_to_reference and reference_reward is not None:
            if reference_reward == 0:
                return PromptWeights(zero, 0.0, False, "no completion reached the reference, whose reward is 0")
            return PromptWeights(zero, float(reference_reward), True,
                                 "no completion reached the reference answer's reward: fell back to it")
        return PromptWeights(zero, 0.0, False, "no completion kept")
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
        if len(set(kept_r)) == 1 and baseline != "none":
            return PromptWeights(zero, 0.0, False, f"all {n} kept completions scored {kept_r[0]:g}: no signal")
        return PromptWeights(zero, 0.0, False, "every weight is zero: no signal")
    return PromptWeights(weights, 0.0, True)


def applicable_settings(policy: Any, label_free: bool = False) -> dict[str, Any]:
    """The policy settings that change the estimator for the configured variant (and nothing else).

    Used in stage keys (a setting that does nothing never forces a recomputation) and in the
    rollout viewer's header."""
    out: dict[str, Any] = {"variant": policy.variant, "baseline": policy.baseline,
                           "divide_by_kept": policy.divide_by_kept, "token_normalize": policy.token_normalize,
                           "include_eos": getattr(policy, "include_eos", True)}
    if policy.variant == "topk":
        out["topk"] = policy.topk
    if policy.variant == "rejection" and not label_free:
        out["fallback_to_reference"] = policy.fallback_to_reference
    return out
