"""Benchmark of the gradient stages on the default model (not a test: it prints numbers).

    python bench/bench_gradients.py [--examples 64] [--reference-examples 4] [--run-dir runs/default]
    python bench/bench_gradients.py --stages [--prompts 32] [--train-examples 64] [--threads 2]
    python bench/bench_gradients.py --large-d [--lora-r 64] [--examples 8] [--threads 2]

Prints, for 128-token examples and d=8192:
* examples/s of nice_kit (batched per-example gradients + Adam preconditioning + sparse JL) and of a
  LESS-style reference in the same run (one example at a time, dense Rademacher matrix generated per
  batch, as LESS/TRAK do on a CPU), their ratio, the share of time spent projecting, peak memory;
* projection quality on real gradients: the largest error of projected against exact cosines, and
  the Spearman correlation of influence rankings projected versus unprojected.
Uses the warmup checkpoint of ``--run-dir`` when there is one, else runs a short warmup first.

``--stages`` instead times, in one run on the bundled default (SmolLM2-135M, LoRA as in the config,
``--threads`` CPU threads), the NICE validation-gradient stage (the target prompts of the config's
``target_val`` with K completions each, sampled with ``nice_kit.rollouts.sample_rollouts``) and the
training-gradient stage (pool examples, Adam-preconditioned), each BEFORE (a copy of the implementation
this replaced, ``legacy_*`` below: hooks keep every layer's input and output gradient to the end, full
logits, every completion runs its prompt) and AFTER (``nice_kit.gradients.projected_gradients``), with
the bare forward+backward of the same batches beside them and the largest relative difference of the
gradients. It needs no warmup: the LoRA weights are random (B non-zero), the Adam moments synthetic.

``--large-d`` times the training-gradient path at a larger D through the public API only
(``projected_gradients`` with Adam preconditioning as the pipeline calls it, and the sjlt
projection): the bundled model (``--model``) with LoRA r=``--lora-r`` on q,k,v,o (r=64: D = 7,372,800),
``--examples`` examples of ``--length`` tokens in one batch, best of ``--repeats``; then the Adam
preconditioning of a (batch, D) block alone in a fresh process (its time and the peak memory it adds).
Only public functions are used, so the same script measures an older nice_kit:
``PYTHONPATH=/path/to/old/tree python bench/bench_gradients.py --large-d`` (before/after).

``--tiny`` (with any of the above) is the smoke test CI runs (tests/test_bench.py): the tiny
random-weight Llama of bench/shapes.py and the tokenizer saved in the tree instead of the bundled
model, the fast demo's settings and data slice (nice_kit.demo), a few short examples, d=256, no
rollout cache; the run directory is a fresh temporary one unless ``--run-dir`` is given. The numbers
then mean nothing; every code path is the real one.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from nice_kit.config import RunConfig  # noqa: E402
from nice_kit.data import IGNORE_INDEX, Tokenized, tokenize_records  # noqa: E402
import nice_kit.gradients as gradients_mod  # noqa: E402
from nice_kit.gradients import (WeightedSequence, adam_precondition, gradient_dim, group_gradients, padded_batch,  # noqa: E402
                                loop_gradients, mean_nll_sequence, projected_gradients, weighted_nll)
from nice_kit.models import lora_parameters  # noqa: E402
from nice_kit.influence import influence_scores  # noqa: E402
from nice_kit.pipeline import Pipeline  # noqa: E402
from nice_kit.projection import Projector, ProjectionSpec, normalize_rows  # noqa: E402
from nice_kit.warmup import load_adapter_weights  # noqa: E402


# --tiny: sizes small enough for a CI smoke test (each replaces the option's default)
TINY = {"examples": 4, "reference_examples": 2, "length": 64, "dim": 256, "batch_size": 2, "prompts": 2,
        "train_examples": 4, "threads": 1, "lora_r": 4}
MODEL_NAME = "tiny (random weights, bench/shapes.py)"  # what --tiny measures


def bench_model(name: str, tiny: bool):
    """``(model, tokenizer)`` on the CPU in float32: the named model, or with ``--tiny`` the tiny
    random-weight shape of bench/shapes.py with the tokenizer saved in the tree."""
    if tiny:
        from shapes import build_model, load_bench_tokenizer

        tok = load_bench_tokenizer()
        return build_model("tiny", tok, "cpu", torch.float32), tok
    from nice_kit.models import load_model

    return load_model(name, device="cpu", dtype=torch.float32)


def bench_config(args) -> RunConfig:
    """``--config``, or with ``--tiny`` the fast demo's settings with its data slice under ``--run-dir``."""
    if args.tiny:
        from nice_kit.demo import demo_config

        return demo_config(args.run_dir, fast=True)
    return RunConfig.from_file(args.config)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def examples_of_length(tokenizer, records, length: int, n: int) -> list[Tokenized]:
    """n examples of exactly ``length`` tokens: pool responses repeated after the chat prompt."""
    toks, _ = tokenize_records(tokenizer, records, 10_000)
    out = []
    for i in range(n):
        t = toks[i % len(toks)]
        n_prompt = t.labels.count(IGNORE_INDEX)
        if n_prompt >= length:
            raise ValueError(f"--length {length} leaves no answer token after a {n_prompt}-token prompt")
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


# ------------------------------------------------------------------------------------------------
# --stages: the implementation before nice_kit.gradients.projected_gradients, copied as a reference


class LegacyLoraHooks:
    """Captures inputs and output gradients of every LoRA linear layer during one forward/backward."""

    def __init__(self, model):
        modules = dict(model.named_modules())
        self.entries = [(p, modules[name.rsplit(".", 1)[0]]) for name, p in lora_parameters(model)]
        self.inputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for i, (_, mod) in enumerate(self.entries):
            def fwd(module, args, output, i=i):
                self.inputs[i] = args[0].detach()
                if output.requires_grad:
                    output.register_hook(lambda g, i=i: self.grads.__setitem__(i, g.detach()))
            self.handles.append(mod.register_forward_hook(fwd))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.inputs.clear()
        self.grads.clear()

    def per_example(self) -> torch.Tensor:
        parts = []
        for i, (p, _) in enumerate(self.entries):
            x, g = self.inputs[i], self.grads.get(i)
            if g is None:
                parts.append(torch.zeros(x.shape[0], p.numel(), device=x.device))
                continue
            parts.append(torch.einsum("bto,bti->boi", g.float(), x.float()).reshape(x.shape[0], -1))
        self.inputs.clear()
        self.grads.clear()
        return torch.cat(parts, dim=1)


def legacy_batches(seqs: list[WeightedSequence], n_groups: int, batch_size: int):
    """Blocks of ``batch_size`` groups (fewest tokens first) and, in each, forward batches of
    ``batch_size`` sequences sorted by length: (group ids of the block, [batches of (seq, row)])."""
    by_group: list[list[WeightedSequence]] = [[] for _ in range(n_groups)]
    for q in seqs:
        by_group[q.group].append(q)
    order = sorted((j for j in range(n_groups) if by_group[j]), key=lambda j: sum(len(q.input_ids) for q in by_group[j]))
    for a in range(0, len(order), batch_size):
        groups = order[a:a + batch_size]
        part = [WeightedSequence(q.input_ids, q.weights, i) for i, j in enumerate(groups) for q in by_group[j]]
        srt = sorted(range(len(part)), key=lambda i: len(part[i].input_ids))
        yield groups, [[part[i] for i in srt[s:s + batch_size]] for s in range(0, len(srt), batch_size)]


def legacy_projected(model, seqs, n_groups, pad_id, project, transform=None, batch_size=8) -> torch.Tensor:
    """Pipeline.project_gradients + group_gradients as they were (without the final normalisation)."""
    model.eval()
    device = next(model.parameters()).device
    out = None
    with LegacyLoraHooks(model) as hooks:
        for groups, batches in legacy_batches(seqs, n_groups, batch_size):
            g = torch.zeros(len(groups), gradient_dim(model), device=device)
            for batch in batches:
                ids, mask, w = padded_batch(batch, pad_id, device)
                weighted_nll(model, ids, mask, w).sum().backward()
                g.index_add_(0, torch.tensor([s.group for s in batch], device=device), hooks.per_example())
                model.zero_grad(set_to_none=True)
            if transform is not None:
                g = transform(g)
            v = project(g).cpu()
            out = torch.zeros(n_groups, v.shape[1]) if out is None else out
            out[groups] = v
    return out


def bare_legacy(model, seqs, n_groups, pad_id, batch_size=8) -> None:
    """Forward+backward of the legacy batches (full logits), no hooks: today's floor."""
    device = next(model.parameters()).device
    for _, batches in legacy_batches(seqs, n_groups, batch_size):
        for batch in batches:
            ids, mask, w = padded_batch(batch, pad_id, device)
            weighted_nll(model, ids, mask, w).sum().backward()
            model.zero_grad(set_to_none=True)


def bare_new(model, seqs, n_groups, batch_size=8, pad_id=0) -> None:
    """Forward+backward of the batches projected_gradients runs (shared prompts, weighted logits), no hooks."""
    device = next(model.parameters()).device
    parts = gradients_mod._model_parts(model)
    by_group: list[list[WeightedSequence]] = [[] for _ in range(n_groups)]
    for q in seqs:
        by_group[q.group].append(q)
    order = sorted((j for j in range(n_groups) if by_group[j]), key=lambda j: sum(len(q.input_ids) for q in by_group[j]))
    for a in range(0, len(order), batch_size):
        part = [WeightedSequence(q.input_ids, q.weights, i) for i, j in enumerate(order[a:a + batch_size])
                for q in by_group[j]]
        for batch in gradients_mod._forward_batches(gradients_mod._plan(part), batch_size):
            gradients_mod._run_batch(model, parts, batch, pad_id, device, None)
            model.zero_grad(set_to_none=True)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest per-row ||a-b|| / ||b||, largest |a-b| / largest |b|)."""
    a, b = a.double(), b.double()
    rows = ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30))[b.norm(dim=1) > 0]
    return rows.max().item(), ((a - b).abs().max() / b.abs().max()).item()


def stages(args) -> None:
    from nice_kit.data import load_records, prompt_ids
    from nice_kit.models import add_lora, lora_parameters as lora_params
    from nice_kit.rollouts import sample_rollouts

    cfg = bench_config(args)
    torch.set_num_threads(args.threads)
    model, tok = bench_model(cfg.model, args.tiny)
    model = add_lora(model, cfg.lora, seed=0)
    gen = torch.Generator().manual_seed(0)
    for name, p in lora_params(model):  # random adapter: B must be non-zero for A's gradient to be
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.002 if "lora_B" in name else 0.05))
    model.eval()
    D = gradient_dim(model)
    pad = tok.pad_token_id
    projector = Projector(ProjectionSpec(kind=cfg.projection.kind, dim=cfg.projection.dim, seed=0,
                                         nnz=cfg.projection.nnz, input_dim=D))
    projector.project(torch.zeros(1, D))  # build the sketch once (cached, like in a run)
    model_name = MODEL_NAME if args.tiny else cfg.model
    print(f"model {model_name} (LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}): D={D:,}; "
          f"threads {torch.get_num_threads()}; batch size {args.batch_size}; projection {cfg.projection.kind} "
          f"d={cfg.projection.dim}")

    # NICE validation gradients: K sampled completions per target prompt
    recs = load_records(cfg.data.target_val)[: args.prompts]
    rs = cfg.rollouts
    key = {"model": cfg.model, "k": rs.k, "temperature": rs.temperature, "top_k": rs.top_k, "top_p": rs.top_p,
           "max_new_tokens": rs.max_new_tokens, "stop": list(rs.stop), "seed": 0, "first": recs[0].id}
    cache_file = ROOT / "runs" / "bench_gradients_rollouts.json"  # sampling is slow on a CPU: keep the samples
    cached = json.loads(cache_file.read_text()) if cache_file.exists() and not args.tiny else {}
    wanted = {x.id for x in recs}
    if cached.get("key") == key and wanted <= {row["prompt_id"] for row in cached["rows"]}:
        rows = [row for row in cached["rows"] if row["prompt_id"] in wanted]
        how = "read from " + str(cache_file.relative_to(ROOT))
    else:
        t0 = time.perf_counter()
        with model.disable_adapter():  # the base model's own answers (the random adapter would garble them)
            rows = sample_rollouts(model, tok, recs, rs, seed=0)
        how = f"sampled in {time.perf_counter() - t0:.0f} s"
        if not args.tiny:  # a smoke test leaves nothing in the tree
            cache_file.parent.mkdir(exist_ok=True)
            cache_file.write_text(json.dumps({"key": key, "rows": rows}))
    eos = tok.eos_token_id
    nice = []
    for j, rec in enumerate(recs):
        p_ids = prompt_ids(tok, rec.messages)
        mine = [row for row in rows if row["prompt_id"] == rec.id]
        for k, row in enumerate(mine):
            comp = (list(row["token_ids"]) + [eos])[: max(1, cfg.data.max_length - len(p_ids))]
            a = ((k % 4) - 1.5) / len(mine)  # synthetic non-zero weights: every completion counts
            per_token = a / len(comp) if cfg.policy.token_normalize else a
            nice.append(WeightedSequence(p_ids + comp, [0.0] * len(p_ids) + [per_token] * len(comp), j))
    distinct = len({(s.group, tuple(s.input_ids)) for s in nice})
    n_tok = sum(len(s.input_ids) for s in nice)
    print(f"\nNICE: {len(recs)} target prompts x K={rs.k} completions of the base model, from "
          f"nice_kit.rollouts.sample_rollouts (temperature {rs.temperature}, top-k {rs.top_k}, top-p {rs.top_p}, "
          f"at most {rs.max_new_tokens} new tokens; {how}); {len(nice)} sequences, {n_tok} tokens, "
          f"mean prompt {sum(len(prompt_ids(tok, r.messages)) for r in recs) / len(recs):.1f} tokens; "
          f"{distinct} distinct completions; synthetic non-zero weights")

    # training gradients: pool examples, Adam-preconditioned
    pool_tok, _ = tokenize_records(tok, load_records(cfg.data.pool)[: args.train_examples], cfg.data.max_length)
    train = [mean_nll_sequence(t, i) for i, t in enumerate(pool_tok)]
    exp_avg = torch.randn(D, generator=gen) * 1e-4
    exp_avg_sq = torch.rand(D, generator=gen) * 1e-7
    print(f"training: {len(train)} pool examples, {sum(len(s.input_ids) for s in train) / len(train):.1f} tokens "
          f"on average, {sum(sum(1 for w in s.weights[1:] if w) for s in train) / len(train):.1f} of them weighted; "
          "synthetic Adam moments")

    def rounds(measurements: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict[str, object]]:
        """Each measurement once per round, ``--repeats`` rounds (load changes hit all alike); the fastest."""
        best: dict[str, float] = {k: float("inf") for k in measurements}
        results: dict[str, object] = {}
        for _ in range(args.repeats):
            for label, fn in measurements.items():
                t = time.perf_counter()
                results[label] = fn()
                best[label] = min(best[label], time.perf_counter() - t)
        return best, results

    for name, seqs, n, transform in (("NICE validation gradients", nice, len(recs), None),
                                     ("training gradients", train, len(train),
                                      lambda g: adam_precondition(g, exp_avg, exp_avg_sq))):
        raw: dict[str, list[torch.Tensor]] = {"before": [], "after": []}
        t_project = {"before": 0.0, "after": 0.0}

        def recording(key):
            """(transform, project) that keep each block's raw gradients and time the projection."""
            def keep(g):
                raw[key].append(g.cpu())
                return g if transform is None else transform(g)

            def project(g):
                t = time.perf_counter()
                out = projector.project(g)
                t_project[key] += time.perf_counter() - t
                return out
            return keep, project

        def without_merging():
            gradients_mod._MERGE_DUPLICATES = False
            try:
                return projected_gradients(model, seqs, n, pad, projector.project, transform, args.batch_size)
            finally:
                gradients_mod._MERGE_DUPLICATES = True

        measurements = {
            "before (legacy)": lambda: (raw["before"].clear(), t_project.update(before=0.0), legacy_projected(
                model, seqs, n, pad, *recording("before")[::-1], args.batch_size))[-1],
            "after": lambda: (raw["after"].clear(), t_project.update(after=0.0), projected_gradients(
                model, seqs, n, pad, *recording("after")[::-1], args.batch_size))[-1],
            "bare forward+backward, legacy batches": lambda: bare_legacy(model, seqs, n, pad, args.batch_size),
            "bare forward+backward, new batches": lambda: bare_new(model, seqs, n, args.batch_size, pad),
        }
        if name.startswith("NICE"):
            measurements["after, identical completions not merged"] = without_merging
            measurements["after, prompts not shared (logits at weighted positions only)"] = lambda: projected_gradients(
                model, seqs, n, pad, projector.project, transform, args.batch_size, share_prefixes=False)
        times, results = rounds(measurements)
        t_before, t_after = times["before (legacy)"], times["after"]
        t_bare_old = times["bare forward+backward, legacy batches"]
        v_before, v_after = results["before (legacy)"], results["after"]
        lines = list(times.items())
        unit = "prompts" if name.startswith("NICE") else "examples"
        print(f"\n== {name} stage ({n} {unit}, {len(seqs)} sequences) ==")
        for label, t in lines:
            print(f"{label:62s}: {t:7.2f} s  {n / t:7.2f} {unit}/s")
        print(f"(before and after include the projection: {t_project['before']:.2f} s and {t_project['after']:.2f} s "
              "in the last round; the bare passes do not)")
        print(f"speed-up after vs before: {t_before / t_after:.2f}x; after vs today's bare floor: "
              f"{t_bare_old / t_after:.2f}x (target for NICE: >= 2x vs before)")
        # the rows of each block, in the same group order in both implementations
        g_before = torch.cat(raw["before"])
        g_after = torch.cat(raw["after"])
        rel_row, rel_max = relative_difference(g_after, g_before)
        vec_row, _ = relative_difference(v_after, v_before)
        print(f"gradients after vs before: largest per-group relative difference {rel_row:.2e}, largest "
              f"|difference| / largest |entry| {rel_max:.2e}; projected vectors {vec_row:.2e}")


def _adam(g, exp_avg, exp_avg_sq):
    """Adam preconditioning as the pipeline calls it (in place where this nice_kit can)."""
    import inspect

    if "inplace" in inspect.signature(adam_precondition).parameters:
        return adam_precondition(g, exp_avg, exp_avg_sq, inplace=True)
    return adam_precondition(g, exp_avg, exp_avg_sq)


def _adam_only(batch: int, D: int, repeats: int) -> dict:
    """Adam preconditioning of a (batch, D) block in this (fresh) process: seconds and added peak RSS."""
    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(D, generator=gen) * 1e-4, torch.rand(D, generator=gen) * 1e-8
    best = float("inf")
    base = None
    for _ in range(repeats):
        g = torch.randn(batch, D, generator=gen).mul_(1e-4)
        base = peak_rss_mb() if base is None else base  # the block and the moments are in memory
        t0 = time.perf_counter()
        _adam(g, m, v)
        best = min(best, time.perf_counter() - t0)
        del g
    return {"seconds": best, "added_peak_mb": peak_rss_mb() - base, "block_mb": batch * D * 4 / 2**20}


def large_d(args) -> None:
    import subprocess

    from nice_kit.data import load_records
    from nice_kit.models import LoraSettings, add_lora

    torch.set_num_threads(args.threads)
    model, tok = bench_model(args.model, args.tiny)
    model = add_lora(model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in lora_parameters(model):
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)
    D = gradient_dim(model)
    exp_avg, exp_avg_sq = torch.randn(D, generator=gen) * 1e-4, torch.rand(D, generator=gen) * 1e-8
    examples = examples_of_length(tok, load_records(ROOT / "data" / "arith" / "pool.jsonl")[:64], args.length,
                                  args.examples)
    seqs = [mean_nll_sequence(t, i) for i, t in enumerate(examples)]
    projector = Projector(ProjectionSpec(kind="sjlt", dim=args.dim, seed=0, nnz=8, input_dim=D))
    projector.project(torch.zeros(1, D))  # the sketch, built once as in a run
    spent = {"adam": 0.0, "project": 0.0}

    def transform(g):
        t0 = time.perf_counter()
        out = _adam(g, exp_avg, exp_avg_sq)
        spent["adam"] += time.perf_counter() - t0
        return out

    def project(g):
        t0 = time.perf_counter()
        out = projector.project(g)
        spent["project"] += time.perf_counter() - t0
        return out

    import nice_kit

    model_name = MODEL_NAME if args.tiny else args.model
    print(f"nice_kit from {Path(nice_kit.__file__).parent}; model {model_name} + LoRA r={args.lora_r} on q,k,v,o: "
          f"D = {D:,}; {len(seqs)} examples x {args.length} tokens in batches of {args.batch_size}; "
          f"{torch.get_num_threads()} threads")
    best = None
    for _ in range(args.repeats):
        spent.update(adam=0.0, project=0.0)
        t0 = time.perf_counter()
        projected_gradients(model, seqs, len(seqs), tok.pad_token_id, project, transform, args.batch_size)
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, spent["adam"], spent["project"])
    total, t_adam, t_proj = best
    t0 = time.perf_counter()
    for s in range(0, len(seqs), args.batch_size):  # the bare forward+backward of the same batches
        batch = [type(q)(q.input_ids, q.weights, i) for i, q in enumerate(seqs[s:s + args.batch_size])]
        ids, mask, w = padded_batch(batch, tok.pad_token_id, "cpu")
        weighted_nll(model, ids, mask, w).sum().backward()
        model.zero_grad(set_to_none=True)
    bare = time.perf_counter() - t0
    print(f"training-gradient path: {total:.2f} s ({len(seqs) / total:.3f} examples/s; Adam {t_adam:.2f} s, "
          f"projection {t_proj:.2f} s, the rest {total - t_adam - t_proj:.2f} s); bare forward+backward "
          f"{bare:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
    out = subprocess.run([sys.executable, __file__, "--adam-only", str(args.batch_size), str(D)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"Adam preconditioning of a {args.batch_size} x {D:,} block alone (fresh process): {r['seconds']:.3f} s, "
          f"adds {r['added_peak_mb']:.0f} MB of peak RSS (the block itself: {r['block_mb']:.0f} MB)")


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
    ap.add_argument("--stages", action="store_true",
                    help="time the NICE validation-gradient and training-gradient stages before/after (see above)")
    ap.add_argument("--prompts", type=int, default=32, help="--stages: target prompts (K completions each)")
    ap.add_argument("--train-examples", type=int, default=64, help="--stages: pool examples")
    ap.add_argument("--threads", type=int, default=2, help="--stages: CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="--stages: runs per measurement (the fastest is shown)")
    ap.add_argument("--large-d", action="store_true", help="the training-gradient path at a larger D (see above)")
    ap.add_argument("--lora-r", type=int, default=64, help="--large-d: LoRA rank")
    ap.add_argument("--model", default="default", help="--large-d: model")
    ap.add_argument("--adam-only", nargs=2, type=int, metavar=("BATCH", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true",
                    help="a smoke test: the tiny random-weight model, tiny sizes (see above); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        import atexit
        import shutil
        import tempfile

        for name, value in TINY.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
        if args.run_dir == ap.get_default("run_dir"):  # never the bundled run's folder; removed at exit
            args.run_dir = tempfile.mkdtemp(prefix="bench_gradients_tiny_")
            atexit.register(shutil.rmtree, args.run_dir, ignore_errors=True)
    if args.adam_only:
        print(json.dumps(_adam_only(*args.adam_only, repeats=2)))
        return
    if args.stages:
        stages(args)
        return
    if args.large_d:
        large_d(args)
        return

    cfg = bench_config(args)
    if args.tiny:
        torch.set_num_threads(args.threads)
        model, tok = bench_model(cfg.model, tiny=True)
        p = Pipeline(cfg, args.run_dir, model=model, tokenizer=tok, verbose=True)
    else:
        p = Pipeline(cfg, args.run_dir, verbose=True)
    ckpt = p.warmup()[-1]
    model, tok = p.model, p.tokenizer
    load_adapter_weights(model, ckpt)
    exp_avg, exp_avg_sq = ckpt.moments()
    D = gradient_dim(model)
    model_name = MODEL_NAME if args.tiny else cfg.model
    print(f"model {model_name}: {D:,} LoRA parameters; threads {torch.get_num_threads()}; "
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
