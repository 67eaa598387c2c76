
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
