"""An OpenAI-compatible HTTP API over the continuous-batching scheduler (stdlib http.server, one
thread per connection; the scheduler thread runs every pass).

POST /v1/completions, POST /v1/chat/completions (the GGUF's chat template), GET /v1/models, GET /health.
Request fields: model, prompt | messages, max_tokens (max_completion_tokens), temperature, top_p,
seed, stop, stream, stream_options.include_usage, n (1 only), and llama.cpp's top_k, min_p,
repeat_penalty. Errors come back as {"error": {"message", "type", "param", "code"}} with a 4xx
status; a client that disconnects has its generation cancelled and its slot freed.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EngineError
from ..sampling import SamplingParams
from .batcher import Batcher, Handle
from .chat import chat_ids

MAX_BODY = 16 << 20
OPENAI_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' must be {what or types}, got {v!r}", name)
    if not isinstance(v, types) or (check is not None and not check(v)):
        raise ApiError(400, f"'{name}' must be {what}, got {v!r}", name)
    return v


@dataclass(slots=True)
class Request:
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stream: bool
    include_usage: bool


class Service:
    """The model, its scheduler and the request translation (no sockets: testable alone)."""

    def __init__(self, model, batcher: Batcher, model_id: str | None = None):
        self.model, self.batcher = model, batcher
        self.model_id = model_id or Path(model.file.path).name.removesuffix(".gguf")
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "engine"}]}

    def parse(self, body: Any, chat: bool) -> Request:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
        for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
            if body.get(unsupported) not in (None, False):
                raise ApiError(400, f"'{unsupported}' is not supported by this server", unsupported)
        tok = self.model.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ApiError(400, f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
            try:
                ids = chat_ids(tok, msgs)
            except EngineError as e:
                raise ApiError(400, str(e), "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tok.encode(prompt, add_special=True)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt):
                ids = list(prompt)
                if min(ids) < 0 or max(ids) >= self.model.spec.vocab_size:
                    raise ApiError(400, f"token ids must be in [0, {self.model.spec.vocab_size})", "prompt")
            else:
                raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids", "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", "prompt")
        n_ctx = self.batcher.slots.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(400, f"this model's context is {n_ctx} tokens; the prompt has {len(ids)}",
                           "messages" if chat else "prompt", "context_length_exceeded")
        default_max = n_ctx - len(ids) if chat else 16
        max_tokens = _field(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                            int, default_max, lambda v: v >= 0, "an integer >= 0")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
        num = (int, float)
        sampling = dict(
            temperature=_field(body, "temperature", num, OPENAI_SAMPLING_DEFAULTS["temperature"],
                               lambda v: 0 <= v <= 2, "a number in [0, 2]"),
            top_p=_field(body, "top_p", num, OPENAI_SAMPLING_DEFAULTS["top_p"], lambda v: 0 < v <= 1, "a number in (0, 1]"),
            seed=_field(body, "seed", int, None, None, "an integer"),
            stop=tuple(stop or ()))
        for name, check, what in (("top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
                                  ("min_p", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                                  ("repeat_penalty", lambda v: v > 0, "a number > 0")):
            if body.get(name) is not None:
                sampling[name] = _field(body, name, num, None, check, what)
        try:
            params = SamplingParams(**sampling)
        except ConfigError as e:
            raise ApiError(400, str(e), e.field) from None
        stream = _field(body, "stream", bool, False, None, "a boolean")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        return Request(ids, params, max_tokens, stream, bool(opts.get("include_usage")))

    def submit(self, req: Request) -> Handle:
        try:
            return self.batcher.submit(req.ids, req.params, req.max_tokens)
        except EngineError as e:
            raise ApiError(400, str(e), e.field) from None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, fmt, *args):  # quiet: the CLI prints one line per request itself if asked
        if self.server.verbose:
            super().log_message(fmt, *args)

    # -- plumbing ------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _client_gone(self) -> bool:
        """True once the peer closed its side (EOF readable without blocking)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, h: Handle):
        """The handle's events; a client that went away cancels it (its slot is freed)."""
        import queue

        while True:
            try:
                ev = h.events.get(timeout=0.05)
            except queue.Empty:
                if self._client_gone():
                    h.cancel()
                    raise ConnectionResetError("client disconnected")
                continue
            yield ev
            if ev.finish_reason is not None or ev.error is not None:
                return

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if n > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        svc = self.server.service
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, svc.models())
        elif self.path.rstrip("/") == "/health":
            b = svc.batcher
            self._send_json(200, {"status": "ok", "active": b.active, "passes": b.passes, "max_rows": b.max_rows,
                                 "cancelled": b.cancelled})
        else:
            self._error(ApiError(404, f"no route GET {self.path}", code="not_found"))

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        chat = routes.get(self.path.rstrip("/"))
        try:
            body = self._body()
            if chat is None:
                raise ApiError(404, f"no route POST {self.path}", code="not_found")
            svc = self.server.service
            req = svc.parse(body, chat)
            h = svc.submit(req)
        except ApiError as e:
            self._error(e)
            return
        try:
            if req.stream:
                self._stream(h, req, chat)
            else:
                self._whole(h, req, chat)
        except (BrokenPipeError, ConnectionResetError):
            h.cancel()
            self.close_connection = True

    def _meta(self, chat: bool) -> dict:
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.service.model_id}

    @staticmethod
    def _usage(req: Request, ev) -> dict:
        done = ev.usage.completion_tokens if ev.usage else 0
        return {"prompt_tokens": len(req.ids), "completion_tokens": done, "total_tokens": len(req.ids) + done}

    def _whole(self, h: Handle, req: Request, chat: bool) -> None:
        text = []
        for ev in self._events(h):
            if ev.error is not None:
                self._error(ApiError(500, f"generation failed: {ev.error}", kind="server_error"))
                return
            text.append(ev.text)
            last = ev
        out = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}} if chat
                  else {"index": 0, "text": out, "logprobs": None})
        choice["finish_reason"] = _finish(last.finish_reason)
        self._send_json(200, {**self._meta(chat), "choices": [choice], "usage": self._usage(req, last)})

    def _sse(self, obj) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, h: Handle, req: Request, chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        meta = self._meta(chat)
        if chat:
            meta["object"] = "chat.completion.chunk"

        def chunk(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                c = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**meta, "choices": [c]}

        if chat:
            self._sse({**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
        for ev in self._events(h):
            if ev.error is not None:
                self._sse(ApiError(500, f"generation failed: {ev.error}", kind="server_error").body())
                break
            if ev.text:
                self._sse(chunk(ev.text, None))
            if ev.finish_reason is not None:
                self._sse(chunk(None, _finish(ev.finish_reason)))
                if req.include_usage:
                    self._sse({**meta, "choices": [], "usage": self._usage(req, ev)})
        self._sse(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], service: Service | None = None, verbose: bool = False):
        """Binds at once; set `service` before serving."""
        self.service, self.verbose = service, verbose
        super().__init__(address, Handler)

    def serve_until(self, stop: threading.Event, poll: float = 0.2) -> None:
        """Serve until `stop` is set."""
        t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": poll}, daemon=True)
        t.start()
        stop.wait()
        self.shutdown()
        t.join()
