"""How fast is a what-if? (nice_kit.whatif: NICE re-selected from stored vectors.)

    python bench/bench_whatif.py --run-dir runs/default          # the bundled run (after nice-kit run)
    python bench/bench_whatif.py --synthetic                     # 270,679 x 8192 x 4 checkpoints, 500 x 8
    python bench/bench_whatif.py --synthetic --pool 20000 --ckpts 2  # a quick look
    python bench/bench_whatif.py --fast                          # a smoke test on the fast demo run

Bundled run: computes the per-completion parts once (timed), then times what-ifs whose metric
rewards are cached (each run twice; the second is the answer a user waits for): no baseline, the
reference's estimator, the mean aggregate, and another metric's parameters.

Synthetic: the pool of bench/bench_scoring.py (float16 memory-mapped unit rows, written once and
reused) and synthetic parts for 500 target prompts x 8 completions (body and end-of-sequence rows,
a reference row per prompt) with random 0/1 rewards; times what a what-if computes after the rewards
are known: the policy weights, the prompt vectors (coefficients x parts), the streamed influence
scores and the top 5%, with the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fast_run import add_run_arguments, open_run  # noqa: E402
from nice_kit.config import PolicySettings, RunConfig  # noqa: E402
from nice_kit.influence import influence_scores, top_fraction  # noqa: E402
from nice_kit.measurements import weigh_rollouts  # noqa: E402
from nice_kit.projection import normalize_rows  # noqa: E402
from nice_kit.vectors import open_vectors  # noqa: E402
from nice_kit.whatif import prompt_coefficients  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def bundled(args) -> None:
    from nice_kit.whatif import completion_parts

    run = open_run(args)
    t = time.perf_counter()
    parts = completion_parts(run)
    print(f"per-completion parts (once)  : {time.perf_counter() - t:7.1f} s   "
          f"({sum(len(tab) for tab, _ in parts)} parts over {len(parts)} checkpoints)", flush=True)
    cases = [{"policy.baseline": "none"},
             {"policy.estimator": "reference", "policy.variant": "vanilla", "policy.baseline": "none"},
             {"selection.aggregate": "mean"},
             # the fast demo run scores completions' lengths; the bundled run, answers
             {"metric.params": {"max_words": 4} if args.fast else {"extract": "last_number"}}]
    for changes in cases:
        times = []
        for _ in range(2):  # the first also scores the stored completions when the metric is new
            t = time.perf_counter()
            got = run.what_if(changes)
            times.append(time.perf_counter() - t)
        print(f"what if {str(changes):<72}: {times[1]:6.3f} s (first call {times[0]:6.2f} s); top {len(got.selected)} "
              f"shares {got.overlap} with the run's", flush=True)


def synthetic(args) -> None:
    from bench_scoring import write_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / f"n{args.pool}_d{args.dim}"
    print(f"pool {args.pool:,} x d={args.dim} x {args.ckpts} checkpoints against {args.prompts} prompts x {args.k} "
          f"completions; torch threads {torch.get_num_threads()}", flush=True)
    t = time.perf_counter()
    for c in range(args.ckpts):
        write_stage(out / f"epoch_{c + 1}", args.pool, args.dim, seed=c)
    print(f"synthetic pool ready         : {time.perf_counter() - t:7.1f} s   (written once, reused)", flush=True)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(7)
    prompts = [f"p{j}" for j in range(args.prompts)]
    rows = []
    for p in prompts:
        for s in range(args.k):
            rows += [(f"{p}/{s}/body", p, s, "body", 12), (f"{p}/{s}/eos", p, s, "eos", 1)]
        rows.append((f"{p}/reference", p, -1, "reference", 5))
    table = pd.DataFrame(rows, columns=["part_id", "prompt_id", "sample", "kind", "n_tokens"])
    parts = [normalize_rows(torch.randn(len(table), args.dim, generator=g)) for _ in range(args.ckpts)]
    samples = pd.DataFrame({"prompt_id": np.repeat(prompts, args.k), "sample": np.tile(np.arange(args.k), args.prompts),
                            "reward": rng.integers(0, 2, args.prompts * args.k).astype(float)})
    cfg = RunConfig(policy=PolicySettings(variant="vanilla", baseline="mean"))
    subtasks = [f"task{i % args.subtasks}" for i in range(args.prompts)]
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    vectors, valid = [], []
    for c in range(args.ckpts):
        weighted, per_prompt = weigh_rollouts(samples, cfg.policy, {})
        coef, ok = prompt_coefficients(cfg, table, weighted, per_prompt, prompts)
        vectors.append(normalize_rows(torch.from_numpy(coef.astype(np.float32)) @ parts[c]))
        valid.append(ok)
    t_vectors = time.perf_counter() - t0
    train = [open_vectors(out / f"epoch_{c + 1}") for c in range(args.ckpts)]
    mask = torch.tensor(np.stack(valid).any(axis=0))
    t = time.perf_counter()
    scores = influence_scores(train, vectors, [1.0 / args.ckpts] * args.ckpts, subtasks, mask, block_rows=args.block,
                              by_subtask_means=not args.per_prompt)
    t_scores = time.perf_counter() - t
    t = time.perf_counter()
    chosen = top_fraction(train[0].ids, scores, 0.05)
    t_select = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(f"weights + prompt vectors     : {t_vectors:7.2f} s   ({len(table):,} parts per checkpoint)")
    how = "per target prompt" if args.per_prompt else f"against {args.subtasks} subtask means, as the what-if scores"
    print(f"influence scores (streamed)  : {t_scores:7.1f} s   ({how})")
    print(f"top 5%                       : {t_select:7.2f} s   ({len(chosen):,} examples)")
    print(f"what-if total                : {total:7.1f} s   (target < 60 s)")
    print(f"peak RSS                     : {peak_rss_gb():7.2f} GB  (before: {rss_before:.2f} GB; the parts alone "
          f"{sum(p.numel() for p in parts) * 4 / 1e9:.2f} GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--synthetic", action="store_true", help="the synthetic store instead of the bundled run")
    ap.add_argument("--pool", type=int, default=270_679)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--ckpts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--subtasks", type=int, default=10)
    ap.add_argument("--block", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--per-prompt", action="store_true",
                    help="score per target prompt (as run.scores does) instead of against subtask means (the what-if)")
    ap.add_argument("--out", default="/tmp/nice_kit_bench_scoring")
    args = ap.parse_args()
    if args.synthetic:
        synthetic(args)
    else:
        bundled(args)


if __name__ == "__main__":
    main()
