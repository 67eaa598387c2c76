"""Benchmark of the training-gradient stage on the default model (not a test: it prints numbers).

    python bench/bench_gradients.py [--examples 64] [--reference-examples 4] [--run-dir runs/default]

Prints, for 128-token examples and d=8192:
* examples/s of nice_kit (batched per-example gradients + Adam preconditioning + sparse JL) and of a
  LESS-style reference in the same run (one example at a time, dense Rademacher matrix generated per
  batch, as LESS/TRAK do on a CPU), their ratio, the share of time spent projecting, peak memory;
* projection quality on real gradients: the largest error of projected against exact cosines, and
  the Spearman correlation of influence rankings projected versus unprojected.
Uses the warmup checkpoint of ``--run-dir`` when there is one, else runs a short warmup first.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit.config import RunConfig  # noqa: E402
from nice_kit.data import IGNORE_INDEX, Tokenized, tokenize_records  # noqa: E402
from nice_kit.gradients import adam_precondition, gradient_dim, group_gradients, loop_gradients, mean_nll_sequence  # noqa: E402
from nice_kit.influence import influence_scores  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402
from nice_kit.projection import Projector, ProjectionSpec, normalize_rows  # noqa: E402
from nice_kit.warmup import load_adapter_weights  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def examples_of_length(tokenizer, records, length: int, n: int) -> list[Tokenized]:
    """n examples of exactly ``length`` tokens: pool responses repeated after the chat prompt."""
    toks, _ = tokenize_records(tokenizer, records, 10_000)
    out = []
    for i in range(n):
        t = toks[i % len(toks)]
        n_prompt = t.labels.count(IGNORE_INDEX)
        resp = t.input_ids[n_prompt:]
        ids = list(t.input_ids)
        while len(ids) < length:
            ids += resp
        ids = ids[:length]
        out.append(Tokenized(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], False))
    return out


def dense_reference_project(g: torch.Tensor, dim: int, seed: int, block: int = 4096) -> torch.Tensor:
    """LESS/TRAK-style CPU projection: a dense +-1 matrix regenerated block by block for each batch."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(g.shape[0], dim)
    for start in range(0, g.shape[1], block):
        part = g[:, start:start + block]
        mat = torch.randint(0, 2, (part.shape[1], dim), generator=gen, dtype=torch.float32) * 2 - 1
        out += part @ mat
    return out / math.sqrt(dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--reference-examples", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nnz-sweep", action="store_true",
                    help="also compare sjlt nnz 1/4/8 at d=8192 and 16384 over 8 projection seeds")
    args = ap.parse_args()

    cfg = RunConfig.from_file(args.config)
    p = Pipeline(cfg, args.run_dir, verbose=True)
    ckpt = p.warmup()[-1]
    model, tok = p.model, p.tokenizer
    load_adapter_weights(model, ckpt)
    exp_avg, exp_avg_sq = ckpt.moments()
    D = gradient_dim(model)
    print(f"model {cfg.model}: {D:,} LoRA parameters; threads {torch.get_num_threads()}; "
          f"{args.length}-token examples; d={args.dim}")

    examples = examples_of_length(tok, p.pool, args.length, args.examples)
    seqs = [mean_nll_sequence(t, i) for i, t in enumerate(examples)]
    spec = ProjectionSpec(kind="sjlt", dim=args.dim, seed=0, nnz=cfg.projection.nnz, input_dim=D)
    projector = Projector(spec)
    projector.project(torch.zeros(1, D))  # build the sketch once (cached, like in a run)

    # --- nice_kit: batched gradients, preconditioning, sparse projection
    t_grad = t_proj = 0.0
    full_grads = []
    for s in range(0, len(seqs), args.batch_size):
        batch = [type(q)(q.input_ids, q.weights, i) for i, q in enumerate(seqs[s:s + args.batch_size])]
        t0 = time.perf_counter()
        g = adam_precondition(group_gradients(model, batch, len(batch), tok.pad_token_id, args.batch_size),
                              exp_avg, exp_avg_sq)
        t1 = time.perf_counter()
        normalize_rows(projector.project(g))
        t2 = time.perf_counter()
        t_grad += t1 - t0
        t_proj += t2 - t1
        full_grads.append(g)
    ours = len(seqs) / (t_grad + t_proj)
    mem_ours = peak_rss_mb()

    # --- reference: one example at a time, dense Rademacher generated per batch
    t0 = time.perf_counter()
    t_ref_proj = 0.0
    for i, q in enumerate(seqs[: args.reference_examples]):
        g = adam_precondition(loop_gradients(model, [type(q)(q.input_ids, q.weights, 0)], 1), exp_avg, exp_avg_sq)
        tp = time.perf_counter()
        normalize_rows(dense_reference_project(g, args.dim, seed=0))
        t_ref_proj += time.perf_counter() - tp
    t_ref = time.perf_counter() - t0
    ref = args.reference_examples / t_ref

    print("\n== training-gradient stage ==")
    print(f"nice_kit : {ours:7.3f} examples/s  ({len(seqs)} examples, batch {args.batch_size}); "
          f"projection {100 * t_proj / (t_grad + t_proj):.1f}% of the stage")
    print(f"reference: {ref:7.3f} examples/s  ({args.reference_examples} examples, batch 1); "
          f"projection {100 * t_ref_proj / t_ref:.1f}% of the stage")
    print(f"speed-up : {ours / ref:.1f}x   (target >= 3x; projection target < 10%)")
    print(f"peak RSS : {mem_ours:.0f} MB after nice_kit, {peak_rss_mb():.0f} MB after the reference")

    # --- projection quality on real gradients: pool vs LESS validation gradients
    train = torch.cat(full_grads)
    val_tok, _ = tokenize_records(tok, p.target_val, cfg.data.max_length)
    val = group_gradients(model, [mean_nll_sequence(t, j) for j, t in enumerate(val_tok)], len(val_tok),
                          tok.pad_token_id, args.batch_size)
    exact = normalize_rows(train) @ normalize_rows(val).T
    subtasks = [str(r.columns.get("task", "all")) for r in p.target_val]
    s_exact = influence_scores([normalize_rows(train)], [normalize_rows(val)], [1.0], subtasks)
    print("\n== projection quality (real gradients: "
          f"{train.shape[0]} training x {val.shape[0]} validation) ==")
    for kind, seeds in (("sjlt", range(5)), ("rademacher", range(2))):
        errs, rhos = [], []
        for seed in seeds:
            pr = Projector(ProjectionSpec(kind=kind, dim=args.dim, seed=seed, nnz=cfg.projection.nnz, input_dim=D))
            pt, pv = normalize_rows(pr.project(train)), normalize_rows(pr.project(val))
            errs.append((pt @ pv.T - exact).abs().max().item())
            rhos.append(spearmanr(s_exact, influence_scores([pt], [pv], [1.0], subtasks)).statistic)
        print(f"{kind:10s} ({len(rhos)} projection seeds): max |cos error| {max(errs):.4f} "
              f"(per seed {', '.join(f'{e:.3f}' for e in errs)}); Spearman of influence rankings "
              f"mean {sum(rhos) / len(rhos):.4f}, min {min(rhos):.4f} (target >= 0.95)")
    if args.nnz_sweep:
        for dim in (args.dim, 2 * args.dim):
            for nnz in (1, 4, 8):
                rhos = []
                for seed in range(8):
                    pr = Projector(ProjectionSpec(kind="sjlt", dim=dim, seed=seed, nnz=nnz, input_dim=D))
                    pt, pv = normalize_rows(pr.project(train)), normalize_rows(pr.project(val))
                    rhos.append(spearmanr(s_exact, influence_scores([pt], [pv], [1.0], subtasks)).statistic)
                print(f"sjlt d={dim} nnz={nnz} (8 seeds): Spearman mean {sum(rhos) / 8:.4f}, min {min(rhos):.4f}")
    print(f"(exact influence scores of these examples spread little: std {s_exact.std():.4f}, "
          f"so a cosine error of ~1/sqrt(d) = {1 / math.sqrt(args.dim):.4f} reorders neighbours)")

if __name__ == "__main__":
    main()
