"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks enough of the protocol for the real ``openai`` client:
``POST /v1/chat/completions`` answering with a ``chat.completion`` object or
an OpenAI-style error body. Replies are scripted per model: each request for
a model takes the next :class:`Reply` from its script, and the last one
repeats. A reply can be delayed, or hang until :meth:`FakeLLM.release` or
:meth:`FakeLLM.stop`. Every request is recorded.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    content: str | None = ""
    reasoning_content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_sec: float = 0.0
    hang: bool = False
    choices: bool = True  # False answers with an empty ``choices`` list

    @staticmethod
    def opinion(
        tier: int = 1,
        direction: str = "long_bias",
        conviction: int = 70,
        rationale: str = "15m trend is clean",
        watch_for: str = "a close back under the 21 EMA",
        **kwargs: Any,
    ) -> Reply:
        body = {
            "recommended_tier": tier,
            "recommended_direction": direction,
            "conviction": conviction,
            "rationale": rationale,
            "watch_for": watch_for,
        }
        return Reply(content=json.dumps(body), **kwargs)

    @staticmethod
    def error(status: int, message: str = "scripted failure", **kwargs: Any) -> Reply:
        return Reply(content=message, status=status, **kwargs)


@dataclass
class Recorded:
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float


class FakeLLM:
    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply.opinion()
        self.requests: list[Recorded] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # control ------------------------------------------------------------------

    def script(self, model: str, replies: Reply | Iterable[Reply]) -> None:
        """Replies for ``model``, in order; the last one repeats."""
        items = [replies] if isinstance(replies, Reply) else list(replies)
        with self._lock:
            self._scripts[model] = items

    def release(self) -> None:
        """Let every hanging reply finish (with its scripted answer)."""
        self._release.set()

    def calls(self, model: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if model is None or r.model == model]

    def _next(self, model: str) -> Reply:
        with self._lock:
            script = self._scripts.get(model)
            if not script:
                return self.default
            return script.pop(0) if len(script) > 1 else script[0]

    # server -------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                model = str(body.get("model"))
                with fake._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.requests.append(Recorded(model, body, headers, time.monotonic()))
                reply = fake._next(model)
                if reply.hang:
                    fake._release.wait()
                elif reply.delay_sec:
                    fake._release.wait(reply.delay_sec)
                if reply.status != 200:
                    error = {"error": {"message": reply.content or "error", "type": "scripted", "code": reply.status}}
                    self._send(reply.status, error, reply.headers)
                    return
                message: dict[str, Any] = {"role": "assistant", "content": reply.content}
                if reply.reasoning_content is not None:
                    message["reasoning_content"] = reply.reasoning_content
                choices = [{"index": 0, "message": message, "finish_reason": "stop"}] if reply.choices else []
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{next(fake._ids)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": choices,
                        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                    },
                    reply.headers,
                )

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): nothing to answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._release.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeLLM:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


def main() -> None:
    """Serve from the command line (for benchmarks and manual runs): every answer after ``--delay`` seconds."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    fake = FakeLLM(Reply.opinion(delay_sec=args.delay))
    print(fake.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
