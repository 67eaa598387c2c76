"""The run the analysis scripts (nice_limits.py, nice_variants.py, bench_whatif.py) read: the run a
config names, or with ``--fast`` the fast demo run (imported by those scripts; not part of nice_kit).

``--fast`` is their smoke test (tests/test_bench.py): notebook 01's fast mode (nice_kit.demo: a tiny
random-weight model, a slice of the bundled data, the fast settings) at ``--run-dir`` (default
``runs/quickstart-fast``, the notebook's), with every stage it lacks run first. The numbers then mean
nothing; every code path is the real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = ROOT / "runs" / "default"
FAST_RUN_DIR = ROOT / "runs" / "quickstart-fast"


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """``--config``, ``--run-dir`` and ``--fast`` on a script's parser."""
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run-dir", default=None, help=f"default: {DEFAULT_RUN_DIR.relative_to(ROOT)}, with --fast "
                                                    f"{FAST_RUN_DIR.relative_to(ROOT)}")
    ap.add_argument("--fast", action="store_true",
                    help="the fast demo run (tiny random model, a slice of the data; made where missing): a smoke test")


def open_run(args: argparse.Namespace):
    """The :class:`nice_kit.pipeline.Pipeline` of ``args`` (see :func:`add_run_arguments`)."""
    if args.fast:
        from nice_kit.demo import demo_pipeline

        run = demo_pipeline(args.run_dir or FAST_RUN_DIR, fast=True, verbose=False)
        run.run()
        return run
    from nice_kit.config import RunConfig
    from nice_kit.pipeline import Pipeline

    return Pipeline(RunConfig.from_file(args.config), args.run_dir or DEFAULT_RUN_DIR, verbose=False)
