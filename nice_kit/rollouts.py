"""Sampling completions from the model (rollouts) and greedy decoding, batched across prompts."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import RolloutSettings
from .data import Record, prompt_ids


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, do_sample: bool, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, stop=(), seed: int = 0,
             batch_size: int = 64, desc: str = "generate") -> list[tuple[str, list[int], bool]]:
    """Generate one completion per prompt (token-id lists), batched; returns (text, token ids).

    Text is cut at the first stop string and the end-of-sequence token; the token ids are the
    completion's tokens up to that point (re-tokenised after a stop-string cut). Batch b is sampled
    after ``torch.manual_seed(seed + b)``, so results do not depend on what ran before.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[tuple[str, list[int]]] = []
    starts = list(range(0, len(prompts), batch_size))
    for b, start in enumerate(tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)):
        rows = prompts[start:start + batch_size]
        ids, mask = _left_pad(rows, pad, device)
        torch.manual_seed(seed + b)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
        for toks in gen:
            ended = eos in toks
            if ended:
                toks = toks[: toks.index(eos)]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            cut = cut_at_stop(text, stop)
            if cut != text:
                toks = tokenizer(cut, add_special_tokens=False)["input_ids"]
                ended = False
            out.append((cut, toks, ended))
    model.train(was_training)
    return out


def sample_rollouts(model, tokenizer, records: list[Record], settings: RolloutSettings, seed: int = 0,
                    epoch: int = 0) -> list[dict]:
    """K sampled completions per target prompt: rows (prompt_id, sample, completion, n_tokens, token_ids)."""
    prompt_tok = [prompt_ids(tokenizer, r.messages) for r in records]
    flat = [(i, k) for i in range(len(records)) for k in range(settings.k)]
    results = generate(model, tokenizer, [prompt_tok[i] for i, _ in flat], do_sample=True,
                       max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_k=settings.top_k, top_p=settings.top_p, stop=tuple(settings.stop), seed=seed * 7919 + epoch,
                       batch_size=settings.batch_size, desc="rollouts")
    return [
        {"prompt_id": records[i].id, "sample": k, "completion": text, "n_tokens": len(toks), "token_ids": toks,
         "ended_with_eos": ended}
        for (i, k), (text, toks, ended) in zip(flat, results)
    ]


def greedy_completions(model, tokenizer, records: list[Record], max_new_tokens: int, stop=(),
                       batch_size: int = 32) -> list[str]:
    """One greedy completion per record (for evaluation)."""
    prompt_tok = [prompt_ids(tokenizer, r.messages) for r in records]
    res = generate(model, tokenizer, prompt_tok, do_sample=False, max_new_tokens=max_new_tokens, stop=stop,
                   batch_size=batch_size, desc="greedy")
    return [t for t, _, _ in res]
