"""A local stand-in for a vLLM or SGLang server (real HTTP on 127.0.0.1), for tests without the real engine.

    with StandIn(tokenizer, engine="sglang") as srv:
        srv.base_url        # http://127.0.0.1:PORT/v1
        srv.completions     # received /v1/completions bodies

It speaks the endpoints opsd uses:
- GET /v1/models: the base model and every loaded adapter (`root` = its path, `parent` = the base);
- POST /v1/completions with prompt ids and `return_token_ids`: the reply is the text
  `{"name": "<model asked for>", "arguments": {}}\\n</tool_call>` tokenised with `tokenizer`, so a
  trajectory shows which model answered; `prompt_token_ids` echo the ids (or are altered when
  `mangle_prompt=True`); `accept_ids=False` answers 400 to id prompts, like a server without them;
- POST /v1/chat/completions: the same reply as text;
- vLLM: /v1/load_lora_adapter, /v1/unload_lora_adapter (404 with vLLM's error when the path holds
  no adapter); SGLang: /load_lora_adapter, /unload_lora_adapter (answers `success`,
  `error_message`, `loaded_adapters`) and /update_weights_from_disk {"model_path"}.
Faults: `hang_after=N` makes every completion after the first N hang for `hang_seconds`
(a client timeout); `stop_after=N` closes the server after N completions (a crash mid-round).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class StandIn:
    def __init__(self, tokenizer, *, engine: str = "vllm", base_model: str = "smollm2", base_root: str = "/models/base",
                 accept_ids: bool = True, mangle_prompt: bool = False, hang_after: int | None = None,
                 hang_seconds: float = 5.0, stop_after: int | None = None, port: int = 0):
        self.tok, self.engine, self.base_model, self.base_root = tokenizer, engine, base_model, base_root
        self.accept_ids, self.mangle_prompt = accept_ids, mangle_prompt
        self.hang_after, self.hang_seconds, self.stop_after = hang_after, hang_seconds, stop_after
        self.loaded: dict[str, str] = {}  # adapters the server holds (not opsd's record of them)
        self.weights_path = base_root
        self.completions: list[dict] = []
        self.chats: list[dict] = []
        self.admin: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> StandIn:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        threading.Thread(target=self._httpd.shutdown, daemon=True).start()  # safe from a handler thread
        self._httpd.server_close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reply_text(self, model: str) -> str:
        return json.dumps({"name": model, "arguments": {}}) + "\n</tool_call>"

    def models(self) -> dict:
        data = [{"id": self.base_model, "object": "model", "root": self.weights_path, "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": self.base_model} for n, p in self.loaded.items()]
        return {"object": "list", "data": data}

    def known(self, model: str) -> bool:
        if self.engine == "sglang" and ":" in model:
            base, _, adapter = model.partition(":")
            return base == self.base_model and adapter in self.loaded
        return model == self.base_model or model in self.loaded

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, obj) -> None:
                payload = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, code: int, message: str) -> None:
                self._send(code, {"error": {"message": message, "type": "BadRequestError", "code": code}})

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, srv.models())
                elif self.path == "/health":
                    self._send(200, {})
                else:
                    self._error(404, "not found")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                route = self.path.rstrip("/")
                if route == "/v1/completions":
                    return self._completion(body)
                if route == "/v1/chat/completions":
                    return self._chat(body)
                admin = {"vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", None),
                         "sglang": ("/load_lora_adapter", "/unload_lora_adapter", "/update_weights_from_disk")}[srv.engine]
                with srv._lock:
                    srv.admin.append((route, body))
                if route == admin[0]:
                    return self._load(body)
                if route == admin[1]:
                    return self._unload(body)
                if route == admin[2]:
                    ok = (Path(body.get("model_path", "")) / "config.json").is_file()
                    if ok:
                        srv.weights_path = body["model_path"]
                    return self._send(200 if ok else 400, {"success": ok, "num_paused_requests": 0,
                                                          "message": "ok" if ok else "no config.json"})
                self._error(404, f"no route {route}")

            def _load(self, body: dict) -> None:
                name, path = body.get("lora_name"), body.get("lora_path", "")
                ok = (Path(path) / "adapter_config.json").is_file() and (Path(path) / "adapter_model.safetensors").is_file()
                if ok:
                    srv.loaded[name] = path
                if srv.engine == "vllm":
                    return self._send(200, f"Success: LoRA adapter '{name}' added successfully.") if ok else \
                        self._error(404, f"Loading lora {name} failed: No adapter found for {path}")
                self._send(200 if ok else 400, {"success": ok, "error_message": None if ok else f"cannot load {path}",
                                                "loaded_adapters": dict(srv.loaded)})

            def _unload(self, body: dict) -> None:
                name = body.get("lora_name")
                if name not in srv.loaded:
                    return self._error(404, f"The lora adapter '{name}' cannot be found.")
                del srv.loaded[name]
                if srv.engine == "vllm":
                    return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.")
                self._send(200, {"success": True, "error_message": None, "loaded_adapters": dict(srv.loaded)})

            def _fault(self) -> bool:
                with srv._lock:
                    n = len(srv.completions)
                if srv.stop_after is not None and n > srv.stop_after:
                    srv.stop()
                    self.close_connection = True
                    return True
                if srv.hang_after is not None and n > srv.hang_after:
                    srv._closing.wait(srv.hang_seconds)
                    self.close_connection = True
                    return True
                return False

            def _completion(self, body: dict) -> None:
                prompt = body.get("prompt")
                with srv._lock:
                    srv.completions.append(body)
                if self._fault():
                    return
                model = body.get("model", "")
                if not srv.known(model):
                    return self._error(404, f"The model `{model}` does not exist.")
                is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
                if is_ids and not srv.accept_ids:
                    return self._error(400, "prompt must be a string")
                ids = srv.tok.encode(self.server_text(model), add_special_tokens=False)[: body.get("max_tokens", 16)]
                choice = {"index": 0, "text": srv.tok.decode(ids), "finish_reason": "stop", "stop_reason": "</tool_call>"}
                if body.get("return_token_ids") and is_ids and srv.accept_ids:
                    reported = list(prompt)
                    if srv.mangle_prompt:
                        reported = reported[1:]  # e.g. a BOS the server dropped
                    choice |= {"token_ids": ids, "prompt_token_ids": reported}
                self._send(200, {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()),
                                 "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": len(prompt or []), "completion_tokens": len(ids)}})

            def server_text(self, model: str) -> str:
                return srv.reply_text(model)

            def _chat(self, body: dict) -> None:
                with srv._lock:
                    srv.chats.append(body)
                model = body.get("model", "")
                if not srv.known(model):
                    return self._error(404, f"The model `{model}` does not exist.")
                self._send(200, {"id": "chat-standin", "object": "chat.completion", "created": int(time.time()),
                                 "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                                              "message": {"role": "assistant",
                                                                          "content": srv.reply_text(model)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        return Handler
