import pytest

from nice_kit.runs import fingerprint, open_stage, parse_shard, shard_chunks


def test_stage_is_kept_when_inputs_match_and_reset_when_they_change(tmp_path):
    s = open_stage(tmp_path / "st", {"a": 1})
    (s.path / "chunk_00000.safetensors").write_text("x")
    s.mark_done()
    again = open_stage(tmp_path / "st", {"a": 1})
    assert again.done and (again.path / "chunk_00000.safetensors").exists()
    changed = open_stage(tmp_path / "st", {"a": 2})
    assert not changed.done and not (changed.path / "chunk_00000.safetensors").exists()
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_shards_partition_the_chunks():
    every = shard_chunks(103, 10)
    assert [c[0] for c in every] == list(range(11)) and every[-1] == (10, 100, 103)
    parts = [shard_chunks(103, 10, (i, 3)) for i in range(3)]
    assert sorted(c for p in parts for c in p) == every
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1-2", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
