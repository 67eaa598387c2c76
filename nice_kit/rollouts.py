"""Sampling completions from the model (rollouts) and greedy decoding, with our own KV-cache loop.

How it works:

* **Shared prefill.** The K samples of a prompt share one forward pass over the prompt; its cached
  keys and values are then expanded K times (``Cache.batch_select_indices`` with a repeated index),
  so a prompt costs one prefill instead of K.
* **Batches by token budget.** Prompts (longest first) are packed while ``rows x (longest prompt +
  max_new_tokens)`` -- the size of the KV cache when decoding ends -- stays within
  ``RolloutSettings.max_batch_tokens`` and the rows within ``RolloutSettings.batch_size``. A prompt
  whose K rows do not fit alone is split into groups of samples (each group repeats the prefill).
  An out-of-memory error (:func:`nice_kit.memory.is_out_of_memory`: GPU, MPS or CPU) halves both
  limits and retries: results do not depend on them.
* **Left padding done right.** Prompts of different lengths are left-padded; the attention mask
  hides the padding and position ids count real tokens only (as ``generate`` does).
* **Finished rows stop costing compute.** A row that ends (end of sequence, stop string or
  ``max_new_tokens``) is dropped from the batch and its cache: at once on a CPU; on a GPU it stays in
  the batch, masked, until half the rows are done, then all finished rows go in one copy.
* **Few host synchronisations.** Every step's uniforms go to the device in one copy; the sampled
  tokens collect in a device buffer that the host reads every step on a CPU and every 16 steps on a
  GPU (``_LoopPlan``). Stop strings are checked on each completion's new tail only.
* **LoRA merged while sampling** (:func:`nice_kit.models.merged_lora`) where the merged update
  survives rounding to the weights' dtype; the base weights are restored bit for bit afterwards.
* **The cache argument** is ``cache`` or ``past_key_values`` as the model's forward names it
  (transformers 5.24 and 5.17); :func:`rollout_caps` sizes the batch limits to the device's memory.
* **Counter-based randomness.** Every draw is a uniform number hashed from (run seed, epoch, prompt
  id, sample index, step), turned into a token by inverse-CDF sampling from the filtered
  distribution (temperature, then top-k, then top-p, with Hugging Face's semantics; candidates in
  token-id order). A completion therefore depends only on its own key and the model, never on the
  batch, the token budget, the order of the records or which prompts share a batch (up to float
  rounding of the logits when the batch shape changes). Only temperature, top-k and top-p shape the
  distribution: other sampling options of a model's ``generation_config`` (repetition penalty, min-p,
  ...) are not applied.

What a rollout row records: see :func:`sample_rollouts`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .settings import RolloutSettings
from .data import Record, prompt_ids
from .memory import free_cached_memory, is_out_of_memory
from .models import merged_lora

STOP_REASONS = ("eos", "stop", "length")
# Names the sampling scheme (random streams, inverse-CDF draw, row fields): a rollout cache key should
# hold it, so that rollouts sampled by an older scheme are never reused.
SAMPLER = "counter-hash-inverse-cdf/1"


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


# ------------------------------------------------------------------------------------------------
# Counter-based random numbers

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic, logical shifts)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def row_key(seed: int, epoch: int, prompt_id: str, sample: int) -> int:
    """The 64-bit key of one completion's random stream: a hash of (run seed, epoch, prompt id, sample)."""
    text = json.dumps([int(seed), int(epoch), str(prompt_id), int(sample)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def step_uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per key, for decoding step ``step`` (float64, 53 random bits)."""
    keys = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        offset = _mix64(np.array([step + 1], dtype=np.uint64) * _GOLDEN)
        z = _mix64(keys + offset)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# ------------------------------------------------------------------------------------------------
# Sampling from the filtered distribution


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with filtered tokens at -inf, as Hugging Face's warpers do: temperature, then top-k
    (ties with the k-th value are kept), then top-p (the smallest set of most likely tokens whose
    probability exceeds ``top_p``; the most likely token is always kept). ``top_k=0`` and
    ``top_p=1`` disable those filters. Computed in float32."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def _cdf_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the first position whose cumulative probability exceeds ``u x total`` (its id in ``ids``)."""
    cdf = probs.to(_cdf_dtype(probs.device)).cumsum(-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (pos if ids is None else ids.gather(-1, pos)).squeeze(-1)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocab), drawn by inverse CDF with the given uniforms.

    The distribution is :func:`filter_logits`'s softmax; candidates are taken in token-id order, so
    the token depends on the logits and the uniform only. ``temperature == 0`` is greedy (argmax).
    With ``0 < top_k < vocab`` only the top-k candidates are sorted and summed (same distribution).
    """
    if temperature == 0:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    if not top_k or top_k >= vocab:
        return _inverse_cdf(filter_logits(logits, temperature, top_k, top_p).softmax(-1), uniforms)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    vals, idx = torch.topk(scores, top_k)  # descending
    if bool(((scores >= vals[:, -1:]).sum(-1) > top_k).any()):  # a tie at the k-th value: HF keeps them all
        return _inverse_cdf(filter_logits(logits, temperature, top_k, top_p).softmax(-1), uniforms)
    if top_p < 1.0:
        # cumulative probability in ascending order, as TopPLogitsWarper computes it
        tail = vals.softmax(-1).flip(-1).cumsum(-1).flip(-1)
        remove = tail <= (1 - top_p)
        remove[:, 0] = False
        vals = vals.masked_fill(remove, -math.inf)
    order = idx.argsort(-1)
    return _inverse_cdf(vals.softmax(-1).gather(-1, order), uniforms, idx.gather(-1, order))


# ------------------------------------------------------------------------------------------------
# The decoding loop


@dataclass
class Decoded:
    """One decoded completion: the sampled ids (no EOS), why it ended, and the EOS id it sampled."""

    token_ids: list[int]
    stop_reason: str  # "eos" | "stop" | "length"
    eos_token_id: int | None = None


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (which may list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if extra is not None:
        ids.update(int(x) for x in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return ids


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A full-attention cache layer whose keys and values live in buffers sized for the whole
        decode (prompt + max_new_tokens): a step writes one position in place instead of
        concatenating (copying) the whole cache, and dropping finished rows compacts in place."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length, self.rows = capacity, 0, 0
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            cap = max(self.capacity, key_states.shape[-2])
            self._k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            self._v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            self.rows, self.length, self.is_initialized = key_states.shape[0], 0, True

        def _views(self):
            self.keys = self._k[: self.rows, :, : self.length]
            self.values = self._v[: self.rows, :, : self.length]
            return self.keys, self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > self._k.shape[-2]:  # more than planned: grow (not reached by our loop)
                grow = max(n, self._k.shape[-2])
                self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], grow, self._k.shape[-1]))], -2)
                self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], grow, self._v.shape[-1]))], -2)
            self._k[: self.rows, :, self.length:self.length + n] = key_states
            self._v[: self.rows, :, self.length:self.length + n] = value_states
            self.length += n
            return self._views()

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if not self.is_initialized or self.length == 0:
                return
            n, length = len(indices), self.length
            picked_k, picked_v = self._k[indices, :, :length], self._v[indices, :, :length]
            if n > self._k.shape[0]:  # expansion (shared prefill -> K rows): new buffers
                self._k = self._k.new_empty((n, *self._k.shape[1:]))
                self._v = self._v.new_empty((n, *self._v.shape[1:]))
            self._k[:n, :, :length], self._v[:n, :, :length] = picked_k, picked_v
            self.rows = n
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.batch_select_indices(torch.arange(self.rows, device=self._k.device).repeat_interleave(repeats))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if self.is_initialized:
                self.length = max(0, self.length + tokens_to_remove)
                self._views()

        def reset(self) -> None:
            self.length, self.rows, self._k, self._v = 0, 0, None, None
            self.keys = self.values = None
            self.is_initialized = False

    return BufferedLayer


def _new_cache(model, capacity: int):
    """A DynamicCache whose full-attention layers are :func:`_buffered_layer_class` layers of ``capacity``
    positions (sliding-window and other special layers are left as transformers makes them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = _buffered_layer_class()
    cache = DynamicCache(config=model.config)
    if cache.layers:
        cache.layers = [layer_class(capacity) if type(x) is DynamicLayer else x for x in cache.layers]
    elif getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = lambda: layer_class(capacity)
    return cache


def all_step_uniforms(keys: np.ndarray, steps: int) -> np.ndarray:
    """``step_uniforms(keys, s)`` for ``s = 0 .. steps - 1`` at once: (steps, len(keys)) float64."""
    keys = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        offsets = _mix64((np.arange(steps, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
        z = _mix64(keys[None, :] + offsets[:, None])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _cache_argument(model) -> str:
    """The name under which the model's forward takes a key/value cache: ``cache`` (recent transformers)
    or ``past_key_values`` (earlier 5.x and 4.x), probed from its signature as nice_kit.gradients does."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return next((a for a in ("cache", "past_key_values") if a in params), "past_key_values")


@dataclass
class _LoopPlan:
    """How often the decode loop looks at its rows on the host, and when it drops finished ones.

    ``sync_every``: steps between host reads of the sampled tokens (end-of-sequence, stop strings,
    whether every row is done); between them nothing waits for the device. ``compact_share``: finished
    rows are kept in the batch (masked: they decode a pad token whose output is ignored) until at
    least this share of the live rows is finished, then dropped from the batch and its cache at once.
    A CPU computes every row it keeps, so it reads every step and drops at once (1, 0.0); a GPU decodes
    a few more rows almost for free but pays for every host synchronisation and cache copy."""

    sync_every: int = 1
    compact_share: float = 0.0


def _loop_plan(device: torch.device) -> _LoopPlan:
    return _LoopPlan(16, 0.5) if device.type == "cuda" else _LoopPlan(1, 0.0)


_PLAN_OVERRIDE: _LoopPlan | None = None  # tests run the GPU plan on a CPU


def stop_window(stop: tuple[str, ...]) -> int:
    """Tokens of a completion's tail that hold every character a new stop-string occurrence can span:
    every token decodes to at least one byte and a character is at most 4 bytes, plus a margin for
    the window's first tokens (a cut multi-byte character, a stripped leading space)."""
    return 4 * max((len(x) for x in stop), default=0) + 8


def first_stop_step(tokenizer, tokens: list[int], start: int, stop: tuple[str, ...], window: int) -> int | None:
    """The first ``t >= start`` at which ``decode(tokens[:t + 1])`` contains a stop string (None: none up to
    the end), given that ``decode(tokens[:start])`` contains none.

    One decode of the tail (the last ``window`` tokens before ``start`` and the new ones) rules out the
    common case; only when a stop string shows up there is each step decoded in full, which is the
    criterion itself."""
    tail = tokenizer.decode(tokens[max(0, start - window):], skip_special_tokens=True)
    if not any(x and x in tail for x in stop):
        return None
    for t in range(start, len(tokens)):
        text = tokenizer.decode(tokens[:t + 1], skip_special_tokens=True)
        if any(x and x in text for x in stop):
            return t
    return None


@torch.no_grad()
def _decode_batch(model, tokenizer, prompts: list[list[int]], counts: list[int], keys: np.ndarray, *,
                  temperature: float, top_k: int, top_p: float, max_new_tokens: int, stop: tuple[str, ...],
                  eos_ids: set[int], pad_id: int, keep_one_logit: bool, cache_arg: str = "cache") -> list[Decoded]:
    """Decode ``counts[i]`` rows of prompt ``i`` (rows in that order, with ``keys``): one prefill per prompt.

    The uniforms of every step are computed once (the same numbers as :func:`step_uniforms`) and sent
    to the device in one copy; sampled tokens go to a device buffer, read on the host every
    ``_LoopPlan.sync_every`` steps."""
    device = next(model.parameters()).device
    plan = _PLAN_OVERRIDE or _loop_plan(device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    cache = _new_cache(model, width + max_new_tokens)
    extra = {"logits_to_keep": 1} if keep_one_logit else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **{cache_arg: cache}, **extra)
    if cache.get_seq_length() != width:
        raise RuntimeError(f"{type(model).__name__} did not fill the KV cache passed as `{cache_arg}=`")
    logits = out.logits[:, -1, :].float()
    del out
    if any(c != 1 for c in counts):  # share the prefill: expand each prompt's cache to its rows
        expand = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], device=device)
        cache.batch_select_indices(expand)
        logits, mask = logits[expand], mask[expand]
    next_pos = mask.sum(-1)

    n_rows = int(sum(counts))
    uniforms = torch.from_numpy(all_step_uniforms(keys, max_new_tokens)).to(device=device, dtype=_cdf_dtype(device))
    sampled = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)  # -1: after the end
    eos_t = torch.tensor(sorted(eos_ids) or [-2], dtype=torch.long, device=device)
    live = list(range(n_rows))  # row index of each position in the batch (finished rows included until dropped)
    live_t = torch.arange(n_rows, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # per batch position
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    results: list[Decoded | None] = [None] * n_rows
    window = stop_window(stop)
    read_from = 0  # first step not yet read on the host
    for step in range(max_new_tokens):
        chosen = sample_tokens(logits, uniforms[step].index_select(0, live_t), temperature, top_k, top_p)
        sampled[live_t, step] = torch.where(done, -1, chosen)
        done = done | torch.isin(chosen, eos_t)
        last = step == max_new_tokens - 1
        if last or (step + 1 - read_from) >= plan.sync_every:
            block = sampled[live_t, read_from:step + 1].tolist()  # the one host synchronisation
            for row, new in zip(live, block):
                if results[row] is not None:
                    continue
                start = len(tokens[row])
                for tok in new:
                    if tok == -1:
                        break
                    if tok in eos_ids:
                        results[row] = Decoded(tokens[row], "eos", tok)
                        break
                    tokens[row].append(tok)
                if stop and len(tokens[row]) > start:
                    t = first_stop_step(tokenizer, tokens[row], start, stop, window)
                    if t is not None:
                        del tokens[row][t + 1:]
                        results[row] = Decoded(tokens[row], "stop")
            read_from = step + 1
            if last:
                break
            finished = [j for j, row in enumerate(live) if results[row] is not None]
            if len(finished) == len(live):
                break
            if finished:
                done[torch.tensor(finished, device=device)] = True  # stop strings end rows on the device too
                if len(finished) >= max(1.0, plan.compact_share * len(live)):
                    keep = [j for j, row in enumerate(live) if results[row] is None]
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, next_pos, chosen, done = mask[index], next_pos[index], chosen[index], done[index]
                    live = [live[j] for j in keep]
                    live_t = live_t[index]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        feed = torch.where(done, pad_id, chosen)  # finished rows decode a pad token (output ignored)
        out = model(input_ids=feed.unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1),
                    use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1, :].float()
        del out
        next_pos = next_pos + 1
    return [r if r is not None else Decoded(tokens[i], "length") for i, r in enumerate(results)]


def decode(model, tokenizer, prompts: list[list[int]], keys: list[list[int]], *, temperature: float,
           top_k: int = 0, top_p: float = 1.0, max_new_tokens: int, stop: tuple[str, ...] = (),
           max_batch_tokens: int = 32768, batch_size: int = 256, desc: str = "decode") -> list[list[Decoded]]:
    """Decode ``len(keys[i])`` completions of prompt ``i`` (token ids), the j-th drawn with key ``keys[i][j]``.

    Returns, per prompt, its completions in key order. Batches are packed by token budget (see the
    module docstring); the model is put in eval mode for the call and restored after.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
    keep_one_logit = _accepts_logits_to_keep(model)
    cache_arg = _cache_argument(model)
    results: dict[tuple[int, int], Decoded] = {}
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # longest first: memory peaks early
    pending = deque((i, list(range(len(keys[i])))) for i in order if keys[i])
    budget, row_cap = max(1, int(max_batch_tokens)), max(1, int(batch_size))
    bar = tqdm(total=sum(len(k) for k in keys), desc=desc, leave=False, disable=len(pending) < 2)
    merged = merged_lora(model)
    try:
        merged.__enter__()
        while pending:
            batch: list[tuple[int, list[int]]] = []
            rows, width = 0, 0
            while pending:
                i, samples = pending[0]
                w = max(width, len(prompts[i]))
                fit = min(row_cap, budget // (w + max_new_tokens))
                if rows + len(samples) <= fit:
                    batch.append(pending.popleft())
                    rows, width = rows + len(samples), w
                    continue
                if not batch:  # one prompt's samples do not fit alone: take as many as fit
                    n = max(1, fit)
                    batch.append((i, samples[:n]))
                    if samples[n:]:
                        pending[0] = (i, samples[n:])
                    else:
                        pending.popleft()
                    rows = n
                break
            try:
                decoded = _decode_batch(
                    model, tokenizer, [prompts[i] for i, _ in batch], [len(s) for _, s in batch],
                    np.array([keys[i][j] for i, s in batch for j in s], dtype=np.uint64),
                    temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                    stop=stop, eos_ids=eos_ids, pad_id=pad_id, keep_one_logit=keep_one_logit, cache_arg=cache_arg)
            except Exception as err:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_out_of_memory(err) or rows <= 1:
                    raise
                decoded = None
            if decoded is None:  # out of memory; outside the except block, the failed batch is unreferenced
                _merge_back(pending, batch)
                free_cached_memory(next(model.parameters()).device)
                row_cap, budget = max(1, rows // 2), max(1, budget // 2)
                warnings.warn(f"{desc}: out of memory with {rows} rows; retrying with at most {row_cap} rows "
                              f"and {budget} tokens per batch (results do not change)")
                continue
            it = iter(decoded)
            for i, samples in batch:
                for j in samples:
                    results[(i, j)] = next(it)
            bar.update(rows)
    finally:
        merged.__exit__(None, None, None)
        bar.close()
        model.train(was_training)
    return [[results[(i, j)] for j in range(len(keys[i]))] for i in range(len(prompts))]


def kv_bytes_per_token(model) -> int:
    """Bytes of key/value cache one token position holds across all layers (from the model's config)."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    size = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * kv_heads * head_dim * size


def rollout_caps(model, max_new_tokens: int, prompt_tokens: int, memory_bytes: int | None = None,
                 share: float = 0.5) -> tuple[int, int]:
    """``(batch_size, max_batch_tokens)`` for ``[rollouts]`` that use ``share`` of ``memory_bytes`` (default:
    the device's free memory now; on a CPU, a quarter of RAM) for the key/value cache, with room per row
    for the float32 logits and the sampler's copies of them (about 6 x vocab x 4 bytes).

    For example Llama-2-7B in bf16 (512 KiB of cache per token) on a GPU with 100 GiB free: 102,400
    tokens, i.e. 133 rows of 512-token prompts with 256 new tokens."""
    device = next(model.parameters()).device
    if memory_bytes is None:
        if device.type == "cuda":
            memory_bytes = torch.cuda.mem_get_info(device)[0]
        else:
            import os

            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    per_token = kv_bytes_per_token(model)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    per_row = (prompt_tokens + max_new_tokens) * per_token + 6 * 4 * vocab
    rows = max(1, int(share * memory_bytes // per_row))
    return rows, rows * (prompt_tokens + max_new_tokens)


def _merge_back(pending: deque, batch: list[tuple[int, list[int]]]) -> None:
    """Put a failed batch's items back at the front of ``pending`` (re-joining a split prompt)."""
    for i, samples in reversed(batch):
        if pending and pending[0][0] == i:
            pending[0] = (i, samples + pending[0][1])
        else:
            pending.appendleft((i, samples))


# ------------------------------------------------------------------------------------------------
# Public entry points


def _check_settings(settings: RolloutSettings) -> tuple[str, ...]:
    s = settings
    if isinstance(s.stop, str) or not all(isinstance(x, str) for x in s.stop):
        raise ValueError(f"rollouts.stop must be a list of strings, got {s.stop!r}")
    checks = [
        (isinstance(s.k, int) and s.k >= 1, "k", "an integer >= 1"),
        (isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
        (isinstance(s.temperature, (int, float)) and s.temperature >= 0, "temperature", "a number >= 0"),
        (isinstance(s.top_k, int) and s.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)"),
        (isinstance(s.top_p, (int, float)) and 0 < s.top_p <= 1, "top_p", "a number in (0, 1]"),
        (isinstance(s.batch_size, int) and s.batch_size >= 1, "batch_size", "an integer >= 1"),
        (isinstance(s.max_batch_tokens, int) and s.max_batch_tokens >= 1, "max_batch_tokens", "an integer >= 1"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise ValueError(f"rollouts.{name} must be {expected}, got {getattr(s, name)!r}")
    return tuple(s.stop)


def sample_rollouts(model, tokenizer, records: list[Record], settings: RolloutSettings, seed: int = 0,
                    epoch: int = 0) -> list[dict]:
    """K sampled completions per target prompt, one row per (prompt, sample), in record then sample order.

    Row fields:

    * ``prompt_id``, ``sample`` (0..K-1);
    * ``completion``: the decoded text cut at the first stop string (what the metric sees);
    * ``token_ids``: the tokens the model sampled, end-of-sequence excluded. When a stop string
      ended the completion, they run up to and including the token whose decoding completed the
      stop string (so they may decode to more than ``completion``: the stop string and anything
      that token carried after it); ``n_tokens`` is their count;
    * ``ended_with_eos``: True only when the model sampled an end-of-sequence token;
    * ``eos_token_id``: that token's id (None otherwise; models may have several EOS ids);
    * ``stop_reason``: ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (``max_new_tokens``).

    Every random draw comes from (``seed``, ``epoch``, prompt id, sample index, step), so the rows
    do not depend on the batch size, the token budget, how the records are chunked or ordered.
    """
    stop = _check_settings(settings)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"target record ids must be unique (they key the random streams); {dup!r} repeats")
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    keys = [[row_key(seed, epoch, r.id, k) for k in range(settings.k)] for r in records]
    decoded = decode(model, tokenizer, prompts, keys, temperature=settings.temperature, top_k=settings.top_k,
                     top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, stop=stop,
                     max_batch_tokens=settings.max_batch_tokens, batch_size=settings.batch_size, desc="rollouts")
    rows = []
    for rec, per_prompt in zip(records, decoded):
        for k, d in enumerate(per_prompt):
            text = cut_at_stop(tokenizer.decode(d.token_ids, skip_special_tokens=True), stop)
            rows.append({"prompt_id": rec.id, "sample": k, "completion": text, "token_ids": d.token_ids,
                         "n_tokens": len(d.token_ids), "ended_with_eos": d.stop_reason == "eos",
                         "eos_token_id": d.eos_token_id, "stop_reason": d.stop_reason})
    return rows


def greedy_completions(model, tokenizer, records: list[Record], max_new_tokens: int, stop=(),
                       batch_size: int = 32, max_batch_tokens: int = 32768) -> list[str]:
    """One greedy completion per record (for evaluation), cut at the first stop string."""
    if isinstance(stop, str):
        raise ValueError(f"stop must be a list of strings, got {stop!r}")
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    decoded = decode(model, tokenizer, prompts, [[0] for _ in records], temperature=0.0,
                     max_new_tokens=max_new_tokens, stop=tuple(stop), max_batch_tokens=max_batch_tokens,
                     batch_size=batch_size, desc="greedy")
    return [cut_at_stop(tokenizer.decode(d[0].token_ids, skip_special_tokens=True), tuple(stop)) for d in decoded]
