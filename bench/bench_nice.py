"""Benchmark of NICE's own stages on the default model (not a test: it prints numbers).

    python bench/bench_nice.py [--prompts 8] [--run-dir runs/default]

* rollout throughput (completion tokens per second): all prompts' K samples generated in batches
  versus one prompt at a time (K samples per call) versus one sample at a time, in the same run;
* the policy-gradient stage: completions per second through reward-weighted batched gradients and
  the projection, against the one-at-a-time loop.
Uses the warmup checkpoint of ``--run-dir`` (a short warmup runs first if there is none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit.config import RunConfig  # noqa: E402
from nice_kit.data import prompt_ids  # noqa: E402
from nice_kit.gradients import group_gradients, loop_gradients  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402
from nice_kit.projection import normalize_rows  # noqa: E402
from nice_kit.rollouts import generate  # noqa: E402
from nice_kit.warmup import load_adapter_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    cfg = RunConfig.from_file(args.config)
    p = Pipeline(cfg, args.run_dir)
    ckpt = p.warmup()[-1]
    model, tok = p.model, p.tokenizer
    load_adapter_weights(model, ckpt)
    r = cfg.rollouts
    recs = p.target_val[: args.prompts]
    prompts = [prompt_ids(tok, rec.messages) for rec in recs]
    flat = [q for q in prompts for _ in range(r.k)]
    kw = dict(do_sample=True, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
              top_p=r.top_p, seed=0)
    print(f"model {cfg.model}; threads {torch.get_num_threads()}; {len(recs)} prompts x K={r.k}, "
          f"max {r.max_new_tokens} new tokens")

    def timed(batches):
        t0, toks = time.perf_counter(), 0
        for rows in batches:
            toks += sum(len(t) for _, t in generate(model, tok, rows, batch_size=len(rows), **kw))
        return toks, time.perf_counter() - t0

    results = {
        f"batched across prompts (batch {min(r.batch_size, len(flat))})": timed(
            [flat[i:i + r.batch_size] for i in range(0, len(flat), r.batch_size)]),
        f"one prompt at a time (batch K={r.k})": timed([[q] * r.k for q in prompts]),
        "one sample at a time (batch 1)": timed([[q] for q in flat[: 2 * r.k]]),
    }
    print("\n== rollouts ==")
    base = None
    for name, (toks, secs) in results.items():
        rate = toks / secs
        base = base or rate
        print(f"{name:38s}: {rate:7.1f} completion tokens/s ({toks} tokens in {secs:.1f} s)")

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


if __name__ == "__main__":
    main()
