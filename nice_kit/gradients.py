"""Per-example LoRA gradients in batches, Adam preconditioning.

Every measurement in nice_kit is a *weighted token NLL*: a sequence (prompt + answer) with a weight
on each predicted token, summed into a group. Training examples and LESS's reference answers use
weights 1/n on the n answer tokens (mean NLL); NICE's policy gradient uses the reward weight on
every completion token (summed NLL), several completions summed into one group per target prompt.

Per-example gradients of LoRA's two linear maps are computed from one batched forward/backward:
for a linear layer y = x W^T, the gradient of W for example b is sum_t dL/dy[b,t]^T x[b,t]. Hooks
keep each LoRA layer's input and output gradient, and one einsum per layer gives every example's
gradient at once (exactly what one-example-at-a-time backward passes give, to fp32 precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Tokenized
from .models import lora_parameters


@dataclass
class WeightedSequence:
    input_ids: list[int]
    weights: list[float]  # weights[t]: weight of the NLL of input_ids[t] (predicted from t-1); weights[0] unused
    group: int  # which output row this sequence's gradient is added to


def mean_nll_sequence(tok: Tokenized, group: int) -> WeightedSequence:
    """A training example (or reference answer): mean NLL over its response tokens."""
    n = max(tok.n_response_tokens, 1)
    return WeightedSequence(tok.input_ids, [0.0 if l == IGNORE_INDEX else 1.0 / n for l in tok.labels], group)


class _LoraHooks:
    """Captures inputs and output gradients of every LoRA linear layer during one forward/backward."""

    def __init__(self, model):
        params = lora_parameters(model)
        if not params:
            raise ValueError("the model has no trainable (LoRA) parameters; wrap it with add_lora first")
        modules = dict(model.named_modules())
        self.entries = []  # (param, module) in lora_parameters order
        for name, p in params:
            mod_name = name.rsplit(".", 1)[0]
            mod = modules.get(mod_name)
            if not isinstance(mod, torch.nn.Linear) or not name.endswith(".weight") or mod.bias is not None:
                raise ValueError(f"per-example gradients support bias-free LoRA linear layers, not {name}")
            self.entries.append((p, mod))
        self.sizes = [p.numel() for p, _ in self.entries]
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
        """(batch, D) gradients in lora_parameters order, float32."""
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


def gradient_dim(model) -> int:
    return sum(p.numel() for _, p in lora_parameters(model))


def _batch(seqs: list[WeightedSequence], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def group_gradients(model, seqs: list[WeightedSequence], n_groups: int, pad_id: int,
                    batch_size: int = 8) -> torch.Tensor:
    """Gradient of each group's summed weighted NLL: a (n_groups, D) float32 tensor.

    Sequences are batched ``batch_size`` at a time (sorted by length to waste little padding); the
    model must be a peft LoRA model and is used in eval mode (no dropout).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(n_groups, gradient_dim(model), device=device)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    try:
        with _LoraHooks(model) as hooks:
            for start in range(0, len(order), batch_size):
                batch = [seqs[i] for i in order[start:start + batch_size]]
                ids, mask, w = _batch(batch, pad_id, device)
                loss = weighted_nll(model, ids, mask, w).sum()
                loss.backward()
                per_example = hooks.per_example()
                groups = torch.tensor([s.group for s in batch], device=device)
                out.index_add_(0, groups, per_example)
                model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return out


def loop_gradients(model, seqs: list[WeightedSequence], n_groups: int) -> torch.Tensor:
    """The reference's way: one sequence at a time through ordinary backward. For tests and benchmarks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for _, p in lora_parameters(model)]
    out = torch.zeros(n_groups, sum(p.numel() for p in params), device=device)
    for s in seqs:
        ids, mask, w = _batch([s], 0, device)
        model.zero_grad(set_to_none=True)
        weighted_nll(model, ids, mask, w).sum().backward()
        out[s.group] += torch.cat([p.grad.reshape(-1).float() for p in params])
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return out


def adam_precondition(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """One Adam step's direction for each row of ``grads`` given the optimiser's moments (NICE.md, step 2)."""
    m = beta1 * exp_avg + (1 - beta1) * grads
    v = beta2 * exp_avg_sq + (1 - beta2) * grads.pow(2)
    return m / torch.sqrt(v + eps)
