import json

import pytest

from conftest import write_jsonl
from nice_kit.data import IGNORE_INDEX, DataError, collate, load_records, save_records, tokenize_pair, tokenize_records

GOOD = [
    {"id": "a", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "task": "t"},
    {"id": 7, "prompt": "3+3?", "response": "6", "harmful": True},
]


def test_both_formats_and_extra_columns_kept(tmp_path):
    recs = load_records(write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert [r.id for r in recs] == ["a", "7"]
    assert recs[0].prompt == "2+2?" and recs[0].response == "4" and recs[0].columns == {"task": "t"}
    assert recs[1].messages == [{"role": "user", "content": "3+3?"}] and recs[1].columns == {"harmful": True}
    save_records(recs, tmp_path / "out.jsonl")
    again = load_records(tmp_path / "out.jsonl")
    assert [(r.id, r.messages, r.response, r.columns) for r in again] == [(r.id, r.messages, r.response, r.columns) for r in recs]


def test_multi_turn_chat_keeps_history(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    (rec,) = load_records(write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "messages": msgs}]))
    assert rec.messages == msgs[:-1] and rec.response == "4"


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "prompt": "x", "response": "y"', "malformed JSON"),
    ('{"prompt": "x", "response": "y"}', "missing field 'id'"),
    ('{"id": "b", "response": "y"}', "needs either 'messages' or 'prompt'"),
    ('{"id": "b", "prompt": "x", "response": "   "}', "the response is empty"),
    ('{"id": "b", "prompt": "x"}', "missing the response"),
    ('{"id": "a", "prompt": "x", "response": "y"}', "duplicate id 'a' (first seen on line 1)"),
    ('[1, 2]', "expected a JSON object"),
    ('{"id": "b", "messages": [{"role": "assistant", "content": "y"}]}', "must be a 'user' message"),
    ('{"id": "b", "messages": [{"role": "user"}]}', "messages[0] must be an object"),
    ('{"id": "", "prompt": "x", "response": "y"}', "'id' must be a non-empty"),
])
def test_bad_input_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], line])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl")


def test_label_free_targets_need_no_response(tmp_path):
    (rec,) = load_records(write_jsonl(tmp_path / "t.jsonl", [{"id": "q", "prompt": "x"}]), require_response=False)
    assert rec.response is None


def test_prompt_is_masked_out_of_the_loss(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    t = tokenize_pair(tokenizer, msgs, "4", max_length=128)
    n_prompt = len(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert all(l == IGNORE_INDEX for l in t.labels[:n_prompt])
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert tokenizer.decode(t.input_ids[n_prompt:]) == "4" + tokenizer.eos_token
    assert not t.truncated


def test_truncation_is_counted_and_keeps_the_response(tokenizer, tmp_path):
    long_prompt = "word " * 200
    recs = load_records(write_jsonl(tmp_path / "p.jsonl", [{"id": "l", "prompt": long_prompt, "response": "42"}, GOOD[0]]))
    toks, n_truncated = tokenize_records(tokenizer, recs, max_length=48)
    assert n_truncated == 1 and len(toks[0].input_ids) == 48 and toks[0].n_response_tokens >= 2
    assert tokenizer.decode([x for x in toks[0].labels if x != IGNORE_INDEX]).startswith("42")


def test_collate_pads_right_and_ignores_padding(tokenizer):
    a = tokenize_pair(tokenizer, [{"role": "user", "content": "hi"}], "a much longer answer here", 64)
    b = tokenize_pair(tokenizer, [{"role": "user", "content": "hi"}], "x", 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(b.input_ids)
    assert batch["attention_mask"][1].sum() == n and (batch["labels"][1, n:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------------
# Encodings (hostile-input probe, issue 7 item 16)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "x", "response": "y"}\n{"id": "b", "prompt": "caf\xe9", "response": "y"}\n')
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: not valid UTF-8 (byte 0xe9" in str(err.value)


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n" + json.dumps(GOOD[1]).encode() + b"\n")
    recs = load_records(path)
    assert [r.id for r in recs] == ["a", "7"] and recs[0].response == "4"


def test_a_lone_surrogate_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD[0], '{"id": "b", "prompt": "x\\ud800y", "response": "z"}'])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: a string holds a lone UTF-16 surrogate" in str(err.value)
    # a proper pair is one character and loads
    path = write_jsonl(tmp_path / "pair.jsonl", ['{"id": "b", "prompt": "smile \\ud83d\\ude00", "response": "z"}'])
    assert load_records(path)[0].prompt == "smile \U0001F600"


def test_records_remember_where_they_were_read(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD[0], "", GOOD[1]])
    a, b = load_records(path)
    assert (a.origin, a.line, b.origin, b.line) == (f"{path}:1", 1, f"{path}:3", 3)
    assert "origin" not in a.to_json() and a == load_records(path)[0]


# ---------------------------------------------------------------------------------------------------
# Parquet, datasets folders and column mappings (issue 8 item 6)

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "task": "t"},
    {"id": "b", "prompt": "3+3?", "response": "6", "task": "u"},
]


def as_tuples(records):
    return [(r.id, r.messages, r.response, r.columns) for r in records]


def table(rows):
    """An Arrow table with every row's columns, null where a row lacks one (as tables are)."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])


def test_parquet_reads_like_jsonl(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(table(ROWS), tmp_path / "pool.parquet")  # nulls where a row lacks a column
    recs = load_records(tmp_path / "pool.parquet")
    assert as_tuples(recs) == as_tuples(load_records(write_jsonl(tmp_path / "pool.jsonl", ROWS)))
    assert (recs[1].origin, recs[1].line) == (f"{tmp_path / 'pool.parquet'}: row 1", 1)
    bad = ROWS + [{"id": "c", "prompt": "x", "response": " ", "task": "t"}]
    pq.write_table(table(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad.parquet'}: row 2 \(id c\): the response is empty"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_records(tmp_path / "broken.parquet")


def save_like_datasets(folder, rows, shards=2):
    """A folder as datasets.Dataset.save_to_disk writes it: Arrow stream shards listed in state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    data = table(rows)
    names = []
    per = -(-len(rows) // shards)
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data.slice(s * per, per))
        names.append(name)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "f", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return folder


def test_a_folder_saved_by_datasets(tmp_path):
    rows = ROWS + [{"id": f"x{i}", "prompt": f"{i}+1?", "response": str(i + 1), "task": "t"} for i in range(3)]
    folder = save_like_datasets(tmp_path / "pool", rows)
    assert as_tuples(load_records(folder)) == as_tuples(load_records(write_jsonl(tmp_path / "pool.jsonl", rows)))
    # a DatasetDict with one split is read as that split; with several, the user picks one
    (tmp_path / "dd").mkdir()
    save_like_datasets(tmp_path / "dd" / "train", rows, shards=1)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert [r.id for r in load_records(tmp_path / "dd")] == [r["id"] for r in rows]
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="give the folder of one split"):
        load_records(tmp_path / "dd")
    dup = save_like_datasets(tmp_path / "dup", rows + [{"id": "a", "prompt": "q", "response": "r"}])
    with pytest.raises(DataError, match=rf"{dup}: row 5: duplicate id 'a' \(first seen in row 0\)"):
        load_records(dup)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets' save_to_disk"):
        load_records(tmp_path / "plain")


def test_column_mapping(tmp_path):
    alpaca = [{"idx": 1, "instruction": "2+2?", "output": "4", "label": "4"},
              {"idx": 2, "instruction": "3+3?", "output": "6", "label": "6"}]
    mapping = {"id": "idx", "prompt": "instruction", "response": "output", "answer": "label"}
    recs = load_records(write_jsonl(tmp_path / "a.jsonl", alpaca), columns=mapping)
    assert [(r.id, r.prompt, r.response, r.columns) for r in recs] == [("1", "2+2?", "4", {"answer": "4"}),
                                                                       ("2", "3+3?", "6", {"answer": "6"})]
    sharegpt = [{"key": "s1", "conversations": [{"from": "system", "value": "be brief"},
                                                {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (rec,) = load_records(write_jsonl(tmp_path / "s.jsonl", sharegpt), columns={"id": "key", "messages": "conversations"})
    assert rec.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert rec.response == "hello"
    with pytest.raises(DataError, match=r"a.jsonl:1: no column 'key' \(read as 'id'\) named in the column mapping"):
        load_records(tmp_path / "a.jsonl", columns={"id": "key", "prompt": "instruction", "response": "output"})
    both = [{"id": "1", "prompt": "p", "instruction": "i", "response": "r"}]
    with pytest.raises(DataError, match="also has a column 'prompt'"):
        load_records(write_jsonl(tmp_path / "b.jsonl", both), columns={"prompt": "instruction"})
    import pyarrow.parquet as pq

    pq.write_table(table(alpaca), tmp_path / "a.parquet")
    assert as_tuples(load_records(tmp_path / "a.parquet", columns=mapping)) == as_tuples(recs)


def test_digest_of_a_file_and_of_a_folder(tmp_path):
    from nice_kit.data import file_digest

    folder = save_like_datasets(tmp_path / "pool", ROWS, shards=1)
    before = file_digest(folder)
    assert before == file_digest(folder) and len(before) == 16
    save_like_datasets(tmp_path / "other", ROWS[:1], shards=1)
    assert file_digest(tmp_path / "other") != before
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert file_digest(path) != file_digest(write_jsonl(tmp_path / "q.jsonl", ROWS[:1]))


def test_a_mapped_column_missing_from_the_file_names_file_mapping_and_columns(tmp_path):
    """Issue #20 failure 4: a mapping naming a column the file lacks was silently ignored when the
    rows had another way in (``messages``), in JSONL, Parquet and datasets folders alike."""
    import pyarrow.parquet as pq

    chat = [{"id": "a", "messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    with pytest.raises(DataError) as err:
        load_records(path, columns={"prompt": "instruction"})
    assert str(err.value) == (f"{path}: the column mapping data.columns = {{'prompt': 'instruction'}} names column(s) "
                              "the file does not have (prompt = 'instruction'); the file has columns ['id', 'messages']")
    pq.write_table(table(chat), tmp_path / "chat.parquet")
    with pytest.raises(DataError, match=r"chat.parquet: the column mapping .* \(prompt = 'instruction'\); the file has "
                                        r"columns \['id', 'messages'\]"):
        load_records(tmp_path / "chat.parquet", columns={"prompt": "instruction"})
    folder = save_like_datasets(tmp_path / "ds", chat, shards=1)
    with pytest.raises(DataError, match=r"ds: the column mapping .* the file has columns \['id', 'messages'\]"):
        load_records(folder, columns={"prompt": "instruction"})
    # a mapped column that some rows have is fine (JSONL rows may differ)
    mixed = [{"id": "b", "instruction": "3+3", "response": "6"}, *chat]
    assert len(load_records(write_jsonl(tmp_path / "mixed.jsonl", mixed), columns={"prompt": "instruction"})) == 2


def test_parquet_and_datasets_messages_list_the_columns_found(tmp_path):
    """Issue #20 failure 4: "row 0: missing field 'id'" listed no columns and said nothing of data.columns."""
    import pyarrow.parquet as pq

    alpaca = [{"idx": "a", "instruction": "2+2", "output": "4"}, {"idx": "b", "instruction": "3+3", "output": "6"}]
    pq.write_table(table(alpaca), tmp_path / "a.parquet")
    with pytest.raises(DataError) as err:
        load_records(tmp_path / "a.parquet")
    assert str(err.value).startswith(f"{tmp_path / 'a.parquet'}: row 0: missing field 'id'; the row has columns "
                                     "['idx', 'instruction', 'output']; map your column names with data.columns")
    folder = save_like_datasets(tmp_path / "ds", alpaca)
    with pytest.raises(DataError, match=r"ds: row 0: missing field 'id'; the row has columns \['idx', 'instruction', "
                                        r"'output'\]; map your column names with data.columns"):
        load_records(folder)
    with pytest.raises(DataError, match=r"row 0 \(id a\): needs either 'messages' or 'prompt' .*; the row has columns "
                                        r"\['idx', 'instruction', 'output'\]; map .* data.columns"):
        load_records(folder, columns={"id": "idx"})
    with pytest.raises(DataError, match=r"row 0 \(id a\): missing the response .*the row has columns \['idx', "
                                        r"'instruction', 'output'\]"):
        load_records(tmp_path / "a.parquet", columns={"id": "idx", "prompt": "instruction"})
    got = load_records(tmp_path / "a.parquet", columns={"id": "idx", "prompt": "instruction", "response": "output"})
    assert [r.response for r in got] == ["4", "6"]
