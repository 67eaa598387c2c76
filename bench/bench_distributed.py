"""Benchmark and check of the pipeline under torchrun (not a test: it prints numbers).

    python bench/bench_distributed.py [--examples 64] [--keep DIR]      # CPU: processes against threads
    python bench/bench_distributed.py --device cuda [--keep DIR]        # GPU: the NCCL path against none
    python bench/bench_distributed.py --check [--keep DIR]              # that check on the CPU (gloo, 2 processes)

CPU (default): the training-gradient stage of the bundled default model (configs/default.toml, its
first ``--examples`` pool examples, one warmup checkpoint made once and copied to both runs), run
as 1 process x ``--cores`` threads and as ``--cores`` processes x 1 thread (torchrun, gloo), one
after the other in this run. Prints examples/s of the stage (the model loaded, between two
barriers), the wall time of each command (start-up and model load included) and whether both
wrote the same vectors.

GPU (``--device cuda``): a random-weight model of ``--shape`` (default tiny; bench/shapes.py, the
tokenizer saved in bench/tokenizer/: no model files needed) on a slice of the bundled data, the whole
``nice-kit run`` without torchrun against ``torchrun --nproc-per-node G`` (NCCL for CUDA tensors,
G = the GPUs here, at most 2) from the same warmup checkpoints, and a torchrun run whose warmup
starts from scratch. Prints the largest differences and PASS/FAIL; exits 1 on a failure.
``--check`` runs the same check on the CPU (gloo, 2 processes x 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args: list[str], nproc: int | None, log: Path) -> float:
    """Run ``python args`` (or ``torchrun --nproc-per-node nproc args``); returns its wall time."""
    cmd = [sys.executable, *args] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def _write_config(path: Path, base: dict, **over) -> Path:
    """A TOML config: ``base`` (a RunConfig dict) with nested ``over`` settings."""
    from nice_kit.settings import merge_settings as _merge

    cfg = _merge(base, over)
    lines = []
    for key, value in cfg.items():
        if not isinstance(value, dict) and value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in cfg.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml(v)}" for k, v in value.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


# ------------------------------------------------------------------------------------------ worker
def worker(config: str, run_dir: str) -> None:
    """One process of a measured run: load the model, then time ``train_gradients`` between barriers."""
    import torch

    from nice_kit.config import RunConfig
    from nice_kit.distributed import init_from_env, shutdown
    from nice_kit.pipeline import Pipeline

    cfg = RunConfig.from_file(config)
    dist = init_from_env(cfg.device)
    try:
        p = Pipeline(cfg, run_dir, verbose=False, dist=dist)
        p.model  # noqa: B018 (loads the model and sets the threads)
        p.checkpoints  # noqa: B018
        dist.barrier()
        start = time.perf_counter()
        p.train_gradients()
        dist.barrier()
        seconds = time.perf_counter() - start
        if dist.is_main:
            result = {"seconds": seconds, "examples": len(p.pool), "threads": torch.get_num_threads(),
                      "processes": dist.world_size}
            (Path(run_dir) / "bench.json").write_text(json.dumps(result))
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------ CPU
def bench_cpu(args, work: Path) -> None:
    import numpy as np

    from nice_kit.config import RunConfig
    from nice_kit.data import load_records, save_records

    default = RunConfig.from_file(ROOT / "configs" / "default.toml")
    pool = load_records(default.data.pool)[: args.examples]
    save_records(pool, work / "pool.jsonl")
    base = default.to_dict()
    common = {"data": {"pool": str(work / "pool.jsonl")},
              "warmup": {"fraction": 16 / len(pool), "epochs": 1},  # one checkpoint: the stage runs once
              "gradients": {"chunk_size": args.chunk_size}}
    single = _write_config(work / "single.toml", base, threads=args.cores, **common)
    multi = _write_config(work / "multi.toml", base, threads=1, **common)

    print(f"default model {default.model}; {len(pool)} pool examples; chunk size {args.chunk_size}; "
          f"{os.cpu_count()} CPUs here")
    print("warmup (once, one process) ...", flush=True)
    _run(["-m", "nice_kit", "warmup", "--config", str(single), "--run-dir", str(work / "warmup_run")], None,
         work / "warmup.log")
    rows = []
    for name, cfg, nproc in ((f"1 process x {args.cores} threads", single, None),
                             (f"{args.cores} processes x 1 thread", multi, args.cores)):
        run_dir = work / ("single" if nproc is None else "multi")
        run_dir.mkdir()
        shutil.copytree(work / "warmup_run" / "warmup", run_dir / "warmup")
        print(f"{name} ...", flush=True)
        wall = _run([str(Path(__file__).resolve()), "--worker", str(cfg), str(run_dir)], nproc, work / f"{run_dir.name}.log")
        stats = json.loads((run_dir / "bench.json").read_text())
        rows.append((name, stats, wall, run_dir))
    print("\n== training-gradient stage, default model (shared, loaded machine: compare within this run) ==")
    for name, stats, wall, _ in rows:
        print(f"{name:<26}: {stats['examples'] / stats['seconds']:6.3f} examples/s  (stage {stats['seconds']:6.1f} s, "
              f"command {wall:6.1f} s with start-up and model load)")
    (_, a, _, dir_a), (_, b, _, dir_b) = rows
    print(f"processes / threads: {(b['examples'] / b['seconds']) / (a['examples'] / a['seconds']):.2f}x")
    va = np.load(dir_a / "grads" / "train" / "epoch_1" / "vectors.npy").astype(np.float32)
    vb = np.load(dir_b / "grads" / "train" / "epoch_1" / "vectors.npy").astype(np.float32)
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    print(f"same vectors: {'bit for bit' if np.array_equal(va, vb) else 'no'}; largest difference "
          f"{np.abs(va - vb).max():.2e} (unit rows in float16; {args.cores} vs 1 threads sum in another order), "
          f"smallest cosine {cos.min():.6f}")


# ------------------------------------------------------------------------------------------ GPU
def check(args, work: Path) -> int:
    """The torchrun path (NCCL on GPUs, else gloo) against no torchrun, on a tiny random-weight model."""
    import numpy as np
    import pandas as pd
    import torch

    from nice_kit.config import RunConfig
    from nice_kit.demo import FAST_OVERRIDES
    from nice_kit.warmup import load_checkpoints
    from shapes import bench_data, build_model, lora_settings, load_bench_tokenizer

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    gpus = min(2, torch.cuda.device_count()) if cuda else 2
    tok = load_bench_tokenizer(args.tokenizer)
    build_model(args.shape, tok, "cpu", torch.float32).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    data = bench_data(work / "data", n_pool=min(32, args.examples), n_val=4, n_test=4)
    base = RunConfig().to_dict()
    cfg = _write_config(work / "tiny.toml", base, **{**FAST_OVERRIDES, "model": str(work / "model"),
                                                     "device": args.device, "threads": "auto" if cuda else 1,
                                                     "data": {**data, "max_length": 64},
                                                     "lora": lora_settings(args.shape),
                                                     "warmup": {**FAST_OVERRIDES["warmup"], "grad_accum": 2},
                                                     "gradients": {"chunk_size": 8, "batch_size": 8},
                                                     "projection": {"dim": 512}})
    where = f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if cuda else "CPU (gloo)"
    print(f"{where}; torchrun with {gpus} process(es)")
    run = ["-m", "nice_kit", "run", "--config", str(cfg), "--run-dir"]
    t = _run(run + [str(work / "one")], None, work / "one.log")
    print(f"one process, no torchrun: {t:.1f} s")
    (work / "same").mkdir()
    shutil.copytree(work / "one" / "warmup", work / "same" / "warmup")
    t = _run(run + [str(work / "same")], gpus, work / "same.log")
    backend = "NCCL" if cuda else "gloo"
    print(f"torchrun, {backend}, same warmup: {t:.1f} s")
    t = _run(run + [str(work / "scratch")], gpus, work / "scratch.log")
    print(f"torchrun, {backend}, warmup from scratch: {t:.1f} s")

    failures = 0

    def report(what: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {what}: {detail}")

    one = pd.read_csv(work / "one" / "scores.csv")
    for name in ("same", "scratch"):
        other = pd.read_csv(work / name / "scores.csv")
        diff = float(np.abs(other[["less", "nice"]].to_numpy() - one[["less", "nice"]].to_numpy()).max())
        tol = 1e-3 if name == "same" else 2e-2
        report(f"{name}: scores", diff <= tol, f"largest difference {diff:.2e} (tolerance {tol:g})")
        for m in ("less", "nice"):
            a, b = ((work / d / f"selected_{m}.jsonl").read_text() for d in ("one", name))
            report(f"{name}: {m} selection", a == b, "identical" if a == b else "differs")
    for folder in ("train/epoch_1", "val_less/epoch_2", "val_nice/epoch_2"):
        a, b = (np.load(work / d / "grads" / folder / "vectors.npy").astype(np.float32) for d in ("one", "same"))
        diff = float(np.abs(a - b).max())
        report(f"same: {folder} vectors", diff <= 1e-2, "bit for bit" if diff == 0 else f"largest difference {diff:.2e}")
    for a, b in zip(load_checkpoints(work / "one" / "warmup"), load_checkpoints(work / "scratch" / "warmup")):
        rel = max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) for x, y in zip(a.moments(), b.moments()))
        report(f"scratch: warmup epoch {a.epoch} Adam moments", rel <= 1e-2 and a.lr == b.lr,
               f"largest difference / largest entry {rel:.2e}; lr {a.lr:.3g} vs {b.lr:.3g}")
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the NCCL check (implies --check)")
    ap.add_argument("--check", action="store_true", help="the torchrun-against-one-process check instead of the timing")
    ap.add_argument("--examples", type=int, default=64, help="pool examples (CPU benchmark; the check: at most 32)")
    ap.add_argument("--shape", choices=["tiny", "1b", "7b", "8b"], default="tiny",
                    help="the check's random-weight model (bench/shapes.py)")
    ap.add_argument("--tokenizer", default=None, help="the check's tokenizer folder (default: bench/tokenizer/)")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2, help="threads of the one process = processes of the other run")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        code = check(args, work) if args.check or args.device == "cuda" else (bench_cpu(args, work) or 0)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
