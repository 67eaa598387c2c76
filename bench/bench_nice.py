"""Benchmark of NICE's own stages (not a test: it prints numbers).

    python bench/bench_nice.py [--prompts 32] [--device cpu|cuda] [--part rollouts|policy|overhead|all]
    python bench/bench_nice.py --shape 7b --device cuda      # a random-weight model (bench/shapes.py): no model files

* rollouts (completion tokens per second, same prompts and sampling settings, in one run): the old
  way (Hugging Face ``generate`` on K copies of each prompt, batches of 64 sequences; the function
  is kept below as ``legacy_generate``) against ``nice_kit.rollouts.sample_rollouts`` (one shared
  prefill per prompt, batches by token budget, finished rows dropped). Runs on the bundled default
  model (or ``--model``) on any device: ``--device cuda`` on a GPU.
* the policy-gradient stage: completions per second through reward-weighted batched gradients and
  the projection, against the one-at-a-time loop. Uses the warmup checkpoint of ``--run-dir`` (a
  short warmup runs first if there is none).
* overhead: the decode loop's own cost per decoding step (sampling, bookkeeping, stop strings,
  host synchronisation), measured as the loop's wall time minus the time spent inside the model's
  forward calls, on ``--shape`` (default tiny, where the model costs little) with a LoRA adapter.

With ``--shape`` (tiny, 1b, 7b, 8b) every part uses a Llama of that shape with random weights and
a LoRA adapter of the shape's rank (lora_B drawn at random, so that the adapter changes the
samples), the tokenizer saved in ``bench/tokenizer/`` and a label-free reward: nothing needs the
bundled model, nice_kit's cache or a package a bare GPU machine lacks. Without it the rollouts and
policy parts use ``--model`` (default: the bundled SmolLM2-135M-Instruct) and ``--config``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit.config import RolloutSettings, RunConfig  # noqa: E402
from nice_kit.data import load_records, prompt_ids  # noqa: E402
from nice_kit.gradients import group_gradients, loop_gradients  # noqa: E402
from nice_kit.models import load_model  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402
from nice_kit.projection import normalize_rows  # noqa: E402
from nice_kit.rollouts import sample_rollouts  # noqa: E402
from nice_kit.warmup import load_adapter_weights  # noqa: E402
from shapes import SHAPES, build_model, lora_settings, load_bench_tokenizer, vowel_share  # noqa: E402


@torch.no_grad()
def legacy_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_k: int, top_p: float, seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """The rollouts before this change (reference only): ``generate`` on left-padded batches of
    ``batch_size`` prompts (K copies of a prompt are K rows), each batch seeded with ``seed + b``.
    Returns each completion's tokens up to the end-of-sequence token."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        rows = prompts[start:start + batch_size]
        n = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        torch.manual_seed(seed + b)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos, temperature=temperature, top_k=top_k,
                             top_p=top_p)[:, n:].tolist()
        out += [toks[: toks.index(eos)] if eos in toks else toks for toks in gen]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shaped_lora_model(shape: str, device, tokenizer_path: str | None = None, seed: int = 0):
    """A random-weight model of ``shape`` wrapped in a LoRA adapter of the shape's rank, with lora_B
    drawn at random (a trained adapter's B is not zero), and its tokenizer."""
    from nice_kit.models import LoraSettings, add_lora

    tok = load_bench_tokenizer(tokenizer_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(shape, tok, device)
    lora = lora_settings(shape)
    model = add_lora(model, LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"]), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    return model.eval(), tok


def _model_and_tokenizer(args):
    if args.shape:
        return shaped_lora_model(args.shape, args.device, args.tokenizer)
    return load_model(args.model, device=args.device)


def bench_rollouts(args) -> None:
    cfg = RunConfig.from_file(args.config, check_model=False)  # the model is loaded (or built) below
    r = cfg.rollouts
    model, tok = _model_and_tokenizer(args)
    device = next(model.parameters()).device
    path = Path(args.config).parent / cfg.data.target_val
    recs = load_records(path if path.exists() else ROOT / "data" / "arith" / "target_val.jsonl")[: args.prompts]
    k = args.k or r.k
    settings = RolloutSettings(k=k, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                               max_new_tokens=args.max_new_tokens or r.max_new_tokens, stop=[])
    if args.max_batch_tokens:
        settings.max_batch_tokens = args.max_batch_tokens
    if args.batch_size:
        settings.batch_size = args.batch_size
    prompts = [prompt_ids(tok, rec.messages) for rec in recs]
    print(f"model {args.shape or args.model} on {device} ({next(model.parameters()).dtype}); threads {torch.get_num_threads()}; "
          f"{len(recs)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens) x K={k}, at most "
          f"{settings.max_new_tokens} new tokens, temperature {settings.temperature}, top-k {settings.top_k}, "
          f"top-p {settings.top_p}")

    def legacy(recs, s):
        flat = [prompt_ids(tok, rec.messages) for rec in recs for _ in range(s.k)]
        return sum(len(t) for t in legacy_generate(model, tok, flat, max_new_tokens=s.max_new_tokens,
                                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                   batch_size=64))

    def new(recs, s):
        return sum(row["n_tokens"] for row in sample_rollouts(model, tok, recs, s, seed=0, epoch=0))

    ways = {"old: generate, K copies, batch 64": legacy,
            f"new: shared prefill, <= {settings.batch_size} rows / {settings.max_batch_tokens} tokens": new}
    for fn in ways.values():  # warm up (first-call overheads, kernels)
        fn(recs[:2], RolloutSettings(**{**settings.__dict__, "max_new_tokens": 2}))
    print("\n== rollouts ==")
    rates = {}
    for rep in range(args.repeats):
        for name, fn in ways.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            toks = fn(recs, settings)
            _sync(device)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates.setdefault(name, []).append(toks / secs)
            peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                    if device.type == "cuda" else "")
            print(f"{name:58s}: {toks / secs:8.1f} completion tokens/s ({toks} tokens in {secs:.2f} s; "
                  f"{cpu:.2f} s of CPU time, {toks / cpu:.1f} tokens per CPU second{peak})")
    old, new_rate = (max(v) for v in rates.values())
    print(f"speed-up (best of {args.repeats}): {new_rate / old:.2f}x")


def _policy_pipeline(args) -> Pipeline:
    """The pipeline of the policy part: ``--config`` with ``--run-dir``, or with ``--shape`` a
    random-weight model in a run directory of its own, scored by a label-free reward."""
    cfg = RunConfig.from_file(args.config, check_model=not args.shape)
    if not args.shape:
        return Pipeline(cfg, args.run_dir)
    from nice_kit.settings import merge_settings as _merge
    from shapes import bench_data

    tok = load_bench_tokenizer(args.tokenizer)
    model = build_model(args.shape, tok, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(args.run_dir if args.run_dir != _DEFAULT_RUN_DIR else f"runs/bench_nice_{args.shape}")
    data = bench_data(run_dir / "data", n_pool=16, n_val=max(1, args.prompts // 2), n_test=1)
    d = _merge(cfg.to_dict(), {"model": f"random-{args.shape}", "threads": 1 if model.device.type != "cpu" else "auto",
                               "data": {**data, "max_length": 256}, "lora": lora_settings(args.shape),
                               "warmup": {"fraction": 0.5, "epochs": 1, "lr": 2e-5, "batch_size": 4},
                               "metric": {"name": "length", "params": {}}})
    cfg = RunConfig.from_dict(d, check_model=False)
    cfg.metric.name, cfg.metric.params = vowel_share, {}
    return Pipeline(cfg, run_dir, model=model, tokenizer=tok, verbose=False)


def bench_policy(args) -> None:
    from nice_kit.measurements import completion_sequence

    p = _policy_pipeline(args)
    cfg = p.cfg
    ckpt = p.warmup()[-1]
    model, tok = p.model, p.tokenizer
    load_adapter_weights(model, ckpt)
    r = cfg.rollouts
    recs = p.target_val[: args.prompts]
    # policy-gradient stage on these rollouts
    rows = p.rollouts(ckpt)
    rows = rows[rows["prompt_id"].isin([x.id for x in recs])]
    seqs = []
    for j, rec in enumerate(recs):
        pids = prompt_ids(tok, rec.messages)
        for toks, eos in zip(rows[rows["prompt_id"] == rec.id]["token_ids"],
                             rows[rows["prompt_id"] == rec.id]["ended_with_eos"]):
            seq = completion_sequence(p.context, pids, list(toks), bool(eos), 0.125, j)
            if seq is not None:
                seqs.append(seq)
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    g = group_gradients(model, seqs, len(recs), tok.pad_token_id, cfg.gradients.batch_size)
    normalize_rows(p.projector.project(g))
    _sync(device)
    t_batched = time.perf_counter() - t0
    n_loop = min(len(seqs), 2 * r.k)
    t0 = time.perf_counter()
    loop_gradients(model, seqs[:n_loop], len(recs))
    _sync(device)
    t_loop = (time.perf_counter() - t0) * len(seqs) / max(1, n_loop)
    print("\n== policy-gradient stage ==")
    print(f"batched (batch {cfg.gradients.batch_size}) + projection: {len(seqs) / t_batched:6.2f} completions/s "
          f"({len(recs) / t_batched:.2f} target prompts/s)")
    print(f"one completion at a time (no projection): {len(seqs) / t_loop:6.2f} completions/s")


def bench_overhead(args) -> None:
    """The decode loop's own cost per step: wall time minus the time inside the model's forward calls."""
    model, tok = shaped_lora_model(args.shape or "tiny", args.device, args.tokenizer)
    device = next(model.parameters()).device
    recs = load_records(ROOT / "data" / "arith" / "target_val.jsonl")[: args.prompts]
    k = args.k or 8
    new_tokens = args.max_new_tokens or 32
    settings = RolloutSettings(k=k, temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=new_tokens,
                               stop=list(args.stop))
    inside = {"s": 0.0, "calls": 0, "t0": 0.0}

    def pre(module, a, kw):
        _sync(device)
        inside["t0"] = time.perf_counter()

    def post(module, a, kw, out):
        _sync(device)
        inside["s"] += time.perf_counter() - inside["t0"]
        inside["calls"] += 1

    base = model.get_base_model()
    sample_rollouts(model, tok, recs[:2], RolloutSettings(**{**settings.__dict__, "max_new_tokens": 2}))  # warm up
    handles = [base.register_forward_pre_hook(pre, with_kwargs=True),
               base.register_forward_hook(post, with_kwargs=True)]
    try:
        best = None
        for _ in range(args.repeats):
            inside.update(s=0.0, calls=0)
            _sync(device)
            t0 = time.perf_counter()
            rows = sample_rollouts(model, tok, recs, settings, seed=0)
            _sync(device)
            wall = time.perf_counter() - t0
            steps = max(1, inside["calls"])
            result = (wall, inside["s"], steps, sum(r["n_tokens"] for r in rows))
            best = result if best is None or wall < best[0] else best
    finally:
        for h in handles:
            h.remove()
    wall, fwd, steps, toks = best
    print(f"\n== decode loop overhead ({args.shape or 'tiny'} + LoRA on {device}; {len(recs)} prompts x K={k}, "
          f"{new_tokens} new tokens, stop strings {list(args.stop)}; best of {args.repeats}) ==")
    print(f"wall {wall:.3f} s for {toks} tokens in {steps} forward calls; inside the model {fwd:.3f} s; "
          f"loop overhead {1000 * (wall - fwd) / steps:.2f} ms per step ({1000 * (wall - fwd) / max(1, toks):.3f} "
          f"ms per token)")


_DEFAULT_RUN_DIR = str(ROOT / "runs" / "default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["rollouts", "policy", "overhead", "all"], default="all")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a random-weight model of this shape with a LoRA adapter (no model files needed)")
    ap.add_argument("--tokenizer", default=None, help="with --shape: tokenizer folder (default: bench/tokenizer/)")
    ap.add_argument("--stop", nargs="*", default=["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
                    help="overhead part: stop strings (default: HumanEval's)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run-dir", default=_DEFAULT_RUN_DIR,
                    help="policy part (default: runs/default, or runs/bench_nice_SHAPE with --shape)")
    ap.add_argument("--prompts", type=int, default=32, help="target prompts (rollouts); policy part: 8 is plenty")
    ap.add_argument("--model", default="default", help="rollouts part: model name or path (default: the bundled one)")
    ap.add_argument("--device", default=None, help="rollouts part: cpu, cuda, ... (default: the best available)")
    ap.add_argument("--k", type=int, default=0, help="samples per prompt (default: the config's)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's")
    ap.add_argument("--batch-size", type=int, default=0, help="new way's row cap (default: RolloutSettings')")
    ap.add_argument("--max-batch-tokens", type=int, default=0, help="new way's token budget (default: RolloutSettings')")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("rollouts", "all"):
        bench_rollouts(args)
    if args.part in ("policy", "all"):
        bench_policy(args)
    if args.part in ("overhead", "all"):
        bench_overhead(args)


if __name__ == "__main__":
    main()
