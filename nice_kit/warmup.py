"""LoRA fine-tuning: the warmup (checkpoints with Adam moments and learning rates) and plain training.

After each epoch the warmup keeps what NICE needs at that checkpoint: the adapter (peft format, on
disk), AdamW's moments ``exp_avg`` / ``exp_avg_sq`` flattened in ``lora_parameters`` order, and the
epoch's learning rate (the mean over its steps, the value LESS weights checkpoints by). It also keeps
the full optimizer and scheduler state, so an interrupted warmup resumes after its last epoch.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import Tokenized, collate
from .models import lora_parameters
from .runs import atomic_write_text, load_tensors, save_tensors


@dataclass
class Checkpoint:
    """One warmup checkpoint on disk."""

    epoch: int
    path: Path
    lr: float

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_tensors(self.path / "adam_moments.safetensors")
        return t["exp_avg"], t["exp_avg_sq"]


def load_checkpoints(warmup_dir: Path) -> list[Checkpoint]:
    out = []
    for d in sorted(Path(warmup_dir).glob("epoch_*")):
        state = d / "state.json"
        if state.exists():
            s = json.loads(state.read_text())
            out.append(Checkpoint(s["epoch"], d, s["lr"]))
    return sorted(out, key=lambda c: c.epoch)


def load_adapter_weights(model, checkpoint: Checkpoint) -> None:
    """Set a peft model's LoRA weights to those saved at ``checkpoint``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = list(checkpoint.adapter_path.glob("adapter_model.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint.adapter_path}: no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(files[0])))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ValueError(f"adapter at {checkpoint.adapter_path} does not fit the model: {missing[:3]}")


def reset_lora(model, seed: int) -> None:
    """Re-initialise every LoRA adapter from ``seed`` (B = 0: the model equals the base model again)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


def checkpoint_weights(checkpoints: list[Checkpoint]) -> list[float]:
    """w_c = eta_c / sum(eta) (uniform if every learning rate is 0)."""
    total = sum(c.lr for c in checkpoints)
    if total <= 0:
        return [1.0 / len(checkpoints)] * len(checkpoints)
    return [c.lr / total for c in checkpoints]


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def train_lora(model, examples: list[Tokenized], *, epochs: int, lr: float, batch_size: int, pad_id: int,
               seed: int = 0, grad_accum: int = 1, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
               out_dir: Path | None = None, desc: str = "train") -> list[Checkpoint]:
    """Train a peft model's LoRA weights with AdamW and a linear schedule.

    With ``out_dir``, each epoch is saved as a :class:`Checkpoint` there, and a call that finds earlier
    epochs on disk resumes after the last one (same data order: epoch e shuffles with seed + e).
    """
    if not examples:
        raise ValueError("no training examples")
    params = [p for _, p in lora_parameters(model)]
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / batch_size) / grad_accum)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(warmup_ratio * total)))
    done = load_checkpoints(out_dir) if out_dir else []
    start_epoch = 0
    if done:
        last = done[-1]
        load_adapter_weights(model, last)
        state = torch.load(last.path / "optimizer.pt", map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = last.epoch
    model.train()
    for epoch in range(start_epoch + 1, epochs + 1):
        order = list(range(len(examples)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        torch.manual_seed(seed * 1000 + epoch)  # dropout masks
        lrs, losses = [], []
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{epochs}", leave=False)
        for b, idx in enumerate(bar):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss / grad_accum
            loss.backward()
            losses.append(loss.item() * grad_accum)
            if (b + 1) % grad_accum == 0 or b + 1 == len(batches):
                lrs.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{sum(losses[-8:]) / len(losses[-8:]):.3f}")
        if out_dir is not None:
            _save_checkpoint(model, opt, sched, Path(out_dir) / f"epoch_{epoch}", epoch,
                             sum(lrs) / len(lrs), sum(losses) / len(losses))
    model.eval()
    return load_checkpoints(out_dir) if out_dir else []


def _save_checkpoint(model, opt, sched, path: Path, epoch: int, lr: float, loss: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path / "adapter")
    params = [p for _, p in lora_parameters(model)]
    exp_avg = torch.cat([opt.state[p]["exp_avg"].reshape(-1).float() for p in params])
    exp_avg_sq = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1).float() for p in params])
    save_tensors({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, path / "adam_moments.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path / "optimizer.pt")
    # state.json last: its presence marks the checkpoint complete
    atomic_write_text(path / "state.json", json.dumps({"epoch": epoch, "lr": lr, "train_loss": loss}))
