#!/usr/bin/env python
"""Generate the bundled ``arith`` benchmark (``data/arith/``) from reasoning-gym, reproducibly.

    python scripts/make_benchmark.py                 # writes data/arith/ with the default seed
    python scripts/make_benchmark.py --out DIR --seed N
    python scripts/make_benchmark.py --scenario verbose_refs   # the second scenario, data/verbose_refs/

Running it twice with the same seed (and the same reasoning-gym version) writes byte-identical files.

Target task "arith": two reasoning-gym subtasks, each prompt asking for the bare answer.

* ``products``: 2 terms, 1-digit factors (0-9). Only 100 distinct questions exist ("a * b" for
  a, b in 0..9). To keep the held-out prompts free of leakage the questions are split by
  *unordered* factor pair, so "7 * 8" and "8 * 7" always land in the same split:
  val gets 7 pairs + 2 squares (16 questions), test 11 pairs + 2 squares (24), the pool the other
  27 pairs + 6 squares (60). **Deviation from 40 test prompts per subtask:** ``products`` has only
  24 test prompts (the minimum allowed), because the pool needs 60 distinct questions.
  The pool holds 115 ``products`` examples on those 60 questions: the 60 correct examples use
  each question once, and the 55 harmful ones (wrong / verbose / bad format) use 55 distinct
  questions among the same 60. Duplicated questions are unavoidable here; every harmful
  ``products`` example therefore has a correct twin in the pool (same prompt, right answer).
* ``basic_arithmetic``: 2 terms, 1-2 digits (reasoning-gym defaults otherwise: + - * /,
  parentheses, negation, "/" is exact integer division). reasoning-gym's question ("Calculate
  5 - 3.") gets " Give only the result as your final answer." appended. All 171 questions used
  (115 pool, 16 val, 40 test) are distinct; questions whose expressions have the same multiset of
  tokens ("3 + 4" / "4 + 3") are kept in the same split.

Pool (310 examples, shuffled; the brief said 320, but its per-kind counts add up to 310): per subtask 60 correct, 30 wrong answers (off by 1, 2 or 10, a
digit swap, or for products a neighbouring times-table entry; never scored above 0 by the task
scorer), 15 verbose (reasoning in sentences, the number never on the first line), 10 bad format
(6 spelled out in words, e.g. "fifty-six"; 4 with the words after the digits, e.g.
"56 (fifty-six)"), plus 80 correct off-task examples, 20 each from letter_counting,
spell_backward, word_sorting and caesar_cipher (answers ASCII and under 40 characters, hence
under 40 tokens).

Note on scoring: reasoning-gym's scorers give partial credit len(answer) / len(completion) when
the reference answer is a substring of the completion, so "56 (fifty-six)" scores about 0.14 and a
verbose response about 0.04 when passed whole. Under the strict first-line extraction (the
completion's first line as the answer) verbose responses score exactly 0; under exact match all
verbose and bad-format responses score 0.

Pool records also carry ``answer`` (the reference answer) and ``metadata`` (reasoning-gym's) as
diagnostic columns, like ``on_task``, ``harmful``, ``harm_kind`` and ``source``: selectors never
read them.

Second scenario, ``--scenario verbose_refs`` (``data/verbose_refs/``, ``configs/verbose_refs.toml``):
designed so that the reference loss and the metric disagree. The same two subtasks and prompts (asking
for the bare result), but every target reference is written in a tutor's verbose style ("Let me work
this out step by step.\n7 times 8 equals 56.\nSo the answer is 56.", the number never on the first
line), so the strict metric (``task_score``, first line) gives every reference 0. Pool (190): per
subtask 25 concise correct, 15 concise wrong, 25 verbose correct, 10 verbose wrong; 40 off-task (10 per
dataset, 3 of them verbose). Val 16 + 16, test 24 + 24 prompts. Pool records add ``style`` (concise /
verbose) and ``correct``; ``harm_kind`` is ``verbose`` for any verbose example, ``wrong_answer`` for a
concise wrong one. The generator checks that every reference scores 0 and every on-task pool response
scores 1 exactly when it is concise and correct.
"""

from __future__ import annotations

import argparse
import enum
import importlib.metadata
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

import reasoning_gym

DEFAULT_SEED = 20250101

PRODUCTS_CFG = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
BASIC_CFG = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)
OFF_TASK_CFGS: dict[str, dict[str, Any]] = {
    "letter_counting": dict(min_words=5, max_words=10),
    "spell_backward": dict(min_word_len=3, max_word_len=8),
    "word_sorting": dict(min_words=3, max_words=4, min_word_length=3, max_word_length=8),
    "caesar_cipher": dict(min_words=3, max_words=5),
}
SUBTASKS = ("products", "basic_arithmetic")
INSTRUCTION = "Give only the result as your final answer."

# per subtask
N_CORRECT, N_WRONG, N_VERBOSE, N_BAD_FORMAT = 60, 30, 15, 10
N_BAD_WORDS_ONLY = 6  # of N_BAD_FORMAT; the rest are "56 (fifty-six)"
N_VAL = 16
N_TEST = {"products": 24, "basic_arithmetic": 40}
N_OFF_TASK_EACH = 20
MAX_OFF_TASK_ANSWER_CHARS = 39  # ASCII: at most one token per character, so < 40 tokens
# products split by unordered factor pair: (non-square pairs, squares)
PRODUCTS_SPLIT = {"val": (7, 2), "test": (11, 2), "pool": (27, 6)}

# ------------------------------------------------------------------------------------------------
# Number words

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for an integer with |n| < 1,000,000, e.g. -56 -> 'minus fifty-six'."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        sep = "" if rest == 0 else (" and " if rest < 100 else " ")
        return number_words(n // 1000) + " thousand" + ("" if rest == 0 else sep + number_words(rest))
    raise ValueError(f"number too large for number_words: {n}")


_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def expression_words(expression: str) -> str:
    """'7 * 8' -> '7 times 8' (numbers stay digits; used inside verbose responses)."""
    return " ".join(_OP_WORDS.get(tok, tok) for tok in expression.split())


# ------------------------------------------------------------------------------------------------
# Helpers


def jsonable(obj: Any) -> Any:
    """reasoning-gym metadata as plain JSON values (tuples -> lists, enums -> values)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def scorer(task: str) -> Callable[[str, dict], float]:
    return reasoning_gym.get_score_answer_fn(task)


def score(task: str, completion: str, answer: str, metadata: dict) -> float:
    return float(scorer(task)(completion, {"answer": answer, "metadata": metadata}))


def on_task_prompt(task: str, question: str) -> str:
    if "only" in question.lower():
        return question
    return f"{question} {INSTRUCTION}"


def token_key(expression: str) -> tuple[str, ...]:
    """Expressions with the same multiset of tokens ('3 + 4', '4 + 3') share a key."""
    return tuple(sorted(re.findall(r"\d+|[^\s\d]", expression)))


# ------------------------------------------------------------------------------------------------
# Harmful responses


def wrong_answer(task: str, entry: dict, rng: random.Random) -> str:
    """A plausible wrong number: off by 1, 2 or 10, a digit swap, or (products) a neighbouring
    times-table entry. Never the truth and never given any credit by the task's scorer."""
    truth = int(entry["answer"])
    cands: set[int] = {truth + d for d in (-10, -2, -1, 1, 2, 10)}
    digits = str(abs(truth))
    for i in range(len(digits) - 1):
        if digits[i] != digits[i + 1]:
            swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
            if not swapped.startswith("0"):
                cands.add(int(swapped) * (-1 if truth < 0 else 1))
    if task == "products":
        a, b = (int(t) for t in entry["metadata"]["expression"].split(" * "))
        cands |= {a * (b + 1), a * (b - 1), (a + 1) * b, (a - 1) * b}
        cands = {c for c in cands if c >= 0}
    valid = sorted(
        c for c in cands
        if c != truth and score(task, str(c), entry["answer"], entry["metadata"]) == 0.0
    )
    if not valid:
        raise RuntimeError(f"no wrong answer for {entry['question']!r}")
    return str(rng.choice(valid))


_VERBOSE_TEMPLATES = [
    "Let me work this out step by step.\n{words} equals {ans}.\nSo the answer is {ans}.",
    "Sure! Let's compute it.\n{expr} = {ans}\nThe final answer is {ans}.",
    "To solve this, I evaluate the expression.\nThe result of {expr} is {ans}.\nAnswer: {ans}",
    "Okay, let me think.\nWe need {words}.\nThat gives {ans}, so the result is {ans}.",
    "Great question! Here is the calculation:\n{expr} = {ans}.\nTherefore the answer is {ans}.",
]


def verbose_answer(task: str, entry: dict, rng: random.Random) -> str:
    expr = entry["metadata"]["expression"]
    tmpl = rng.choice(_VERBOSE_TEMPLATES)
    return tmpl.format(expr=expr, words=expression_words(expr), ans=entry["answer"])


def bad_format_answer(task: str, entry: dict, words_only: bool) -> str:
    words = number_words(int(entry["answer"]))
    if words_only:
        return words
    return f"{entry['answer']} ({words})"


# ------------------------------------------------------------------------------------------------
# Sources


def products_entries(seed: int) -> list[dict]:
    """All 100 distinct 1-digit products questions (first occurrence in reasoning-gym order)."""
    ds = reasoning_gym.create_dataset("products", size=3000, seed=seed, **PRODUCTS_CFG)
    by_expr: dict[str, dict] = {}
    for entry in ds:
        by_expr.setdefault(entry["metadata"]["expression"], entry)
        if len(by_expr) == 100:
            break
    if len(by_expr) != 100:
        raise RuntimeError(f"expected 100 distinct products questions, found {len(by_expr)}")
    return [by_expr[k] for k in sorted(by_expr)]


def split_products(entries: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    pairs: dict[tuple[int, int], list[dict]] = {}
    for e in entries:
        a, b = (int(t) for t in e["metadata"]["expression"].split(" * "))
        pairs.setdefault((min(a, b), max(a, b)), []).append(e)
    squares = sorted(k for k in pairs if k[0] == k[1])
    others = sorted(k for k in pairs if k[0] != k[1])
    rng.shuffle(squares)
    rng.shuffle(others)
    out: dict[str, list[dict]] = {}
    for split, (n_pairs, n_squares) in PRODUCTS_SPLIT.items():
        keys = others[:n_pairs] + squares[:n_squares]
        others, squares = others[n_pairs:], squares[n_squares:]
        out[split] = [e for k in keys for e in sorted(pairs[k], key=lambda e: e["question"])]
        rng.shuffle(out[split])
    assert not others and not squares
    return out


def split_basic(seed: int, rng: random.Random, n_pool: int, n_val: int = N_VAL,
                n_test: int = N_TEST["basic_arithmetic"]) -> dict[str, list[dict]]:
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=1000, seed=seed, **BASIC_CFG)
    groups: dict[tuple[str, ...], list[dict]] = {}
    seen_q: set[str] = set()
    for entry in ds:
        if entry["question"] in seen_q:
            continue
        seen_q.add(entry["question"])
        groups.setdefault(token_key(entry["metadata"]["expression"]), []).append(entry)
    keys = list(groups)  # insertion order: deterministic
    rng.shuffle(keys)
    need = {"val": n_val, "test": n_test, "pool": n_pool}
    out: dict[str, list[dict]] = {k: [] for k in need}
    for split in ("val", "test", "pool"):
        while len(out[split]) < need[split]:
            if not keys:
                raise RuntimeError("not enough distinct basic_arithmetic questions")
            group = groups[keys.pop()]
            # one question per token group, so splits never share commuted expressions
            out[split].append(group[0])
    return out


def off_task_entries(seed: int, n_each: int = N_OFF_TASK_EACH) -> list[dict]:
    out: list[dict] = []
    for i, (task, cfg) in enumerate(OFF_TASK_CFGS.items()):
        ds = reasoning_gym.create_dataset(task, size=200, seed=seed + 100 + i, **cfg)
        got: list[dict] = []
        seen: set[str] = set()
        for entry in ds:
            ans = entry["answer"]
            if entry["question"] in seen or not ans.isascii() or len(ans) > MAX_OFF_TASK_ANSWER_CHARS:
                continue
            if score(task, ans, ans, entry["metadata"]) != 1.0:
                continue
            seen.add(entry["question"])
            got.append(entry)
            if len(got) == n_each:
                break
        if len(got) < n_each:
            raise RuntimeError(f"only {len(got)} usable {task} examples")
        out.extend(got)
    return out


# ------------------------------------------------------------------------------------------------
# Records


def pool_record(task: str, entry: dict, response: str, on_task: bool, harm_kind: str | None) -> dict:
    prompt = on_task_prompt(task, entry["question"]) if on_task else entry["question"]
    return {
        "id": None,  # assigned after shuffling
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        "task": task,
        "source": "reasoning_gym",
        "on_task": on_task,
        "harmful": harm_kind is not None,
        "harm_kind": harm_kind,
        "answer": entry["answer"],
        "metadata": jsonable(entry["metadata"]),
    }


def target_record(split: str, task: str, i: int, entry: dict) -> dict:
    return {
        "id": f"{split}-{task}-{i:03d}",
        "prompt": on_task_prompt(task, entry["question"]),
        "response": entry["answer"],
        "task": task,
        "answer": entry["answer"],
        "metadata": jsonable(entry["metadata"]),
    }


def build(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    splits = {
        "products": split_products(products_entries(seed), rng),
        "basic_arithmetic": split_basic(seed + 1, rng, n_pool=N_CORRECT + N_WRONG + N_VERBOSE + N_BAD_FORMAT),
    }
    pool: list[dict] = []
    for task in SUBTASKS:
        pool_q = splits[task]["pool"]
        if task == "products":
            correct = pool_q[:N_CORRECT]
            harmful_q = rng.sample(pool_q, N_WRONG + N_VERBOSE + N_BAD_FORMAT)
        else:
            correct = pool_q[:N_CORRECT]
            harmful_q = pool_q[N_CORRECT:]
        for e in correct:
            pool.append(pool_record(task, e, e["answer"], True, None))
        wrong = harmful_q[:N_WRONG]
        verbose = harmful_q[N_WRONG:N_WRONG + N_VERBOSE]
        bad = harmful_q[N_WRONG + N_VERBOSE:]
        for e in wrong:
            pool.append(pool_record(task, e, wrong_answer(task, e, rng), True, "wrong_answer"))
        for e in verbose:
            pool.append(pool_record(task, e, verbose_answer(task, e, rng), True, "verbose"))
        for j, e in enumerate(bad):
            pool.append(pool_record(task, e, bad_format_answer(task, e, j < N_BAD_WORDS_ONLY), True, "bad_format"))
    for e in off_task_entries(seed):
        task = e["metadata"]["source_dataset"]
        pool.append(pool_record(task, e, e["answer"], False, None))
    rng.shuffle(pool)
    for i, rec in enumerate(pool, start=1):
        rec["id"] = f"pool-{i:04d}"

    val, test = [], []
    for task in SUBTASKS:
        val += [target_record("val", task, i, e) for i, e in enumerate(splits[task]["val"], start=1)]
        test += [target_record("test", task, i, e) for i, e in enumerate(splits[task]["test"], start=1)]
    return {"pool": pool, "target_val": val, "target_test": test}


def readme(data: dict[str, list[dict]], seed: int) -> str:
    def count(recs: list[dict], **kw: Any) -> int:
        return sum(all(r.get(k) == v for k, v in kw.items()) for r in recs)

    pool, val, test = data["pool"], data["target_val"], data["target_test"]
    off_tasks = list(OFF_TASK_CFGS)
    rows = []
    for task in SUBTASKS:
        rows.append(
            f"| {task} | {count(pool, task=task, harm_kind=None)} | {count(pool, task=task, harm_kind='wrong_answer')} "
            f"| {count(pool, task=task, harm_kind='verbose')} | {count(pool, task=task, harm_kind='bad_format')} "
            f"| {count(val, task=task)} | {count(test, task=task)} |"
        )
    for task in off_tasks:
        rows.append(f"| {task} (off-task) | {count(pool, task=task)} | 0 | 0 | 0 | 0 | 0 |")
    rows.append(f"| **total** | {count(pool, harmful=False)} | {count(pool, harm_kind='wrong_answer')} "
                f"| {count(pool, harm_kind='verbose')} | {count(pool, harm_kind='bad_format')} | {len(val)} | {len(test)} |")
    table = "\n".join(rows)
    return f"""# `arith`: the bundled benchmark

Generated by `scripts/make_benchmark.py` from [reasoning-gym](https://github.com/open-thought/reasoning-gym)
{_rg_version()} with seed {seed}. Regenerate (byte-identical output) with

    python scripts/make_benchmark.py            # same as --out data/arith --seed {DEFAULT_SEED}

Target task: short arithmetic with a bare numeric answer, two subtasks named after their
reasoning-gym datasets: `products` (2 terms, 1-digit factors) and `basic_arithmetic`
(2 terms, 1-2 digits, + - * / with parentheses and negation). Every on-task prompt ends with an
instruction to give only the result.

## Files

- `pool.jsonl`: the training pool to select from, {len(pool)} chat records, shuffled:
  `{{"id", "messages": [user, assistant], "task", "source", "on_task", "harmful", "harm_kind",
  "answer", "metadata"}}`.
- `target_val.jsonl`: {len(val)} target prompts for selection/validation:
  `{{"id", "prompt", "response", "task", "answer", "metadata"}}`; `response` and `answer` are the
  bare reference answer.
- `target_test.jsonl`: {len(test)} held-out prompts for evaluation, same format.

| task | pool correct | pool wrong_answer | pool verbose | pool bad_format | val | test |
|---|---|---|---|---|---|---|
{table}

Harmful kinds (all on-task):

- `wrong_answer`: a plausible wrong number (off by 1, 2 or 10, a digit swap, or for products a
  neighbouring times-table entry); the task scorer gives it 0.
- `verbose`: the right number inside a few sentences of reasoning, never on the first line, e.g.
  "Let me work this out step by step.\\n7 times 8 equals 56.\\nSo the answer is 56.". A strict
  scorer (first line, or exact match) gives 0; reasoning-gym's own scorer on the whole string
  gives small partial credit (len(answer) / len(completion)).
- `bad_format`: the right value spelled out ("fifty-six"), or digits followed by text on the same
  line ("56 (fifty-six)"); exact match gives 0, the task scorer 0 or small partial credit.

Scoring a completion: `reasoning_gym.get_score_answer_fn(task)(completion, {{"answer": answer,
"metadata": metadata}})`; the reference answers score 1.0.

`products` has only 100 distinct questions, split by unordered factor pair ("7 * 8" and "8 * 7"
stay together): val 16, test 24 (not 40), pool 60. The 115 pool examples of `products` reuse
those 60 questions: each harmful one shares its prompt with a correct example. No question of
val or test appears in the pool; `basic_arithmetic` questions are all distinct.

The columns `on_task`, `harmful`, `harm_kind`, `source`, and the pool's `answer` and `metadata`, are
for diagnostics only (plots, checking what a selector picked): selectors never read them.
"""


# ------------------------------------------------------------------------------------------------
# Second scenario: verbose references, a strict metric (data/verbose_refs)
#
# The same two arithmetic subtasks, but the target's reference answers are written in a tutor's
# verbose style ("Let me work this out step by step.\n7 times 8 equals 56.\nSo the answer is 56."),
# while the metric (task_score, strict: the completion's first line is the answer) rewards the bare
# number only. Every reference therefore scores 0 under the metric it is meant to teach: the loss of
# the references (what LESS lowers) and the metric (what NICE raises) disagree by construction.

VERBOSE_SCENARIO = "verbose_refs"
# per subtask: concise correct, concise wrong, verbose correct, verbose wrong
V_CONCISE_CORRECT, V_CONCISE_WRONG, V_VERBOSE_CORRECT, V_VERBOSE_WRONG = 25, 15, 25, 10
V_N_VAL, V_N_TEST = 16, 24  # per subtask
V_OFF_TASK_EACH, V_OFF_TASK_VERBOSE_EACH = 10, 3  # per off-task dataset; the verbose ones among them

_OFF_TASK_VERBOSE_TEMPLATES = [
    "Let me work this out step by step.\nI go through the question carefully.\nSo the answer is {ans}.",
    "Sure! Let's look at it.\nI check each part of the question in turn.\nThe final answer is {ans}.",
    "Okay, let me think.\nI work through it one piece at a time.\nAnswer: {ans}",
]


def strict_first_line(completion: str) -> str:
    """The completion's first line, stripped: what ``task_score`` with ``extract = "strict"`` scores."""
    text = completion.strip()
    return text.splitlines()[0].strip() if text else ""


def verbose_with(entry: dict, ans: str, rng: random.Random) -> str:
    """A verbose response (one of :data:`_VERBOSE_TEMPLATES`) that arrives at ``ans``."""
    expr = entry["metadata"]["expression"]
    return rng.choice(_VERBOSE_TEMPLATES).format(expr=expr, words=expression_words(expr), ans=ans)


def verbose_pool_record(task: str, entry: dict, response: str, on_task: bool, style: str,
                        correct: bool) -> dict:
    """A pool record of the verbose scenario: the first benchmark's fields plus ``style`` and
    ``correct``; ``harm_kind`` is ``verbose`` for every verbose response (its first line never holds
    the answer, so the strict metric gives it 0 whether its number is right or not), ``wrong_answer``
    for a concise wrong one, None otherwise."""
    harm_kind = "verbose" if style == "verbose" else (None if correct else "wrong_answer")
    rec = pool_record(task, entry, response, on_task, harm_kind)
    out = {k: rec[k] for k in ("id", "messages", "task", "source", "on_task", "harmful", "harm_kind")}
    out.update(style=style, correct=correct, answer=rec["answer"], metadata=rec["metadata"])
    return out


def _check_verbose_pool(rec: dict) -> None:
    """On-task: a verbose response scores 0 under the strict metric, a concise one 1 if correct else 0
    (off-task scorers are other tasks' and some give partial credit to any text: not checked)."""
    if not rec["on_task"]:
        return
    task, resp, ans, meta = rec["task"], rec["messages"][-1]["content"], rec["answer"], rec["metadata"]
    strict = score(task, strict_first_line(resp), ans, meta)
    if rec["style"] == "verbose" and strict != 0.0:
        raise RuntimeError(f"verbose response scores {strict} under the strict metric: {resp!r}")
    if rec["style"] == "concise" and strict != float(rec["correct"]):
        raise RuntimeError(f"concise response scores {strict}, correct={rec['correct']}: {resp!r}")


def build_verbose(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    n_pool = V_CONCISE_CORRECT + V_CONCISE_WRONG + V_VERBOSE_CORRECT + V_VERBOSE_WRONG
    products = split_products(products_entries(seed), rng)  # val 16, test 24, pool 60 questions
    basic = split_basic(seed + 1, rng, n_pool=n_pool, n_val=V_N_VAL, n_test=V_N_TEST)
    splits = {"products": products, "basic_arithmetic": basic}
    pool: list[dict] = []
    for task in SUBTASKS:
        q = list(splits[task]["pool"])
        if len(q) < n_pool:  # products: 60 questions for 75 examples; some questions come twice
            q = q + rng.sample(q, n_pool - len(q))
        cut = [V_CONCISE_CORRECT, V_CONCISE_WRONG, V_VERBOSE_CORRECT, V_VERBOSE_WRONG]
        bounds = [sum(cut[:i]) for i in range(len(cut) + 1)]
        cc, cw, vc, vw = (q[bounds[i]:bounds[i + 1]] for i in range(len(cut)))
        for e in cc:
            pool.append(verbose_pool_record(task, e, e["answer"], True, "concise", True))
        for e in cw:
            pool.append(verbose_pool_record(task, e, wrong_answer(task, e, rng), True, "concise", False))
        for e in vc:
            pool.append(verbose_pool_record(task, e, verbose_with(e, e["answer"], rng), True, "verbose", True))
        for e in vw:
            pool.append(verbose_pool_record(task, e, verbose_with(e, wrong_answer(task, e, rng), rng), True,
                                            "verbose", False))
    off = off_task_entries(seed + 2, n_each=V_OFF_TASK_EACH)
    for i, e in enumerate(off):
        task = e["metadata"]["source_dataset"]
        if i % V_OFF_TASK_EACH < V_OFF_TASK_VERBOSE_EACH:
            resp = rng.choice(_OFF_TASK_VERBOSE_TEMPLATES).format(ans=e["answer"])
            pool.append(verbose_pool_record(task, e, resp, False, "verbose", True))
        else:
            pool.append(verbose_pool_record(task, e, e["answer"], False, "concise", True))
    for rec in pool:
        _check_verbose_pool(rec)
    rng.shuffle(pool)
    for i, rec in enumerate(pool, start=1):
        rec["id"] = f"pool-{i:04d}"

    def target(split: str, task: str, i: int, entry: dict) -> dict:
        rec = target_record(split, task, i, entry)
        rec["response"] = verbose_with(entry, entry["answer"], rng)
        if score(task, strict_first_line(rec["response"]), rec["answer"], rec["metadata"]) != 0.0:
            raise RuntimeError(f"a reference scores above 0 under the strict metric: {rec['response']!r}")
        return rec

    val, test = [], []
    for task in SUBTASKS:
        val += [target("val", task, i, e) for i, e in enumerate(splits[task]["val"][:V_N_VAL], start=1)]
        test += [target("test", task, i, e) for i, e in enumerate(splits[task]["test"][:V_N_TEST], start=1)]
    return {"pool": pool, "target_val": val, "target_test": test}


def readme_verbose(data: dict[str, list[dict]], seed: int) -> str:
    def count(recs: list[dict], **kw: Any) -> int:
        return sum(all(r.get(k) == v for k, v in kw.items()) for r in recs)

    pool, val, test = data["pool"], data["target_val"], data["target_test"]
    rows = []
    for task in SUBTASKS:
        rows.append(
            f"| {task} | {count(pool, task=task, style='concise', correct=True)} "
            f"| {count(pool, task=task, style='concise', correct=False)} "
            f"| {count(pool, task=task, style='verbose', correct=True)} "
            f"| {count(pool, task=task, style='verbose', correct=False)} | {count(val, task=task)} "
            f"| {count(test, task=task)} |")
    for task in OFF_TASK_CFGS:
        rows.append(f"| {task} (off-task) | {count(pool, task=task, style='concise')} | 0 "
                    f"| {count(pool, task=task, style='verbose')} | 0 | 0 | 0 |")
    rows.append(f"| **total** | {count(pool, style='concise', correct=True)} "
                f"| {count(pool, style='concise', correct=False)} | {count(pool, style='verbose', correct=True)} "
                f"| {count(pool, style='verbose', correct=False)} | {len(val)} | {len(test)} |")
    table = "\n".join(rows)
    example = next(r for r in val if r["task"] == "products")
    return f"""# `{VERBOSE_SCENARIO}`: verbose references, a strict metric

Generated by `scripts/make_benchmark.py --scenario {VERBOSE_SCENARIO}` from
[reasoning-gym](https://github.com/open-thought/reasoning-gym) {_rg_version()} with seed {seed}.
Regenerate (byte-identical output) with

    python scripts/make_benchmark.py --scenario {VERBOSE_SCENARIO}   # --out data/{VERBOSE_SCENARIO} --seed {DEFAULT_SEED}

**This scenario is designed to show the discrepancy between loss and metric**; it is not a neutral
benchmark. For the case where the references are exactly what the metric rewards (loss and metric
mostly agree) see the first benchmark, `data/arith/`.

The target task is the first benchmark's (`products` and `basic_arithmetic`, every prompt asking
for the bare result), but the **reference answers are written in a tutor's verbose style**, e.g.

    {example["prompt"]}
    -> {json.dumps(example["response"])}

while the metric, `task_score` with `extract = "strict"` (configs/{VERBOSE_SCENARIO}.toml), reads the
completion's first line as the answer: **every reference scores 0 under it** (the generator checks
this). Why this is realistic: reference answers are often written, or generated by a teacher model,
for people (explanations around the answer), while the deployed system parses the answer
automatically (the first line, a bare number, a field a program reads). The reference loss, the proxy
LESS lowers, then rewards data that teaches the explanation; the metric rewards data that teaches the
bare answer.

## Files

- `pool.jsonl`: {len(pool)} chat records to select from, shuffled: `{{"id", "messages": [user, assistant],
  "task", "source", "on_task", "harmful", "harm_kind", "style", "correct", "answer", "metadata"}}`.
- `target_val.jsonl`: {len(val)} target prompts for selection, `{{"id", "prompt", "response", "task",
  "answer", "metadata"}}`: `response` is the verbose reference, `answer` the bare number.
- `target_test.jsonl`: {len(test)} held-out prompts for evaluation, same format.

| task | concise correct | concise wrong | verbose correct | verbose wrong | val | test |
|---|---|---|---|---|---|---|
{table}

- concise: the bare number (correct, or a plausible wrong number: off by 1, 2 or 10, a digit swap,
  a neighbouring times-table entry); the strict metric gives 1 or 0.
- verbose: the references' style, three lines with the number (right or wrong) only after the first
  line; the strict metric gives 0 either way. Off-task verbose examples use the same openings.
- Flags (diagnostics only, never read by a selector): `harm_kind` is `verbose` for every verbose
  example, `wrong_answer` for a concise wrong one, empty otherwise; `harmful` is whether `harm_kind`
  is set; `style` and `correct` give the two axes separately.

Splits as in `data/arith/`: `products` questions split by unordered factor pair (val 16, test 24,
pool 60 questions; the 75 `products` pool examples reuse some of the 60), `basic_arithmetic`
questions all distinct and kept apart from their commuted forms. No val or test question is in the pool.
"""


def _rg_version() -> str:
    # reasoning_gym.__version__ lags the installed distribution (0.1.19 vs 0.1.25), so ask pip's metadata
    try:
        return importlib.metadata.version("reasoning-gym")
    except importlib.metadata.PackageNotFoundError:
        return reasoning_gym.__version__


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


SCENARIOS = {"arith": (build, readme), VERBOSE_SCENARIO: (build_verbose, readme_verbose)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="arith",
                    help=f"which bundled scenario (default arith; {VERBOSE_SCENARIO}: verbose references, strict metric)")
    ap.add_argument("--out", default=None, help="output folder (default data/<scenario>)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")
    args = ap.parse_args(argv)
    out = Path(args.out or f"data/{args.scenario}")
    out.mkdir(parents=True, exist_ok=True)
    build_fn, readme_fn = SCENARIOS[args.scenario]
    data = build_fn(args.seed)
    for name, records in data.items():
        write_jsonl(out / f"{name}.jsonl", records)
    (out / "README.md").write_text(readme_fn(data, args.seed), encoding="utf-8", newline="\n")
    print(f"wrote {out}: pool {len(data['pool'])}, target_val {len(data['target_val'])}, "
          f"target_test {len(data['target_test'])}")


if __name__ == "__main__":
    main()
