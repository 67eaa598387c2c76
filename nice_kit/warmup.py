"""LoRA fine-tuning: the warmup (checkpoints with Adam moments and learning rates) and plain training.

After each epoch the warmup keeps what NICE needs at that checkpoint: the adapter (peft format, on
disk), AdamW's moments ``exp_avg`` / ``exp_avg_sq`` flattened in ``lora_parameters`` order, and the
epoch's learning rate (the mean over its steps, the value LESS weights checkpoints by). It also keeps
the full optimizer and scheduler state, so an interrupted warmup resumes after its last epoch.

Integrity: a checkpoint is written into a temporary folder and renamed into place; its
``state.json`` (written last) records the size and SHA-256 of every file, which are checked when the
file is loaded (a mismatch raises :class:`~nice_kit.runs.IntegrityError` naming it). A resumed warmup
checks its checkpoints in full and recomputes from the first damaged one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Tokenized, collate
from .distributed import SINGLE, Dist
from .models import lora_parameters
from .runs import (IntegrityError, atomic_write_text, check_file, file_record, load_tensors, log, save_tensors,
                   writing)

CHECKPOINT_FILES = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adam_moments.safetensors",
                    "optimizer.pt")


@dataclass
class Checkpoint:
    """One warmup checkpoint on disk."""

    epoch: int
    path: Path
    lr: float
    files: dict | None = None  # size and SHA-256 of each file, recorded in state.json (None: not recorded)

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def check(self, name: str, deep: bool = True) -> None:
        """Raise :class:`~nice_kit.runs.IntegrityError` when the checkpoint's file ``name`` does not
        match what was recorded when it was saved."""
        if self.files and name in self.files:
            problem = check_file(self.path / name, self.files[name], deep)
            if problem:
                raise IntegrityError(self.path / name, problem, "the next `nice-kit warmup` (or run) recomputes "
                                     "the warmup from this checkpoint on")

    def problem(self, deep: bool = True) -> str | None:
        """What is wrong with the checkpoint's files (``None``: sound)."""
        for name in (self.files or {}):
            try:
                self.check(name, deep)
            except IntegrityError as err:
                return str(err)
        if not (self.path / "adapter" / "adapter_model.safetensors").exists():
            return f"{self.path / 'adapter' / 'adapter_model.safetensors'}: missing"
        return None

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.check("adam_moments.safetensors", deep=False)  # the file's own checksums are checked as it loads
        t = load_tensors(self.path / "adam_moments.safetensors")
        return t["exp_avg"], t["exp_avg_sq"]


def _read_state(d: Path) -> Checkpoint | None:
    try:
        s = json.loads((d / "state.json").read_text())
        return Checkpoint(int(s["epoch"]), d, float(s["lr"]), s.get("files"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def load_checkpoints(warmup_dir: Path, strict: bool = False, deep: bool = False) -> list[Checkpoint]:
    """The complete checkpoints of a warmup folder, by epoch.

    A checkpoint is complete when its ``state.json`` reads and its recorded files exist with their
    recorded sizes (``deep``: and SHA-256). Only the unbroken run of complete epochs from epoch 1 is
    returned (a warmup resumes after it). ``strict``: a checkpoint that is present but damaged, or a
    gap, raises :class:`~nice_kit.runs.IntegrityError` instead (readers of a finished warmup)."""
    found = {}
    for d in sorted(Path(warmup_dir).glob("epoch_*")):
        if not d.name.removeprefix("epoch_").isdigit():
            continue  # a temporary folder
        ckpt = _read_state(d)
        if ckpt is None:
            if strict and (d / "state.json").exists():
                raise IntegrityError(d / "state.json", "unreadable: corrupted", "recompute: nice-kit warmup (or run)")
            continue
        found[ckpt.epoch] = ckpt
    out = []
    for epoch in range(1, max(found, default=0) + 1):
        ckpt = found.get(epoch)
        problem = "missing" if ckpt is None else ckpt.problem(deep)
        if problem:
            if strict:
                raise IntegrityError(Path(warmup_dir) / f"epoch_{epoch}", problem,
                                     "recompute: nice-kit warmup (or run)")
            if any(e >= epoch for e in found):
                log(f"integrity: warmup checkpoint {epoch}: {problem} -- the warmup resumes before it")
            break
        out.append(ckpt)
    return out


def checkpoint_records(warmup_dir: Path) -> dict:
    """Every checkpoint's recorded files (and state.json), named relative to the warmup folder."""
    out = {}
    for ckpt in load_checkpoints(warmup_dir):
        for name, rec in (ckpt.files or {}).items():
            out[f"{ckpt.path.name}/{name}"] = rec
        out[f"{ckpt.path.name}/state.json"] = file_record(ckpt.path / "state.json")
    return out


def load_adapter_weights(model, checkpoint: Checkpoint) -> None:
    """Set a peft model's LoRA weights to those saved at ``checkpoint``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = list(checkpoint.adapter_path.glob("adapter_model.safetensors"))
    if not files:
        raise IntegrityError(checkpoint.adapter_path / "adapter_model.safetensors", "missing",
                             "recompute: nice-kit warmup (or run)")
    checkpoint.check("adapter/adapter_model.safetensors")
    try:
        weights = load_file(str(files[0]))
    except Exception as err:  # safetensors' own error for a truncated or corrupted file
        raise IntegrityError(files[0], f"unreadable ({type(err).__name__}: {err}): truncated or corrupted",
                             "recompute: nice-kit warmup (or run)") from None
    result = set_peft_model_state_dict(model, weights)
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


def dropout_seed(seed: int, epoch: int, micro_batch: int, part: int = 0) -> int:
    """The seed of one micro-batch's dropout masks: a function of (seed, epoch, micro-batch index[, part])
    only, so masks do not depend on which process computes the micro-batch or what ran before."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{micro_batch}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def response_tokens(example: Tokenized) -> int:
    """Tokens an example's next-token loss is averaged over (labels after the shift, not ignored)."""
    return sum(1 for x in example.labels[1:] if x != IGNORE_INDEX)


def summed_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch's response tokens of the next-token NLL (float32 logits, as Hugging Face's loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def train_lora(model, examples: list[Tokenized], *, epochs: int, lr: float, batch_size: int, pad_id: int,
               seed: int = 0, grad_accum: int = 1, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
               out_dir: Path | None = None, desc: str = "train", dist: Dist | None = None) -> list[Checkpoint]:
    """Train a peft model's LoRA weights with AdamW and a linear schedule.

    Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples; a micro-batch's
    loss is the mean next-token NLL over its response tokens. Micro-batch ``b`` of epoch ``e`` draws its
    dropout masks after ``torch.manual_seed(dropout_seed(seed, e, b))``. With ``out_dir``, each epoch is
    saved as a :class:`Checkpoint` there, and a call that finds earlier epochs on disk resumes after the
    last one (same data order: epoch e shuffles with seed + e).

    Several processes (``dist``, see :mod:`nice_kit.distributed`) train one model data-parallel with
    the same global batch: their LoRA gradients are summed before each optimizer step, every process
    steps its own identical optimizer, and rank 0 writes the checkpoints while the others wait.

    * When ``grad_accum`` is a multiple of the number of processes, whole micro-batches are dealt
      round-robin (micro-batch j of a step to rank j % world): every process computes the same
      micro-batches with the same dropout masks as one process would, and the checkpoints equal one
      process's up to float summation order.
    * Otherwise each micro-batch is split into one sub-batch per process, each normalised by the
      whole micro-batch's token count (so the gradient is the same sum). Sub-batch ``p`` draws its
      dropout masks from ``dropout_seed(seed, e, b, p + 1)``: with LoRA dropout > 0 the result then
      equals one process's in distribution only (exactly, to float order, without dropout).
    """
    if not examples:
        raise ValueError("no training examples")
    dist = dist or SINGLE
    params = [p for _, p in lora_parameters(model)]
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / batch_size) / grad_accum)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(warmup_ratio * total)))
    done = load_checkpoints(out_dir, deep=True) if out_dir else []  # a damaged checkpoint is recomputed
    start_epoch = 0
    if done:
        last = done[-1]
        load_adapter_weights(model, last)
        last.check("optimizer.pt")
        state = torch.load(last.path / "optimizer.pt", map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = last.epoch
    world = dist.world_size if dist.parallel else 1
    rank = dist.rank if dist.parallel else 0
    split = grad_accum % world != 0  # split each micro-batch across processes instead of dealing them
    dist.broadcast([p.data for p in params])  # every process starts from rank 0's weights
    model.train()
    for epoch in range(start_epoch + 1, epochs + 1):
        order = list(range(len(examples)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        lrs, loss_sum = [], torch.zeros((), dtype=torch.float64, device=device)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        steps = [range(s, min(s + grad_accum, len(batches))) for s in range(0, len(batches), grad_accum)]
        bar = tqdm(steps, desc=f"{desc} epoch {epoch}/{epochs}", leave=False)
        for step in bar:
            for j, b in enumerate(step):
                idx = batches[b]
                if split:
                    part, mine = rank + 1, idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]
                else:
                    part, mine = 0, idx if j % world == rank else []
                if not mine:
                    continue
                n_tokens = max(1, sum(response_tokens(examples[i]) for i in idx))  # the whole micro-batch's
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in mine], pad_id).items()}
                torch.manual_seed(dropout_seed(seed, epoch, b, part))
                loss = summed_nll(model, batch) / n_tokens
                (loss / grad_accum).backward()
                loss_sum += loss.detach().double()
            if dist.parallel:
                for p in params:
                    if p.grad is None:  # no micro-batch on this process in this step
                        p.grad = torch.zeros_like(p)
                dist.all_reduce_sum([p.grad for p in params])
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not split:  # this process's whole micro-batches: their mean loss so far
                bar.set_postfix(loss=f"{loss_sum.item() / max(1, len(range(rank, step.stop, world))):.3f}")
        dist.all_reduce_sum([loss_sum])
        epoch_loss = loss_sum.item() / len(batches)  # the mean micro-batch loss
        if out_dir is not None:
            dist.on_main(lambda: _save_checkpoint(model, opt, sched, Path(out_dir) / f"epoch_{epoch}", epoch,
                                                  sum(lrs) / len(lrs), epoch_loss))
    model.eval()
    return load_checkpoints(out_dir) if out_dir else []


def _save_checkpoint(model, opt, sched, path: Path, epoch: int, lr: float, loss: float) -> None:
    """Write the checkpoint into a temporary folder, record its files' sizes and checksums in
    state.json (last), then rename it into place: a crash or a full disk never leaves a checkpoint
    that looks complete (:class:`~nice_kit.runs.DiskFullError` names the stage and the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{uuid.uuid4().hex[:8]}")
    with writing(path / "state.json", tmp, f"warmup checkpoint {epoch}"):
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter")
        params = [p for _, p in lora_parameters(model)]
        exp_avg = torch.cat([opt.state[p]["exp_avg"].reshape(-1).float() for p in params])
        exp_avg_sq = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1).float() for p in params])
        save_tensors({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, tmp / "adam_moments.safetensors")
        with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a full disk raises OSError(ENOSPC)
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, f)
        files = {name: file_record(tmp / name) for name in CHECKPOINT_FILES if (tmp / name).exists()}
        # state.json last: its presence marks the checkpoint complete
        atomic_write_text(tmp / "state.json", json.dumps({"epoch": epoch, "lr": lr, "train_loss": loss,
                                                          "files": files}))
        if path.exists():  # a damaged or partial checkpoint of an earlier attempt
            shutil.rmtree(path)
        tmp.rename(path)
