"""Rollouts: our KV-cache decoding loop against Hugging Face and against a cache-free recomputation,
the sampled distribution, seeds that do not depend on batching, EOS / stop strings, shared prefill."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from nice_kit.config import RolloutSettings
from nice_kit.data import Record, load_records, prompt_ids
from nice_kit.rollouts import (
    _new_cache, cut_at_stop, decode, filter_logits, greedy_completions, row_key, sample_rollouts, sample_tokens,
    step_uniforms,
)
from test_memory import OUT_OF_MEMORY_ERRORS

ROOT = Path(__file__).resolve().parent.parent


def _untied_tiny_model(tokenizer, seed: int = 0):
    """``tiny_model``'s shape with its own output layer and larger weights: with tied embeddings a
    random tiny model greedily repeats the prompt's last token, which would make every check weak."""
    from transformers import LlamaForCausalLM

    from nice_kit.models import tiny_model

    config = tiny_model(tokenizer).config
    config.tie_word_embeddings = False
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _untied_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def records() -> list[Record]:
    recs = load_records(ROOT / "data" / "arith" / "target_val.jsonl")
    # prompts of different lengths in one batch (left padding must be right)
    return [recs[0], recs[9], recs[17], recs[30], recs[5]]


def _settings(**over) -> RolloutSettings:
    base = dict(k=3, max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.95)
    return RolloutSettings(**{**base, **over})


def _by_key(rows):
    return {(r["prompt_id"], r["sample"]): r for r in rows}


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _greedy_eos_model(model, tokenizer, records, n_steps=6):
    """The greedy tokens of each record (HF generate, one prompt at a time, no padding)."""
    out = []
    for rec in records:
        p = prompt_ids(tokenizer, rec.messages)
        gen = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=n_steps, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, temperature=None, top_k=None, top_p=None)
        out.append(gen[0, len(p):].tolist())
    return out


# ------------------------------------------------------------------------------------------------
# Greedy equals Hugging Face's generate


def test_greedy_and_top_k_1_equal_hf_generate(model, tokenizer, records):
    ref = _greedy_eos_model(model, tokenizer, records, n_steps=8)
    # HF generate on the left-padded batch too (what evaluation used before)
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_k=None, top_p=None)[:, width:].tolist()
    assert batched == ref
    assert len({tuple(r) for r in ref}) > 1  # the prompts do lead to different completions

    rows = sample_rollouts(model, tokenizer, records, _settings(k=2, top_k=1, max_new_tokens=8), seed=5, epoch=2)
    for rec, want in zip(records, ref):
        for k in range(2):
            row = _by_key(rows)[(rec.id, k)]
            assert row["token_ids"] == want
            assert row["stop_reason"] == "length" and not row["ended_with_eos"] and row["n_tokens"] == 8
    got = decode(model, tokenizer, prompts, [[0]] * len(prompts), temperature=0.0, max_new_tokens=8)
    assert [d[0].token_ids for d in got] == ref
    texts = greedy_completions(model, tokenizer, records, max_new_tokens=8, batch_size=2)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in ref]


# ------------------------------------------------------------------------------------------------
# The filtered distribution and the sampler


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9),
                                                     (1.2, 50, 0.95), (0.5, 5, 0.5), (2.0, 1, 0.9)])
def test_filter_logits_matches_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 3
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    want = procs(None, logits.clone())
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1), rtol=1e-5, atol=1e-7)
    if top_k:
        assert int(torch.isfinite(got).sum(-1).max()) <= top_k


def test_top_k_candidates_path_draws_like_full_vocabulary_path():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 500, generator=g) * 2
    u = torch.from_numpy(step_uniforms(np.arange(4000, dtype=np.uint64), 0))
    fast = sample_tokens(logits, u, 1.2, 50, 0.95)  # sorts only the 50 candidates
    probs = filter_logits(logits, 1.2, 50, 0.95).softmax(-1)
    cdf = probs.double().cumsum(-1)
    full = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # identical up to float rounding at a CDF boundary (the two sum the probabilities differently)
    assert (fast != full).sum() <= 2
    assert bool((probs.gather(-1, fast.unsqueeze(-1)) > 0).all())


def test_tie_at_kth_value_keeps_all_tied_tokens_like_hf():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))[0].tolist()
    assert kept == [True, True, True, True, False]
    drawn = {int(sample_tokens(logits, torch.tensor([u]), 1.0, 2, 1.0)) for u in np.linspace(0, 0.999, 50)}
    assert drawn == {0, 1, 2, 3}


def test_step_uniforms_are_uniform_and_keyed():
    keys = np.array([row_key(0, 0, f"p{i}", k) for i in range(50) for k in range(40)], dtype=np.uint64)
    u0, u1 = step_uniforms(keys, 0), step_uniforms(keys, 1)
    assert np.array_equal(u0, step_uniforms(keys.copy(), 0))  # a pure function of (key, step)
    assert u0.min() >= 0 and u0.max() < 1 and len(set(u0.tolist())) == len(u0)
    assert not np.any(u0 == u1)
    from scipy.stats import kstest

    assert kstest(np.concatenate([u0, u1]), "uniform").pvalue > 1e-4
    assert row_key(0, 0, "a", 0) != row_key(0, 1, "a", 0) != row_key(1, 0, "a", 0)
    assert row_key(0, 0, "a", 0) != row_key(0, 0, "a", 1) != row_key(0, 0, "b", 1)


def test_sampled_frequencies_match_filtered_distribution(model, tokenizer, records):
    """Many samples of one prompt's first token against the model's filtered distribution (chi-square)."""
    from scipy.stats import chi2

    rec = records[1]
    n, temperature, top_k, top_p = 4000, 1.5, 40, 0.9
    rows = sample_rollouts(model, tokenizer, [rec], _settings(k=n, max_new_tokens=1, temperature=temperature,
                                                              top_k=top_k, top_p=top_p), seed=11, epoch=0)
    probs = filter_logits(_last_logits(model, prompt_ids(tokenizer, rec.messages))[None], temperature, top_k,
                          top_p).softmax(-1)[0].double()
    support = torch.nonzero(probs > 0).squeeze(-1).tolist()
    assert 5 <= len(support) <= top_k
    counts = {t: 0 for t in support}
    for r in rows:
        first = r["token_ids"][0] if r["token_ids"] else r["eos_token_id"]
        assert first in counts, f"token {first} is outside the filtered support"
        counts[first] += 1
    expected = np.array([float(probs[t]) * n for t in support])
    observed = np.array([counts[t] for t in support])
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert chi2.sf(stat, len(support) - 1) > 1e-6, (stat, len(support))


# ------------------------------------------------------------------------------------------------
# Seeds: rows depend on (seed, epoch, prompt id, sample), never on batching


def test_rows_do_not_depend_on_batching_or_order(model, tokenizer, records):
    s = _settings(k=3, max_new_tokens=7)
    base = sample_rollouts(model, tokenizer, records, s, seed=4, epoch=1)
    assert [(r["prompt_id"], r["sample"]) for r in base] == [(rec.id, k) for rec in records for k in range(3)]
    variants = [
        sample_rollouts(model, tokenizer, records, _settings(k=3, max_new_tokens=7, batch_size=1), seed=4, epoch=1),
        sample_rollouts(model, tokenizer, records, _settings(k=3, max_new_tokens=7, batch_size=5), seed=4, epoch=1),
        sample_rollouts(model, tokenizer, records, _settings(k=3, max_new_tokens=7, max_batch_tokens=90),
                        seed=4, epoch=1),
        sample_rollouts(model, tokenizer, records[::-1], s, seed=4, epoch=1),
        sample_rollouts(model, tokenizer, records[:2], s, seed=4, epoch=1)
        + sample_rollouts(model, tokenizer, records[2:], s, seed=4, epoch=1),
    ]
    for rows in variants:
        assert _by_key(rows) == _by_key(base)

    def tokens(rows):
        return {k: tuple(r["token_ids"]) for k, r in _by_key(rows).items()}

    ref = tokens(base)
    for other in (sample_rollouts(model, tokenizer, records, s, seed=5, epoch=1),
                  sample_rollouts(model, tokenizer, records, s, seed=4, epoch=2)):
        other = tokens(other)
        assert sum(other[k] != ref[k] for k in ref) >= len(ref) - 1
    for rec in records:  # the K samples of a prompt differ from each other
        assert len({ref[(rec.id, k)] for k in range(3)}) == 3
    # more samples keep the first ones: sample k's stream does not depend on K
    more = tokens(sample_rollouts(model, tokenizer, records, _settings(k=5, max_new_tokens=7), seed=4, epoch=1))
    assert all(more[k] == v for k, v in ref.items())


# ------------------------------------------------------------------------------------------------
# What a row records


def test_token_ids_are_what_was_sampled(model, tokenizer, records):
    """A cache-free recomputation (one prompt, no padding) redraws every recorded token."""
    s = _settings(k=3, max_new_tokens=6, temperature=1.2)
    rows = sample_rollouts(model, tokenizer, records, s, seed=2, epoch=3)
    for r in rows:
        rec = next(x for x in records if x.id == r["prompt_id"])
        ids = prompt_ids(tokenizer, rec.messages)
        key = np.array([row_key(2, 3, rec.id, r["sample"])], dtype=np.uint64)
        drawn = r["token_ids"] + ([r["eos_token_id"]] if r["ended_with_eos"] else [])
        for t, tok in enumerate(drawn):
            logits = _last_logits(model, ids + r["token_ids"][:t])[None]
            u = torch.from_numpy(step_uniforms(key, t))
            assert int(sample_tokens(logits, u, s.temperature, s.top_k, s.top_p)) == tok
        assert r["n_tokens"] == len(r["token_ids"])
        assert r["completion"] == tokenizer.decode(r["token_ids"], skip_special_tokens=True)


def test_top_k_1_tokens_are_the_argmax_of_a_rerun(model, tokenizer, records):
    rows = sample_rollouts(model, tokenizer, records, _settings(k=1, top_k=1, max_new_tokens=6), seed=0)
    for r in rows:
        rec = next(x for x in records if x.id == r["prompt_id"])
        ids = prompt_ids(tokenizer, rec.messages) + r["token_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        n_prompt = len(ids) - len(r["token_ids"])
        assert logits[n_prompt - 1:-1].argmax(-1).tolist() == r["token_ids"]


def _first_new_token_step(seq: list[int]) -> int:
    return next(t for t in range(1, len(seq)) if seq[t] not in seq[:t])


def test_eos_length_and_stop_endings(model, tokenizer, records):
    greedy = _greedy_eos_model(model, tokenizer, records[:1], n_steps=8)[0]
    rec = records[0]
    # 1. end of sequence: make the greedy token at step t an EOS id of the model
    t = _first_new_token_step(greedy)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[t]]
    try:
        rows = sample_rollouts(model, tokenizer, [rec], _settings(k=2, top_k=1, max_new_tokens=8), seed=0)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[0]]
        at_once = sample_rollouts(model, tokenizer, [rec], _settings(k=1, top_k=1, max_new_tokens=8), seed=0)[0]
    finally:
        model.generation_config.eos_token_id = old
    for r in rows:
        assert r["token_ids"] == greedy[:t] and r["n_tokens"] == t
        assert r["ended_with_eos"] is True and r["stop_reason"] == "eos" and r["eos_token_id"] == greedy[t]
    assert at_once["token_ids"] == [] and at_once["completion"] == "" and at_once["ended_with_eos"]
    # 2. max_new_tokens
    r = sample_rollouts(model, tokenizer, [rec], _settings(k=1, top_k=1, max_new_tokens=3), seed=0)[0]
    assert r["token_ids"] == greedy[:3] and r["stop_reason"] == "length" and r["ended_with_eos"] is False
    assert r["eos_token_id"] is None
    # 3. a stop string completed by the token at step j (and not before)
    texts = [tokenizer.decode(greedy[:n], skip_special_tokens=True) for n in range(9)]
    j = next(n for n in range(2, 8) if len(texts[n]) > len(texts[n - 1]) + 1 and texts[n - 1] in texts[n][:len(texts[n - 1])])
    stop = texts[j][len(texts[j - 1]) - 1:len(texts[j - 1]) + 1]  # straddles tokens j-1 and j
    assert stop not in texts[j - 1] and stop in texts[j]
    r = sample_rollouts(model, tokenizer, [rec], _settings(k=1, top_k=1, max_new_tokens=8, stop=["@@never", stop]),
                        seed=0)[0]
    assert r["stop_reason"] == "stop" and r["ended_with_eos"] is False
    assert r["token_ids"] == greedy[:j]  # up to and including the token that completed the stop string
    assert r["completion"] == cut_at_stop(texts[j], [stop]) and stop not in r["completion"]


def test_stop_string_cuts_sampled_completions(model, tokenizer, records):
    rows = sample_rollouts(model, tokenizer, records, _settings(k=4, max_new_tokens=10, temperature=1.5), seed=1)
    # a frequent character of these completions as the stop string
    chars = [c for r in rows for c in r["completion"] if c.isalpha()]
    stop = max(set(chars), key=chars.count)
    cut = sample_rollouts(model, tokenizer, records, _settings(k=4, max_new_tokens=10, temperature=1.5,
                                                               stop=[stop]), seed=1)
    n_stopped = 0
    for full, r in zip(rows, cut):
        assert stop not in r["completion"]
        assert full["token_ids"][:r["n_tokens"]] == r["token_ids"]  # same stream, ended earlier
        if r["stop_reason"] == "stop":
            n_stopped += 1
            assert stop in tokenizer.decode(r["token_ids"], skip_special_tokens=True)
            assert stop not in tokenizer.decode(r["token_ids"][:-1], skip_special_tokens=True)
        else:
            assert r["token_ids"] == full["token_ids"]
    assert n_stopped > 0


def test_bad_settings_fail_with_the_setting_named(model, tokenizer, records):
    with pytest.raises(ValueError, match="rollouts.stop"):
        sample_rollouts(model, tokenizer, records, _settings(stop="Answer"))
    with pytest.raises(ValueError, match="rollouts.k"):
        sample_rollouts(model, tokenizer, records, _settings(k=0))
    with pytest.raises(ValueError, match="rollouts.top_p"):
        sample_rollouts(model, tokenizer, records, _settings(top_p=0.0))
    with pytest.raises(ValueError, match="unique"):
        sample_rollouts(model, tokenizer, [records[0], records[0]], _settings())


# ------------------------------------------------------------------------------------------------
# Shared prefill, token budget, finished rows, out of memory


class _Calls:
    """Records the (rows, length) of every forward of the decoder stack."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        self.shapes.append(tuple(x.shape[:2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_k_samples_share_one_prefill_and_finished_rows_stop(model, tokenizer, records):
    greedy = _greedy_eos_model(model, tokenizer, records, n_steps=1)
    old = model.generation_config.eos_token_id
    # the greedy first token of two prompts is an EOS: about half of their rows end at once
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[0][0], greedy[1][0]]
    try:
        with _Calls(model) as calls:
            rows = sample_rollouts(model, tokenizer, records, _settings(k=6, max_new_tokens=5, temperature=0.8,
                                                                        top_k=2), seed=0)
    finally:
        model.generation_config.eos_token_id = old
    widths = [len(prompt_ids(tokenizer, r.messages)) for r in records]
    prefill, steps = calls.shapes[0], calls.shapes[1:]
    assert prefill == (len(records), max(widths))  # each prompt once, not K times
    assert all(length == 1 for _, length in steps)
    assert [n for n, _ in steps] == sorted((n for n, _ in steps), reverse=True)
    assert any(r["ended_with_eos"] for r in rows) and not all(r["ended_with_eos"] for r in rows)
    # a row takes part in the decoding steps after its first token until its last: nothing more
    assert sum(n for n, _ in steps) == sum(r["n_tokens"] - (0 if r["ended_with_eos"] else 1) for r in rows)


def test_batches_respect_the_token_budget_and_split_large_prompts(model, tokenizer, records):
    s = _settings(k=4, max_new_tokens=4)
    base = sample_rollouts(model, tokenizer, records, s, seed=9)
    width = max(len(prompt_ids(tokenizer, r.messages)) for r in records)
    budget = 3 * (width + 4)  # fewer than K rows of the longest prompt fit
    with _Calls(model) as calls:
        small = sample_rollouts(model, tokenizer, records, _settings(k=4, max_new_tokens=4, max_batch_tokens=budget),
                                seed=9)
    assert _by_key(small) == _by_key(base)
    prefills = [(i, shape) for i, shape in enumerate(calls.shapes) if shape[1] > 1]
    assert len(prefills) > len(records)  # prompts were split into groups of samples
    rows_after = [calls.shapes[i + 1][0] if i + 1 < len(calls.shapes) else 0 for i, _ in prefills]
    for (_, (_, w)), rows in zip(prefills, rows_after):
        assert rows * (w + 4) <= budget
    # a budget below one row of any prompt: one row per batch, same rows
    with _Calls(model) as calls:
        tiny = sample_rollouts(model, tokenizer, records, _settings(k=4, max_new_tokens=4, max_batch_tokens=1), seed=9)
    assert _by_key(tiny) == _by_key(base)
    assert max(n for n, _ in calls.shapes) == 1 and sum(length > 1 for _, length in calls.shapes) == 4 * len(records)


@contextmanager
def _failing_above(model, rows: int, error: Callable[[], BaseException]):
    """The model's decoder raises ``error()`` on any forward of more than ``rows`` rows."""
    def limit(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        if x.shape[0] > rows:
            raise error()

    handle = model.model.register_forward_pre_hook(limit, with_kwargs=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        handle.remove()


def _out_of_memory_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "out of memory" in str(w.message)]


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY_ERRORS))
def test_out_of_memory_lowers_the_batch_and_retries(model, tokenizer, records, kind):
    s = _settings(k=3, max_new_tokens=4)
    base = sample_rollouts(model, tokenizer, records, s, seed=6)
    with _failing_above(model, 4, OUT_OF_MEMORY_ERRORS[kind]) as caught:
        rows = sample_rollouts(model, tokenizer, records, s, seed=6)
    assert _by_key(rows) == _by_key(base)
    messages = _out_of_memory_warnings(caught)
    halvings = [re.fullmatch(r"rollouts: out of memory with (\d+) rows; retrying with at most (\d+) rows and "
                             r"(\d+) tokens per batch \(results do not change\)", m) for m in messages]
    assert halvings and all(halvings), messages
    tried = [int(m[1]) for m in halvings]
    assert all(n > 4 for n in tried)  # only batches above the limit failed
    assert [int(m[2]) for m in halvings] == [n // 2 for n in tried]  # each halves the rows it tried
    budgets = [int(m[3]) for m in halvings]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == len(budgets)  # and the budget


def test_out_of_memory_at_one_row_and_other_errors_propagate(model, tokenizer, records):
    s = _settings(k=2, max_new_tokens=3)
    with _failing_above(model, 0, OUT_OF_MEMORY_ERRORS["cpu"]) as caught:
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
            sample_rollouts(model, tokenizer, records[:1], s, seed=1)
    assert len(_out_of_memory_warnings(caught)) == 1  # halved once (2 rows to 1); at one row it is the caller's
    with _failing_above(model, 1, lambda: RuntimeError("shape mismatch")) as caught:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            sample_rollouts(model, tokenizer, records, s, seed=1)
    assert not _out_of_memory_warnings(caught)  # not out of memory: no retry


def test_lora_model_in_training_mode_is_sampled_in_eval_mode(tokenizer, records):
    from nice_kit.models import LoraSettings, add_lora

    peft_model = add_lora(_untied_tiny_model(tokenizer, seed=3), LoraSettings(r=2, alpha=4, dropout=0.5))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.5)
    peft_model.train()
    ids = torch.tensor([prompt_ids(tokenizer, records[0].messages)])
    with torch.no_grad():  # in training mode dropout changes the logits from call to call
        assert not torch.equal(peft_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    s = _settings(k=2, temperature=0.7, top_k=5)
    a = sample_rollouts(peft_model, tokenizer, records[:2], s, seed=0)
    assert peft_model.training  # restored
    b = sample_rollouts(peft_model, tokenizer, records[:2], s, seed=0)
    assert a == b  # dropout is off while sampling
    plain = sample_rollouts(_untied_tiny_model(tokenizer, seed=3), tokenizer, records[:2], s, seed=0)
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in plain]  # the adapter is used


def test_buffered_cache_layers_hold_what_dynamic_layers_hold(model):
    """The in-place cache layers used by the loop against transformers' concatenating DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    cache = _new_cache(model, capacity=12)
    assert len(cache.layers) == model.config.num_hidden_layers
    buffered, plain = cache.layers[0], DynamicLayer()
    assert type(buffered).__name__ == "BufferedLayer"
    g = torch.Generator().manual_seed(0)

    def kv(rows, n):
        return torch.randn(rows, 2, n, 8, generator=g), torch.randn(rows, 2, n, 8, generator=g)

    def same():
        assert buffered.get_seq_length() == plain.get_seq_length()
        assert torch.equal(buffered.keys, plain.keys) and torch.equal(buffered.values, plain.values)

    k, v = kv(2, 5)  # prefill of 2 prompts
    for layer in (buffered, plain):
        out = layer.update(k, v)
    assert torch.equal(out[0], k)
    same()
    expand = torch.tensor([0, 0, 0, 1, 1])  # K samples share the prefill
    for layer in (buffered, plain):
        layer.batch_select_indices(expand)
    same()
    for step, keep in enumerate([None, torch.tensor([0, 2, 3, 4]), None, torch.tensor([1, 3]), None]):
        if keep is not None:  # finished rows dropped
            for layer in (buffered, plain):
                layer.batch_select_indices(keep)
            same()
        k, v = kv(plain.keys.shape[0], 1)
        outs = [layer.update(k, v) for layer in (buffered, plain)]
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        same()
    assert buffered.get_seq_length() == 10 and buffered._k.shape[-2] == 12  # written in place, no growth
    k, v = kv(2, 4)  # past the planned capacity: grows instead of failing
    for layer in (buffered, plain):
        layer.update(k, v)
    same()


# ------------------------------------------------------------------------------------------------
# The GPU decode loop on the CPU: fewer host syncs, finished rows masked, merged LoRA, cache argument


def test_all_step_uniforms_are_step_uniforms():
    from nice_kit.rollouts import all_step_uniforms

    keys = np.array([row_key(0, 1, f"p{i}", k) for i in range(3) for k in range(4)], dtype=np.uint64)
    table = all_step_uniforms(keys, 7)
    assert table.shape == (7, 12)
    for s in range(7):
        assert np.array_equal(table[s], step_uniforms(keys, s))  # the same numbers, bit for bit (integer hash)


def _eos_and_stop_settings(model, tokenizer, records):
    """EOS ids and settings under which rows end in all three ways (EOS, stop string, length) at
    different steps: a token sampled in about a third of the rows becomes an EOS id, and a letter in
    about a third of the remaining completions the stop string."""
    s = _settings(k=5, max_new_tokens=12, temperature=1.3, top_k=20)
    base = sample_rollouts(model, tokenizer, records, s, seed=2)
    counts = {}
    for r in base:
        for t in set(r["token_ids"][1:]):
            counts[t] = counts.get(t, 0) + 1
    extra = min(counts, key=lambda t: (abs(counts[t] - len(base) / 3), t))
    eos = [tokenizer.eos_token_id, extra]
    texts = [tokenizer.decode(r["token_ids"], skip_special_tokens=True) for r in base if extra not in r["token_ids"]]
    chars = {c for t in texts for c in t if c.isalpha()}
    stop = min(chars, key=lambda c: (abs(sum(c in t for t in texts) - len(texts) / 3), c))
    return eos, _settings(k=5, max_new_tokens=12, temperature=1.3, top_k=20, stop=["@@never", stop])


@pytest.mark.parametrize("plan", [(3, 0.5), (5, 1.0), (64, 0.5)])
def test_gpu_loop_plan_draws_the_same_samples_as_the_cpu_plan(model, tokenizer, records, monkeypatch, plan):
    import nice_kit.rollouts as rollouts_mod

    eos, s = _eos_and_stop_settings(model, tokenizer, records)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        cpu = sample_rollouts(model, tokenizer, records, s, seed=2)
        monkeypatch.setattr(rollouts_mod, "_PLAN_OVERRIDE", rollouts_mod._LoopPlan(*plan))
        with _Calls(model) as calls:
            gpu = sample_rollouts(model, tokenizer, records, s, seed=2)
    finally:
        model.generation_config.eos_token_id = old
    assert {r["stop_reason"] for r in cpu} == {"eos", "stop", "length"}
    assert gpu == cpu
    rows = [n for n, length in calls.shapes if length == 1]
    changes = sum(a != b for a, b in zip(rows, rows[1:]))
    ended_early = sum(r["stop_reason"] != "length" for r in cpu)
    assert changes < ended_early  # finished rows stayed in the batch (masked) instead of one copy each


def test_finished_rows_are_masked_until_half_are_done(model, tokenizer, records, monkeypatch):
    import nice_kit.rollouts as rollouts_mod

    eos, s = _eos_and_stop_settings(model, tokenizer, records)
    s.stop = []
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    monkeypatch.setattr(rollouts_mod, "_PLAN_OVERRIDE", rollouts_mod._LoopPlan(1, 0.5))
    try:
        with _Calls(model) as calls:
            rows = sample_rollouts(model, tokenizer, records, s, seed=2)
    finally:
        model.generation_config.eos_token_id = old
    last_step = [r["n_tokens"] + (1 if r["ended_with_eos"] else 0) for r in rows]  # steps each row sampled at
    passes = [n for n, length in calls.shapes if length == 1]  # the forward before step 2, 3, ...
    unfinished = [sum(e > step for e in last_step) for step in range(1, len(passes) + 1)]
    assert all(n >= u for n, u in zip(passes, unfinished))  # every unfinished row is decoded
    assert any(n > u for n, u in zip(passes, unfinished))  # and finished ones stayed, masked
    for before, after in zip([len(rows)] + passes, passes):
        assert after == before or before - after >= before / 2  # dropped only once half were finished


def test_first_stop_step_is_the_full_decoding_criterion(tokenizer):
    from nice_kit.rollouts import first_stop_step, stop_window

    gen = np.random.default_rng(0)
    vocab = len(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    words = tokenizer("\ndef f():\n    return 1\nclass A:\n# é ü 你好\nprint(1)", add_special_tokens=False)["input_ids"]
    stops = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "好")
    window = stop_window(stops)
    checked = found = 0
    for trial in range(150):
        pool = words + newline * 3 if trial % 2 else list(gen.integers(0, vocab, 30))
        toks = [int(t) for t in gen.choice(pool, size=int(gen.integers(1, 40)))]
        want = next((t for t in range(len(toks)) if any(x in tokenizer.decode(toks[:t + 1], skip_special_tokens=True)
                                                        for x in stops)), None)
        for start in {0, len(toks) // 2, max(0, len(toks) - 1)}:
            if want is not None and want < start:
                continue  # the function's precondition: no stop string before start
            assert first_stop_step(tokenizer, toks, start, stops, window) == want
            checked += 1
        found += want is not None
    assert checked > 200 and found > 20


def test_lora_is_merged_while_sampling_and_the_weights_restored(tokenizer, records, monkeypatch):
    import contextlib

    import nice_kit.rollouts as rollouts_mod
    from nice_kit.models import LoraSettings, add_lora, merged_lora

    peft_model = add_lora(_untied_tiny_model(tokenizer, seed=3), LoraSettings(r=2, alpha=4, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.3)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    ids = torch.tensor([prompt_ids(tokenizer, records[0].messages)])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with merged_lora(peft_model) as merged:
            assert merged
            lora_calls = []
            hooks = [m.register_forward_hook(lambda *a: lora_calls.append(1)) for n, m in peft_model.named_modules()
                     if n.endswith("lora_A.default")]
            in_merge = peft_model(input_ids=ids).logits
            for h in hooks:
                h.remove()
            assert lora_calls == []  # the LoRA branch is off: its update is in the base weights
    torch.testing.assert_close(in_merge, adapted, rtol=1e-4, atol=1e-4)
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored bit for bit
    s = _settings(k=3, temperature=1.0, top_k=20, max_new_tokens=8)
    merged_rows = sample_rollouts(peft_model, tokenizer, records, s, seed=5)
    monkeypatch.setattr(rollouts_mod, "merged_lora", lambda model: contextlib.nullcontext(False))
    plain_rows = sample_rollouts(peft_model, tokenizer, records, s, seed=5)
    assert merged_rows == plain_rows
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_lora_update_lost_in_bf16_rounding_is_not_merged(tokenizer):
    from nice_kit.models import LoraSettings, add_lora, merged_lora

    base = _untied_tiny_model(tokenizer, seed=3).to(torch.bfloat16)
    peft_model = add_lora(base, LoraSettings(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.fill_(1e-5)  # an update far below bf16's resolution of the base weights
    w = next(p for n, p in peft_model.named_parameters() if "q_proj.base_layer.weight" in n).detach().clone()
    with merged_lora(peft_model) as merged:
        assert not merged
    assert torch.equal(next(p for n, p in peft_model.named_parameters() if "q_proj.base_layer.weight" in n), w)
    with merged_lora(_untied_tiny_model(tokenizer)) as merged:  # no LoRA at all
        assert not merged


def test_the_cache_argument_is_probed_from_the_forward_signature(model):
    from nice_kit.rollouts import _cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            raise NotImplementedError

    class New(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
            raise NotImplementedError

    import inspect

    assert _cache_argument(Old()) == "past_key_values" and _cache_argument(New()) == "cache"
    assert _cache_argument(model) in inspect.signature(model.forward).parameters


def test_rollout_caps_fill_the_given_memory_share(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nice_kit.rollouts import kv_bytes_per_token, rollout_caps

    with torch.device("meta"):  # Llama-2-7B's shape, no memory used
        big = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32,
                                           num_key_value_heads=32)).to(torch.bfloat16)
    assert kv_bytes_per_token(big) == 2 * 32 * 32 * 128 * 2  # 512 KiB per token
    rows, tokens = rollout_caps(big, max_new_tokens=256, prompt_tokens=512, memory_bytes=100 << 30, share=0.5)
    per_row = 768 * kv_bytes_per_token(big) + 24 * 32000
    assert rows * per_row <= 50 << 30 < (rows + 1) * per_row and tokens == rows * 768
    assert rows > 80  # what paper.toml's batch_size allows today
