"""Per-example LoRA gradients in batches, their projection, Adam preconditioning.

Every measurement in nice_kit is a *weighted token NLL*: a sequence (prompt + answer) with a weight
on each predicted token, summed into a group. Training examples and LESS's reference answers use
weights 1/n on the n answer tokens (mean NLL); NICE's policy gradient uses the reward weight on
every completion token (summed NLL), several completions summed into one group per target prompt.

How a batch is computed (``group_gradients``, ``projected_gradients``):

* **Per-example gradients from one backward.** For a LoRA linear map y = x W^T the gradient of W for
  example b is sum_t dL/dy[b,t]^T x[b,t]. A forward hook keeps each LoRA layer's input; a tensor hook
  on its output forms every example's gradient as soon as that output gradient arrives in backward,
  adds it into a preallocated (groups, D) buffer at the parameter's offset and drops the input at
  once. Memory beyond a bare forward+backward is the buffer plus one layer's product.
* **Logits only where a weight is non-zero.** The decoder runs to hidden states; the vocabulary
  projection and the cross-entropy are applied only at positions that predict a weighted token.
* **Shared prompts run once.** Sequences of one group that start with the same zero-weight prefix
  (NICE: the K completions of a target prompt) run that prefix once; its key/value cache is expanded
  to the continuations, and gradients flow back through it into the prefix's LoRA parameters, so the
  group's gradient is exactly the sum of its sequences' gradients. Identical sequences of one group
  are run once with their weights added (the gradient is linear in the weights).
* **No unused work.** Backward runs to the input embeddings' output (a leaf made for it), not to the
  LoRA weights: their batch-summed gradients (``.grad``) are never formed. On CUDA the per-example
  products take bf16 inputs with float32 accumulation and float32 products may use TF32
  (:func:`add_per_example_products`); a CPU computes in float32 as before. ``adam_precondition``
  works in blocks of 2^20 coordinates, in place in the training stage.
* **Batches by token positions.** A forward pass holds no more token positions than ``batch_size``
  whole sequences (so several prompts with their short completions share a pass); out of memory on a
  batch (:func:`nice_kit.memory.is_out_of_memory`) halves the batch size (down to 1) and retries that
  batch (:class:`BatchSize`).

The model's decoder, output head and cache are found generically (``get_decoder``,
``get_output_embeddings``) and checked once per model against its plain forward; a model where
they are not found, or do not reproduce the plain forward, gets full logits and no prefix sharing.
Results equal one-sequence-at-a-time backward passes to fp32 precision (tests/test_gradients.py).
"""

from __future__ import annotations

import inspect
import logging
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Tokenized
from .memory import free_cached_memory, is_out_of_memory
from .models import lora_parameters

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WeightedSequence:
    input_ids: list[int]
    weights: list[float]  # weights[t]: weight of the NLL of input_ids[t] (predicted from t-1); weights[0] unused
    group: int  # which output row this sequence's gradient is added to


def mean_nll_sequence(tok: Tokenized, group: int) -> WeightedSequence:
    """A training example (or reference answer): mean NLL over its response tokens."""
    n = max(tok.n_response_tokens, 1)
    return WeightedSequence(tok.input_ids, [0.0 if l == IGNORE_INDEX else 1.0 / n for l in tok.labels], group)


def accumulation_dtype(model) -> torch.dtype:
    """What per-example gradients are summed in: float32, or float64 for a float64 model (exactness
    checks against float64 oracles, tests/test_reference_estimator.py)."""
    params = lora_parameters(model)
    return torch.float64 if params and params[0][1].dtype == torch.float64 else torch.float32


def gradient_dim(model) -> int:
    return sum(p.numel() for _, p in lora_parameters(model))


# ------------------------------------------------------------------------------------------------
# The reference: plain full-logit NLL, one sequence at a time


def padded_batch(seqs: list[WeightedSequence], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, attention mask and per-token weights of ``seqs`` on ``device``."""
    n = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    w = torch.zeros((len(seqs), n), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if len(s.weights) != len(s.input_ids):
            raise ValueError("weights and input_ids differ in length")
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, : len(s.input_ids)] = 1
        w[i, : len(s.weights)] = torch.tensor(s.weights, dtype=torch.float32)
    return ids.to(device), mask.to(device), w.to(device)


def weighted_nll(model, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum_t weights[t] * NLL(ids[t] | ids[<t]), shape (batch,)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    b, t, v = logits.shape
    # a contiguous (N, V) layout: cross_entropy over (B, V, T) loses about 10x more fp32 precision
    nll = torch.nn.functional.cross_entropy(logits.reshape(b * t, v), ids[:, 1:].reshape(-1), reduction="none")
    return (nll.view(b, t) * weights[:, 1:]).sum(dim=1)


def loop_gradients(model, seqs: list[WeightedSequence], n_groups: int) -> torch.Tensor:
    """The reference's way: one sequence at a time through ordinary backward. For tests and benchmarks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for _, p in lora_parameters(model)]
    out = torch.zeros(n_groups, sum(p.numel() for p in params), device=device)
    for s in seqs:
        ids, mask, w = padded_batch([s], 0, device)
        model.zero_grad(set_to_none=True)
        weighted_nll(model, ids, mask, w).sum().backward()
        out[s.group] += torch.cat([p.grad.reshape(-1).float() for p in params])
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return out


_ADAM_BLOCK = 1 << 20  # coordinates per block of adam_precondition: one block's temporary at a time


def adam_precondition(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, *,
                      inplace: bool = False) -> torch.Tensor:
    """One Adam step's direction for each row of ``grads`` given the optimiser's moments
    (docs/method.md, "The pipeline", step 2): ``m' / sqrt(v' + eps)`` with ``m' = beta1 m + (1 - beta1) g``
    and ``v' = beta2 v + (1 - beta2) g^2``.

    Computed in blocks of 2^20 coordinates (a LoRA module's worth), so the only temporary is one
    block of ``(b, 2^20)``; ``inplace=True`` writes the result into ``grads`` (batch x D is then held
    once), else into a new tensor. The same elementwise operations in the same order as the plain
    formula: the results are equal."""
    out = grads if inplace else torch.empty_like(grads)
    n = grads.shape[-1]
    for a in range(0, n, _ADAM_BLOCK):
        g, m, v = grads[..., a:a + _ADAM_BLOCK], exp_avg[..., a:a + _ADAM_BLOCK], exp_avg_sq[..., a:a + _ADAM_BLOCK]
        denom = g.pow(2).mul_(1 - beta2).add_(beta2 * v).add_(eps).sqrt_()  # sqrt(v' + eps), from g before it changes
        o = out[..., a:a + _ADAM_BLOCK]
        torch.mul(g, 1 - beta1, out=o)
        o.add_(beta1 * m).div_(denom)
    return out


# ------------------------------------------------------------------------------------------------
# Planning: which tokens run in which forward pass


@dataclass
class _Unit:
    """Continuations of one group run after one shared ``prefix`` (empty: each row is a whole sequence).

    ``rows`` hold (token ids, weights) with the same convention as WeightedSequence: weights[0] is
    unused; a continuation's first token is the prefix's successor, whose hidden state predicts the
    first weighted token."""

    group: int
    prefix: list[int]
    rows: list[tuple[list[int], list[float]]]


def _check_groups(seqs: Sequence[WeightedSequence], n_groups: int) -> None:
    for n, s in enumerate(seqs):
        if not 0 <= s.group < n_groups:
            raise ValueError(f"sequence {n}: group {s.group} is outside 0..{n_groups - 1}")
        if len(s.weights) != len(s.input_ids):
            raise ValueError(f"sequence {n}: {len(s.weights)} weights for {len(s.input_ids)} tokens "
                             "(one weight per token expected)")


_MERGE_DUPLICATES = True  # benchmarks switch it off to measure what merging identical sequences gains


def _plan(seqs: Sequence[WeightedSequence], share_prefixes: bool = True,
          merge_duplicates: bool = True) -> list[_Unit]:
    """Units to run: identical sequences of a group merged (weights added), zero-weight sequences and
    tokens after the last weighted one dropped, and sequences of a group whose zero-weight prefixes
    (all tokens before the one that predicts the first weighted token) are identical sharing it."""
    merged: dict[tuple[int, tuple[int, ...], int], list[float]] = {}
    for n, s in enumerate(seqs):
        key = (s.group, tuple(s.input_ids), 0 if merge_duplicates else n)
        w = merged.get(key)
        merged[key] = [float(x) for x in s.weights] if w is None else [a + float(b) for a, b in zip(w, s.weights)]
    buckets: dict[tuple[int, tuple[int, ...]], list[tuple[list[int], list[float], int]]] = {}
    for (group, ids, _), w in merged.items():
        weighted = [t for t in range(1, len(ids)) if w[t] != 0.0]
        if not weighted:
            continue  # contributes nothing
        end = weighted[-1] + 1
        split = weighted[0] - 1 if share_prefixes else 0
        buckets.setdefault((group, ids[:split]), []).append((list(ids[:end]), w[:end], split))
    units = []
    for (group, prefix), members in buckets.items():
        if len(members) > 1 and prefix:
            units.append(_Unit(group, list(prefix), [(ids[p:], w[p:]) for ids, w, p in members]))
        else:
            units += [_Unit(group, [], [(ids, w)]) for ids, w, _ in members]
    return units


def _pass_tokens(batch: list[_Unit]) -> int:
    """Token positions a forward pass of ``batch`` holds: padded prefixes plus padded continuations."""
    rows = [ids for u in batch for ids, _ in u.rows]
    return len(batch) * max(len(u.prefix) for u in batch) + len(rows) * max(len(ids) for ids in rows)


def _forward_batches(units: list[_Unit], batch_size: int) -> list[list[_Unit]]:
    """Units packed into forward passes that hold no more token positions than ``batch_size`` whole
    sequences would (the pass's longest prefix + continuation, padded); a unit with more than
    ``batch_size`` continuations is split, each piece running its prefix. Shared and unshared units
    never mix in one pass. Without shared prefixes this is ``batch_size`` sequences per pass."""
    pieces = []
    for u in units:
        rows = sorted(u.rows, key=lambda r: len(r[0]))
        pieces += [_Unit(u.group, u.prefix, rows[a:a + batch_size]) for a in range(0, len(rows), batch_size)]
    plain = sorted((u for u in pieces if not u.prefix), key=lambda u: len(u.rows[0][0]))
    shared = sorted((u for u in pieces if u.prefix), key=lambda u: (len(u.prefix), len(u.rows[-1][0])))
    batches: list[list[_Unit]] = []
    for kind in (plain, shared):
        current: list[_Unit] = []
        longest = 0
        for u in kind:
            whole = len(u.prefix) + max(len(ids) for ids, _ in u.rows)
            if current and _pass_tokens(current + [u]) > batch_size * max(longest, whole):
                batches.append(current)
                current, longest = [], 0
            current.append(u)
            longest = max(longest, whole)
        if current:
            batches.append(current)
    return batches


# ------------------------------------------------------------------------------------------------
# Per-example gradients during backward


class _PerExampleRecorder:
    """Forms each LoRA layer's per-example gradient as its output gradient arrives in backward.

    Before each module call the caller sets which output row (group) each batch row belongs to
    (``set_rows``); the forward hook captures that mapping with the layer's input, and the tensor hook
    on the layer's output adds sum_t g[b,t]^T x[b,t] into ``buffer[group(b), offset:offset + size]``
    and releases the input."""

    def __init__(self, model):
        params = lora_parameters(model)
        if not params:
            raise ValueError("the model has no trainable (LoRA) parameters; wrap it with add_lora first")
        modules = dict(model.named_modules())
        self.entries: list[tuple[torch.nn.Module, int, int]] = []  # (module, offset, size) in lora_parameters order
        offset = 0
        for name, p in params:
            mod = modules.get(name.rsplit(".", 1)[0])
            if not isinstance(mod, torch.nn.Linear) or not name.endswith(".weight") or mod.bias is not None:
                raise ValueError(f"per-example gradients support bias-free LoRA linear layers, not {name}")
            self.entries.append((mod, offset, p.numel()))
            offset += p.numel()
        self.dim = offset
        self.fast_products = False  # bf16 products with fp32 accumulation (set per session: CUDA)
        # backward runs to the input embeddings' output (a leaf made here), not to the LoRA weights:
        # the batch-summed weight gradients (.grad), which nothing reads, are never computed
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        frozen = isinstance(emb, torch.nn.Module) and not any(q.requires_grad for q in emb.parameters())
        self.embedding = emb if frozen else None
        self.leaves: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, int | None] | None = None
        self._pending: list[list] = []  # [input, rows] of layers whose output gradient has not arrived
        self._handles: list = []

    def set_rows(self, groups: list[int], device) -> None:
        single = groups[0] if all(g == groups[0] for g in groups) else None
        self._rows = (torch.tensor(groups, device=device), single)

    def __enter__(self):
        for mod, offset, size in self.entries:
            self._handles.append(mod.register_forward_hook(self._forward_hook(offset, size)))
        if self.embedding is not None:
            self._handles.append(self.embedding.register_forward_hook(self._embedding_hook))
        return self

    def _embedding_hook(self, module, args, output):
        if self.buffer is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        leaf = output.detach().requires_grad_()
        self.leaves.append(leaf)
        return leaf

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` far enough for every LoRA layer's output gradient (the hooks form the
        per-example gradients); the LoRA weights' own gradients are not computed."""
        leaves, self.leaves = self.leaves, []
        if leaves:
            torch.autograd.grad(loss, leaves, allow_unused=True)
        else:  # no embedding leaf (a model without accessible input embeddings): ordinary backward
            loss.backward()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()

    def release(self) -> None:
        """Drop inputs kept for layers whose gradient never arrived (unused outputs, an aborted batch)."""
        for cell in self._pending:
            cell.clear()
        self._pending.clear()
        self.leaves = []

    def pending(self) -> int:
        """How many layer inputs are held right now (tests check they are released during backward)."""
        return sum(1 for c in self._pending if c)

    def _forward_hook(self, offset: int, size: int):
        def hook(module, args, output):
            if self.buffer is None or not output.requires_grad:
                return
            cell = [args[0].detach(), self._rows]
            self._pending.append(cell)

            def on_grad(grad: torch.Tensor) -> None:
                if not cell:
                    return
                x, rows = cell
                cell.clear()
                self._add(offset, size, x, grad, rows)

            output.register_hook(on_grad)

        return hook

    def _add(self, offset: int, size: int, x: torch.Tensor, g: torch.Tensor, rows) -> None:
        groups, single = rows
        add_per_example_products(self.buffer[:, offset:offset + size], g, x, groups, single, self.fast_products)


def _product_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D or batched 3-D) of bf16 inputs with a float32 result: fp32 accumulation written
    out without rounding to bf16 (torch's ``out_dtype`` kernels on CUDA; elsewhere the product in bf16
    then widened, which rounds the result once)."""
    op = torch.mm if a.dim() == 2 else torch.bmm
    if a.device.type == "cuda":
        try:
            return op(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype kernels
            pass
    return op(a, b).float()


def add_per_example_products(target: torch.Tensor, g: torch.Tensor, x: torch.Tensor, groups: torch.Tensor,
                             single: int | None, fast: bool = False) -> None:
    """Add ``sum_t g[b,t]^T x[b,t]`` (a linear layer's weight gradient of batch row ``b``) into
    ``target[groups[b]]`` (``target``: (groups, out * in) float32; ``single``: the one group of every row,
    or None).

    ``fast=False`` (CPUs): inputs and products in ``target``'s dtype (float32; float64 for a float64
    model, exactness checks). ``fast=True`` (CUDA): bf16 inputs
    with float32 accumulation and result, on tensor cores; the inputs' rounding to bf16 (8 bits of
    mantissa) perturbs each gradient by about 0.3% relative, far below what the 8192-dimensional
    projection distorts."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    g = g.reshape(b, -1, g.shape[-1])
    if not fast:
        x, g = x.to(target.dtype), g.to(target.dtype)
        if single is not None:  # all rows in one group: one matrix product
            target[single] += torch.einsum("bto,bti->oi", g, x).reshape(-1)
        else:
            target.index_add_(0, groups, torch.einsum("bto,bti->boi", g, x).reshape(b, -1))
        return
    x, g = x.to(torch.bfloat16), g.to(torch.bfloat16)
    if single is not None:
        target[single] += _product_fp32(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1])).reshape(-1)
    else:
        target.index_add_(0, groups, _product_fp32(g.transpose(1, 2), x).reshape(b, -1))


_FAST_PRODUCTS: bool | None = None  # None: bf16 products on CUDA only; tests set True to run that path on a CPU


def _use_fast_products(device: torch.device) -> bool:
    if _FAST_PRODUCTS is not None:
        return _FAST_PRODUCTS
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextmanager
def _tensor_core_matmuls(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 matrix products may use TF32 tensor cores while gradients are computed (the LoRA
    layers' own products run in float32: peft keeps adapter weights in float32); restored after.
    Elsewhere nothing changes."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------------------
# The model's parts: decoder, output head, cache


@dataclass
class _ModelParts:
    """How to run ``model``: its decoder and output head (None: full logits from the model), and the
    name of the decoder's cache argument (None: no prefix sharing)."""

    decoder: torch.nn.Module | None = None
    head: torch.nn.Module | None = None
    cache_arg: str | None = None


_PARTS: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelParts]" = weakref.WeakKeyDictionary()


def _model_parts(model) -> _ModelParts:
    parts = _PARTS.get(model)
    if parts is None:
        parts = _PARTS[model] = _find_parts(model)
    return parts


def _find_parts(model) -> _ModelParts:
    """Find the decoder, head and cache argument, and keep each only if it reproduces the plain forward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        head, decoder = inner.get_output_embeddings(), inner.get_decoder()
    except Exception:  # noqa: BLE001 - a model without these accessors simply gets full logits
        head = decoder = None
    if not isinstance(head, torch.nn.Module) or not isinstance(decoder, torch.nn.Module) or decoder is inner:
        warnings.warn("nice_kit.gradients: the model's decoder or output head was not found; computing logits "
                      "at every position and running shared prompts once per sequence", stacklevel=3)
        return _ModelParts()
    params = inspect.signature(decoder.forward).parameters
    cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
    was_training = model.training
    model.eval()
    try:
        parts = _ModelParts(decoder, head, None)
        if not _reproduces_forward(model, parts, shared=False):
            warnings.warn("nice_kit.gradients: the model's decoder and output head do not reproduce its logits; "
                          "computing logits at every position", stacklevel=3)
            return _ModelParts()
        if cache_arg is not None:
            parts.cache_arg = cache_arg
            if not _reproduces_forward(model, parts, shared=True):
                warnings.warn("nice_kit.gradients: continuing from an expanded key/value cache does not reproduce "
                              "the model's logits; running shared prompts once per sequence", stacklevel=3)
                parts.cache_arg = None
        return parts
    finally:
        model.train(was_training)


def _reproduces_forward(model, parts: _ModelParts, shared: bool) -> bool:
    """Logits of a few short sequences through ``parts`` (with or without shared prefixes, padded)
    against the model's own forward of each sequence alone."""
    device = next(model.parameters()).device
    vocab = getattr(parts.head, "out_features", None) or 64
    seqs = [[3, 5, 7, 11, 13, 17], [3, 5, 7, 19, 2], [23, 29, 31, 37], [23, 29, 41, 43, 47]]
    seqs = [[t % vocab for t in s] for s in seqs]
    splits = [3, 3, 2, 2] if shared else [0, 0, 0, 0]
    units = [_Unit(0, s[:p], [(s[p:], [1.0] * (len(s) - p))]) for s, p in zip(seqs, splits)]
    if shared:  # two prefixes of different lengths, each shared by two continuations
        units = [_Unit(0, units[0].prefix, units[0].rows + units[1].rows),
                 _Unit(0, units[2].prefix, units[2].rows + units[3].rows)]
    try:
        with torch.no_grad():
            got, _, _ = _weighted_logits(model, parts, units, 0, device, None)
            want = torch.cat([model(input_ids=torch.tensor([s], device=device)).logits[0, p:len(s) - 1]
                              for s, p in zip(seqs, splits)])
    except Exception:  # noqa: BLE001 - any failure means "does not reproduce"
        return False
    if got.shape != want.shape:
        return False
    tol = 1e-3 if want.dtype == torch.float32 or want.dtype == torch.float64 else 3e-2
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    return bool(err < tol)


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _weighted_logits(model, parts: _ModelParts, batch: list[_Unit], pad_id: int, device,
                     recorder: _PerExampleRecorder | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of ``batch``: (logits, targets, weights) at the positions whose next token has
    a non-zero weight, in row-major order."""
    conts = [r for u in batch for r in u.rows]
    unit_of_row = [i for i, u in enumerate(batch) for _ in u.rows]
    row_groups = [batch[i].group for i in unit_of_row]
    ids, mask = _pad([c[0] for c in conts], pad_id, device)
    acc = recorder.buffer.dtype if recorder is not None and recorder.buffer is not None else accumulation_dtype(model)
    weights = torch.zeros(ids.shape, dtype=acc)
    for i, (_, w) in enumerate(conts):
        weights[i, : len(w)] = torch.tensor(w, dtype=acc)
    rows, cols = (weights[:, 1:] != 0).nonzero(as_tuple=True)  # on the CPU: no device synchronisation
    head_groups = [row_groups[r] for r in rows.tolist()]
    weights, rows, cols = weights.to(device), rows.to(device), cols.to(device)
    kwargs: dict = {"input_ids": ids, "attention_mask": mask}
    if batch[0].prefix:
        if parts.decoder is None or parts.cache_arg is None:
            raise RuntimeError("shared prefixes need a decoder with a key/value cache")
        pre_ids, pre_mask = _pad([u.prefix for u in batch], pad_id, device)
        if recorder is not None:
            recorder.set_rows([u.group for u in batch], device)
        out = parts.decoder(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True)
        cache = getattr(out, parts.cache_arg)
        index = torch.tensor(unit_of_row, device=device)
        cache.batch_select_indices(index)  # differentiable: gradients of all continuations reach the prefix
        start = torch.tensor([len(batch[i].prefix) for i in unit_of_row], device=device)
        kwargs.update({"attention_mask": torch.cat([pre_mask[index], mask], dim=1),
                       "position_ids": start[:, None] + torch.arange(ids.shape[1], device=device),
                       parts.cache_arg: cache, "use_cache": True})
    if recorder is not None:
        recorder.set_rows(row_groups, device)
    if parts.decoder is not None:
        if not batch[0].prefix:
            kwargs["use_cache"] = False
        hidden = parts.decoder(**kwargs).last_hidden_state[rows, cols]
        if recorder is not None:
            recorder.set_rows(head_groups, device)
        logits = parts.head(hidden)
    else:
        logits = model(**kwargs).logits[rows, cols]
    return logits, ids[rows, cols + 1], weights[rows, cols + 1]


def _run_batch(model, parts: _ModelParts, batch: list[_Unit], pad_id: int, device,
               recorder: _PerExampleRecorder | None) -> None:
    """Forward and backward of one batch: per-example gradients land in ``recorder.buffer``."""
    logits, targets, weights = _weighted_logits(model, parts, batch, pad_id, device, recorder)
    nll = F.cross_entropy(logits.to(weights.dtype), targets, reduction="none")
    loss = (nll * weights).sum()
    if recorder is None:
        loss.backward()
    else:
        recorder.backward(loss)


# ------------------------------------------------------------------------------------------------
# Public API


@dataclass
class BatchSize:
    """A batch size that out-of-memory errors lower (halved, down to 1). Pass one object to every call
    of a stage to keep the lowered value for the rest of the stage (an ``int`` is lowered per call)."""

    value: int

    def __post_init__(self):
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.value!r}")


class _Session:
    """Eval mode, hooks and the model's parts for one gradient computation; OOM-aware batch size."""

    def __init__(self, model, pad_id: int, batch_size: int | BatchSize, log: Callable[[str], None] | None,
                 share_prefixes: bool):
        self.size = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size)
        self.model, self.pad_id = model, pad_id
        self.log = log or logger.warning
        self.device = next(model.parameters()).device
        self.recorder = _PerExampleRecorder(model)
        self.share = share_prefixes

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.parts = _model_parts(self.model)
        self.share = self.share and self.parts.cache_arg is not None
        self.recorder.fast_products = _use_fast_products(self.device)
        self._matmuls = _tensor_core_matmuls(self.device)
        self._matmuls.__enter__()
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc):
        self.recorder.__exit__(*exc)
        self._matmuls.__exit__(*exc)
        self.model.zero_grad(set_to_none=True)
        self.model.train(self.was_training)

    def gradients(self, seqs: Sequence[WeightedSequence], n_groups: int, batch_size: int) -> torch.Tensor:
        """(n_groups, D) gradients on the model's device (float32; float64 for a float64 model)."""
        buffer = torch.zeros(n_groups, self.recorder.dim, device=self.device, dtype=accumulation_dtype(self.model))
        self.recorder.buffer = buffer
        try:
            for batch in _forward_batches(_plan(seqs, self.share, _MERGE_DUPLICATES), batch_size):
                _run_batch(self.model, self.parts, batch, self.pad_id, self.device, self.recorder)
                self.model.zero_grad(set_to_none=True)
                self.recorder.release()
        finally:
            self.recorder.buffer = None
            self.recorder.release()
        return buffer

    def retrying(self, compute: Callable[[int], T]) -> T:
        """``compute(batch_size)``; on out-of-memory, halve the batch size (kept for later calls) and retry."""
        while True:
            try:
                return compute(self.size.value)
            except Exception as err:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
                if not is_out_of_memory(err) or self.size.value <= 1:
                    raise
            # outside the except block: the failed batch's tensors are no longer referenced
            self.recorder.release()
            self.model.zero_grad(set_to_none=True)
            free_cached_memory(self.device)
            lowered = max(1, self.size.value // 2)
            self.log(f"out of memory at gradient batch size {self.size.value}; "
                     f"continuing with batch size {lowered}")
            self.size.value = lowered


def group_gradients(model, seqs: list[WeightedSequence], n_groups: int, pad_id: int,
                    batch_size: int | BatchSize = 8, *, log: Callable[[str], None] | None = None,
                    share_prefixes: bool = True) -> torch.Tensor:
    """Gradient of each group's summed weighted NLL: a (n_groups, D) float32 tensor on the model's device
    (float64 for a float64 model).

    At most ``batch_size`` sequences run per forward pass (halved on out-of-memory, with a message
    through ``log``; see :class:`BatchSize`); the model must be a peft LoRA model and is used in eval
    mode (no dropout)."""
    _check_groups(seqs, n_groups)
    with _Session(model, pad_id, batch_size, log, share_prefixes) as session:
        return session.retrying(lambda size: session.gradients(seqs, n_groups, size))


def projected_gradients(model, seqs: Sequence[WeightedSequence], n_groups: int, pad_id: int,
                        project: Callable[[torch.Tensor], torch.Tensor],
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        batch_size: int | BatchSize = 8, *, log: Callable[[str], None] | None = None,
                        share_prefixes: bool = True) -> torch.Tensor:
    """``project(transform(gradient))`` of each group: (n_groups, d) float32 on the CPU, not normalised.

    Groups are computed ``batch_size`` at a time (fewest tokens first), so full-size gradients never
    exceed batch_size x D floats; ``transform`` (e.g. Adam preconditioning) and ``project`` (e.g.
    ``Projector.project``) map a (b, D) block to (b, D) and (b, d). Groups without sequences stay
    zero rows. On out-of-memory the batch size is halved (down to 1, logged through ``log``) and the
    block retried; the lower size is kept for the rest (and for later calls given the same
    :class:`BatchSize`)."""
    _check_groups(seqs, n_groups)
    by_group: list[list[WeightedSequence]] = [[] for _ in range(n_groups)]
    for q in seqs:
        by_group[q.group].append(q)
    order = sorted((j for j in range(n_groups) if by_group[j]),
                   key=lambda j: sum(len(q.input_ids) for q in by_group[j]))
    out: torch.Tensor | None = None
    with _Session(model, pad_id, batch_size, log, share_prefixes) as session:
        done = 0
        while done < len(order):
            def block(size: int) -> tuple[list[int], torch.Tensor]:
                groups = order[done:done + size]
                part = [WeightedSequence(q.input_ids, q.weights, i) for i, j in enumerate(groups) for q in by_group[j]]
                g = session.gradients(part, len(groups), size)
                if transform is not None:
                    g = transform(g)
                return groups, project(g).to("cpu", torch.float32)

            groups, vectors = session.retrying(block)
            if out is None:
                out = torch.zeros(n_groups, vectors.shape[1])
            out[groups] = vectors
            done += len(groups)
        if out is None:  # no group has a sequence: the projection's width from an empty block
            width = project(torch.zeros(0, session.recorder.dim, device=session.device)).shape[1]
            out = torch.zeros(n_groups, width)
    return out
