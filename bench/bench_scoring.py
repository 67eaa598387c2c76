"""Scoring a real pool's size: synthetic unit vectors stored as nice_kit stores them, scored and selected.

    python bench/bench_scoring.py                       # 270,679 x 8192 x 4 checkpoints vs 500 prompts
    python bench/bench_scoring.py --pool 20000 --ckpts 2 --out /tmp/small   # a quick look

LESS's pool has 270,679 examples. This writes that many random unit vectors per checkpoint in the
format of a finished vector stage (``vectors.npy``, float16, memory-mapped; 17.7 GB at the default
size, written once and reused), then times :func:`nice_kit.influence.influence_scores` streaming the
pool in blocks against 500 target prompts in 10 subtasks, and top-5% selection
(:func:`nice_kit.influence.top_fraction`). It prints seconds and the process's peak resident memory:
the point is that scoring never holds a checkpoint's whole matrix in memory.

It also prints what the integrity checks cost (issue #20, target under 5%): the store is written with
its ``integrity.json`` as a finished stage keeps it, scored once with every row block checked as it is
read and once with the block checks off, and the time spent inside the checks is counted
(:data:`nice_kit.runs.CHECK_SECONDS`). ``--run DIR`` instead times a whole ``nice-kit run`` of
``--config`` (the bundled run by default) in DIR and the share of it spent in checks.

    python bench/bench_scoring.py --run runs/integrity --config configs/default.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit import runs  # noqa: E402
from nice_kit.influence import influence_scores, top_fraction  # noqa: E402
from nice_kit.projection import ProjectionSpec, save_spec  # noqa: E402
from nice_kit.runs import check_vectors_file  # noqa: E402
from nice_kit.vectors import open_vectors, record_vectors, write_npy_header  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def write_stage(folder: Path, n: int, d: int, seed: int, block: int = 16384) -> None:
    """A finished vector stage of n random unit rows, written block by block (never all in memory),
    with its integrity.json (recorded once; a store written by an older version gets it now)."""
    if (folder / "vectors.npy").exists():
        if not (folder / "integrity.json").exists():
            record_vectors(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with open(folder / ".vectors.tmp.npy", "wb") as out:
        write_npy_header(out, (n, d))
        for a in range(0, n, block):
            x = torch.randn(min(block, n - a), d, generator=g)
            out.write(torch.nn.functional.normalize(x, dim=1).to(torch.float16).numpy().tobytes())
    np.savez(folder / "extras.npz", norms=np.ones(n, dtype=np.float32))
    (folder / "ids.json").write_text(json.dumps([f"pool-{i}" for i in range(n)]))
    save_spec(ProjectionSpec(dim=d, input_dim=1), folder)
    (folder / ".vectors.tmp.npy").replace(folder / "vectors.npy")
    record_vectors(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=270_679)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--ckpts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--subtasks", type=int, default=10)
    ap.add_argument("--block", type=int, default=8192, help="pool rows scored at a time")
    ap.add_argument("--out", default="/tmp/nice_kit_bench_scoring")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--clean", action="store_true", help="delete the synthetic vectors afterwards")
    ap.add_argument("--repeats", type=int, default=1, help="score this many times with and without the block "
                    "checks, alternating, and keep the best of each (the first pass also warms the page cache)")
    ap.add_argument("--run", help="instead: time a whole `nice-kit run` in this run directory and its checks")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"), help="the config of --run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        return bench_run(args.run, args.config)
    out = Path(args.out) / f"n{args.pool}_d{args.dim}"
    size_gb = args.pool * args.dim * 2 * args.ckpts / 1e9
    free_gb = shutil.disk_usage(Path(args.out).parent if not Path(args.out).exists() else args.out).free / 1e9
    if size_gb > free_gb * 0.9:
        sys.exit(f"needs {size_gb:.1f} GB on disk, {free_gb:.1f} GB free")
    print(f"pool {args.pool:,} x d={args.dim} x {args.ckpts} checkpoints (float16, {size_gb:.1f} GB on disk) "
          f"against {args.prompts} target prompts in {args.subtasks} subtasks; torch threads {torch.get_num_threads()}")
    t = time.perf_counter()
    for c in range(args.ckpts):
        write_stage(out / f"epoch_{c + 1}", args.pool, args.dim, seed=c)
    print(f"synthetic vectors ready      : {time.perf_counter() - t:7.1f} s   (written once, reused by later runs)")

    g = torch.Generator().manual_seed(99)
    val = [torch.nn.functional.normalize(torch.randn(args.prompts, args.dim, generator=g), dim=1)
           for _ in range(args.ckpts)]
    subtasks = [f"task{i % args.subtasks}" for i in range(args.prompts)]
    weights = [1.0 / args.ckpts] * args.ckpts
    rss_before = peak_rss_gb()
    t_score = t_unchecked = t_checks = float("inf")
    for r in range(args.repeats):
        t = time.perf_counter()
        c0 = runs.CHECK_SECONDS["total"]
        train = [open_vectors(out / f"epoch_{c + 1}") for c in range(args.ckpts)]
        t_open = time.perf_counter() - t
        scores = influence_scores(train, val, weights, subtasks, block_rows=args.block)
        if time.perf_counter() - t < t_score:
            t_score, t_checks = time.perf_counter() - t, runs.CHECK_SECONDS["total"] - c0
        # the same scoring with the per-block checks off (the stores opened without their block checksums)
        t = time.perf_counter()
        unchecked = [dataclasses.replace(s, blocks=None) for s in train]
        scores_unchecked = influence_scores(unchecked, val, weights, subtasks, block_rows=args.block)
        t_unchecked = min(t_unchecked, time.perf_counter() - t)
        assert np.array_equal(scores, scores_unchecked)
    t = time.perf_counter()
    for c in range(args.ckpts):  # what a writer does on opening a finished stage (nice-kit run): the whole file
        folder = out / f"epoch_{c + 1}"
        problem = check_vectors_file(folder / "vectors.npy", json.loads((folder / "integrity.json").read_text())
                                     ["files"]["vectors.npy"])
        assert problem is None, problem
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    ids = train[0].ids
    chosen = top_fraction(ids, scores, 0.05)
    t_select = time.perf_counter() - t
    print(f"influence scores (streamed)  : {t_score:7.1f} s   ({args.pool * args.ckpts / t_score:,.0f} pool rows/s)")
    print(f"top 5% selection             : {t_select:7.2f} s   ({len(chosen):,} examples)")
    print(f"integrity checks while scoring: {t_checks:7.2f} s   ({100 * t_checks / t_score:.1f}% of the scoring; "
          f"opening the stores {t_open:.2f} s)")
    print(f"scoring without block checks  : {t_unchecked:7.1f} s   (with them {t_score:.1f} s: "
          f"{100 * (t_score - t_unchecked) / t_unchecked:+.1f}%; best of {args.repeats})")
    print(f"full check of the stores      : {t_full:7.2f} s   (what `nice-kit run` does on opening finished stages; "
          f"{args.pool * args.dim * 2 * args.ckpts / 1e9 / max(t_full, 1e-9):.1f} GB/s)")
    print(f"peak RSS                     : {peak_rss_gb():7.2f} GB  (before scoring: {rss_before:.2f} GB; one "
          f"checkpoint's matrix in float32 would be {args.pool * args.dim * 4 / 1e9:.1f} GB)")
    # sanity: a block of rows scored directly equals the streamed scores
    a = min(1000, args.pool)
    direct = influence_scores([t.rows(0, a) for t in train], val, weights, subtasks)
    assert np.allclose(direct, scores[:a], rtol=1e-5, atol=1e-6), "streamed scores differ from direct ones"
    if args.clean:
        shutil.rmtree(out)


def bench_run(run_dir: str, config: str) -> None:
    """A whole `nice-kit run` of ``config`` in ``run_dir``, and the time spent in integrity checks."""
    from nice_kit import Pipeline, RunConfig

    t = time.perf_counter()
    Pipeline(RunConfig.from_file(config), run_dir).run()
    total = time.perf_counter() - t
    checks = runs.CHECK_SECONDS["total"]
    print(f"nice-kit run {config} in {run_dir}: {total:7.1f} s, of which integrity checks {checks:.2f} s "
          f"({100 * checks / total:.2f}%)")


if __name__ == "__main__":
    main()
