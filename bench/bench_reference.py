"""nice_kit's reference estimator against the independent float64 oracle, on the bundled model.

    python bench/bench_reference.py            # 12 pool examples, 8 target prompts, every variant and option
    python bench/bench_reference.py --quick --oracle-dtype float32   # 6 and 4, the five variants (CI)

A shared warmup of SmolLM2-135M-Instruct on a slice of the bundled benchmark, 8 (--quick: 4) target
prompts in two subtasks, 12 completions per prompt sampled by the model, and designed rewards (ties at the
top-10 cut, negative rewards, ties with the reference answer's reward, an all-zero prompt, an empty
completion, a completion whose text encodes to other ids) fed to both sides. nice_kit's side is the
pipeline's own measurement and float32 gradient engine; the oracle (tests/reference_oracle.py) is a
plain float64 loop written from the description of the reference's arithmetic. Both unprojected.

Prints, per variant: the smallest cosine between the two sides' prompt vectors, whether zero vectors
agree, the largest score error relative to the largest score, the Spearman correlation of the scores
and whether the top 1/2/3 are identical; and the same for nice_kit's own estimator with the policy
paper.toml used before (vanilla, no baseline), for comparison. Exit 1 if a variant misses
Spearman >= 0.99, an identical top 3, or a cosine >= 0.999999.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import reference_check as rc  # noqa: E402
from nice_kit.config import RunConfig  # noqa: E402
from nice_kit.demo import DEFAULT_CONFIG, fast_data  # noqa: E402
from nice_kit.settings import merge_settings  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402


def build(out: Path, n_pool: int, n_val: int, model: str, threads: int) -> Pipeline:
    data = fast_data(out / "data", n_pool=n_pool, n_val=n_val, n_test=2)
    base = RunConfig.from_file(DEFAULT_CONFIG).to_dict()
    cfg = RunConfig.from_dict(merge_settings(base, {
        "model": model, "threads": threads, "data": {**data, "max_length": 512},
        "warmup": {"fraction": 1.0, "epochs": 2, "batch_size": 2, "lr": 3e-4},
        "rollouts": {"k": 12, "max_new_tokens": 12, "temperature": 1.0},
        "policy": {"estimator": "reference", "variant": "vanilla", "baseline": "none"}}))
    return Pipeline(cfg, out / "run", verbose=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 pool examples, 4 target prompts, the five variants only")
    ap.add_argument("--pool", type=int, default=0, help="pool examples (default 12; --quick 6)")
    ap.add_argument("--per-subtask", type=int, default=0, help="target prompts per subtask (default 4; --quick 2)")
    ap.add_argument("--model", default="default", help="model name or folder (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oracle-dtype", choices=["float64", "float32"], default="float64",
                    help="the oracle model's dtype (float32: minutes instead of an hour on 2 cores; its sums stay "
                         "float64); CI runs --quick --oracle-dtype float32")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_reference_"))
    n_pool = args.pool or (6 if args.quick else 12)
    per_subtask = args.per_subtask or (2 if args.quick else 4)
    run = build(out, n_pool, per_subtask, args.model, args.threads)
    print(f"[bench_reference] step: warmup and rollouts ({len(run.pool)} pool examples, "
          f"{len(run.target_val)} target prompts x {run.cfg.rollouts.k})", flush=True)
    run.warmup()
    tables, refs = rc.designed_rollouts({c.epoch: run.rollouts(c) for c in run.checkpoints}, run.tokenizer)
    rc.feed(run, tables, refs)
    print(f"[bench_reference] cases exercised: {rc.exercised(run, tables)}", flush=True)
    print(f"[bench_reference] step: training gradients (nice_kit float32, oracle {args.oracle_dtype})", flush=True)
    train = rc.nice_kit_train(run)
    orc = rc.Oracle(run, tables, refs, dtype=getattr(torch, args.oracle_dtype))
    cases = [c for c in rc.CASES if not (args.quick and (c[1] or c[2]))]
    print(f"{'variant':<32} {'min cos':>14} {'zeros':>6} {'rel err':>9} {'spearman':>9} top1 top2 top3", flush=True)
    failed = []

    def report(name: str, got: dict, top: list[bool]) -> None:
        print(f"{name:<32} {got['min_cosine']:>14.10f} {str(got['zeros_agree']):>6} {got['scores_rel_err']:>9.2e} "
              f"{got['spearman']:>9.6f} " + " ".join(f"{str(t):>4}" for t in top), flush=True)

    for variant, wcp, dn in cases:
        rc.with_policy(run, variant, wcp, dn)
        ours, ref = rc.nice_kit_side(run, train), orc.side(variant, wcp, dn)
        got, top = rc.agreement(ours, ref), [rc.agreement(ours, ref, k)["same_top_k"] for k in (1, 2, 3)]
        name = variant + (" worst_case_protect" if wcp else "") + (" do_normalize" if dn else "")
        report(name, got, top)
        if not (got["spearman"] >= 0.99 and all(top) and got["min_cosine"] >= 0.999999 and got["zeros_agree"]):
            failed.append(name)
    run.cfg.policy = replace(run.cfg.policy, estimator="nice_kit", variant="vanilla", baseline="none")
    ours = rc.nice_kit_side(run, train)
    ref = orc.side("vanilla", False, False)
    report("(nice_kit's own, vanilla/none)", rc.agreement(ours, ref),
           [rc.agreement(ours, ref, k)["same_top_k"] for k in (1, 2, 3)])
    print(f"[bench_reference] {len(cases) - len(failed)} of {len(cases)} reference cases agree "
          f"({time.time() - t0:.0f} s)" + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
