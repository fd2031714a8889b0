"""A scriptable local OpenAI-compatible chat-completions server, for tests and benchmarks.

Real HTTP (stdlib `ThreadingHTTPServer`, one thread per connection, so concurrent requests are
served concurrently), with scripted replies and faults and an optional fixed latency:

    from opsd_critic.fake_server import FakeServer, Reply, Status, Hang, Raw
    with FakeServer(script=[Status(429, headers={"Retry-After": "0.2"}), Reply('{"verdict": "ok", ...}')],
                    latency=0.2) as srv:
        srv.base_url            # "http://127.0.0.1:PORT/v1"
        srv.requests            # list of received JSON bodies (headers are not kept)

Each POST /v1/chat/completions consumes the next scripted action; when the script is empty the
`responder(body) -> action` is called (default: an `ok` critique). Actions:

- `Reply(content, usage=None, finish_reason="stop")`: 200 with a chat.completion whose message content is
  `content`;
- `Status(code, body=None, headers=None)`: an error status with an OpenAI-style error body;
- `Hang(seconds)`: sleep, then close without answering (the client must time out);
- `Raw(body, content_type)`: 200 with an arbitrary (e.g. malformed) body.

`reject_response_format=True` answers 400 to any request carrying `response_format`.
`Authorization` headers and query values (`?api-key=...`) are never stored or logged; the
names of each request's query parameters are kept in `query_names`. Run standalone for benchmarks:

    python -m opsd_critic.fake_server --port 8011 --latency 0.2
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qsl

OK_REPLY = json.dumps({"verdict": "ok", "step": None, "quote": None, "hint": None, "category": None})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the stdlib default (5) resets connections under concurrency 32


@dataclass
class Reply:
    content: str
    usage: dict | None = None
    finish_reason: str = "stop"  # "length": cut off at max_tokens


@dataclass
class Status:
    code: int
    body: dict | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Hang:
    seconds: float


@dataclass
class Raw:
    body: str
    content_type: str = "application/json"


def _default_responder(body: dict) -> Reply:
    return Reply(OK_REPLY)


class FakeServer:
    """Threaded OpenAI-compatible server; usable as a context manager (see module docstring)."""

    def __init__(self, script: list | None = None, *, responder: Callable[[dict], object] | None = None,
                 latency: float = 0.0, reject_response_format: bool = False, host: str = "127.0.0.1", port: int = 0,
                 nodelay: bool = True):
        self.nodelay = nodelay  # TCP_NODELAY, as real servers set it; False shows Nagle's ~40 ms stall per reply
        self.script = deque(script or [])
        self.responder = responder or _default_responder
        self.latency = latency
        self.reject_response_format = reject_response_format
        self.requests: list[dict] = []
        self.query_names: list[list[str]] = []  # per POST, the names of its query parameters (never values)
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = _Server((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_action(self, body: dict):
        with self._lock:
            self.requests.append(body)
            if self.reject_response_format and "response_format" in body:
                return Status(400, {"error": {"message": "response_format is not supported by this server",
                                              "type": "invalid_request_error", "param": "response_format"}})
            if self.script:
                return self.script.popleft()
        return self.responder(body)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = server.nodelay  # headers and body are two small writes

            def log_message(self, *args) -> None:  # silent; never log headers
                pass

            def _send(self, code: int, payload: bytes, content_type: str = "application/json", headers=None):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                path, _, query = self.path.partition("?")
                with server._lock:
                    server.query_names.append(sorted(k for k, _ in parse_qsl(query)))  # names only: values may be keys
                if not path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, b'{"error": {"message": "body is not JSON"}}')
                    return
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    action = server._next_action(body)
                    if server.latency:
                        time.sleep(server.latency)
                    self._act(action, body)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _act(self, action, body: dict) -> None:
                if isinstance(action, Hang):
                    server._closing.wait(action.seconds)
                    self.close_connection = True
                    return
                if isinstance(action, Raw):
                    self._send(200, action.body.encode(), action.content_type)
                    return
                if isinstance(action, Status):
                    err = action.body or {"error": {"message": f"scripted HTTP {action.code}", "type": "fake_error"}}
                    self._send(action.code, json.dumps(err).encode(), headers=action.headers)
                    return
                if not isinstance(action, Reply):
                    raise TypeError(f"unknown fake-server action {action!r}")
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                usage = action.usage or {"prompt_tokens": prompt_tokens, "completion_tokens": len(action.content.split()),
                                         "total_tokens": prompt_tokens + len(action.content.split())}
                out = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                       "model": body.get("model", "fake"),
                       "choices": [{"index": 0, "finish_reason": action.finish_reason,
                                    "message": {"role": "assistant", "content": action.content}}],
                       "usage": usage}
                self._send(200, json.dumps(out).encode())

        return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fake OpenAI-compatible server answering every request with an 'ok' critique")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    a = p.parse_args(argv)
    srv = FakeServer(latency=a.latency, host=a.host, port=a.port).start()
    print(f"serving {srv.base_url} (latency {a.latency}s); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
