"""Policy-gradient weights: how much each sampled completion counts in a target prompt's gradient.

G_j = sum_k a_jk * grad NLL_sum(y_jk | x_j) (+ a_ref * grad NLL_sum(y_ref | x_j) on fallback), where
the weights a come from the rewards r_jk (docs/method.md, step 5).

**nice_kit's estimator** (``policy.estimator = "nice_kit"``, the default, :func:`policy_weights`):

* ``vanilla``: a_k = r_k, every completion kept;
* ``rejection``: keep the completions whose reward reaches the reference answer's, ties included
  (r_k > r_ref - 1e-5, the rule of the reference's ``hard_rejection``); when none is kept and
  ``fallback_to_reference`` is set, the prompt's gradient is the reference answer's summed NLL
  weighted by its reward;
* ``topk``: keep the ``topk`` best completions;
* a ``baseline`` subtracted over the kept completions (``mean``, or leave-one-out ``loo``), which
  makes a prompt whose completions all score the same carry no gradient at all; ``divide_by_kept``
  (a positive factor per prompt: no cosine changes).

A prompt whose weights are all zero carries no signal: ``signal=False``, and nice_kit's estimator
leaves it out of the influence aggregate (never a NaN). Without a baseline, equal non-zero rewards
are *not* zero: such a prompt keeps its gradient. Where this estimator departs from the reference's
is listed, with reasons, in docs/method.md.

**The reference's estimator** (``policy.estimator = "reference"``, :func:`reference_weights`) is the
arithmetic of github.com/JTWang2000/NICE (``obtain_policy_gradients`` in
``nice/data_selection/collect_grad_reps.py``), under its own variant names:

* ``vanilla``: a_k = r_k for every completion, no division;
* ``rejection``: keep r_k > 0; ``hard_rejection``: keep r_k > r_ref - 1e-5; both divide the kept
  rewards by the number kept;
* ``topk_rejection`` / ``topk_hard``: first the 10 highest rewards, ties going to the *later*
  samples (a stable ``argsort(r)[-10:][::-1]``), then the rule of ``rejection`` / ``hard_rejection``
  among those 10, divided by the number kept among them;
* when a rejection variant keeps nothing, the prompt's gradient is the reference answer's summed NLL
  times its reward if ``worst_case_protect`` (off by default, as in the reference), else zero.

Such a zero gradient is not dropped: it counts as a cosine of 0 in its subtask's mean, as the
reference's ``nan_to_num(0)`` makes it count (:mod:`nice_kit.measurements` re-encodes the
completion's text as the reference does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# the names settings choose from live with the settings (policy.estimator: nice_kit's own estimator, with
# VARIANTS and BASELINES, or the reference's arithmetic with REFERENCE_VARIANTS)
from .settings import BASELINES, REFERENCE_VARIANTS, VARIANTS


TIE_TOLERANCE = 1e-5  # the reference keeps completions whose reward is within this of the reference's
REFERENCE_TOPK = 10  # the reference's topk_sampling for topk_rejection and topk_hard


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


def reference_weights(rewards: list[float], *, variant: str = "vanilla", reference_reward: float | None = None,
                      worst_case_protect: bool = False) -> PromptWeights:
    """The reference implementation's weights of one target prompt's completions (module docstring).

    ``reference_reward`` (the metric on the reference answer) is needed by ``hard_rejection``,
    ``topk_hard`` and by ``worst_case_protect``. ``signal`` says whether any weight is non-zero; a
    prompt without one still counts (as zero) in the reference's aggregate."""
    if variant not in REFERENCE_VARIANTS:
        raise ValueError(f"the reference estimator's variant must be one of {REFERENCE_VARIANTS}, not {variant!r}")
    k = len(rewards)
    zero = [0.0] * k
    if variant == "vanilla":
        weights = [float(r) for r in rewards]
        signal = any(w != 0 for w in weights)
        return PromptWeights(weights, 0.0, signal, "" if signal else "every reward is 0: zero gradient (counts as 0)")
    hard = variant in ("hard_rejection", "topk_hard")
    if hard and reference_reward is None:
        raise ValueError(f"the reference's {variant} compares with the reference answer's reward; none is given")
    threshold = float(reference_reward) - TIE_TOLERANCE if hard else 0.0
    if variant.startswith("topk_"):
        candidates = [int(i) for i in np.argsort(np.asarray(rewards, dtype=np.float64), kind="stable")
                      [-REFERENCE_TOPK:][::-1]]
    else:
        candidates = list(range(k))
    kept = [i for i in candidates if rewards[i] > threshold]
    if kept:
        weights = list(zero)
        for i in kept:
            weights[i] = float(rewards[i]) / len(kept)
        signal = any(w != 0 for w in weights)
        return PromptWeights(weights, 0.0, signal, "" if signal else "every kept reward is 0: zero gradient")
    if worst_case_protect and reference_reward is not None and reference_reward != 0:
        return PromptWeights(zero, float(reference_reward), True,
                             "no completion kept: the reference answer's gradient times its reward (worst_case_protect)")
    return PromptWeights(zero, 0.0, False, "no completion kept: zero gradient (counts as 0 in its subtask's mean)")


def applicable_settings(policy: Any, label_free: bool = False) -> dict[str, Any]:
    """The policy settings that change the estimator for the configured variant (and nothing else).

    Used in stage keys (a setting that does nothing never forces a recomputation) and in the
    rollout viewer's header."""
    if getattr(policy, "estimator", "nice_kit") == "reference":
        ref: dict[str, Any] = {"estimator": "reference", "variant": policy.variant, "do_normalize": policy.do_normalize}
        if policy.variant != "vanilla":
            ref["worst_case_protect"] = policy.worst_case_protect
        return ref
    out: dict[str, Any] = {"variant": policy.variant, "baseline": policy.baseline,
                           "divide_by_kept": policy.divide_by_kept, "token_normalize": policy.token_normalize,
                           "include_eos": getattr(policy, "include_eos", True)}
    if policy.variant == "topk":
        out["topk"] = policy.topk
    if policy.variant == "rejection" and not label_free:
        out["fallback_to_reference"] = policy.fallback_to_reference
    return out
