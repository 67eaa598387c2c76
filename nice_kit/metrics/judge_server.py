"""A minimal OpenAI-compatible chat-completions server backed by a local Hugging Face causal LM.

Enough of the API for :func:`nice_kit.metrics.model_based.llm_judge` (and other OpenAI clients) to talk to
a local model: ``POST /v1/chat/completions`` (also ``/chat/completions``) and ``GET /v1/models``.
Replies are greedy (``temperature`` is ignored), ``max_tokens`` (or ``max_completion_tokens``)
defaults to 16, and requests are answered one generation at a time. It binds to 127.0.0.1 unless
told otherwise. Standard library HTTP only.

    python -m nice_kit.metrics.judge_server --model PATH --port 8000
    # then: get_metric("llm_judge", base_url="http://127.0.0.1:8000/v1", model="PATH")

In Python, ``serve(model_or_path)`` starts it on a background thread and returns
``(server, thread, url)``; stop it with ``server.shutdown(); server.server_close()``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Responder = Callable[[list[dict[str, str]], int], str]

DEFAULT_MAX_TOKENS = 16


class JudgeServer(ThreadingHTTPServer):
    """The HTTP server; ``complete`` produces the replies. Counts requests in ``request_count``."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        model_or_path: Any,
        device: str | None = None,
        api_key: str | None = None,
        model_name: str | None = None,
    ):
        self.api_key = api_key
        self.request_count = 0  # chat-completion requests received, answered or not
        self.requests: list[dict[str, Any]] = []  # their parsed bodies, for inspection
        self._lock = threading.Lock()  # guards the counters
        self._generate_lock = threading.Lock()  # one generation at a time: the model is shared
        if callable(model_or_path):
            # A responder ``(messages, max_tokens) -> text``: a stub judge without a model.
            self._responder: Responder | None = model_or_path
            self.net = self.tokenizer = None
            self.model_name = model_name or getattr(model_or_path, "__name__", "responder")
        else:
            from nice_kit.metrics.model_based import load_cached_model

            self._responder = None
            self.net, self.tokenizer = load_cached_model("causal", str(model_or_path), device)
            self.model_name = model_name or str(model_or_path)
        super().__init__(address, _Handler)

    def complete(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int, str]:
        """(text, prompt_tokens, completion_tokens, finish_reason) of the greedy reply."""
        with self._generate_lock:
            if self._responder is not None:
                return str(self._responder(messages, max_tokens)), 0, 0, "stop"
            from nice_kit.metrics.model_based import generate_chat

            return generate_chat(self.net, self.tokenizer, [messages], max_tokens)[0]


class _Handler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no request log on stderr
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorised(self) -> bool:
        if not self.server.api_key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.server.api_key}".encode())

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            if not self._authorised():
                return self._error(401, "invalid or missing API key", "authentication_error")
            return self._send(
                200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model", "owned_by": "local"}]}
            )
        self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}")
        with self.server._lock:
            self.server.request_count += 1
        if not self._authorised():
            return self._error(401, "invalid or missing API key", "authentication_error")
        try:
            request = json.loads(raw or b"{}")
            messages = request["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError("messages must be a list of objects")
            max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        except (ValueError, KeyError, TypeError) as err:
            return self._error(400, f"bad request: {err}")
        with self.server._lock:
            self.server.requests.append(request)
        try:
            text, prompt_tokens, completion_tokens, finish = self.server.complete(messages, max_tokens)
        except Exception as err:  # the model failed: tell the client instead of dropping the connection
            return self._error(500, f"generation failed: {type(err).__name__}: {err}", "server_error")
        self._send(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model") or self.server.model_name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


def serve(
    model_or_path: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
) -> tuple[JudgeServer, threading.Thread, str]:
    """Start the server on a daemon thread; return ``(server, thread, url)``, url ending in ``/v1``.

    ``model_or_path``: a Hugging Face causal LM name or local path, or a responder function
    ``(messages, max_tokens) -> text`` (a stub judge). ``port=0`` picks a free port. With
    ``api_key`` set, requests must carry ``Authorization: Bearer <api_key>``.
    """
    server = JudgeServer((host, port), model_or_path, device=device, api_key=api_key, model_name=model_name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="judge-server", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, thread, f"http://{shown}:{bound_port}/v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face causal LM name or local path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    parser.add_argument("--api-key-env", default=None, help="require the key in this environment variable as a Bearer token")
    args = parser.parse_args(argv)
    import os

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        parser.error(f"environment variable {args.api_key_env} is not set")
    server, thread, url = serve(args.model, args.host, args.port, device=args.device, api_key=api_key)
    print(f"serving {args.model} at {url}/chat/completions (Ctrl-C to stop)", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
