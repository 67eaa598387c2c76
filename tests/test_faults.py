"""Fault injection: truncate, flip bytes in and delete every kind of stored artifact, fill the disk,
kill the run at each stage. Each case ends in an error naming the file (a reader) or in a correct
recomputation (the next run), never in a wrong score.

The seven failures of issue #20 are reproduced here (each test names the one it covers): before the
integrity checks, each of these tests failed."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import nice_kit.stages as stages_mod
import nice_kit.runs as runs_mod
import nice_kit.vectors as vectors_mod
import nice_kit.warmup as warmup_mod
from conftest import copy_run, tiny_config, write_jsonl
from nice_kit.data import DataError, load_records
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.runs import DiskFullError, IntegrityError, Stage, save_tensors
from nice_kit.vectors import merge_chunks, open_vectors

SCORE_ATOL = 1e-6  # a recomputation on the same machine repeats the same arithmetic; a wrong score is off by far more


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


@pytest.fixture(scope="module")
def ref(tokenizer, small_data, tmp_path_factory):
    """A finished run: every stage, scores and selection (read-only: tests damage copies)."""
    p = make(tokenizer, small_data, tmp_path_factory.mktemp("faults") / "ref")
    p.run()
    return p


def ref_scores(ref) -> pd.DataFrame:
    return pd.read_csv(ref.run_dir / "scores.csv", dtype={"id": str})


def assert_same_scores(got: pd.DataFrame, ref) -> None:
    want = ref_scores(ref)
    assert list(got["id"]) == list(want["id"])
    for col in ("less", "nice"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=0, atol=SCORE_ATOL)


def assert_same_files(run_dir: Path, ref) -> None:
    """Every recorded file of every finished stage is byte for byte the one the reference run wrote
    (a recomputation repeats the original, it does not just come close)."""
    for manifest in ref.run_dir.rglob("integrity.json"):
        rel = manifest.relative_to(ref.run_dir)
        want = json.loads(manifest.read_text())["files"]
        got = json.loads((run_dir / rel).read_text())["files"]
        assert {k: v.get("sha256", v.get("blocks")) for k, v in got.items()} == \
            {k: v.get("sha256", v.get("blocks")) for k, v in want.items()}, rel


def assert_sound(run_dir: Path) -> None:
    """Every finished stage's recorded files match their records; no temporary file is left."""
    for done in run_dir.rglob("DONE"):
        stage = Stage(done.parent, done.read_text().strip())
        assert stage.records() is not None, f"{done.parent}: no integrity.json"
        assert stage.problems() == {}, stage.problems()
    assert not [p for p in run_dir.rglob(".*tmp*")], "a temporary file was left behind"


# ------------------------------------------------------------------------------------------ damage
def flip(path: Path, n: int = 32) -> None:
    """Flip ``n`` bytes in the second half of a binary file (its data, not its header)."""
    data = bytearray(path.read_bytes())
    start = max(len(data) // 2, len(data) - 4 * n)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0x24
    path.write_bytes(bytes(data))


def flip_text(path: Path) -> None:
    """Change one letter or digit in the second half of a text file: it stays valid JSON, reads
    without error, and means something else (the silent kind of corruption)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data)):
        c = chr(data[i])
        if c.isdigit():
            data[i] = ord("7" if c != "7" else "3")
            break
        if c.isalpha() and c.islower() and chr(data[i - 1]) not in '\\"':
            data[i] = ord("q" if c != "q" else "z")
            break
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete(path: Path) -> None:
    path.unlink()


DAMAGE = {"flip": flip, "truncate": truncate, "delete": delete}


def unfinish(stage_dir: Path) -> None:
    """Make a finished vector or rollout stage look interrupted before its merge."""
    for name in ("DONE", "integrity.json", "vectors.npy", "extras.npz", "samples.jsonl"):
        (stage_dir / name).unlink(missing_ok=True)


# (artifact, relative path, whether the stage is made unfinished first, damage kinds)
ARTIFACTS = [
    ("gradient chunk (unfinished stage)", "grads/train/epoch_1/chunk_00001.safetensors", True, ("flip", "truncate", "delete")),
    ("gradient chunk (nice, unfinished)", "grads/val_nice/epoch_2/chunk_00000.safetensors", True, ("flip", "truncate")),
    ("merged vectors", "grads/train/epoch_2/vectors.npy", False, ("flip", "truncate", "delete")),
    ("merged target vectors", "grads/val_less/epoch_1/vectors.npy", False, ("flip",)),
    ("norms and validity", "grads/val_nice/epoch_1/extras.npz", False, ("flip", "truncate", "delete")),
    ("vector ids", "grads/train/epoch_1/ids.json", False, ("flip", "truncate", "delete")),
    ("rollout chunk (unfinished stage)", "rollouts/epoch_1/chunk_00000.jsonl", True, ("flip", "truncate", "delete")),
    ("rollout samples", "rollouts/epoch_2/samples.jsonl", False, ("flip", "truncate", "delete")),
    ("reward cache", "rollouts/epoch_1/rewards_*.json", False, ("flip", "truncate", "delete")),
    ("warmup adapter", "warmup/epoch_1/adapter/adapter_model.safetensors", False, ("flip", "truncate", "delete")),
    ("warmup Adam moments", "warmup/epoch_2/adam_moments.safetensors", False, ("flip", "delete")),
    ("warmup optimizer state", "warmup/epoch_1/optimizer.pt", False, ("flip", "truncate")),
    ("warmup checkpoint state", "warmup/epoch_1/state.json", False, ("flip", "delete")),
    ("scores", "scores.csv", False, ("flip", "truncate", "delete")),
    ("stage inputs", "grads/val_less/epoch_2/stage.json", False, ("flip", "truncate")),
    ("chunk layout (unfinished stage)", "grads/train/epoch_2/layout.json", True, ("truncate",)),
    ("finished-stage record", "grads/train/epoch_1/integrity.json", False, ("truncate",)),
]
CASES = [pytest.param(path, unfinished, kind, id=f"{name}-{kind}")
         for name, path, unfinished, kinds in ARTIFACTS for kind in kinds]


def _reader_outcome(q) -> None:
    """What a reader makes of the damaged run: a named error, or exactly the right scores."""
    try:
        got = q.scores()
    except (IntegrityError, RuntimeError, FileNotFoundError) as err:
        assert str(q.run_dir) in str(err), f"the error names no file: {err}"
        return
    assert_same_scores(got, q._ref)


@pytest.mark.parametrize("rel,unfinished,kind", CASES)
def test_a_damaged_artifact_is_refused_or_recomputed_never_scored(ref, tmp_path, rel, unfinished, kind):
    q = copy_run(ref, tmp_path / "r")
    q._ref = ref
    (path,) = list(q.run_dir.glob(rel))
    if unfinished:
        unfinish(path.parent)
    damage = flip_text if kind == "flip" and path.suffix in (".json", ".jsonl", ".csv") else DAMAGE[kind]
    damage(path)
    if not unfinished:
        _reader_outcome(q)
    q.run()  # the next run recomputes exactly the damaged piece
    assert_same_scores(q.read_scores(), ref)
    # rollouts are opened by what reads them (run() skips them once NICE's vectors are done): healed there
    pd.testing.assert_frame_equal(q.rollouts(), ref.rollouts())
    assert_sound(q.run_dir)
    assert_same_files(q.run_dir, ref)


def test_a_recomputation_redoes_only_the_damaged_piece(ref, tmp_path, monkeypatch):
    """Issue #20 failure 2: a truncated chunk of an unfinished stage is recomputed, alone."""
    q = copy_run(ref, tmp_path / "r")
    stage_dir = q.run_dir / "grads" / "train" / "epoch_1"
    unfinish(stage_dir)
    truncate(stage_dir / "chunk_00001.safetensors")
    calls = []
    real = stages_mod.projected_gradients

    def counting(model, seqs, n_groups, *a, **k):
        calls.append(n_groups)
        return real(model, seqs, n_groups, *a, **k)

    monkeypatch.setattr(stages_mod, "projected_gradients", counting)
    monkeypatch.setattr(stages_mod, "train_lora", _boom)
    monkeypatch.setattr(stages_mod, "sample_rollouts", _boom)
    q.run()
    assert calls == [8]  # one chunk of 8 pool examples, nothing else
    assert_same_scores(q.read_scores(), ref)


def _boom(*a, **k):
    raise AssertionError("recomputed a piece that was not damaged")


def test_flipped_bytes_in_an_unfinished_chunk_never_reach_the_scores(ref, tmp_path):
    """Issue #20 failure 1: 32 flipped bytes inside a chunk of an unfinished stage gave a LESS score
    of -89.8 with rc 0. Now the chunk's checksum refuses it and the run recomputes it."""
    q = copy_run(ref, tmp_path / "r")
    stage_dir = q.run_dir / "grads" / "train" / "epoch_1"
    unfinish(stage_dir)
    flip(stage_dir / "chunk_00000.safetensors")
    q.run()
    got = q.read_scores()
    assert got["less"].abs().max() <= 1.0 + 1e-6  # a cosine average
    assert_same_scores(got, ref)


def test_the_merge_refuses_rows_that_are_not_unit(tmp_path):
    """Unit rows are checked at merge: a chunk with a valid checksum but rows of norm 3 is refused
    (and removed, so that the next run recomputes it)."""
    stage = Stage(tmp_path, "k")
    good = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    save_tensors({"vectors": good.half(), "norms": torch.ones(4)}, stage.chunk_path(0))
    save_tensors({"vectors": (3 * good).half(), "norms": torch.ones(4)}, stage.chunk_path(1))
    with pytest.raises(IntegrityError, match=r"chunk_00001\.safetensors: row\(s\) \[0, 1, 2, 3\] are not unit"):
        merge_chunks(stage, 8, 4)
    assert not stage.chunk_path(1).exists() and stage.chunk_path(0).exists() and not stage.done
    # a (nearly) zero gradient is normalised by a clamped length: its short row is what was computed
    short = good.clone()
    short[2] *= 0.1
    save_tensors({"vectors": short.half(), "norms": torch.tensor([1.0, 1.0, 1e-13, 1.0])}, stage.chunk_path(1))
    merge_chunks(stage, 8, 4)
    assert stage.done and np.linalg.norm(np.load(stage.path / "vectors.npy")[6].astype(np.float32)) < 0.2


def test_a_truncated_store_names_its_file(ref, tmp_path):
    """Issue #20 failure 2: a truncated vectors.npy said "cannot reshape array of size 12256 into
    shape (24,1024)" and named no file."""
    q = copy_run(ref, tmp_path / "r")
    path = q.run_dir / "grads" / "train" / "epoch_1" / "vectors.npy"
    truncate(path)
    with pytest.raises(IntegrityError, match=r"train/epoch_1/vectors\.npy: .*truncated"):
        q.scores()
    with pytest.raises(IntegrityError, match=r"vectors\.npy: .*truncated"):
        open_vectors(path.parent)
    # the reader changed nothing; the writer re-merges it from its chunks
    assert (path.parent / "DONE").exists() and (path.parent / "integrity.json").exists()
    q.run()
    assert_same_scores(q.read_scores(), ref)


def test_a_flipped_row_block_is_caught_as_it_is_read(ref, tmp_path):
    q = copy_run(ref, tmp_path / "r")
    folder = q.run_dir / "grads" / "train" / "epoch_2"
    stored = open_vectors(folder)
    data = bytearray((folder / "vectors.npy").read_bytes())
    data[stored.offset + 5 * stored.dim * 2 + 7] ^= 0x01  # one bit of row 5: still a unit row, near enough
    (folder / "vectors.npy").write_bytes(bytes(data))
    stored = open_vectors(folder)
    with pytest.raises(IntegrityError, match="changed after they were written"):
        stored.row(5)
    with pytest.raises(IntegrityError, match=r"epoch_2/vectors\.npy"):
        stored.rows(0, len(stored))


def test_stages_made_from_a_checkpoint_that_changed_since_are_refused_and_recomputed(ref, tmp_path, monkeypatch):
    """A warmup checkpoint recomputed with other bytes (another machine, another library version)
    invalidates what was computed from it, though the stages' keys (settings) are unchanged: readers
    refuse them, the next run recomputes exactly that checkpoint's stages."""
    from nice_kit.runs import StaleResultError, file_record

    q = copy_run(ref, tmp_path / "r")
    ckpt_dir = q.run_dir / "warmup" / "epoch_1"
    t = runs_mod.load_tensors(ckpt_dir / "adam_moments.safetensors")
    save_tensors({"exp_avg": t["exp_avg"], "exp_avg_sq": 2 * t["exp_avg_sq"]}, ckpt_dir / "adam_moments.safetensors")
    state = json.loads((ckpt_dir / "state.json").read_text())  # a sound checkpoint, only another one
    state["files"]["adam_moments.safetensors"] = file_record(ckpt_dir / "adam_moments.safetensors")
    (ckpt_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((q.run_dir / "warmup" / "integrity.json").read_text())
    for name in ("adam_moments.safetensors", "state.json"):
        manifest["files"][f"epoch_1/{name}"] = file_record(ckpt_dir / name)
    (q.run_dir / "warmup" / "integrity.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleResultError, match=r"train/epoch_1: training gradients \(epoch 1\) were made from another "
                       r"warmup checkpoint.*\n  adam moments: "):
        q.scores()
    epoch2 = {p: p.stat().st_mtime_ns for p in q.run_dir.glob("grads/*/epoch_2/vectors.npy")}
    q.run()
    assert {p: p.stat().st_mtime_ns for p in q.run_dir.glob("grads/*/epoch_2/vectors.npy")} == epoch2  # untouched
    got = q.read_scores()
    assert not np.allclose(got["less"], ref_scores(ref)["less"], atol=1e-6)  # other moments, other scores
    assert_sound(q.run_dir)


# ------------------------------------------------------------------------------- a run from before
def test_a_run_made_before_checksums_is_reused_after_checking_what_can_be(ref, tmp_path, monkeypatch):
    """A run directory written before this version (no integrity.json, no checksums in the files'
    metadata, plain reward lists, no scores.csv record) is reused without recomputing anything; its
    vector stages get their checksums once their sizes, ids and unit rows pass."""
    q = copy_run(ref, tmp_path / "r")
    for f in q.run_dir.rglob("integrity.json"):
        f.unlink()
    for f in q.run_dir.rglob("rewards_*.json"):
        f.write_text(json.dumps(json.loads(f.read_text())["value"]))
    meta = json.loads((q.run_dir / "scores.json").read_text())
    del meta["scores.csv"]
    (q.run_dir / "scores.json").write_text(json.dumps(meta))
    for f in q.run_dir.glob("warmup/epoch_*/state.json"):
        s = json.loads(f.read_text())
        del s["files"]
        f.write_text(json.dumps(s))
    monkeypatch.setattr(stages_mod, "projected_gradients", _boom)
    monkeypatch.setattr(stages_mod, "train_lora", _boom)
    monkeypatch.setattr(stages_mod, "sample_rollouts", _boom)
    assert_same_scores(q.read_scores(), ref)
    q.run()
    assert_same_scores(q.read_scores(), ref)
    assert all((d / "integrity.json").exists() for d in q.run_dir.glob("grads/*/epoch_*"))


def test_a_damaged_legacy_store_is_recomputed(ref, tmp_path):
    q = copy_run(ref, tmp_path / "r")
    folder = q.run_dir / "grads" / "train" / "epoch_1"
    (folder / "integrity.json").unlink()
    stored = open_vectors(folder)
    data = bytearray((folder / "vectors.npy").read_bytes())
    data[stored.offset: stored.offset + 64] = b"\x00\x7c" * 32  # row 0 now holds infinities
    (folder / "vectors.npy").write_bytes(bytes(data))
    q.run()
    assert_same_scores(q.read_scores(), ref)


# ------------------------------------------------------------------------------------- disk full
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _partial_then_enospc(tensors, filename, metadata=None):
    """A safetensors save that writes part of its file, then runs out of space (as a real full disk does)."""
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_the_warmup_checkpoint(tokenizer, small_data, tmp_path, monkeypatch, ref):
    """Issue #20 failure 6: a full disk gave a raw `No space left on device` traceback from the warmup's
    checkpoint save. Now: a DiskFullError naming the stage and the folder, no half-written
    checkpoint that looks complete, and the next run resumes to the same result."""
    p = make(tokenizer, small_data, tmp_path / "r")
    monkeypatch.setattr(warmup_mod.torch, "save", _enospc)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing warmup checkpoint 1 \(stage "
                       + str(tmp_path / "r" / "warmup").replace("/", ".") + r", folder .*epoch_1"):
        p.warmup()
    monkeypatch.undo()
    warm = p.run_dir / "warmup"
    assert not list(warm.glob("epoch_*")) and not list(warm.glob(".epoch_*")) and not (warm / "DONE").exists()
    p.run()
    assert_same_scores(p.read_scores(), ref)
    assert_sound(p.run_dir)


@pytest.mark.parametrize("where", ["gradient chunk", "merge", "rollout chunk", "scores"])
def test_disk_full_in_each_stage_names_it_and_leaves_nothing_looking_finished(ref, tmp_path, monkeypatch, where):
    q = copy_run(ref, tmp_path / "r")
    target = {"gradient chunk": "grads/train/epoch_1", "merge": "grads/val_less/epoch_2",
              "rollout chunk": "rollouts/epoch_2", "scores": "."}[where]
    stage_dir = (q.run_dir / target).resolve()
    if where == "scores":
        (q.run_dir / "scores.csv").unlink()
    elif where == "rollout chunk":  # NICE's vectors of that epoch need its rollouts again
        unfinish(q.run_dir / "grads" / "val_nice" / "epoch_2")
        for chunk in (q.run_dir / "grads" / "val_nice" / "epoch_2").glob("chunk_*"):
            chunk.unlink()
    if where != "scores":
        unfinish(stage_dir)
        if where != "merge":
            for chunk in stage_dir.glob("chunk_*"):
                chunk.unlink()
    if where == "gradient chunk":
        monkeypatch.setattr(runs_mod, "save_file", _partial_then_enospc)
    elif where == "merge":
        monkeypatch.setattr(vectors_mod, "write_npy_header", _enospc)
    elif where == "rollout chunk":
        real = Path.write_text

        def write_text(self, text, *a, **k):
            if ".chunk_" in self.name:
                real(self, text[: len(text) // 2], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, text, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        real_csv = pd.DataFrame.to_csv

        def to_csv(self, path=None, *a, **k):
            real_csv(self.iloc[: len(self) // 2], path, *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    with pytest.raises(DiskFullError, match="no space left on device") as err:
        q.run()
    assert str(stage_dir if where != "scores" else q.run_dir) in str(err.value)
    assert "run the same command again" in str(err.value)
    assert not (stage_dir / "DONE").exists() or where == "scores"
    assert not [p for p in q.run_dir.rglob(".*tmp*")] and not [p for p in q.run_dir.rglob(".vectors.npy.*")]
    if where == "scores":
        assert not (q.run_dir / "scores.csv").exists()
    monkeypatch.undo()
    q.run()
    assert_same_scores(q.read_scores(), ref)
    assert_sound(q.run_dir)


# ------------------------------------------------------------------------------- kill at each stage
KILL_POINTS = {
    "warmup checkpoint": (warmup_mod, "_save_checkpoint", 2),
    "training gradient chunk": (stages_mod, "save_tensors", 2),
    "merge": (stages_mod, "merge_chunks", 1),
    "rollouts": (stages_mod, "write_rows", 1),
    "validation gradients": (stages_mod, "save_tensors", 7),
    "scores": (stages_mod, "influence_scores", 1),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_at_each_stage_resumes_to_the_same_scores(ref, tokenizer, small_data, tmp_path, monkeypatch,
                                                              point):
    module, name, nth = KILL_POINTS[point]
    real = getattr(module, name)
    calls = {"n": 0}

    def kill(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt  # as kill -INT; the write under way is lost, nothing half-written stays
        return real(*a, **k)

    q = copy_run(ref, tmp_path / "r", leave_out=("grads", "rollouts", "scores.*", "selected*")
                 if point != "warmup checkpoint" else ("*",))
    monkeypatch.setattr(module, name, kill)
    with pytest.raises(KeyboardInterrupt):
        q.run()
    monkeypatch.undo()
    q.run()
    assert_same_scores(q.read_scores(), ref)
    assert_sound(q.run_dir)


# ------------------------------------------------------------------------------ evaluation tables
def test_checkpoint_curve_recomputes_when_the_test_file_content_changes(ref, tmp_path, monkeypatch):
    """Issue #20 failure 3: evaluation.checkpoint_curve reused its cached table after the test file's
    content changed (its key held record ids, not content)."""
    from nice_kit import evaluation

    test = tmp_path / "test.jsonl"
    shutil.copy(ref.cfg.data.target_test, test)
    cfg = tiny_config({"pool": ref.cfg.data.pool, "target_val": ref.cfg.data.target_val, "target_test": str(test)})
    calls = []

    def fake_evaluate(pipeline, records):
        calls.append([r.columns.get("answer") for r in records])
        return {"metric": float(len(calls)), "n_test": len(records), "loss": 1.0}

    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    q = copy_run(ref, tmp_path / "r").sibling(tmp_path / "r", cfg)
    first = evaluation.checkpoint_curve(q)
    assert len(calls) == 3  # base model + 2 checkpoints
    pd.testing.assert_frame_equal(evaluation.checkpoint_curve(q), first)  # cached
    assert len(calls) == 3
    recs = [json.loads(line) for line in test.read_text().splitlines()]
    recs[0]["answer"] = "not the answer"  # same ids, other content
    write_jsonl(test, recs)
    q2 = q.sibling(q.run_dir, cfg)
    evaluation.checkpoint_curve(q2)
    assert len(calls) == 6 and calls[-1][0] == "not the answer"


def test_a_damaged_evaluation_row_is_recomputed_not_reported(ref, tmp_path, monkeypatch):
    from nice_kit import evaluation

    runs = []

    def fake_finetune(pipeline, ids, seed, test):
        runs.append((len(ids), seed))
        return {"metric": 0.25 + 0.01 * seed, "n_test": len(test), "loss": 1.5}

    monkeypatch.setattr(evaluation, "finetune_and_evaluate", fake_finetune)
    q = copy_run(ref, tmp_path / "r")
    first = evaluation.compare(q, methods=["random", "full"], seeds=[0, 1])
    assert len(runs) == 4
    path = q.run_dir / "evaluation" / "results.csv"
    df = pd.read_csv(path, dtype={"key": str, "check": str})
    df.loc[1, "metric"] = 0.99  # a value edited or corrupted after it was written
    df.to_csv(path, index=False)
    again = evaluation.compare(q, methods=["random", "full"], seeds=[0, 1])
    assert len(runs) == 5  # exactly the damaged row was recomputed
    timing = ["cpu_s", "wall_s"]  # how long a training took is not part of its result
    pd.testing.assert_frame_equal(again.drop(columns=timing, errors="ignore"), first.drop(columns=timing, errors="ignore"))
    evaluation.compare(q, methods=["random", "full"], seeds=[0, 1])
    assert len(runs) == 5


# ------------------------------------------------------------------------------------- data errors
def test_a_mapped_column_the_file_lacks_is_an_error(tmp_path):
    """Issue #20 failure 4: `columns = {prompt = "instruction"}` on a pool that has `messages` was
    silently ignored."""
    path = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}])
    with pytest.raises(DataError) as err:
        load_records(path, columns={"prompt": "instruction"})
    text = str(err.value)
    assert str(path) in text and "'instruction'" in text and "data.columns" in text and "['id', 'messages']" in text


def test_max_length_beyond_the_context_is_an_error_or_a_warning(tokenizer, small_data, tmp_path):
    """Issue #20 failure 5: `max_length = 1000000000` ran on without a word."""
    cfg = tiny_config(small_data)
    cfg.data.max_length = 1_000_000_000
    p = Pipeline(cfg, tmp_path / "r", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    with pytest.warns(UserWarning, match=r"max_length = 1000000000 is beyond the context .* \(512 tokens.*the longest "
                      r"sequence of this data has \d+ tokens, so nothing is affected now.*at most 512"):
        p.prepare()  # the data is short: said, not refused
    long = load_records(small_data["pool"])
    long[0].response = "word " * 700  # longer than the tiny model's 512 positions
    pool = write_jsonl(tmp_path / "long.jsonl", [r.to_json() for r in long])
    cfg = tiny_config({**small_data, "pool": str(pool)})
    cfg.data.max_length = 1_000_000_000
    p = Pipeline(cfg, tmp_path / "r2", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    with pytest.raises(DataError, match=r"max_length = 1000000000 is beyond the context .* \(512 tokens.*a sequence "
                       r"of this data has \d+ tokens.*at most 512"):
        p.run()
    assert not (tmp_path / "r2" / "warmup").exists()  # refused before any stage


def test_a_pool_too_small_for_its_fractions_is_warned(tokenizer, small_data, tmp_path):
    """Issue #20 failure 5: a one-example pool ran on without a word."""
    recs = load_records(small_data["pool"])[:1]
    pool = write_jsonl(tmp_path / "one.jsonl", [r.to_json() for r in recs])
    p = make(tokenizer, {**small_data, "pool": str(pool)}, tmp_path / "r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.prepare()
    text = "\n".join(str(w.message) for w in caught)
    assert "warmup trains on 1 example" in text and "the whole pool" in text and str(pool) in text
    pool = write_jsonl(tmp_path / "five.jsonl", [r.to_json() for r in load_records(small_data["pool"])[:5]])
    p = make(tokenizer, {**small_data, "pool": str(pool)}, tmp_path / "r5")
    with pytest.warns(UserWarning, match=r"selection.fraction = 0.1 of a 5-example pool is 0.50 examples: 1 example"):
        p.prepare()
