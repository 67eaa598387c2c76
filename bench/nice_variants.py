"""Which policy-gradient settings make NICE's selection cleanest? (Diagnostics only: no retraining.)

    python bench/nice_variants.py [--run-dir runs/default]
    python bench/nice_variants.py --fast      # a smoke test on the fast demo run (bench/fast_run.py)

Asks the finished run one what-if per variant (nice_kit.whatif: the same warmup, training gradients
and rollouts; NICE's prompt vectors recombined from the stored per-completion gradients, computed
once, so a variant costs about a second and equals a fresh run within float16 storage,
tests/test_whatif.py), and prints the share of harmful / wrong-answer / verbose / on-task examples
among each variant's top 10% (the benchmark's flags, never seen by NICE) and its overlap with the
run's selection. The "reference estimator" rows are the reference implementation's arithmetic
(policy.estimator = "reference"); the others are nice_kit's estimator with the settings named.

    python bench/nice_variants.py --only "paper.toml" "mean baseline (default)" --retrain-seeds 0 1 2

also trains a fresh LoRA on each variant's selection per fine-tuning seed, as ``nice-kit evaluate``
does, and prints the test metric (mean ± standard error over the seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fast_run import add_run_arguments, open_run  # noqa: E402
from nice_kit.evaluation import finetune_and_evaluate  # noqa: E402

REFERENCE = {"estimator": "reference", "baseline": "none"}
VARIANTS = {
    "reference estimator: vanilla (paper.toml)": {"policy": {**REFERENCE, "variant": "vanilla"}},
    "reference estimator: rejection": {"policy": {**REFERENCE, "variant": "rejection"}},
    "reference estimator: hard_rejection": {"policy": {**REFERENCE, "variant": "hard_rejection"}},
    "reference estimator: topk_rejection": {"policy": {**REFERENCE, "variant": "topk_rejection"}},
    "reference estimator: topk_hard": {"policy": {**REFERENCE, "variant": "topk_hard"}},
    "vanilla, no baseline": {"policy": {"variant": "vanilla", "baseline": "none"}},
    "vanilla, mean baseline (default)": {"policy": {"variant": "vanilla", "baseline": "mean"}},
    "vanilla, leave-one-out baseline": {"policy": {"variant": "vanilla", "baseline": "loo"}},
    "mean baseline, per-token normalised": {"policy": {"variant": "vanilla", "baseline": "mean", "token_normalize": True}},
    "top-4, no baseline": {"policy": {"variant": "topk", "topk": 4, "baseline": "none"}},
    "rejection vs reference (+fallback)": {"policy": {"variant": "rejection", "baseline": "none"}},
    "mean baseline, lenient metric": {"metric": {"name": "task_score", "params": {"extract": "last_number"}}},
}


def _dotted(over: dict) -> dict:
    return {f"{section}.{k}": v for section, values in over.items() for k, v in values.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--retrain-seeds", nargs="*", type=int, default=[],
                    help="fine-tuning seeds: retrain on each variant's selection and score the test prompts")
    args = ap.parse_args()
    p = open_run(args)
    rows = []
    for name, over in VARIANTS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        got = p.what_if(_dotted(over))
        diag = got.diagnostics.set_index("method").loc["what-if"].to_dict() if got.diagnostics is not None else {}
        rows.append({"variant": name, **{k: v for k, v in diag.items() if k.endswith("share")},
                     "overlap": got.overlap, "seconds": got.seconds})
        if args.retrain_seeds:
            test = p.target_test[: p.cfg.evaluation.max_test or None]
            runs = [finetune_and_evaluate(p, got.selected, seed, test) for seed in args.retrain_seeds]
            metric = np.array([r["metric"] for r in runs])
            rows[-1]["test_metric"] = float(metric.mean())
            rows[-1]["test_metric_se"] = float(metric.std(ddof=1) / np.sqrt(len(metric))) if len(metric) > 1 else np.nan
        print(pd.DataFrame(rows).tail(1).to_string(index=False, header=len(rows) == 1), flush=True)
    print("\n" + pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
