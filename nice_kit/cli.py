"""``nice-kit``: the pipeline from the command line (the same functions the notebooks call)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import EVAL_METHODS, SELECTION_METHODS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


# commands that only read what earlier stages wrote: a mistyped run directory is an error, not a new run
_READERS = ("score", "select", "evaluate", "explain", "what-if", "lds")


def _pipeline(args):
    from .config import RunConfig
    from .pipeline import Pipeline

    run_dir = Path(args.run_dir)
    if args.command in _READERS and not (run_dir / "config.json").exists():
        hint = "" if run_dir.exists() else " does not exist"
        raise FileNotFoundError(f"run directory {run_dir}{hint or ' holds no run (no config.json)'}; "
                                "start one with `nice-kit run --run-dir DIR`")
    cfg = RunConfig.from_file(args.config, sets=getattr(args, "override", None) or ())
    from .distributed import init_from_env

    dist = init_from_env(cfg.device)  # under torchrun: join the process group; else one process as before
    if dist.parallel:  # the bundled default model is converted on first use: once per machine, not per process
        from .models import resolve_model_path

        if dist.local_rank == 0:
            resolve_model_path(cfg.model)
        dist.barrier()
    p = Pipeline(cfg, run_dir, verbose=dist.is_main, dist=dist)
    dist.check_shared(run_dir)  # every process must see the same run directory
    return p


def _shard(text):
    from .runs import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_run(args) -> None:
    import pandas as pd

    from .diagnostics import has_flags

    p = _pipeline(args)
    diag = p.run()
    pd.set_option("display.width", 160)
    if has_flags(p):
        print(f"\nSelection diagnostics (top {p.cfg.selection.fraction:.0%} of the pool; flags never seen by the "
              "selectors):")
    else:
        print(f"\nSelections (top {p.cfg.selection.fraction:.0%} of the pool):")
    print(diag.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nscores: {p.run_dir / 'scores.csv'}   selection: {p.run_dir / 'selected.jsonl'}")


def cmd_prepare(args) -> None:
    import json

    print(json.dumps(_pipeline(args).prepare(), indent=1))


def cmd_warmup(args) -> None:
    for c in _pipeline(args).warmup():
        print(f"epoch {c.epoch}: lr {c.lr:.3g}  {c.path}")


def cmd_train_grads(args) -> None:
    _pipeline(args).train_gradients(shard=args.shard)


def cmd_val_grads(args) -> None:
    _pipeline(args).validation_gradients(args.method, shard=args.shard)


def cmd_rollouts(args) -> None:
    df = _pipeline(args).rollouts()
    print(df.groupby("epoch")["reward"].describe().to_string())


def cmd_score(args) -> None:
    p = _pipeline(args)
    scores = p.scores(args.methods)
    print(scores.describe().to_string())


def cmd_select(args) -> None:
    from .diagnostics import selection_summary

    p = _pipeline(args)
    summary = p.dist.on_main(lambda: selection_summary(p, p.select(fraction=args.fraction)))  # rank 0 writes
    print(summary.to_string(index=False))


def cmd_evaluate(args) -> None:
    from .evaluation import compare, diversity_summary, summarize

    p = _pipeline(args)
    if p.dist.parallel and p.dist.world_size > 1:
        raise RuntimeError("nice-kit evaluate runs in one process: start it without torchrun (the selections it "
                           "trains on are already in the run directory)")
    df = compare(p, methods=args.methods, fraction=args.fraction, seeds=args.seeds,
                 selection_seeds=args.selection_seeds, quick=args.quick, full=args.full)
    print(summarize(df).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    diversity = diversity_summary(df)
    if "answer_top_share" in diversity.columns:
        print("\nAnswer diversity of the fine-tuned models' test completions (a collapse: one completion for half "
              "the test prompts or more):")
        print(diversity.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nper run: {p.run_dir / 'evaluation' / 'results.csv'}")


def cmd_lds(args) -> None:
    from .evaluation import describe_lds, lds

    p = _pipeline(args)
    if p.dist.parallel and p.dist.world_size > 1:
        raise RuntimeError("nice-kit lds runs in one process: start it without torchrun")
    result = lds(p, n_subsets=args.subsets, fraction=args.fraction, seeds=args.seeds, methods=args.methods,
                 n_bootstrap=args.bootstrap, subset_seed=args.subset_seed)
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    print(f"\nLinear datamodeling score ({args.subsets} random subsets of {args.fraction:.0%} of the pool; target "
          "'loss' is minus the test reference loss, so positive means 'predicts better'):")
    print(result.table.to_string(index=False, float_format=fmt))
    if len(result.differences):
        print("\nDifferences (paired bootstrap over subsets):")
        print(result.differences.to_string(index=False, float_format=fmt))
    print("\n" + describe_lds(result))
    print(f"\ncost of the stored trainings: {result.cpu_minutes:.1f} CPU minutes; per training: "
          f"{p.run_dir / 'evaluation' / 'lds.csv'}")


def cmd_explain(args) -> None:
    from .explain import check_decomposition, format_explanation

    p = _pipeline(args)
    if args.check:
        df = check_decomposition(p, args.method)
        worst = df.loc[df["difference"].abs().idxmax()]
        print(f"{args.method}: {len(df)} examples ({p.cfg.selection.aggregate}); largest |sum of contributions - "
              f"stored score| = {abs(worst['difference']):.3g} (example {worst['id']}, score {worst['stored']:+.6g})")
        if "completion_difference" in df:
            w = df.loc[df["completion_ratio"].idxmax()]
            print(f"completions: largest |sum of a prompt's completion shares - its contribution| = "
                  f"{df['completion_difference'].max():.3g}; largest against its float16 tolerance = "
                  f"{w['completion_ratio']:.3g} of it (example {w['id']})")
        return
    if args.id is None:
        raise ValueError("nice-kit explain needs a pool example ID (or --check for every example)")
    print(format_explanation(p.explain(args.id, args.method), top=args.top))


def _setting(text: str) -> tuple[str, object]:
    """``section.setting=value`` with a TOML value (``none`` and other bare words are strings)."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected section.setting=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def cmd_what_if(args) -> None:
    from .whatif import what_if

    p = _pipeline(args)
    got = what_if(p, dict(args.set or []), top_moves=args.top)
    print(got.summary())
    if args.out:
        got.scores.to_csv(args.out, index=False)
        print(f"\nscores: {args.out}")


def cmd_config(args) -> None:
    from .config import RunConfig
    from .settings import to_toml

    cfg = RunConfig.from_file(args.config, sets=args.override or (), check_model=not args.no_model_check)
    print(f"# {args.config}" + "".join(f"\n# --set {k}={v!r}" for k, v in args.override or ()) + "\n" + to_toml(cfg),
          end="")


def cmd_metrics(args) -> None:
    from .metrics import list_metrics

    for _, row in list_metrics().iterrows():
        ref = "needs reference" if row["needs_reference"] else "label-free"
        print(f"{row['name']:<14} ({ref}) {row['description']}\n{'':<15}params: {row['params']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nice-kit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help, shard=False, run_dir=True, overrides=True, **kw):
        sp = sub.add_parser(name, help=help, description=help, **kw)
        sp.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML config (default: the bundled default)")
        if overrides:
            sp.add_argument("--set", dest="override", action="append", type=_setting, metavar="SECTION.SETTING=VALUE",
                            help="override one setting of the config (repeatable), e.g. --set rollouts.k=4 "
                                 "--set policy.baseline=none; `nice-kit config --help` lists every setting")
        if run_dir:
            sp.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
        if shard:
            sp.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                            help="compute only shard I of N (chunks c with c %% N == I); merged when all exist")
        sp.set_defaults(func=fn)
        return sp

    add("run", cmd_run, "run the whole pipeline (prepare, warmup, gradients, rollouts, scores, selection)")
    add("prepare", cmd_prepare, "check and tokenise the data; report truncation")
    add("warmup", cmd_warmup, "train the warmup LoRA and save a checkpoint per epoch")
    add("train-grads", cmd_train_grads, "projected Adam-preconditioned gradients of the pool", shard=True)
    sp = add("val-grads", cmd_val_grads, "validation gradients of the target prompts (less or nice)", shard=True)
    sp.add_argument("--method", choices=SELECTION_METHODS, default="nice")
    add("rollouts", cmd_rollouts, "sample and score completions of the target prompts")
    sp = add("score", cmd_score, "influence scores of the pool (scores.csv)")
    sp.add_argument("--methods", nargs="+", choices=SELECTION_METHODS, default=None)
    sp = add("select", cmd_select, "select the top fraction by each method (selected*.jsonl)")
    sp.add_argument("--fraction", type=float, default=None)
    sp = add("evaluate", cmd_evaluate, "fine-tune on each method's selection and score held-out test prompts")
    sp.add_argument("--methods", nargs="+", default=None, help=f"subset of: {' '.join(EVAL_METHODS)}")
    sp.add_argument("--fraction", type=float, default=None)
    sp.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tuning seeds")
    sp.add_argument("--selection-seeds", nargs="+", type=int, default=None,
                    help="selection seeds: k re-runs the selection with run seed + k and projection seed + k")
    sp.add_argument("--quick", action="store_true",
                    help="one fine-tuning seed and no full-pool row unless --full (for a notebook)")
    sp.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                    help="include (--full) or leave out (--no-full) the full-pool row")
    sp = add("lds", cmd_lds, "linear datamodeling score: does the sum of an example's scores predict what training "
             "on random subsets does to the test metric and loss?")
    sp.add_argument("--subsets", type=int, default=32, help="number of random subsets M (default 32)")
    sp.add_argument("--fraction", type=float, default=0.5, help="each subset's share of the pool (default 0.5)")
    sp.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="fine-tuning seeds per subset (default: the first of the config's evaluation seeds)")
    sp.add_argument("--methods", nargs="+", default=None, help="score columns to test (default: all in scores.csv)")
    sp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over subsets (default 1000)")
    sp.add_argument("--subset-seed", type=int, default=0, help="seed of the random subsets (default 0)")
    sp = add("explain", cmd_explain, "why an example scored what it did: its top target prompts and completions")
    sp.add_argument("id", nargs="?", default=None, help="the pool example's id")
    sp.add_argument("--method", choices=SELECTION_METHODS, default="nice")
    sp.add_argument("--top", type=int, default=10, help="how many contributions to print (default 10)")
    sp.add_argument("--check", action="store_true",
                    help="decompose every example and print the largest difference from its stored score")
    sp = add("what-if", cmd_what_if, "NICE's selection under another metric, estimator or aggregate, from stored "
             "vectors (no new samples; computes the per-completion gradients once)", overrides=False)
    sp.add_argument("--set", action="append", type=_setting, metavar="SECTION.SETTING=VALUE",
                    help="a [metric] or [policy] setting, selection.aggregate or selection.fraction, e.g. "
                         "--set policy.baseline=none --set metric.name=length --set metric.params.max_words=3")
    sp.add_argument("--top", type=int, default=10, help="how many rank moves to print (default 10)")
    sp.add_argument("--out", default=None, help="write the what-if's scores (CSV) here")
    from .settings import settings_reference

    sp = add("config", cmd_config, "print the config with every setting (after --set), checked; --help lists "
             "every setting with its default, range and meaning", run_dir=False,
             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=settings_reference(markdown=False))
    sp.add_argument("--no-model-check", action="store_true", help="do not check that the model loads offline")
    sm = sub.add_parser("metrics", help="list the registered reward metrics")
    sm.set_defaults(func=cmd_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import os

    # under torchrun only rank 0 prints results and progress bars (tqdm reads TQDM_DISABLE when torch
    # imports it, so before that); errors show on every rank
    quiet = os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    from .distributed import shutdown

    args = build_parser().parse_args(argv)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
            args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        from .data import DataError
        from .runs import StaleResultError

        if isinstance(err, (DataError, FileNotFoundError, StaleResultError)) or not _debug():
            print(f"nice-kit: error: {err}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("\nnice-kit: interrupted; finished chunks are kept and the next run resumes from them", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


def _debug() -> bool:
    import os

    return bool(os.environ.get("NICE_KIT_DEBUG"))


if __name__ == "__main__":
    sys.exit(main())
