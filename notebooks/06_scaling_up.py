# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Scaling up: a 7B-8B model on GPUs
#
# Everything in the earlier notebooks runs the same code that scales to the paper's setting: a
# 7B-8B model, LoRA r=128, projections to 8192 dimensions, K=20 samples per target prompt. Only
# the configuration changes, and it ships as `configs/paper.toml`. This notebook
#
# 1. reads the paper's settings from `configs/paper.toml` and shows how they differ from the
#    bundled default;
# 2. estimates what they cost on a GPU (gradient size, device memory, storage), and points to
#    `bench/bench_gpu.py`, which measures every stage on one GPU;
# 3. runs the pipeline on several processes with `torchrun` (several GPUs, several machines, SLURM),
#    and demonstrates it for real on a tiny model with two CPU processes: the vectors equal one
#    process's, bit for bit;
# 4. runs the pipeline with the big model **only when a CUDA GPU is present and the model is on
#    this machine**. Otherwise it shows what it would do and stops cleanly: the heavy cells check a
#    flag and skip.
#
# Set `NICE_KIT_BIG_MODEL` to the model to use (a local folder, or a model already in your Hugging
# Face cache: nice_kit never downloads; default `meta-llama/Llama-2-7b-hf`, as in `configs/paper.toml`)
# and, for your own data, `NICE_KIT_BIG_POOL`, `NICE_KIT_BIG_VAL`, `NICE_KIT_BIG_TEST` (JSONL,
# Parquet or a `datasets` folder, see `data/arith/README.md`).

# %% [markdown]
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` the notebook is marked as a CI
# > run: the big run is skipped even on a GPU. Everything else it does (the settings, the cost
# > estimate, the two-process demonstration on a tiny random model) is the same in both modes and
# > takes well under a minute on a CPU.

# %%
import os
import warnings

import pandas as pd
import torch
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: never start the big run
print("fast mode" if FAST else "full mode")

# %%
HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    props = torch.cuda.get_device_properties(0)
    print(f"CUDA: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA GPU: the heavy cells below will show what they would do and skip")

# %% [markdown]
# ## The paper's settings: `configs/paper.toml`
#
# The file holds the paper's setting, and says setting by setting which are the reference
# implementation's (the files and commit are in [docs/method.md](../docs/method.md), "The reference
# implementation's settings"): LoRA r=128, alpha=512, dropout 0.1 on the q, k, v, o projections;
# warmup on a random 5% of the pool with AdamW at lr 2e-5, linear decay, warmup ratio 0.03,
# effective batch 128 (nice_kit splits it 8 x 16; the reference 1 x 128), 4 epochs, `max_length`
# 2048; the sparse sketch to d=8192 (the reference's dense Rademacher, kind = "rademacher", costs
# seconds per batch at 7B);
# K=20 completions per target prompt at temperature 1.2, top-k 50, top-p 0.95; the reference's own
# estimator (`policy.estimator = "reference"`, checked against an oracle of its arithmetic in
# `tests/test_reference_estimator.py`); the top 5%. The lines marked `<-` in the file are yours to
# change: the model, the data and the metric.
#
# From Python, `RunConfig.from_file` reads it and applies `overrides` (nested dicts, the same
# shape as the file) before checking it; `check_model=False` lets it load on a machine that does
# not have the model. Here the overrides come from the environment variables above:

# %%
from nice_kit.config import RunConfig

PAPER_TOML = ROOT / "configs" / "paper.toml"
overrides = {}
if "NICE_KIT_BIG_MODEL" in os.environ:
    overrides["model"] = os.environ["NICE_KIT_BIG_MODEL"]
data_env = {"pool": "NICE_KIT_BIG_POOL", "target_val": "NICE_KIT_BIG_VAL", "target_test": "NICE_KIT_BIG_TEST"}
if any(v in os.environ for v in data_env.values()):
    overrides["data"] = {k: os.environ[v] for k, v in data_env.items() if v in os.environ}
big = RunConfig.from_file(PAPER_TOML, overrides=overrides, check_model=False)
BIG_MODEL = big.model
print(f"{PAPER_TOML.relative_to(ROOT)} with overrides {overrides or 'none'}: model {BIG_MODEL}")


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "params" else {f"{prefix}{k}": v})
    return out

bundled, paper = flat(RunConfig.from_file(ROOT / "configs" / "default.toml").to_dict()), flat(big.to_dict())
data_files = ("data.pool", "data.target_val", "data.target_test")
changed = [(k, bundled.get(k), v) for k, v in paper.items() if bundled.get(k) != v and k not in data_files]
pd.DataFrame(changed, columns=["setting", "configs/default.toml (SmolLM2, CPU)", "configs/paper.toml (7B-8B, GPU)"])

# %% [markdown]
# On the command line the same file is the config: copy it, change the lines marked `<-`, and run
# `nice-kit run --config configs/my.toml --run-dir runs/my` (or each stage on its own, below).
#
# ## What it costs
#
# The gradient of one example has one coordinate per LoRA parameter: D of them. The next cell
# counts them exactly, with nice_kit's own `add_lora` on the model built on PyTorch's `meta`
# device (shapes only, no memory, no weights). The model's config comes from your local copy; without
# one the cell falls back to the published shape of Llama-2-7B.

# %%
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from nice_kit.gradients import gradient_dim
from nice_kit.models import add_lora

try:
    hf_config = AutoConfig.from_pretrained(BIG_MODEL, local_files_only=True)  # never downloads
    MODEL_AVAILABLE = True
    source = f"{BIG_MODEL}'s config"
except (OSError, ValueError) as err:  # no local copy, or an unknown model type
    hf_config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    MODEL_AVAILABLE = False
    source = f"Llama-2-7B's published shape ({BIG_MODEL} is not on this machine: {type(err).__name__})"

with torch.device("meta"):
    shapes_only = AutoModelForCausalLM.from_config(hf_config)
n_params = sum(p.numel() for p in shapes_only.parameters())
D = gradient_dim(add_lora(shapes_only, big.lora))
print(f"{source}: {n_params / 1e9:.2f}B parameters, D = {D:,} LoRA coordinates "
      f"(r={big.lora.r} on {', '.join(big.lora.target_modules)})")

# %% [markdown]
# Where the memory and the disk go, stage by stage. What each row rests on:
#
# * **Training gradients** (`nice_kit/gradients.py`). Per-example gradients are formed layer by
#   layer during the backward pass (each LoRA layer's stored input freed as soon as its output
#   gradient arrives), so a pass holds `gradients.batch_size` x D fp32 gradients and not the
#   activations of every LoRA layer. The Adam preconditioning of those gradients (one Adam step
#   from the checkpoint's moments) briefly needs a few more blocks of that size: about 5 in all.
#   An out-of-memory error halves the batch size and retries the batch, so a too-large
#   `batch_size` slows the stage down rather than stopping it.
# * **Projection** (`nice_kit/projection.py`). The random sketch is computed on the GPU from a
#   hash of (seed, coordinate) and kept there, up to a fifth of the GPU's memory and at most 16 GiB:
#   `sjlt` needs 8 bytes per coordinate and non-zero (`projection.nnz`, 8 by default), the dense
#   `rademacher` 1 bit per coordinate and output dimension. What does not fit is recomputed at every
#   batch.
# * **Rollouts** (`nice_kit/rollouts.py`). A batch holds at most `rollouts.max_batch_tokens` key/value
#   cache positions (rows x (longest prompt + `max_new_tokens`)); out of memory halves it.
# * **Stored vectors** (`nice_kit/vectors.py`): unit rows in float16, d x 2 bytes per example and
#   checkpoint, scored in blocks read from disk (a 270k-example pool is scored on a laptop).

# %%
from nice_kit.data import load_records

GiB = 2**30
n_pool = len(load_records(big.data.pool))
n_val = len(load_records(big.data.target_val, require_response=False))
C, d, b = big.warmup.epochs, big.projection.dim, big.gradients.batch_size
if HAS_CUDA:
    from nice_kit.projection import default_cache_bytes

    gpu, cache_budget = props.name, default_cache_bytes("cuda")
else:
    gpu, cache_budget = "an 80 GB GPU", min(16 * GiB, 80 * 10**9 // 5)
sketch = {"sjlt": 8 * big.projection.nnz * D, "rademacher": D * d // 8}
flops = {"sjlt": 2 * big.projection.nnz * D, "rademacher": 2 * d * D}
kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
kv_per_token = 2 * hf_config.num_hidden_layers * kv_heads * head_dim * 2  # keys and values, bf16


def sketch_row(kind):
    kept = cache_budget / sketch[kind]
    cached = "all of it cached" if kept >= 1 else f"{kept:.0%} of it cached, the rest recomputed at every batch"
    work = f"{flops[kind] / 1e12:.1f} TFLOP" if flops[kind] >= 1e12 else f"{flops[kind] / 1e9:.1f} GFLOP"
    return (f"projection sketch, {kind}" + (" (configured)" if kind == big.projection.kind else ""),
            f"{sketch[kind] / GiB:,.1f} GiB; on {gpu} (cache budget {cache_budget / GiB:.0f} GiB) {cached}; "
            f"{work} per example")

costs = pd.DataFrame([
    ("LoRA gradient dimension D", f"{D:,}"),
    ("model weights (bf16)", f"{2 * n_params / GiB:.1f} GiB"),
    ("LoRA weights (fp32) and Adam moments (2 x D fp32)",
     f"{4 * D / GiB:.2f} GiB + {8 * D / GiB:.2f} GiB, on the GPU during the warmup and the gradient stage"),
    ("gradients of one pass (batch_size x D fp32)",
     f"{b * 4 * D / GiB:.1f} GiB at gradients.batch_size={b}; about 5 times that while Adam-preconditioning "
     f"({5 * b * 4 * D / GiB:.0f} GiB); halved on out-of-memory"),
    sketch_row("rademacher"),
    sketch_row("sjlt"),
    ("rollouts: key/value cache of one batch",
     f"{big.rollouts.max_batch_tokens:,} positions x {kv_per_token / 2**20:.2f} MiB = "
     f"{big.rollouts.max_batch_tokens * kv_per_token / GiB:.1f} GiB (rollouts.max_batch_tokens)"),
    ("stored pool vectors (float16)",
     f"{n_pool:,} examples x {C} checkpoints x {d} x 2 bytes = {n_pool * C * d * 2 / GiB:.3f} GiB"),
    ("... for LESS's pool of 270,679 examples", f"{270_679 * C * d * 2 / GiB:.1f} GiB"),
    ("Adam moments on disk", f"{8 * D / GiB:.2f} GiB x {C} checkpoints"),
    ("warmup examples (5% of the pool)", f"{max(1, round(big.warmup.fraction * n_pool))}"),
    ("rollouts to sample and score",
     f"{n_val} prompts x K={big.rollouts.k} x {C} checkpoints = {n_val * big.rollouts.k * C:,}"),
], columns=["quantity", "value"])
with pd.option_context("display.max_colwidth", 160):
    display(costs)

# %% [markdown]
# Two things to read off this table.
#
# * **The projection's kind.** `configs/paper.toml` uses the sparse sketch; the reference's dense
#   Rademacher matrix (`kind = "rademacher"`, its distribution, not TRAK's matrix) costs more: at D in the hundreds of millions its packed bits far exceed the cache and its product costs
#   2 x d x D floating-point operations per example; the sparse `sjlt` (nice_kit's default, the
#   same distortion guarantee, see `nice_kit/projection.py`) needs nnz/d of that arithmetic and its
#   whole sketch stays on the GPU. To compare, set `kind = "rademacher"` in `[projection]` (or
#   `overrides={"projection": {"kind": "rademacher"}}`); vectors made with one kind never mix with
#   the other's.
# * **The pool.** The paper's settings assume a pool of hundreds of thousands of examples: on the
#   bundled 310-example pool, 5% is 16 warmup examples, less than one effective batch of 128, so
#   the warmup takes one optimizer step per epoch. Point `NICE_KIT_BIG_POOL` at a real pool, or
#   lower `warmup.grad_accum` for small ones.
#
# ## Measuring on one GPU: `bench/bench_gpu.py`
#
# Before a long run, measure. `bench/bench_gpu.py` builds a model of a named shape with random
# weights (`tiny`, `1b`, `7b`, `8b`; nothing is downloaded) and runs every stage through the public
# API, printing per stage the seconds, items per second, the share spent projecting and the peak GPU
# memory; then how batched per-example gradients agree with one-at-a-time backward passes, and the
# bare forward+backward time of the same batches (the floor the gradient stage is held to):
#
# ```bash
# python bench/bench_gpu.py --shape 7b                          # Llama-2-7B shape, LoRA r=128, bf16, sjlt
# python bench/bench_gpu.py --shape 7b --projection rademacher  # the paper's projection, for comparison
# python bench/bench_gpu.py --shape tiny --device cpu           # the smoke test CI runs (not timed)
# ```
#
# It needs only the tokenizer saved in the tree (`bench/tokenizer/`, 3.4 MB), which travels with it:
# no bundled model, no cache.
#
# ## Several GPUs, several machines: `torchrun`
#
# Every `nice-kit` command runs unchanged under `torchrun` (or `accelerate launch`, or SLURM's
# `srun` starting `torchrun`): each process joins a `torch.distributed` group (NCCL on GPUs, gloo on
# a CPU) and works on `cuda:LOCAL_RANK`. Without a launcher nothing changes. On one machine with
# 4 GPUs:
#
# ```bash
# torchrun --standalone --nproc-per-node 4 -m nice_kit run --config configs/my.toml --run-dir runs/my
# nice-kit evaluate --config configs/my.toml --run-dir runs/my   # the comparison runs without torchrun
# ```
#
# | stage | how the processes share it |
# |---|---|
# | warmup | data-parallel: LoRA gradients summed across processes; the global batch stays `warmup.batch_size` x `warmup.grad_accum`; rank 0 writes the checkpoints |
# | training and validation gradients | chunk c (`gradients.chunk_size` examples, one file) is computed by rank c mod N; rank 0 merges once every chunk exists |
# | rollouts | split by prompt chunk, with the same samples as one process (each sample's seed depends on the prompt and the sample, not on the rank) |
# | scores, selection, diagnostics | rank 0 |
#
# The gradient vectors equal one process's bit for bit; the warmup equals it up to the order of
# float sums. A process that dies loses only the chunk it was computing: the same command, with
# any number of processes, resumes (`torchrun --max-restarts K` does it by itself). Several
# machines run the same command with a rendezvous, the run directory on a shared file system:
#
# ```bash
# torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node01:29500 --rdzv-id my-run \
#     -m nice_kit run --config configs/my.toml --run-dir /nfs/runs/my
# ```
#
# [docs/distributed.md](../docs/distributed.md) has the SLURM script, and what the shared file
# system must hold. For jobs started by hand without a launcher, `--shard I/N` on `train-grads` and
# `val-grads` computes only the chunks c with c mod N = I; whichever shard finishes last merges:
#
# ```bash
# for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i nice-kit train-grads --config configs/my.toml --run-dir runs/my --shard $i/4 & done; wait
# ```
#
# The next cells do it for real on a tiny random model saved to disk (so that the command line can
# load it): the warmup in this process, then `torchrun` with two CPU processes (gloo) for the
# training gradients, then the same stage in one process from the same checkpoints, compared bit
# for bit. It takes a few seconds of work plus the two processes' start-up.

# %%
import shutil
import subprocess
import sys

from nice_kit.demo import fast_data
from nice_kit.models import load_tokenizer, tiny_model
from nice_kit.pipeline import Pipeline

RUN_DIR = ROOT / "runs" / ("nb06-fast" if FAST else "nb06")
DEMO = RUN_DIR / "torchrun_demo"
shutil.rmtree(DEMO, ignore_errors=True)
tok = load_tokenizer("default")
tiny_model(tok).save_pretrained(DEMO / "tiny-model")
tok.save_pretrained(DEMO / "tiny-model")

# a config file written by hand: every setting not given takes nice_kit's default (nice_kit/settings.py; nice-kit config --help lists them)
data = fast_data(DEMO / "data")  # a slice of the bundled benchmark: 40 pool examples
DEMO_TOML = DEMO / "tiny.toml"
DEMO_TOML.write_text("\n".join([
    f'model = "{DEMO / "tiny-model"}"',
    'device = "cpu"',
    "threads = 1",
    "[data]", *(f'{k} = "{v}"' for k, v in data.items()),
    "[warmup]", "fraction = 0.5", "epochs = 2", "lr = 1e-2", "batch_size = 4",
    "[gradients]", "batch_size = 8", "chunk_size = 8",  # 5 chunks of 8 examples
    "[projection]", "dim = 512",
]) + "\n")
print(DEMO_TOML.read_text())

warmup = Pipeline(RunConfig.from_file(DEMO_TOML), DEMO / "run", verbose=False).warmup()  # = nice-kit warmup
print(f"warmup: {len(warmup)} checkpoints")

# %%
cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # = torchrun --standalone ...
       "-m", "nice_kit", "train-grads", "--config", str(DEMO_TOML), "--run-dir", str(DEMO / "run")]
print("$ torchrun", " ".join(cmd[2:]))
done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=False,
                      env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
if done.returncode != 0:
    print(done.stdout[-3000:], done.stderr[-3000:])
    raise RuntimeError("torchrun nice_kit train-grads failed")
print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith("[nice_kit]")))
for folder in sorted((DEMO / "run" / "grads" / "train").glob("epoch_*")):
    chunks = sorted(folder.glob("chunk_*.safetensors"))
    print(folder.name, ", ".join(f"{p.stem} (rank {c % 2})" for c, p in enumerate(chunks)), "-> vectors.npy")

# %%
# The same stage in this process, in a second run directory with the same warmup checkpoints.
single = DEMO / "one_process"
shutil.copytree(DEMO / "run" / "warmup", single / "warmup")
reference = Pipeline(RunConfig.from_file(DEMO_TOML), single, verbose=False)
reference.train_gradients()
two_processes = Pipeline(RunConfig.from_file(DEMO_TOML), DEMO / "run", verbose=False)
for ckpt, a, b in zip(reference.checkpoints, two_processes.load_vectors("train")[0],
                      reference.load_vectors("train")[0]):
    assert a.shape == b.shape and torch.equal(a, b)
    print(f"epoch {ckpt.epoch}: {tuple(a.shape)} from 2 processes == 1 process, bit for bit")

# %% [markdown]
# ## The big run (GPU only)
#
# `RUN_HEAVY` is true only with a CUDA GPU, the model on this machine, and not in fast mode.
# Otherwise each heavy cell prints what it would do and does nothing, so the notebook always runs
# top to bottom. A notebook is one process, so it uses one GPU; for several, run the `torchrun`
# command above from a terminal on the same run directory, and come back to the notebook to look
# at the results (every stage is cached: here they load instantly).
#
# What the run does, in order (each stage cached in the run directory and resumable):
# warmup (4 LoRA checkpoints with Adam moments) → Adam-preconditioned, projected gradients of every
# pool example at each checkpoint → K=20 samples per target prompt at each checkpoint, scored by the
# metric → NICE's policy-gradient validation gradients (and LESS's, from the reference answers) →
# influence scores → the top 5% → fine-tune on random / LESS / NICE / full and score held-out prompts.

# %%
RUN_HEAVY = HAS_CUDA and MODEL_AVAILABLE and not FAST
BIG_RUN = RUN_DIR / "big"
if RUN_HEAVY:
    p = Pipeline(big, BIG_RUN)
    diagnostics = p.run()
    display(diagnostics)
else:
    why = ("fast mode" if FAST else "no CUDA GPU" if not HAS_CUDA
           else f"{BIG_MODEL} is not on this machine (set NICE_KIT_BIG_MODEL to a local folder)")
    print(f"skipped ({why}). On a GPU this cell runs the whole pipeline:")
    print(f"  Pipeline(big, {BIG_RUN}).run()")
    print(f"  # the same as: nice-kit run --config {PAPER_TOML.relative_to(ROOT)} --run-dir {BIG_RUN.relative_to(ROOT)}"
          + ("  (on a copy of the file with the overrides written in)" if overrides else ""))

# %%
if RUN_HEAVY:
    from nice_kit.evaluation import compare, summarize

    results = compare(p)  # random / LESS / NICE at 5%, and the full pool; 3 seeds each
    display(summarize(results))
else:
    print("skipped. On a GPU: compare(p) fine-tunes on random, LESS, NICE (top 5%) and the full pool,")
    print(f"{len(big.evaluation.seeds)} seeds each ({big.evaluation.epochs} epochs at lr {big.evaluation.lr}), "
          "and summarize() gives mean and standard error of the metric per method")

# %% [markdown]
# ## Practical notes for GPUs
#
# * **Precision.** On GPUs that support it nice_kit loads models in bf16; per-example gradients,
#   the Adam preconditioning and the projection run in fp32 (the projection with TF32 switched off,
#   so that vectors made on a CPU and on a GPU with the same projection agree to fp32 tolerance);
#   the vectors are stored in float16 after normalisation to unit length.
# * **Memory, gradient stages.** The model, the LoRA and Adam state, the sketch cache and
#   `gradients.batch_size` sequences in flight (table above). Logits are computed only at the
#   positions that carry a weight (the answer tokens; for NICE the completion tokens), never over
#   the whole sequence, so the vocabulary projection does not grow with the prompt. On
#   out-of-memory the batch size is halved (down to 1) and the batch retried; `data.max_length`
#   (2048) bounds the longest sequence.
# * **NICE's validation gradients.** The K completions of a target prompt share it: the prompt runs
#   once, its key/value cache is expanded to the K continuations and gradients flow back through it,
#   so a group costs one prompt plus K completions rather than K whole sequences.
# * **Rollouts.** The K samples of a prompt share one prefill; prompts are packed into batches by a
#   token budget, `rollouts.max_batch_tokens` positions of key/value cache (default 32,768; raise it
#   on a large GPU, lower it on out-of-memory, which also halves it by itself), and at most
#   `rollouts.batch_size` rows. Each sample's randomness is hashed from (seed, checkpoint, prompt,
#   sample), so the completions do not depend on the batch sizes, the token budget or the number of
#   processes. The sampled token ids, whether each completion ended with an end-of-sequence token,
#   and the sampling settings are stored with the text.
# * **`chunk_size`** (256 in `configs/paper.toml`) is the number of examples per file on disk: the
#   unit of resuming and of sharing work between processes, not a memory setting.
# * **Code tasks.** For HumanEval use the `humaneval` metric with
#   `nice_kit.metrics.code.load_humaneval_records()` as target records, temperature 0.8 and stop
#   sequences (`rollouts.stop`), as the reference does.
