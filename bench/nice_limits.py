"""What limits NICE on the bundled benchmark? Signal, what the selections share, and the LDS.

    python bench/nice_limits.py [--config C] [--run-dir runs/default] [--subsets 40] [--fraction 0.1]
    python bench/nice_limits.py --fast --subsets 3   # a smoke test on the fast demo run (bench/fast_run.py)

Prints, for a finished run (``nice-kit run``): per warmup epoch and subtask how many target prompts got
mixed rewards (NICE's policy gradient is zero on the others), the most common responses in the LESS and
NICE selections with the benchmark's flags, and the linear datamodeling score over random subsets
(:func:`nice_kit.evaluation.lds`: it trains the subsets not yet stored in ``evaluation/lds.csv``, so the
first call costs about a minute of CPU per subset of 31 examples) with the answer diversity of each
subset's fine-tuned model: how often a model collapses to one answer, and what goes with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fast_run import add_run_arguments, open_run  # noqa: E402
from nice_kit.diagnostics import reward_signal, response_values, selection_diagnostics  # noqa: E402
from nice_kit.evaluation import COLLAPSE_SHARE, describe_lds, is_collapse, lds, rank_correlation  # noqa: E402
from nice_kit.influence import top_fraction  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    args = ap.parse_args()
    pd.set_option("display.width", 200)
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    run = open_run(args)

    print("== signal: target prompts with mixed rewards over their K samples, per warmup epoch ==")
    print(reward_signal(run).to_string(index=False, float_format=fmt))

    scores = run.read_scores()
    picks = {m: top_fraction(scores["id"].tolist(), scores[m].to_numpy(), run.cfg.selection.fraction)
             for m in ("less", "nice") if m in scores.columns}
    print("\n== what the selections hold (benchmark flags; responses stripped) ==")
    diag = selection_diagnostics(run, picks)
    print(diag.to_string(index=False, float_format=fmt))
    by_id = {r.id: r for r in run.pool}
    for m, ids in picks.items():
        tasks = pd.Series([by_id[i].columns.get("task") for i in ids]).value_counts().to_dict()
        print(f"\n{m}: {len(ids)} picks, tasks {tasks}; most common responses:")
        print(response_values(run, ids).to_string(index=False, float_format=fmt))
    print(f"\nLESS and NICE share {len(set(picks.get('less', [])) & set(picks.get('nice', [])))} picks; "
          f"scores' Spearman {rank_correlation(scores['less'], scores['nice']):.3f}")

    print(f"\n== linear datamodeling score: {args.subsets} random subsets of {args.fraction:.0%} ==")
    res = lds(run, n_subsets=args.subsets, fraction=args.fraction, seeds=args.seeds)
    print(res.table.to_string(index=False, float_format=fmt))
    print(res.differences.to_string(index=False, float_format=fmt))
    print(describe_lds(res))
    sub = res.subsets
    share = sub["answer_top_share"]
    print(f"\nanswer diversity over the {len(sub)} subsets' models: most common test completion's share "
          f"median {share.median():.2f}, range {share.min():.2f}-{share.max():.2f}; distinct completions median "
          f"{sub['answer_distinct'].median():.0f}; collapsed (>= {COLLAPSE_SHARE:.0%}): "
          f"{sum(is_collapse(x) for x in share)} of {len(sub)}")
    print(f"Spearman over subsets: metric vs top-answer share {rank_correlation(sub['metric'], share):+.3f}; "
          f"top-answer share vs the subset's own top-response share {rank_correlation(share, sub['train_top_share']):+.3f}")
    top = res.trainings.groupby("answer_top").size().sort_values(ascending=False).head(5)
    print("most common completion of each model (count of models):", top.to_dict())
    print(f"metric over subsets: mean {sub['metric'].mean():.3f}, sd {sub['metric'].std(ddof=1):.3f}; "
          f"loss mean {sub['loss'].mean():.3f}, sd {sub['loss'].std(ddof=1):.3f}; "
          f"metric vs loss Spearman {rank_correlation(sub['metric'], -sub['loss']):+.3f} (minus loss)")
    print(f"cost of the stored trainings: {res.cpu_minutes:.1f} CPU minutes "
          f"({res.trainings['cpu_s'].mean():.0f} CPU s and {res.trainings['wall_s'].mean():.0f} s wall per training)")


if __name__ == "__main__":
    main()
