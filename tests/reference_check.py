"""nice_kit's reference estimator against the independent oracle (tests/reference_oracle.py).

Shared by tests/test_reference_estimator.py (a tiny model) and bench/bench_reference.py (the
bundled model): the same real rollouts and designed rewards are fed to both sides, which then
compute every target prompt's policy gradient and the influence scores, unprojected.

The designed rewards exercise what the reference's arithmetic is particular about: ties at the
top-10 cut (sample order decides), negative rewards, rewards equal to the reference answer's, a
prompt whose rewards are all zero, an empty completion and a completion whose text encodes to
other ids than were sampled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

import reference_oracle as oracle
from nice_kit.data import prompt_ids, tokenize_pair
from nice_kit.gradients import adam_precondition, group_gradients, mean_nll_sequence
from nice_kit.influence import counted_prompts, influence_scores
from nice_kit.measurements import PolicyGradient
from nice_kit.projection import normalize_rows
from nice_kit.warmup import checkpoint_weights, load_adapter_weights

# (variant, worst_case_protect, do_normalize): every reference variant at its default, and the two options
CASES = [("vanilla", False, False), ("rejection", False, False), ("hard_rejection", False, False),
         ("topk_rejection", False, False), ("topk_hard", False, False), ("rejection", True, False),
         ("topk_hard", True, False), ("vanilla", False, True), ("hard_rejection", True, True)]

# prompt 0: ties at the top-10 cut among rewards the hard variants keep (its reference reward is -0.5)
TIES = [1.0, 0.5, 0.5, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.0, -1.0, 0.5]
REFERENCE_REWARDS = [-0.5, 1.0, 0.25, 0.5]  # prompt 1's rewards are all 0; prompt 2 has ties with 0.25


def _pattern(j: int, k: int, rng: np.random.Generator) -> list[float]:
    if j == 0:
        return [TIES[i % len(TIES)] for i in range(k)]
    if j == 1:
        return [0.0] * k
    if j == 2:
        return [[0.25, -1.0, 0.25, 1.0, 0.0, -0.5][i % 6] for i in range(k)]
    return rng.choice([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0], size=k).tolist()


def reencoding_pair(tokenizer) -> list[int]:
    """Two token ids whose decoded text encodes to other ids (e.g. "a" + "b" -> "ab")."""
    for a, b in [("a", "b"), ("1", "2"), ("th", "e"), ("in", "g")]:
        ids = tokenizer.encode(a, add_special_tokens=False) + tokenizer.encode(b, add_special_tokens=False)
        if tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False) != ids:
            return ids
    raise AssertionError("no token pair found that re-encodes differently")


def designed_rollouts(tables: dict[int, pd.DataFrame], tokenizer, seed: int = 0
                      ) -> tuple[dict[int, pd.DataFrame], dict[str, float]]:
    """The real rollouts with designed rewards, an empty completion and a re-encoded one (in the
    last target prompt, both with positive rewards so that every variant keeps them)."""
    out = {}
    rng = np.random.default_rng(seed)
    pair = reencoding_pair(tokenizer)
    prompt_order = list(dict.fromkeys(next(iter(tables.values()))["prompt_id"]))
    for epoch, df in tables.items():
        df = df.copy().reset_index(drop=True)
        for j, pid in enumerate(prompt_order):
            idx = df.index[df["prompt_id"] == pid]
            df.loc[idx, "reward"] = _pattern(j, len(idx), rng)
        last = df.index[df["prompt_id"] == prompt_order[-1]]
        empty, odd = last[0], last[1]
        df.at[empty, "completion"], df.at[empty, "token_ids"] = "", []
        df.at[empty, "ended_with_eos"], df.at[empty, "reward"] = True, 1.0
        df.at[odd, "completion"], df.at[odd, "token_ids"] = tokenizer.decode(pair, skip_special_tokens=True), pair
        df.at[odd, "ended_with_eos"], df.at[odd, "reward"] = False, 0.5
        df["n_tokens"] = df["token_ids"].map(len)
        out[epoch] = df
    refs = {pid: REFERENCE_REWARDS[j % len(REFERENCE_REWARDS)] for j, pid in enumerate(prompt_order)}
    return out, refs


def feed(run, tables: dict[int, pd.DataFrame], ref_rewards: dict[str, float]) -> None:
    """Make ``run`` read these rollouts and reference rewards instead of sampling and scoring."""
    run.rollouts = lambda ckpt=None: tables[ckpt.epoch].copy()
    run.reference_rewards = lambda: dict(ref_rewards)


def with_policy(run, variant: str, worst_case_protect: bool, do_normalize: bool) -> None:
    run.cfg.policy = replace(run.cfg.policy, estimator="reference", variant=variant, baseline="none",
                             worst_case_protect=worst_case_protect, do_normalize=do_normalize)


@dataclass
class Side:
    train: list[torch.Tensor]  # per checkpoint (n, D) float64, not normalised
    val: list[torch.Tensor]  # per checkpoint (m, D)
    valid: list[list[bool] | None]
    scores: np.ndarray


def nice_kit_train(run, model=None) -> list[torch.Tensor]:
    """The pipeline's training gradients, unprojected, with ``model`` (default the run's; a float64
    copy makes nice_kit's engine sum in float64)."""
    model = model if model is not None else run.model
    toks = [tokenize_pair(run.tokenizer, r.messages, r.response, run.cfg.data.max_length) for r in run.pool]
    out = []
    for ckpt in run.checkpoints:
        load_adapter_weights(model, ckpt)
        g = group_gradients(model, [mean_nll_sequence(t, i) for i, t in enumerate(toks)], len(toks),
                            run.tokenizer.pad_token_id)
        m, v = ckpt.moments()
        out.append(adam_precondition(g, m.to(g.dtype), v.to(g.dtype)).double())
    return out


def nice_kit_side(run, train: list[torch.Tensor], model=None) -> Side:
    """The pipeline's measurement and gradient engine, unprojected; its aggregation."""
    model = model if model is not None else run.model
    m = PolicyGradient()
    val, valid = [], []
    for ckpt in run.checkpoints:
        load_adapter_weights(model, ckpt)
        measured = m.measure(run, ckpt, run.target_val)
        val.append(group_gradients(model, measured.sequences, len(run.target_val),
                                   run.tokenizer.pad_token_id).double())
        valid.append(measured.valid)
    n_val = len(run.target_val)
    mask = torch.from_numpy(counted_prompts([None if v is None else np.array(v) for v in valid], n_val))
    scores = influence_scores([normalize_rows(t) for t in train], [normalize_rows(v) for v in val],
                              checkpoint_weights(run.checkpoints), run.target_subtasks(), mask, run.cfg.selection.aggregate)
    return Side(train, val, valid, scores.astype(np.float64))


def chat_prompt(tok, messages) -> list[int]:
    """The prompt's ids from the tokenizer's chat template (plain transformers, not nice_kit)."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


def pair(tok, messages, response: str) -> tuple[list[int], list[int]]:
    """Prompt + response + end of sequence, the prompt masked (-100): LESS's tokenisation."""
    p_ids = chat_prompt(tok, messages)
    answer = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
    return p_ids + answer, [-100] * len(p_ids) + answer


def oracle_prompts(run, table: pd.DataFrame, ref_rewards: dict[str, float]) -> list[oracle.OraclePrompt]:
    tok = run.tokenizer
    out = []
    for rec, subtask in zip(run.target_val, run.target_subtasks()):
        rows = table[table["prompt_id"] == rec.id].sort_values("sample")
        ids, labels = pair(tok, rec.messages, rec.response)
        out.append(oracle.OraclePrompt(chat_prompt(tok, rec.messages), rows["completion"].astype(str).tolist(),
                                       rows["reward"].tolist(), ids, labels, ref_rewards.get(rec.id), subtask))
    return out


class Oracle:
    """The oracle's side for one run: float64 copies of the model per checkpoint (``dtype``; its sums
    are float64 either way), gradients cached across variants (``cache=False``: every variant
    recomputes every completion, as the reference does)."""

    def __init__(self, run, tables: dict[int, pd.DataFrame], ref_rewards: dict[str, float], cache: bool = True,
                 dtype: torch.dtype = torch.float64):
        self.run, self.tables, self.refs = run, tables, ref_rewards
        self.models, self.caches = [], []
        for ckpt in run.checkpoints:
            load_adapter_weights(run.model, ckpt)
            self.models.append(copy.deepcopy(run.model).to(dtype).eval())
            self.caches.append({} if cache else None)
        self.train = []
        for model, ckpt in zip(self.models, run.checkpoints):
            m, v = ckpt.moments()
            rows = []
            for rec in run.pool:
                ids, labels = pair(run.tokenizer, rec.messages, rec.response)
                rows.append(oracle.train_gradient(model, ids, labels, m, v))
            self.train.append(torch.stack(rows))

    def side(self, variant: str, worst_case_protect: bool, do_normalize: bool) -> Side:
        run, val = self.run, []
        for model, cache, ckpt in zip(self.models, self.caches, run.checkpoints):
            prompts = oracle_prompts(run, self.tables[ckpt.epoch], self.refs)
            val.append(torch.stack([oracle.prompt_gradient(model, run.tokenizer, p, variant, worst_case_protect,
                                                           do_normalize, cache=cache) for p in prompts]))
        scores = oracle.scores(self.train, val, [c.lr for c in run.checkpoints], run.target_subtasks())
        return Side(self.train, val, None, scores)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def agreement(ours: Side, ref: Side, k: int = 3) -> dict:
    """Per prompt vector: the smallest cosine (where the oracle's is non-zero) and whether zero
    vectors are zero on both sides; scores: largest error relative to the largest score, Spearman,
    whether the rankings and the top ``k`` are identical."""
    cosines, zeros_agree = [], True
    for a_c, b_c in zip(ours.val, ref.val):
        for a, b in zip(a_c, b_c):
            if b.norm() == 0:
                zeros_agree &= bool(a.norm() == 0)
            else:
                cosines.append(cosine(a, b))
    scale = float(np.abs(ref.scores).max()) or 1.0
    order = lambda s: np.argsort(-s, kind="stable")  # noqa: E731
    return {"min_cosine": min(cosines) if cosines else float("nan"), "zeros_agree": zeros_agree,
            "n_vectors": len(cosines),
            "scores_rel_err": float(np.abs(ours.scores - ref.scores).max() / scale),
            "spearman": float(spearmanr(ours.scores, ref.scores).statistic),
            "same_ranking": bool((order(ours.scores) == order(ref.scores)).all()),
            "same_top_k": set(order(ours.scores)[:k]) == set(order(ref.scores)[:k])}


def exercised(run, tables: dict[int, pd.DataFrame]) -> dict[str, bool]:
    """Which particular cases the designed rollouts contain (the tests assert each is there)."""
    tok = run.tokenizer
    df = next(iter(tables.values()))
    by_prompt = [df[df["prompt_id"] == r.id].sort_values("sample")["reward"].to_numpy() for r in run.target_val]
    ties_at_cut = any(len(r) > 10 and np.sort(r)[::-1][9] == np.sort(r)[::-1][10] for r in by_prompt)
    reencoded = any(tok.encode(t, add_special_tokens=False) != list(ids)
                    for t, ids in zip(df["completion"], df["token_ids"]) if t)
    prompt_prefix = all(tokenize_pair(tok, r.messages, r.response, run.cfg.data.max_length).input_ids[
        :len(prompt_ids(tok, r.messages))] == prompt_ids(tok, r.messages) for r in run.target_val)
    return {"ties_at_top10_cut": ties_at_cut, "negative_rewards": bool((df["reward"] < 0).any()),
            "all_zero_prompt": any((r == 0).all() for r in by_prompt), "empty_completion": bool((df["completion"] == "").any()),
            "reencoding_differs": reencoded, "prompt_is_prefix_of_pair": prompt_prefix}
