"""Metrics backed by models: a reward model and an LLM judge.

Both register themselves in :mod:`nice_kit.metrics.registry` on import (``registry._load_plugins`` imports this
module), so ``get_metric("reward_model", model=...)`` and ``get_metric("llm_judge", ...)`` work like
the built-in metrics. torch and transformers are imported inside the factories only: importing this
module stays cheap.

``reward_model``
    Any Hugging Face ``AutoModelForSequenceClassification`` (name or local path) scores
    prompt + completion. One logit: the logit is the reward. Two or more labels: the softmax
    probability of ``label_index`` (default: the last label).

``llm_judge``
    Pairwise judgement against a baseline answer (AlpacaEval style): win 1, draw 0.5, loss 0. Each
    completion is judged twice, once as answer A and once as answer B, and the two rewards are
    averaged to cancel the judge's position bias, so a reward is one of 0, 0.25, 0.5, 0.75, 1. The
    judge is either an OpenAI-compatible chat-completions endpoint (``base_url``; vLLM, llama.cpp's
    server, :mod:`nice_kit.metrics.judge_server`, OpenAI itself) or a local causal LM (``local_model``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from nice_kit.metrics.registry import Metric, register_metric

# (kind, model name or path, device, dtype) -> (model, tokenizer)
_MODEL_CACHE: dict[tuple, tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every model loaded by the metrics in this module (frees their memory)."""
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _resolve_dtype(dtype: Any, device: str):
    """None: float32 on the CPU, the checkpoint's own dtype elsewhere."""
    import torch

    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    return dtype


def load_cached_model(kind: str, model: str, device: str | None, dtype: Any = None) -> tuple[Any, Any]:
    """Load (and cache) a model of ``kind`` ('seq_cls' or 'causal') with its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    key = (kind, str(model), device, str(torch_dtype))
    with _CACHE_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        cls = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        net = cls.from_pretrained(str(model), dtype=torch_dtype).to(device)
        net.eval()
        if kind == "seq_cls":
            # Batched scoring pads on the right and the model pools its rightmost non-pad token, so
            # the tokenizer's pad id and the model's pad id must agree.
            model_pad = net.config.pad_token_id
            if model_pad is not None:
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(model_pad))
            else:
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
                net.config.pad_token_id = tokenizer.pad_token_id
            tokenizer.padding_side = "right"
        else:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"  # generation continues from the right end
        _MODEL_CACHE[key] = (net, tokenizer)
        return net, tokenizer


# ----------------------------------------------------------------------------------------------
# Reward model


def format_pair(tokenizer: Any, prompt: str, completion: str, use_chat_template: bool = True) -> tuple[str, bool]:
    """The text a reward model reads for (prompt, completion), and whether it came from the chat template.

    With ``use_chat_template`` and a tokenizer that has a chat template, the pair is a user turn and
    an assistant turn in that template; otherwise it is ``"prompt\\n\\ncompletion"``.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        except Exception:  # a template that rejects this conversation shape: fall back to plain text
            pass
    return f"{prompt}\n\n{completion}", False


class RewardModelMetric:
    """``reward_model`` metric: a sequence-classification model's score of prompt + completion.

    Texts longer than ``max_length`` tokens are cut on the right. Batches are padded on the right and
    the model pools its rightmost non-pad token, so scores do not depend on ``batch_size``.
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        max_length: int = 512,
        device: str | None = None,
        label_index: int | None = None,
        use_chat_template: bool = True,
        dtype: Any = None,
    ):
        if not model:
            raise ValueError("reward_model needs model: a Hugging Face model name or a local path")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_name = str(model)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.label_index = label_index
        self.use_chat_template = use_chat_template
        self.net, self.tokenizer = load_cached_model("seq_cls", self.model_name, device, dtype)
        self.device = next(self.net.parameters()).device
        self.num_labels = int(self.net.config.num_labels)
        if self.num_labels == 1:
            if label_index not in (None, 0, -1):
                raise ValueError(f"model {self.model_name!r} has a single logit; label_index must be None or 0")
        elif label_index is not None and not -self.num_labels <= label_index < self.num_labels:
            raise ValueError(f"label_index {label_index} out of range for {self.num_labels} labels")

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        return [format_pair(self.tokenizer, p, c, self.use_chat_template)[0] for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        formatted = [format_pair(self.tokenizer, p, c, self.use_chat_template) for p, c in zip(prompts, completions)]
        texts = [text for text, _ in formatted]
        templated = bool(formatted) and formatted[0][1]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                    add_special_tokens=not templated,  # the chat template already holds them
                ).to(self.device)
                logits = self.net(**batch).logits.float()
                if self.num_labels == 1:
                    scores = logits[:, 0]
                else:
                    idx = -1 if self.label_index is None else self.label_index
                    scores = torch.softmax(logits, dim=-1)[:, idx]
                out.extend(float(s) for s in scores.cpu())
        return out

    def __repr__(self) -> str:
        return f"RewardModelMetric(model={self.model_name!r}, device={str(self.device)!r})"


@register_metric(
    "reward_model",
    "Score of a Hugging Face sequence-classification reward model (name or local path) on prompt + "
    "completion, formatted with the tokenizer's chat template when it has one. A single-logit model "
    "gives its logit; a model with 2+ labels gives the softmax probability of label_index (default "
    "the last label). Needs no reference.",
)
def reward_model(
    model: str = "",
    batch_size: int = 8,
    max_length: int = 512,
    device: str | None = None,
    label_index: int | None = None,
    use_chat_template: bool = True,
    dtype: str | None = None,
) -> Metric:
    return RewardModelMetric(model, batch_size, max_length, device, label_index, use_chat_template, dtype)


# ----------------------------------------------------------------------------------------------
# Local generation, shared by the local judge backend and nice_kit.metrics.judge_server


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, ready for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages) + "\n\nassistant:"
    return tokenizer(text)["input_ids"]


def generate_chat(
    net: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int = 16
) -> list[tuple[str, int, int, str]]:
    """Greedy replies to each conversation, one at a time: (text, prompt_tokens, completion_tokens, finish_reason)."""
    import torch

    device = next(net.parameters()).device
    eos = tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for messages in conversations:
            ids = chat_prompt_ids(tokenizer, messages)
            input_ids = torch.tensor([ids], device=device)
            generated = net.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max(1, int(max_new_tokens)),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            )
            new = generated[0, len(ids) :].tolist()
            finish = "length"
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
                finish = "stop"
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append((text, len(ids), len(new), finish))
    return out


# ----------------------------------------------------------------------------------------------
# LLM judge

JUDGE_SYSTEM = (
    "You are a careful, impartial judge. You compare two answers to a user's question and say which "
    "one answers it better: more helpful, correct, relevant and clear. The order of the answers and "
    "their length must not influence you."
)

JUDGE_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Answer A]\n{answer_a}\n[The End of Answer A]\n\n"
    "[The Start of Answer B]\n{answer_b}\n[The End of Answer B]\n\n"
    'Which answer better answers the user\'s question? Reply with exactly "A", "B" or "tie", and nothing else.'
)

_ANSWER_BLOCK = re.compile(r"\[The Start of Answer ([AB])\]\n(.*?)\n\[The End of Answer \1\]", re.S)


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to compare answer A and answer B to ``question``."""
    user = JUDGE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judged_answers(messages: list[dict[str, str]]) -> dict[str, str]:
    """Answers A and B back out of judge messages (for stub judges and inspection)."""
    text = "\n".join(m.get("content", "") for m in messages if m.get("role") == "user")
    return {label: body for label, body in _ANSWER_BLOCK.findall(text)}


_EXACT = re.compile(r"^[\s\"'`*_.:()\[\]]*(A|B|tie)[\s\"'`*_.!:()\[\]]*$", re.I)
_LABELLED = re.compile(r"\b(?i:answer|verdict|winner)\s*(?i:is\s*)?[:\-]?\s*[\"'*(\[]*\s*(A|B|(?i:tie))\b")
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(A|B|[Tt][Ii][Ee])(?![A-Za-z0-9])")


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B', 'tie', or None when the reply names none of them.

    Tried in order: the whole reply is the verdict (``"B"``, ``"**tie**."``); a labelled verdict
    (``"Answer: B"``, ``"the winner is A"``); the first token that is ``A``, ``B`` (upper case, so the
    article "a" is not read as a verdict) or ``tie`` (any case).
    """
    if not text:
        return None
    for pattern in (_EXACT, _LABELLED, _TOKEN):
        found = pattern.search(text.strip())
        if found:
            verdict = found.group(1)
            return "tie" if verdict.lower() == "tie" else verdict.upper()
    return None


_WIN_AS_A = {"A": 1.0, "B": 0.0, "tie": 0.5, None: 0.5}
_WIN_AS_B = {"A": 0.0, "B": 1.0, "tie": 0.5, None: 0.5}


class JudgeError(RuntimeError):
    """The judge endpoint failed (after its retries) or answered something that is not a chat completion."""


class HTTPJudgeBackend:
    """POSTs chat-completion requests to an OpenAI-compatible endpoint with the standard library."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        max_tokens: int = 8,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or "default"
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.max_tokens = int(max_tokens)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                problem = f"HTTP {err.code} {err.reason}: {detail}"
                if err.code in (400, 401, 403, 404, 422):  # retrying will not help
                    hint = ""
                    if err.code in (401, 403):
                        state = "is set" if self.api_key_env and os.environ.get(self.api_key_env) else "is not set"
                        hint = f" (the API key comes from the environment variable {self.api_key_env!r}, which {state})"
                    raise JudgeError(f"judge endpoint {self.url} refused the request: {problem}{hint}") from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                return json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"not a chat-completion response: {raw[:200].decode('utf-8', 'replace')!r}"
                continue
        raise JudgeError(f"judge endpoint {self.url} failed after {self.max_retries + 1} attempts; last error: {problem}")

    def complete_many(self, conversations: list[list[dict[str, str]]], concurrency: int = 1) -> list[str]:
        if concurrency <= 1 or len(conversations) <= 1:
            return [self.complete(m) for m in conversations]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(self.complete, conversations))

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPJudgeBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


class LocalJudgeBackend:
    """A local Hugging Face causal LM that writes the verdict greedily."""

    def __init__(self, local_model: str, device: str | None = None, max_tokens: int = 8, dtype: Any = None):
        self.model_name = str(local_model)
        self.net, self.tokenizer = load_cached_model("causal", self.model_name, device, dtype)
        self.max_tokens = int(max_tokens)

    def complete(self, messages: list[dict[str, str]]) -> str:
        return self.complete_many([messages])[0]

    def complete_many(self, conversations: list[list[dict[str, str]]], concurrency: int = 1) -> list[str]:
        return [r[0] for r in generate_chat(self.net, self.tokenizer, conversations, self.max_tokens)]

    def __repr__(self) -> str:
        return f"LocalJudgeBackend(local_model={self.model_name!r})"


class LLMJudgeMetric:
    """``llm_judge`` metric: pairwise judgement of each completion against a baseline answer.

    After each call: ``last_verdicts`` holds (verdict with the completion as A, verdict with the
    completion as B) per completion, ``last_replies`` the judge's raw replies in the same shape.
    Counters over the metric's life: ``judgements`` (judge calls) and ``unparsed`` (replies naming
    neither A, B nor tie; each is scored as a tie).
    """

    def __init__(self, backend: Any, baseline_column: str = "response", concurrency: int = 1):
        self.backend = backend
        self.baseline_column = baseline_column
        self.concurrency = int(concurrency)
        self.judgements = 0
        self.unparsed = 0
        self.last_verdicts: list[tuple[str | None, str | None]] = []
        self.last_replies: list[tuple[str, str]] = []

    def _baselines(self, columns: dict[str, Any], n: int) -> list[str]:
        for name in dict.fromkeys((self.baseline_column, "baseline")):
            if columns.get(name) is not None:
                values = list(columns[name])
                if len(values) != n:
                    raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
                return ["" if v is None else str(v) for v in values]
        raise KeyError(
            f"metric 'llm_judge' needs a baseline answer per prompt in the column {self.baseline_column!r} "
            f"(or 'baseline'); the records have {sorted(columns)}"
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        baselines = self._baselines(columns, n)
        conversations = []
        for prompt, completion, baseline in zip(prompts, completions, baselines):
            conversations.append(judge_messages(prompt, completion, baseline))  # completion is A
            conversations.append(judge_messages(prompt, baseline, completion))  # completion is B
        replies = self.backend.complete_many(conversations, concurrency=self.concurrency)
        verdicts = [parse_verdict(r) for r in replies]
        self.judgements += len(replies)
        self.unparsed += sum(v is None for v in verdicts)
        self.last_replies = list(zip(replies[0::2], replies[1::2]))
        self.last_verdicts = list(zip(verdicts[0::2], verdicts[1::2]))
        return [(_WIN_AS_A[a] + _WIN_AS_B[b]) / 2 for a, b in self.last_verdicts]

    def __repr__(self) -> str:
        return f"LLMJudgeMetric({self.backend!r}, baseline_column={self.baseline_column!r})"


@register_metric(
    "llm_judge",
    "Pairwise LLM judge against a baseline answer (column baseline_column, default 'response', or "
    "'baseline'): win 1, draw 0.5, loss 0, judged with the completion as answer A and as answer B and "
    "averaged (0, 0.25, 0.5, 0.75 or 1). The judge is an OpenAI-compatible endpoint (base_url, model; "
    "API key from the environment variable api_key_env) or a local causal LM (local_model). Unparseable "
    "verdicts count as ties and are counted in metric.unparsed.",
    needs_reference=True,
)
def llm_judge(
    base_url: str | None = None,
    model: str | None = None,
    local_model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    timeout_s: float = 60.0,
    max_retries: int = 3,
    retry_backoff_s: float = 1.0,
    baseline_column: str = "response",
    max_tokens: int = 8,
    concurrency: int = 4,
    device: str | None = None,
) -> Metric:
    if bool(base_url) == bool(local_model):
        raise ValueError("llm_judge needs exactly one judge: base_url (an OpenAI-compatible endpoint) or local_model")
    if base_url:
        backend: Any = HTTPJudgeBackend(base_url, model, api_key_env, timeout_s, max_retries, retry_backoff_s, max_tokens)
    else:
        backend = LocalJudgeBackend(local_model, device=device, max_tokens=max_tokens)
    return LLMJudgeMetric(backend, baseline_column=baseline_column, concurrency=concurrency)


def judge_with(complete: Callable[[list[dict[str, str]]], str], baseline_column: str = "response") -> LLMJudgeMetric:
    """An ``llm_judge`` metric over any function ``messages -> reply`` (a stub, another client...)."""

    class _FunctionBackend:
        def complete_many(self, conversations, concurrency=1):
            return [complete(m) for m in conversations]

    return LLMJudgeMetric(_FunctionBackend(), baseline_column=baseline_column)
