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
# the configuration changes. This notebook
#
# 1. writes the paper's settings as a `RunConfig` (and a TOML file for the command line);
# 2. estimates what they cost (gradient size, storage);
# 3. shows how to split the expensive stages over several GPUs or machines with
#    `nice-kit train-grads --shard i/N`, and demonstrates it for real on a tiny model (on any
#    machine, in seconds);
# 4. runs the pipeline with the big model **only when a CUDA GPU is present**. On a CPU it
#    shows what it would do and stops cleanly: the heavy cells check a flag and skip.
#
# Set `NICE_KIT_BIG_MODEL` to the model to use (a Hugging Face name or a local path; default
# `meta-llama/Llama-3.1-8B`, which needs access to the gated repository) and, for your own data,
# `NICE_KIT_BIG_POOL`, `NICE_KIT_BIG_VAL`, `NICE_KIT_BIG_TEST` (JSONL records, see
# `data/arith/README.md`).

# %% [markdown]
# > **Fast mode.** With the environment variable `NICE_KIT_FAST=1` this notebook runs on a tiny
# > model with random weights and a slice of the data, in about a minute: every code path is the real
# > one, but the numbers mean nothing. Without it, it uses the bundled SmolLM2-135M-Instruct.

# %%
import os
import warnings

import pandas as pd
import torch
from IPython.display import display

from nice_kit.demo import ROOT, fast_mode

warnings.filterwarnings("ignore", category=FutureWarning)
FAST = fast_mode()  # NICE_KIT_FAST=1: tiny random model, a slice of the data, numbers meaningless
print("fast mode" if FAST else "full mode (bundled SmolLM2-135M-Instruct)")

# %%
HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    props = torch.cuda.get_device_properties(0)
    print(f"CUDA: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA GPU: the heavy cells below will show what they would do and skip")

# %% [markdown]
# ## The paper's settings as a RunConfig
#
# From the reference implementation (the files and commit are in
# [docs/method.md](../docs/method.md), "The reference implementation's settings"): LoRA r=128,
# alpha=512, dropout 0.1 on the q, k, v, o projections; warmup on a random 5% of the pool with
# AdamW at lr 2e-5, linear decay, warmup ratio 0.03, effective batch 128, 4 epochs; projection to
# d=8192; K=20 completions per target prompt at temperature 1.2, top-k 50, top-p 0.95 (reward-model
# tasks; code tasks use temperature 0.8 and stop sequences); the vanilla policy gradient without a
# baseline; select the top 5%.
#
# Two deliberate departures, both nice_kit's defaults: the projection is a sparse JL transform
# (`sjlt`) rather than the reference's dense Rademacher matrix (same distortion, milliseconds instead
# of a d x D matrix regenerated per batch; set `kind = "rademacher"` to reproduce the reference), and
# the target prompts' rewards come from `task_score` on the bundled data unless you bring your own.

# %%
from nice_kit.config import RunConfig

BIG_MODEL = os.environ.get("NICE_KIT_BIG_MODEL", "meta-llama/Llama-3.1-8B")
DATA = ROOT / "data" / "arith"
big = RunConfig.from_dict({
    "model": BIG_MODEL,
    "seed": 0,
    "device": "cuda" if HAS_CUDA else None,
    "data": {"pool": os.environ.get("NICE_KIT_BIG_POOL", str(DATA / "pool.jsonl")),
             "target_val": os.environ.get("NICE_KIT_BIG_VAL", str(DATA / "target_val.jsonl")),
             "target_test": os.environ.get("NICE_KIT_BIG_TEST", str(DATA / "target_test.jsonl")),
             "max_length": 2048},
    "lora": {"r": 128, "alpha": 512, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "warmup": {"fraction": 0.05, "epochs": 4, "lr": 2e-5, "batch_size": 8, "grad_accum": 16,  # 8 x 16 = 128
               "warmup_ratio": 0.03},
    "gradients": {"batch_size": 8, "chunk_size": 8},  # see the memory estimate below
    "projection": {"kind": "sjlt", "dim": 8192, "seed": 0},
    "rollouts": {"k": 20, "temperature": 1.2, "top_k": 50, "top_p": 0.95, "max_new_tokens": 256, "batch_size": 80},
    "metric": {"name": "task_score", "params": {"extract": "strict"}},
    "policy": {"variant": "vanilla", "baseline": "none"},
    "selection": {"fraction": 0.05},
    "evaluation": {"fraction": 0.05, "seeds": [0, 1, 2], "epochs": 4, "lr": 2e-5, "batch_size": 8,
                   "max_new_tokens": 256},
}, check_model=False)  # the big model need not be on this machine to write its config

def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "params" else {f"{prefix}{k}": v})
    return out

bundled, paper = flat(RunConfig.from_file(ROOT / "configs" / "default.toml").to_dict()), flat(big.to_dict())
changed = [(k, bundled.get(k), v) for k, v in paper.items() if bundled.get(k) != v and not k.startswith("data.")]
pd.DataFrame(changed, columns=["setting", "bundled default (SmolLM2, CPU)", "paper (7B-8B, GPU)"])

# %% [markdown]
# The command line reads the same settings from TOML. A small writer (nested tables, strings,
# numbers, booleans, lists) and a round trip check that the file says exactly what the object says:

# %%
import json


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")

def to_toml(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    top = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    sections = [f"\n[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None)
                for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"

RUN_DIR = ROOT / "runs" / ("nb06-fast" if FAST else "nb06")
RUN_DIR.mkdir(parents=True, exist_ok=True)
BIG_TOML = RUN_DIR / "big.toml"
BIG_TOML.write_text(to_toml(big))
assert RunConfig.from_file(BIG_TOML, check_model=False) == big
print(BIG_TOML.read_text())


# %% [markdown]
# ## What it costs
#
# The gradient of one example has one coordinate per LoRA parameter. For each LoRA-wrapped
# linear map of shape (out, in), LoRA adds r x (in + out) parameters. With the model's config at
# hand this is exact; without it (no network, no local copy) the cell falls back to the published
# shape of Llama-3.1-8B.

# %%
def lora_dim(hf_config, lora) -> int:
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv_heads * head_dim),
              "v_proj": (h, kv_heads * head_dim), "o_proj": (heads * head_dim, h)}
    return hf_config.num_hidden_layers * sum(lora.r * (i + o) for m, (i, o) in shapes.items()
                                             if m in lora.target_modules)

try:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(BIG_MODEL, local_files_only=not HAS_CUDA)
    MODEL_AVAILABLE = True
    source = f"{BIG_MODEL}'s config"
except (OSError, ValueError) as err:  # no network, no local copy, gated repository, unknown model type
    from types import SimpleNamespace

    hf_config = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, num_hidden_layers=32)
    MODEL_AVAILABLE = False
    source = f"Llama-3.1-8B's published shape ({BIG_MODEL} not available here: {type(err).__name__})"

from nice_kit.data import load_records

n_pool = len(load_records(big.data.pool))
n_val = len(load_records(big.data.target_val, require_response=False))
D = lora_dim(hf_config, big.lora)
C, d = big.warmup.epochs, big.projection.dim
GiB = 2**30
costs = pd.DataFrame([
    ("LoRA gradient dimension D", f"{D:,}  ({source})"),
    ("one full gradient (fp32)", f"{4 * D / GiB:.2f} GiB"),
    ("Adam moments kept per checkpoint", f"{8 * D / GiB:.2f} GiB x {C} checkpoints"),
    ("projected pool gradients",
     f"{n_pool:,} examples x {C} checkpoints x {d} x 4 bytes = {n_pool * C * d * 4 / GiB:.3f} GiB"),
    ("... for a 270k-example pool (the paper's)", f"{270_000 * C * d * 4 / GiB:.0f} GiB"),
    ("gradient stage working memory (about 5 x chunk_size x D fp32)",
     f"{5 * big.gradients.chunk_size * 4 * D / GiB:.1f} GiB at chunk_size={big.gradients.chunk_size}"),
    ("warmup examples (5% of the pool)", f"{max(1, round(big.warmup.fraction * n_pool))}"),
    ("rollouts to sample and score",
     f"{n_val} prompts x K={big.rollouts.k} x {C} checkpoints = {n_val * big.rollouts.k * C:,}"),
], columns=["quantity", "value"])
with pd.option_context("display.max_colwidth", 120):
    display(costs)

# %% [markdown]
# The paper's settings assume a pool of hundreds of thousands of examples: on the bundled
# 310-example pool, 5% is 16 warmup examples, less than one effective batch of 128, so the warmup
# takes one optimizer step per epoch. Point `NICE_KIT_BIG_POOL` at a real pool, or lower
# `warmup.grad_accum` for small ones.
#
# ## Sharding the expensive stages
#
# The training-gradient stage costs one forward and backward pass per pool example and checkpoint,
# and the pool is split into chunks of `gradients.chunk_size` examples, each written to its own
# file. `--shard i/N` computes only the chunks c with c mod N = i; whichever shard finishes last finds
# every chunk on disk and merges them into `vectors.npy`, equal to an unsharded run. An
# interrupted shard resumes at its first missing chunk. On one machine with 4 GPUs:
#
# ```bash
# CFG="--config runs/nb06/big.toml --run-dir runs/big"
# nice-kit warmup $CFG
# for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i nice-kit train-grads $CFG --shard $i/4 & done; wait
# nice-kit rollouts $CFG                 # sample and score once, before sharding the NICE gradients
# for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i nice-kit val-grads $CFG --method nice --shard $i/4 & done; wait
# nice-kit val-grads $CFG --method less  # LESS baseline (needs reference answers)
# nice-kit score $CFG && nice-kit select $CFG
# nice-kit evaluate $CFG                 # fine-tune on random / LESS / NICE / full, score held-out prompts
# ```
#
# Across machines, run the warmup once and copy its `warmup/` folder to every machine (so that all
# shards use the same checkpoints), run the shards, then copy their `chunk_*.safetensors` files
# into one run directory (same config): `nice-kit train-grads $CFG` without `--shard` finds every
# chunk and only merges.
#
# The next cells do this for real with a tiny random model saved to disk, so that the command line
# can load it: two shards in two processes, then a check that the merged vectors equal an unsharded
# computation. It takes a few seconds on a CPU.

# %%
import shutil
import subprocess
import sys

from nice_kit.demo import demo_config
from nice_kit.models import load_tokenizer, tiny_model

SHARD_DIR = RUN_DIR / "shard_demo"
shutil.rmtree(SHARD_DIR, ignore_errors=True)
tok = load_tokenizer("default")
tiny = tiny_model(tok)
tiny.save_pretrained(SHARD_DIR / "tiny-model")
tok.save_pretrained(SHARD_DIR / "tiny-model")

small = demo_config(SHARD_DIR / "run", fast=True)  # a slice of the data, fast settings
small.model = str(SHARD_DIR / "tiny-model")
small.device = "cpu"
(SHARD_DIR / "small.toml").write_text(to_toml(small))

def nice_kit_cli(*args):
    cmd = [sys.executable, "-m", "nice_kit.cli", *args, "--config", str(SHARD_DIR / "small.toml"),
           "--run-dir", str(SHARD_DIR / "run")]
    print("$ nice-kit", " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                          check=False)
    if done.returncode != 0:
        print(done.stdout, done.stderr)
        raise RuntimeError(f"nice-kit {args[0]} failed")

from nice_kit.pipeline import Pipeline

Pipeline(RunConfig.from_file(SHARD_DIR / "small.toml"), SHARD_DIR / "run", verbose=False).warmup()  # = nice-kit warmup
nice_kit_cli("train-grads", "--shard", "0/2")  # in practice: one process per GPU, at the same time
nice_kit_cli("train-grads", "--shard", "1/2")
for folder in sorted((SHARD_DIR / "run" / "grads" / "train").glob("epoch_*")):
    print(folder.name, sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors"))

# %%
# The same stage without sharding, in this process, in a second run directory with the same warmup.
whole = SHARD_DIR / "unsharded"
shutil.copytree(SHARD_DIR / "run" / "warmup", whole / "warmup")
reference = Pipeline(RunConfig.from_file(SHARD_DIR / "small.toml"), whole, verbose=False)
reference.train_gradients()
sharded_run = Pipeline(RunConfig.from_file(SHARD_DIR / "small.toml"), SHARD_DIR / "run", verbose=False)
for ckpt, sharded, single in zip(reference.checkpoints, sharded_run.load_vectors("train")[0],
                                 reference.load_vectors("train")[0]):
    assert sharded.shape == single.shape and torch.equal(sharded, single)
    print(f"epoch {ckpt.epoch}: {tuple(sharded.shape)} merged from 2 shards == unsharded, bit for bit")

# %% [markdown]
# ## The big run (GPU only)
#
# `RUN_HEAVY` is true only with a CUDA GPU, the model available (downloaded or local), and not in
# fast mode. Otherwise each heavy cell prints what it would do and does nothing, so the notebook
# always runs top to bottom.
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
           else f"{BIG_MODEL} is not available (set NICE_KIT_BIG_MODEL to a local path)")
    print(f"skipped ({why}). On a GPU this cell runs the whole pipeline:")
    print(f"  Pipeline(big, {BIG_RUN}).run()   # same as: nice-kit run --config {BIG_TOML} --run-dir {BIG_RUN}")

# %%
if RUN_HEAVY:
    from nice_kit.evaluation import compare, summarize

    results = compare(p)  # random / LESS / NICE at 5%, and the full pool; 3 seeds each
    display(summarize(results))
else:
    print("skipped. On a GPU: compare(p) fine-tunes on random, LESS, NICE (top 5%) and the full pool,")
    print(f"3 seeds each ({big.evaluation.epochs} epochs at lr {big.evaluation.lr}), and summarize() "
          "gives mean and standard error of the metric per method")

# %% [markdown]
# ## Practical notes for GPUs
#
# * **Precision.** On GPUs that support it nice_kit loads models in bf16; per-example gradients are
#   accumulated in fp32.
# * **Memory.** An 8B model in bf16 takes about 16 GiB; LoRA r=128 adds 109M parameters (0.4 GiB
#   in fp32, plus 0.8 GiB of Adam state during the warmup). The gradient stage holds the full
#   gradients of a whole chunk (`gradients.chunk_size` x D in fp32, several copies during the Adam
#   preconditioning) before projecting them, which is why `chunk_size` is 8 here rather than the
#   CPU default of 32; it also keeps `gradients.batch_size` sequences of activations. Lower
#   either, or `data.max_length`, on out-of-memory errors.
# * **Rollouts.** `rollouts.batch_size` sequences are generated together; K=20 x 256 new tokens on
#   long prompts is usually the longest stage after the training gradients.
# * **Code tasks.** For HumanEval use the `humaneval` metric with
#   `nice_kit.metrics.code.load_humaneval_records()` as target records, temperature 0.8 and stop
#   sequences (`rollouts.stop`), as the reference does.
