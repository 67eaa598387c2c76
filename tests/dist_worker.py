"""Test helper started by ``torchrun`` in tests/test_distributed.py (not a test module itself).

    torchrun ... tests/dist_worker.py cli run --config C --run-dir D   # the nice-kit command line
    torchrun ... tests/dist_worker.py train OUT POOL                   # train_lora on a tiny model

``cli`` with ``NICE_KIT_TEST_DIE=RANK:TEXT:N`` injects a fault: the process of rank RANK exits at
once (``os._exit(17)``, like a killed process: no cleanup, no exception) right after it wrote its
N-th chunk file whose path contains TEXT. With ``NICE_KIT_TEST_CHUNK_LOG=FILE`` every process
appends ``RANK path`` to FILE for each chunk file it writes.

``train`` trains the LoRA of a tiny model on the first 12 examples of POOL with every process of
the group, once per setting in :data:`TRAIN_SETTINGS`, and writes the checkpoints to OUT/<name>;
then it records in OUT/errors_<rank>.json what each rank sees when rank 0 fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (grad_accum, lora dropout); 2 processes deal whole micro-batches when grad_accum is even
TRAIN_SETTINGS = {"dealt": (2, 0.1), "split": (1, 0.0)}


def train_tiny(out: Path, pool: str, name: str, dist=None) -> None:
    """The training both the test (one process) and the workers (several) run."""
    from nice_kit.data import load_records, tokenize_records
    from nice_kit.models import LoraSettings, add_lora, load_tokenizer, tiny_model
    from nice_kit.warmup import train_lora

    grad_accum, dropout = TRAIN_SETTINGS[name]
    tok = load_tokenizer("default")
    examples, _ = tokenize_records(tok, load_records(pool)[:12], 64)
    model = add_lora(tiny_model(tok), LoraSettings(r=4, alpha=8, dropout=dropout), seed=0)
    train_lora(model, examples, epochs=2, lr=1e-2, batch_size=4, pad_id=tok.pad_token_id, seed=0,
               grad_accum=grad_accum, out_dir=out / name, dist=dist)


def _watch_chunks(log: str | None, die: str | None) -> None:
    """Log every chunk file this process writes (``RANK path`` lines appended to ``log``) and, with
    ``die`` = RANK:TEXT:N, exit at once after the N-th chunk whose path contains TEXT on that rank."""
    import nice_kit.stages as pipeline  # the stages write the chunk files

    rank = os.environ.get("RANK", "0")
    die_rank, text, n = die.split(":") if die else ("", "", "0")
    written = []

    def after_write(path) -> None:
        if log:
            with open(log, "a") as f:
                f.write(f"{rank} {path}\n")
        if die and rank == die_rank and text in str(path):
            written.append(path)
            if len(written) >= int(n):
                os._exit(17)

    save_tensors, write_text = pipeline.save_tensors, pipeline.atomic_write_text

    def save_and_watch(tensors, path, metadata=None):
        save_tensors(tensors, path, metadata)
        after_write(path)

    def write_and_watch(path, text_):
        write_text(path, text_)
        if Path(path).name.startswith("chunk_"):
            after_write(path)

    pipeline.save_tensors, pipeline.atomic_write_text = save_and_watch, write_and_watch


def _errors(out: Path, dist) -> None:
    """What each rank sees when rank 0 fails inside on_main and inside main_first (errors_<rank>.json)."""
    import json

    seen = {}
    try:
        dist.on_main(lambda: 1 / 0)
    except Exception as err:  # noqa: BLE001 (recorded for the test)
        seen["on_main"] = f"{type(err).__name__}: {err}"
    try:
        with dist.main_first():
            if dist.is_main:
                raise ValueError("bad stage")
    except Exception as err:  # noqa: BLE001
        seen["main_first"] = f"{type(err).__name__}: {err}"
    seen["after"] = dist.on_main(lambda: "rank 0's result")  # the group still works afterwards
    (out / f"errors_{dist.rank}.json").write_text(json.dumps(seen))


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    if argv[0] == "cli":
        _watch_chunks(os.environ.get("NICE_KIT_TEST_CHUNK_LOG"), os.environ.get("NICE_KIT_TEST_DIE"))
        from nice_kit.cli import main as cli_main

        return cli_main(argv[1:])
    if argv[0] == "train":
        from nice_kit.distributed import init_from_env, shutdown

        dist = init_from_env("cpu")
        try:
            for name in TRAIN_SETTINGS:
                train_tiny(Path(argv[1]), argv[2], name, dist)
            _errors(Path(argv[1]), dist)
        finally:
            shutdown()
        return 0
    raise SystemExit(f"unknown mode {argv[0]!r}; expected cli or train")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
