"""Benchmark of NICE's own stages (not a test: it prints numbers).

    python bench/bench_nice.py [--prompts 32] [--device cpu|cuda] [--part rollouts|policy|all]

* rollouts (completion tokens per second, same prompts and sampling settings, in one run): the old
  way (Hugging Face ``generate`` on K copies of each prompt, batches of 64 sequences; the function
  is kept below as ``legacy_generate``) against ``nice_kit.rollouts.sample_rollouts`` (one shared
  prefill per prompt, batches by token budget, finished rows dropped). Runs on the bundled default
  model (or ``--model``) on any device: ``--device cuda`` on a GPU.
* the policy-gradient stage: completions per second through reward-weighted batched gradients and
  the projection, against the one-at-a-time loop. Uses the warmup checkpoint of ``--run-dir`` (a
  short warmup runs first if there is none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit.config import RolloutSettings, RunConfig  # noqa: E402
from nice_kit.data import load_records, prompt_ids  # noqa: E402
from nice_kit.gradients import group_gradients, loop_gradients  # noqa: E402
from nice_kit.models import load_model  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402
from nice_kit.projection import normalize_rows  # noqa: E402
from nice_kit.rollouts import sample_rollouts  # noqa: E402
from nice_kit.warmup import load_adapter_weights  # noqa: E402


@torch.no_grad()
def legacy_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_k: int, top_p: float, seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """The rollouts before this change (reference only): ``generate`` on left-padded batches of
    ``batch_size`` prompts (K copies of a prompt are K rows), each batch seeded with ``seed + b``.
    Returns each completion's tokens up to the end-of-sequence token."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        rows = prompts[start:start + batch_size]
        n = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        torch.manual_seed(seed + b)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos, temperature=temperature, top_k=top_k,
                             top_p=top_p)[:, n:].tolist()
        out += [toks[: toks.index(eos)] if eos in toks else toks for toks in gen]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_rollouts(args) -> None:
    cfg = RunConfig.from_file(args.config)
    r = cfg.rollouts
    model, tok = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    path = Path(args.config).parent / cfg.data.target_val
    recs = load_records(path if path.exists() else ROOT / "data" / "arith" / "target_val.jsonl")[: args.prompts]
    k = args.k or r.k
    settings = RolloutSettings(k=k, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                               max_new_tokens=args.max_new_tokens or r.max_new_tokens, stop=[])
    if args.max_batch_tokens:
        settings.max_batch_tokens = args.max_batch_tokens
    if args.batch_size:
        settings.batch_size = args.batch_size
    prompts = [prompt_ids(tok, rec.messages) for rec in recs]
    print(f"model {args.model} on {device} ({next(model.parameters()).dtype}); threads {torch.get_num_threads()}; "
          f"{len(recs)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens) x K={k}, at most "
          f"{settings.max_new_tokens} new tokens, temperature {settings.temperature}, top-k {settings.top_k}, "
          f"top-p {settings.top_p}")

    def legacy(recs, s):
        flat = [prompt_ids(tok, rec.messages) for rec in recs for _ in range(s.k)]
        return sum(len(t) for t in legacy_generate(model, tok, flat, max_new_tokens=s.max_new_tokens,
                                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                   batch_size=64))

    def new(recs, s):
        return sum(row["n_tokens"] for row in sample_rollouts(model, tok, recs, s, seed=0, epoch=0))

    ways = {"old: generate, K copies, batch 64": legacy,
            f"new: shared prefill, <= {settings.batch_size} rows / {settings.max_batch_tokens} tokens": new}
    for fn in ways.values():  # warm up (first-call overheads, kernels)
        fn(recs[:2], RolloutSettings(**{**settings.__dict__, "max_new_tokens": 2}))
    print("\n== rollouts ==")
    rates = {}
    for rep in range(args.repeats):
        for name, fn in ways.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            toks = fn(recs, settings)
            _sync(device)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates.setdefault(name, []).append(toks / secs)
            peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                    if device.type == "cuda" else "")
            print(f"{name:58s}: {toks / secs:8.1f} completion tokens/s ({toks} tokens in {secs:.2f} s; "
                  f"{cpu:.2f} s of CPU time, {toks / cpu:.1f} tokens per CPU second{peak})")
    old, new_rate = (max(v) for v in rates.values())
    print(f"speed-up (best of {args.repeats}): {new_rate / old:.2f}x")


def bench_policy(args) -> None:
    cfg = RunConfig.from_file(args.config)
    p = Pipeline(cfg, args.run_dir)
    ckpt = p.warmup()[-1]
    model, tok = p.model, p.tokenizer
    load_adapter_weights(model, ckpt)
    r = cfg.rollouts
    recs = p.target_val[: args.prompts]
    # policy-gradient stage on these rollouts
    rows = p.rollouts(ckpt)
    rows = rows[rows["prompt_id"].isin([x.id for x in recs])]
    seqs = []
    for j, rec in enumerate(recs):
        pids = prompt_ids(tok, rec.messages)
        for toks in rows[rows["prompt_id"] == rec.id]["token_ids"]:
            seqs.append(p._completion_sequence(pids, list(toks), 0.125, j))
    t0 = time.perf_counter()
    g = group_gradients(model, seqs, len(recs), tok.pad_token_id, cfg.gradients.batch_size)
    normalize_rows(p.projector.project(g))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop_gradients(model, seqs[: 2 * r.k], len(recs))
    t_loop = (time.perf_counter() - t0) * len(seqs) / (2 * r.k)
    print("\n== policy-gradient stage ==")
    print(f"batched (batch {cfg.gradients.batch_size}) + projection: {len(seqs) / t_batched:6.2f} completions/s "
          f"({len(recs) / t_batched:.2f} target prompts/s)")
    print(f"one completion at a time (no projection): {len(seqs) / t_loop:6.2f} completions/s")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["rollouts", "policy", "all"], default="all")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--prompts", type=int, default=32, help="target prompts (rollouts); policy part: 8 is plenty")
    ap.add_argument("--model", default="default", help="rollouts part: model name or path (default: the bundled one)")
    ap.add_argument("--device", default=None, help="rollouts part: cpu, cuda, ... (default: the best available)")
    ap.add_argument("--k", type=int, default=0, help="samples per prompt (default: the config's)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's")
    ap.add_argument("--batch-size", type=int, default=0, help="new way's row cap (default: RolloutSettings')")
    ap.add_argument("--max-batch-tokens", type=int, default=0, help="new way's token budget (default: RolloutSettings')")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("rollouts", "all"):
        bench_rollouts(args)
    if args.part in ("policy", "all"):
        bench_policy(args)


if __name__ == "__main__":
    main()
