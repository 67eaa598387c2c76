"""The pipeline under torchrun (2 CPU processes, gloo) against one process, and resuming after a rank dies.

Each torchrun launch starts 2 Python processes that import torch, transformers and peft; the module
starts 5 commands on a tiny model (the first 3 at the same time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from nice_kit.distributed import SINGLE, Dist, available_cores
from nice_kit.runs import shard_chunks
from nice_kit.warmup import load_checkpoints

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
from dist_worker import TRAIN_SETTINGS, train_tiny  # noqa: E402

REL_TOL = 1e-4  # warmup checkpoints: largest difference over largest entry (float summation order only)


def _command(args: list[str], nproc: int | None) -> list[str]:
    if nproc is None:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _start(args: list[str], nproc: int | None = 2, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(_command(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environ, cwd=ROOT)


def _finish(proc: subprocess.Popen, expect_ok: bool = True) -> str:
    out, _ = proc.communicate(timeout=900)
    if expect_ok:
        assert proc.returncode == 0, out[-4000:]
    return out


def _config(tmp_path: Path, data: dict[str, str], model_dir: Path) -> Path:
    lines = [f'model = "{model_dir}"', "threads = 1", "[data]"]
    lines += [f'{k} = "{v}"' for k, v in data.items()] + ["max_length = 64"]
    # 12 warmup examples in micro-batches of 4, 2 per optimizer step (the last step has one): with 2
    # processes each step's micro-batches are dealt one per rank; LoRA dropout 0.1 (the default)
    lines += ["[warmup]", "fraction = 0.5", "epochs = 2", "lr = 0.01", "batch_size = 4", "grad_accum = 2",
              "[projection]", "dim = 256", "[gradients]", "chunk_size = 4", "[rollouts]", "k = 4",
              "max_new_tokens = 6", "temperature = 1.5", "[metric]", 'name = "length"', "params = { max_words = 3 }"]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, tiny_model_dir):
    """One process's run, a 2-process run from scratch and a 2-process train_lora, started together."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = _config(tmp, small_data, tiny_model_dir)
    one = _start(["-m", "nice_kit", "run", "--config", str(cfg), "--run-dir", str(tmp / "one")], nproc=None)
    two = _start(["-m", "nice_kit", "run", "--config", str(cfg), "--run-dir", str(tmp / "two")])
    train = _start([str(WORKER), "train", str(tmp / "train_two"), small_data["pool"]])
    outputs = {name: _finish(p) for name, p in (("one", one), ("two", two), ("train", train))}
    return {"tmp": tmp, "config": cfg, "outputs": outputs}


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)).item()


def _assert_checkpoints_close(one_dir: Path, two_dir: Path) -> None:
    one, two = load_checkpoints(one_dir), load_checkpoints(two_dir)
    assert [c.epoch for c in one] == [c.epoch for c in two] == [1, 2]
    for a, b in zip(one, two):
        assert a.lr == b.lr  # the same schedule, stepped as often
        for x, y in zip(a.moments(), b.moments()):
            assert _max_rel_diff(x, y) <= REL_TOL
        wa = load_file(str(a.adapter_path / "adapter_model.safetensors"))
        wb = load_file(str(b.adapter_path / "adapter_model.safetensors"))
        assert sorted(wa) == sorted(wb)
        for k in wa:
            assert _max_rel_diff(wa[k], wb[k]) <= REL_TOL, k
        loss_a, loss_b = (json.loads((c.path / "state.json").read_text())["train_loss"] for c in (a, b))
        assert loss_b == pytest.approx(loss_a, rel=1e-5)


# ------------------------------------------------------------------------------------ no process group
def test_without_a_launcher_nothing_is_distributed():
    assert not SINGLE.parallel and SINGLE.is_main
    assert SINGLE.shard((1, 3)) == (1, 3)
    assert SINGLE.on_main(lambda: 42) == 42
    assert SINGLE.cpu_threads("auto") == "auto" and SINGLE.device(None) is None
    with SINGLE.main_first():
        pass


def test_rank_shards_split_a_hand_shard_without_overlap():
    for shard in ((0, 1), (1, 3)):
        mine = [shard_chunks(40, 3, Dist(rank=r, world_size=4, backend="gloo").shard(shard)) for r in range(4)]
        flat = sorted(c for part in mine for c in part)
        assert flat == shard_chunks(40, 3, shard)  # every chunk of the hand shard, each once
        assert all(mine)


def test_cpu_threads_share_the_cores_unless_set():
    d = Dist(rank=1, world_size=2, local_rank=1, local_world_size=2, backend="gloo")
    assert d.cpu_threads("auto") == max(1, available_cores() // 2)
    assert d.cpu_threads(3) == 3


def test_a_file_rank_0_wrote_must_become_visible(tmp_path):
    other = Dist(rank=1, world_size=2, backend="gloo")
    (tmp_path / "DONE").write_text("")
    other.wait_visible(tmp_path / "DONE")
    with pytest.raises(RuntimeError, match="file system every machine shares"):
        other.wait_visible(tmp_path / "missing", timeout=0.3)
    Dist(rank=0, world_size=2, backend="gloo").wait_visible(tmp_path / "missing", timeout=0)  # rank 0 wrote it


def test_own_loss_equals_the_hugging_face_loss(tokenizer, small_data):
    from nice_kit.data import collate, load_records, tokenize_records
    from nice_kit.models import tiny_model
    from nice_kit.warmup import response_tokens, summed_nll

    ex, _ = tokenize_records(tokenizer, load_records(small_data["pool"])[:3], 64)
    model = tiny_model(tokenizer)
    batch = collate(ex, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = summed_nll(model, batch) / sum(response_tokens(t) for t in ex)
        torch.testing.assert_close(ours, model(**batch).loss, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ under torchrun
def test_data_parallel_lora_training_matches_one_process(runs, small_data):
    """Micro-batches dealt to ranks (grad_accum 2, dropout 0.1: the same dropout masks) and split across
    ranks (grad_accum 1, no dropout): the checkpoints equal one process's to float summation order."""
    tmp = runs["tmp"]
    for name in TRAIN_SETTINGS:
        train_tiny(tmp / "train_one", small_data["pool"], name)
        _assert_checkpoints_close(tmp / "train_one" / name, tmp / "train_two" / name)


def test_an_error_on_rank_0_reaches_every_rank(runs):
    seen = [json.loads((runs["tmp"] / "train_two" / f"errors_{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["on_main"] == "ZeroDivisionError: division by zero"
    assert seen[1]["on_main"] == "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"
    assert seen[0]["main_first"] == "ValueError: bad stage"
    assert seen[1]["main_first"] == "RuntimeError: rank 0 failed: ValueError: bad stage"
    assert seen[0]["after"] == seen[1]["after"] == "rank 0's result"


def test_torchrun_from_scratch_matches_one_process(runs):
    tmp, outputs = runs["tmp"], runs["outputs"]
    assert outputs["two"].count("Selection diagnostics") == 1  # printed by rank 0 only
    _assert_checkpoints_close(tmp / "one" / "warmup", tmp / "two" / "warmup")
    for name in ("selected.jsonl", "selected_less.jsonl", "selected_nice.jsonl", "diagnostics.csv"):
        assert (tmp / "two" / name).read_text() == (tmp / "one" / name).read_text(), name
    one, two = pd.read_csv(tmp / "one" / "scores.csv"), pd.read_csv(tmp / "two" / "scores.csv")
    assert one["id"].tolist() == two["id"].tolist()
    np.testing.assert_allclose(two[["less", "nice"]], one[["less", "nice"]], atol=1e-3)


def test_torchrun_from_the_same_warmup_gives_identical_results_and_resumes_after_a_rank_dies(runs):
    """Rank 1 dies right after its first training-gradient chunk; the same command resumes without
    recomputing any finished chunk and writes what one process writes, bit for bit."""
    tmp, cfg = runs["tmp"], runs["config"]
    run_dir = tmp / "resumed"
    run_dir.mkdir()
    shutil.copytree(tmp / "one" / "warmup", run_dir / "warmup")
    args = [str(WORKER), "cli", "run", "--config", str(cfg), "--run-dir", str(run_dir)]
    out = _finish(_start(args, NICE_KIT_TEST_DIE="1:grads/train/epoch_1:1"), expect_ok=False)
    stage = run_dir / "grads" / "train" / "epoch_1"
    assert not (stage / "DONE").exists(), out[-3000:]
    assert (stage / "chunk_00001.safetensors").exists()  # rank 1's first chunk survived it
    kept = {p.name: p.stat().st_ino for p in stage.glob("chunk_*.safetensors")}
    assert len(kept) < 6  # not every chunk was done: the rerun has work left

    log = tmp / "chunks.log"
    _finish(_start(args, NICE_KIT_TEST_CHUNK_LOG=str(log)))
    assert {p: (stage / p).stat().st_ino for p in kept} == kept  # finished chunks were not recomputed
    written = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert {rank for rank, _ in written} == {"0", "1"}
    for rank, path in written:  # chunk c is computed by rank c % 2, and only by it
        assert int(Path(path).name.split("_")[1].split(".")[0]) % 2 == int(rank), (rank, path)
    assert len(written) == len({path for _, path in written})
    assert not any(Path(p).parent == stage and Path(p).name in kept for _, p in written)
    one = tmp / "one"
    assert (run_dir / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    for folder in ("train/epoch_1", "train/epoch_2", "val_less/epoch_1", "val_less/epoch_2", "val_nice/epoch_1",
                   "val_nice/epoch_2"):
        a, b = one / "grads" / folder, run_dir / "grads" / folder
        assert (a / "vectors.npy").read_bytes() == (b / "vectors.npy").read_bytes(), folder
        extras_a, extras_b = np.load(a / "extras.npz"), np.load(b / "extras.npz")
        assert extras_a.files == extras_b.files
        for k in extras_a.files:
            assert np.array_equal(extras_a[k], extras_b[k]), f"{folder}: {k}"
    for epoch in (1, 2):
        a, b = (d / "rollouts" / f"epoch_{epoch}" / "samples.jsonl" for d in (one, run_dir))
        assert a.read_text() == b.read_text()
    assert (run_dir / "selected.jsonl").read_text() == (one / "selected.jsonl").read_text()
