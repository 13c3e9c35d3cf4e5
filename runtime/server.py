"""HTTP: an OpenAI-compatible API and the chat page, on the standard library.

Threads: the HTTP server runs one thread per connection (ThreadingHTTPServer); ONE engine
thread (runtime/worker.py's EngineWorker) loads the model and runs every generation, taking
jobs from a queue. An HTTP thread never touches the engine, the model or Numba: it parses
and validates a request (runtime/openai_api.py), tokenizes it through the worker's text
interface (pure Python), puts a Job on the queue and relays the Job's events to its client.
A client that goes away cancels its Job.

Endpoints: GET / (the chat page), GET /health, GET /v1/models, GET /props, GET /slots, POST
/v1/chat/completions, POST /v1/completions, POST /tokenize, POST /detokenize (the last three
as llama.cpp's server).
"""

from __future__ import annotations

import errno
import hmac
import json
import queue
import select
import socket
import sys
import time
import traceback
from http import HTTPStatus
from typing import Any, Callable

from runtime.http_checks import (check_json_depth, content_length, host_allowed,
                                 is_json_content_type, is_loopback_host, machine_names,
                                 origin_allowed)
from runtime.http_connections import (DEFAULT_WORKERS, BoundedHTTPServer, BoundedRequestHandler,
                                      RequestDeadline)
from runtime.llamacpp_api import NativeReply, completion_body
from runtime.openai_api import (MAX_TOP_LOGPROBS, ChatSettings, Reply, RequestError, bool_field,
                                chat_request, error_body, int_field, refuse_unsupported,
                                requested_grammar, sampling_params)
from runtime.terminal import printable
from runtime.worker import EngineWorker, Job, ModelInfo, QueueFull

MAX_BODY_BYTES = 8 * 2**20
POLL_SECONDS = 0.1  # how often a waiting HTTP thread checks whether its client is still there
PORT_ATTEMPTS = 10
WSAEADDRINUSE = 10048  # Windows' "address in use"


# --- the HTTP server ---------------------------------------------------------------------------

def _is_loopback_bind(host: str) -> bool:
    return is_loopback_host(host if ":" not in host else f"[{host}]")


class ModelServer(BoundedHTTPServer):
    """The HTTP server: holds the worker, the settings and the chat page. `workers`
    requests are answered at once (llama.cpp's --threads-http); allowed_hosts: names
    the Host header may give besides this machine's own (--allowed-host)."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], worker: EngineWorker, model_name: str, *,
                 api_key: str | None = None, cors_origin: str | None = None,
                 max_body: int = MAX_BODY_BYTES, log: bool = True,
                 workers: int = DEFAULT_WORKERS, allowed_hosts: tuple[str, ...] = (),
                 chat_settings: ChatSettings = ChatSettings(), slots_endpoint: bool = True,
                 embeddings: bool = False, pooling: str | None = None, metrics: bool = False):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler, workers)
        self.worker = worker
        self.model_name = model_name
        self.api_key = api_key
        self.cors_origin = cors_origin
        self.chat_settings = chat_settings
        self.max_body = max_body
        self.log = log
        self.slots_endpoint = slots_endpoint  # GET /slots (--slots / --no-slots)
        self.embeddings = embeddings  # /v1/embeddings and /embedding (--embeddings)
        self.pooling = pooling  # --pooling; None: the model's (runtime.embeddings)
        self.metrics = None  # GET /metrics (--metrics); prometheus_client takes 0.2 s to import
        if metrics:
            from runtime.metrics import ServerMetrics

            self.metrics = ServerMetrics(worker)
        self.loopback_only = _is_loopback_bind(address[0])
        # a loopback server answers to loopback names only (and --allowed-host); one on the
        # network also to this machine's own names and addresses
        extra = {h.strip().lower().rstrip(".") for h in allowed_hosts}
        self.allowed_hosts = extra if self.loopback_only else extra | machine_names(address[0])
        self.created = int(time.time())
        self._page: bytes | None = None

    def handle_error(self, request, client_address) -> None:
        """A client that vanished is routine; anything else is logged, briefly."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # RequestDeadline too
            return
        sys.stderr.write(f"error on a connection from {client_address[0]}:\n{traceback.format_exc()}")

    @property
    def port(self) -> int:
        return self.server_address[1]

    def page(self) -> bytes:
        if self._page is None:
            from importlib.resources import files

            self._page = (files("runtime") / "web" / "index.html").read_bytes()
        return self._page


def bind_server(host: str, port: int, make: Callable[[tuple[str, int]], ModelServer],
                attempts: int = PORT_ATTEMPTS, say: Callable[[str], None] = print) -> ModelServer:
    """make((host, port)) on the first free port of port, port+1, ...; OSError when none is."""
    for p in range(port, port + attempts) if port else [0]:
        try:
            return make((host, p))
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, WSAEADDRINUSE):
                raise
            if not port:
                raise
            if p + 1 < port + attempts:
                say(f"port {p} is in use; trying {p + 1}")
    raise OSError(errno.EADDRINUSE,
                  f"ports {port}-{port + attempts - 1} on {host} are all in use; pass --port N")


class ClientGone(Exception):
    """The client closed its connection."""


class RequestHandler(BoundedRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds a connection may sit idle between requests (or stall mid-body)
    server_version = "modelrun"
    sys_version = ""
    server: ModelServer

    # --- plumbing ---

    def log_message(self, format: str, *args) -> None:
        """One line per request on stderr, except the page's /health polling."""
        if self.server.log and not getattr(self, "path", "").startswith("/health"):
            sys.stderr.write(f"{self.address_string()} - {printable(format % args)}\n")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (malformed request line, bad headers...) in
        OpenAI's JSON shape; the connection closes after them."""
        self.close_connection = True
        try:
            self.send_json(code, error_body(code, message or HTTPStatus(code).phrase), close=True)
        except OSError:
            pass

    def send_cors_headers(self) -> None:
        origin = self.server.cors_origin
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")

    def _send_bytes(self, status: int, body: bytes, content_type: str,
                    extra: dict | None = None, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_cors_headers()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, close: bool = False, extra: dict | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        self._send_bytes(status, body, "application/json; charset=utf-8", extra, close)

    def _send_request_error(self, e: RequestError, close: bool = False) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 405:
            extra = {"Allow": getattr(e, "allow", "GET, POST")}
        self.send_json(e.status, error_body(e.status, e.message, e.param, e.code, e.type),
                        close=close, extra=extra)

    def _dispatch(self, method: str) -> None:
        """Route a request; every failure becomes a JSON error, never a traceback."""
        try:
            self._check_host()
            path = self.path.split("?", 1)[0]
            if method == "OPTIONS" and self.server.cors_origin:
                return self._preflight()
            route = ROUTES.get(path)
            if route is None:
                raise RequestError(404, f"no such endpoint: {path}", code="not_found")
            handler = route.get(method)
            if handler is None:
                e = RequestError(405, f"{path} does not accept {method}; use "
                                      f"{' or '.join(sorted(route))}", code="method_not_allowed")
                e.allow = ", ".join(sorted(route))
                raise e
            if path not in PUBLIC_PATHS:
                self._check_origin()
                self._check_key()
            if method == "POST" and not is_json_content_type(self.headers.get("Content-Type")):
                raise RequestError(415, f"{path} takes a JSON body: send it with Content-Type: "
                                        "application/json", code="unsupported_media_type")
            handler(self)
        except RequestError as e:
            self._discard_body()
            self._send_request_error(e, close=self.close_connection)
        except (BrokenPipeError, ConnectionResetError, ClientGone, socket.timeout,
                RequestDeadline):
            self.close_connection = True
        except Exception:
            sys.stderr.write(f"error while serving {method} {self.path}:\n{traceback.format_exc()}")
            self.close_connection = True
            try:
                self.send_json(500, error_body(500, "internal server error (see the server log)"),
                                close=True)
            except OSError:
                pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # --- checks ---

    def _check_host(self) -> None:
        """DNS-rebinding protection: the Host header must name this server (runtime.http_checks)."""
        host = self.headers.get("Host")
        if not host_allowed(host, self.server.allowed_hosts):
            names = ("localhost / 127.0.0.1 / [::1]" if self.server.loopback_only
                     else "this machine's names and addresses")
            raise RequestError(403, f"Host {printable(host)!r} is not allowed: this server answers "
                                    f"to {names} (add a name with --allowed-host NAME)",
                               code="host_not_allowed")

    def _check_origin(self) -> None:
        """A web page from elsewhere may not use the API (unless --cors names it)."""
        origin = self.headers.get("Origin")
        if not origin_allowed(origin, self.headers.get("Host"), self.server.cors_origin):
            raise RequestError(403, f"requests from the web page at {printable(origin)!r} are not "
                                    "allowed (start the server with --cors ORIGIN to allow them)",
                               code="origin_not_allowed")

    def _check_key(self) -> None:
        key = self.server.api_key
        if not key:
            return
        auth = self.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError(401, "invalid API key", code="invalid_api_key")

    def _preflight(self) -> None:
        self.send_response(204)
        self.send_cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _discard_body(self) -> None:
        """Read an unread request body so the connection can carry the next request; close
        it instead when the body is large or its length unknown."""
        if getattr(self, "_body_read", False) or self.command in ("GET", "HEAD", "OPTIONS"):
            return
        try:
            length = content_length(self.headers.get("Content-Length"))
        except ValueError:
            length = None
            self.close_connection = True
        if length is None or length > self.server.max_body:
            if length:
                self.close_connection = True
            return
        self._body_read = True
        self.read_body(length)

    def _json_body(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length (chunked uploads are "
                                    "not supported)")
        try:
            length = content_length(self.headers.get("Content-Length"))
        except ValueError as e:
            self.close_connection = True
            raise RequestError(400, str(e)) from None
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if length > self.server.max_body:
            self.close_connection = True  # the body stays unread: this connection is done
            raise RequestError(413, f"the request body has {length} bytes; the limit is "
                                    f"{self.server.max_body}", code="request_too_large")
        data = self.read_body(length)
        self._body_read = True
        if len(data) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(data)} of {length} bytes")
        try:
            body = json.loads(data)
            check_json_depth(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except (ValueError, RecursionError) as e:
            message = str(e) if isinstance(e, ValueError) else "the JSON body nests too deeply"
            raise RequestError(400, message, code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _loaded(self) -> tuple[EngineWorker, ModelInfo]:
        """The worker and its model's facts, or a 503 while it loads or when it failed to."""
        worker = self.server.worker
        if worker.state == "loading":
            raise RequestError(503, "the model is still loading; try again in a moment",
                               code="model_loading")
        if worker.state != "ok":
            raise RequestError(503, f"the model failed to load: {worker.error}", code="model_failed")
        return worker, worker.info

    def _client_gone(self) -> bool:
        """True when the client closed its side (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- endpoints ---

    def get_page(self) -> None:
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")
        self._send_bytes(200, self.server.page(), "text/html; charset=utf-8",
                         {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                          "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    def get_health(self) -> None:
        worker = self.server.worker
        if worker.state == "ok":
            self.send_json(200, {"status": "ok"})
        elif worker.state == "loading":
            self.send_json(503, {"status": "loading", **error_body(503, "the model is loading",
                                                                       code="model_loading")})
        else:
            self.send_json(503, {"status": "failed", **error_body(503, f"the model failed to load: "
                                                                      f"{worker.error}")})

    def get_models(self) -> None:
        """The one model, with its context and what it can be asked for (as llama.cpp's
        /v1/models, and Ollama's "models" list that some apps read instead)."""
        worker = self.server.worker
        info = worker.info
        entry = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "modelrun",
                 "meta": {"n_ctx": info.n_ctx, "n_vocab": info.n_vocab} if info else None}
        if info:
            entry["context_length"] = info.n_ctx
            entry["capabilities"] = self._capabilities(worker)
        self.send_json(200, {"object": "list", "data": [entry], "models": [
            {"name": self.server.model_name, "model": self.server.model_name,
             "capabilities": entry.get("capabilities", [])}]})

    def _capabilities(self, worker: EngineWorker) -> list[str]:
        """completion always; chat and tools when the model has its own chat template (a
        base model has none: the page opens it in text completion); embeddings when the
        server was started with --embeddings."""
        found = ["completion"]
        if worker.model_chat_template():
            found += ["chat", "tools"]
        if self.server.embeddings:
            found.append("embeddings")
        return found

    def get_props(self) -> None:
        """llama.cpp's /props, in part. chat_template is the model's own template, "" when it has
        none (a base model: the chat page then opens in text completion)."""
        worker, info = self._loaded()
        self.send_json(200, {"chat_template": worker.model_chat_template(),
                             "default_generation_settings": {"n_ctx": info.n_ctx},
                             "total_slots": info.n_slots})

    def get_slots(self) -> None:
        """llama.cpp's GET /slots: each slot's state; with ?fail_on_no_slot, a 503 when none
        is idle (a load balancer's probe)."""
        if not self.server.slots_endpoint:
            raise RequestError(501, "this server does not serve /slots (it was started with --no-slots)",
                               code="not_supported")
        worker, _ = self._loaded()
        slots = worker.slots_state()
        query = self.path.partition("?")[2]
        if "fail_on_no_slot" in query and all(s["is_processing"] for s in slots):
            raise RequestError(503, "no slot available", code="unavailable")
        self.send_json(200, slots)

    def post_embeddings(self) -> None:
        """OpenAI's POST /v1/embeddings, with --embeddings: one pooled, normalized vector per
        input (runtime.embeddings), as floats or base64 (what the openai client asks for)."""
        import base64

        body = self._json_body()
        worker, info = self._loaded()
        inputs = self._embedding_inputs(body, "input", worker, info)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"encoding_format must be float or base64, got {fmt!r}",
                               "encoding_format")
        pooling, vectors = self._embed(body, worker, inputs)
        if pooling == "none":
            raise RequestError(400, "the model's pooling type is none, which gives one vector per "
                                    "token: not OpenAI's shape. Use /embedding, or restart the "
                                    "server with --pooling mean (or last, cls)", "input")
        n = sum(map(len, inputs))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if fmt == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        self.send_json(200, {"object": "list", "data": data, "model": self.server.model_name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def post_native_embedding(self) -> None:
        """llama.cpp's POST /embedding: [{"index", "embedding": [[...]]}] per input, one row
        per token when the pooling is none, else the pooled, normalized vector."""
        body = self._json_body()
        worker, info = self._loaded()
        field = "content" if "content" in body else "input"
        inputs = self._embedding_inputs(body, field, worker, info)
        _, vectors = self._embed(body, worker, inputs)
        self.send_json(200, [{"index": i, "embedding": v.reshape(-1, v.shape[-1]).tolist()}
                             for i, v in enumerate(vectors)])

    MAX_EMBEDDING_INPUTS = 2048  # as OpenAI's API

    def _embedding_inputs(self, body: dict, field: str, worker: EngineWorker,
                          info: ModelInfo) -> list[list[int]]:
        """The inputs (a string, token ids, or a list of those) as token lists; a 501 without
        --embeddings, a 400 naming the field for anything else wrong."""
        if not self.server.embeddings:
            raise RequestError(501, "this server does not give embeddings (start it with "
                                    "--embeddings)", code="not_supported")
        value = body.get(field)
        is_ids = lambda v: isinstance(v, list) and all(  # noqa: E731
            isinstance(t, int) and not isinstance(t, bool) for t in v)
        items = [value] if isinstance(value, str) or (is_ids(value) and value) else value
        if not isinstance(items, list) or not items or len(items) > self.MAX_EMBEDDING_INPUTS:
            raise RequestError(400, f"{field} must be a string, a list of token ids, or a list of "
                                    f"1..{self.MAX_EMBEDDING_INPUTS} of those", field)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                self._refuse_beyond_context(item, info, field)
                tokens = worker.encode(item)
            elif is_ids(item) and all(0 <= t < info.n_vocab for t in item):
                tokens = list(item)
            else:
                raise RequestError(400, f"{field}[{i}] must be a string or a list of token ids "
                                        f"(0..{info.n_vocab - 1})", field)
            if not tokens:
                raise RequestError(400, f"{field}[{i}] is empty", field)
            if len(tokens) > info.n_ctx:
                raise RequestError(400, f"{field}[{i}] has {len(tokens)} tokens but the context "
                                        f"holds only {info.n_ctx}", field, "context_length_exceeded")
            out.append(tokens)
        return out

    def _embed(self, body: dict, worker: EngineWorker, inputs: list[list[int]]):
        from runtime.embeddings import DEFAULT_NORMALIZE, EmbeddingError, embed

        norm = int_field(body, "embd_normalize", -1)
        norm = DEFAULT_NORMALIZE if norm is None else norm
        pooling = self.server.pooling
        try:
            return worker.on_engine_thread(lambda session: embed(session, inputs, pooling, norm))
        except EmbeddingError as e:
            raise RequestError(400, f"{e}", "input") from None

    def get_metrics(self) -> None:
        """llama.cpp's GET /metrics (runtime.metrics), with --metrics."""
        if self.server.metrics is None:
            raise RequestError(501, "this server does not serve /metrics (start it with --metrics)",
                               code="not_supported")
        from runtime.metrics import CONTENT_TYPE

        self._send_bytes(200, self.server.metrics.render(), CONTENT_TYPE)

    def post_tokenize(self) -> None:
        body = self._json_body()
        worker, _ = self._loaded()
        content = body.get("content")
        if not isinstance(content, str):
            raise RequestError(400, f"content must be a string, got {type(content).__name__}", "content")
        parse_special = bool_field(body, "parse_special") if "parse_special" in body else True
        tokens = worker.encode(content, add_special=bool_field(body, "add_special"),
                               parse_special=parse_special)
        self.send_json(200, {"tokens": tokens})

    def post_detokenize(self) -> None:
        body = self._json_body()
        worker, info = self._loaded()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in tokens):
            raise RequestError(400, f"tokens must be a list of token ids (integers 0..{info.n_vocab - 1})",
                               "tokens")
        self.send_json(200, {"content": worker.decode(tokens)})

    def _chat_prompt(self, body: dict, worker: EngineWorker, info: ModelInfo):
        """The request's chat (runtime.openai_api.ChatRequest) and its prompt rendered by the
        model's template; a 400 naming messages when they cannot be rendered or fit."""
        from runtime.chat import ChatTemplateError

        if "messages" not in body:
            raise RequestError(400, "messages is required", "messages")
        chat = chat_request(body, worker.chat_template_source(), self.server.chat_settings)
        try:
            prompt = worker.chat_prompt(chat.messages, **chat.template_vars)
        except ChatTemplateError as e:
            raise RequestError(400, f"{e}", "messages") from None
        except ValueError as e:  # validate_messages names the message and what is wrong
            raise RequestError(400, f"{e}", "messages") from None
        self._refuse_beyond_context(prompt.text, info, "messages")
        return chat, prompt

    def post_apply_template(self) -> None:
        """llama.cpp's POST /apply-template: the prompt a chat request would run, unrun."""
        body = self._json_body()
        worker, info = self._loaded()
        _, prompt = self._chat_prompt(body, worker, info)
        self.send_json(200, {"prompt": prompt.text})

    def post_chat(self) -> None:
        body = self._json_body()
        refuse_unsupported(body)
        worker, info = self._loaded()
        stream = bool_field(body, "stream")
        want_logprobs = bool_field(body, "logprobs")
        top_n = int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top_n is not None and not want_logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = sampling_params(body, info.n_vocab)
        chat, prompt = self._chat_prompt(body, worker, info)
        try:
            tokens = worker.prompt_tokens(prompt)
        except ValueError as e:
            raise RequestError(400, f"{e}", "messages") from None
        forced = chat.forced_grammar(worker.encode, worker.chat_template_source(), prompt.text)
        params.constraint = self._constraint(body, worker, forced)
        # A grammar of the request's own decides the answer from its first token: a <think>
        # the prompt opened does not hold it (a <think> block the grammar writes still does).
        opened_by = "" if params.constraint is not None and forced is None else prompt.text
        job = Job(tokens, params, (top_n or 0) if want_logprobs else None,
                  spell_special=chat.spell_special, n=self._choices(body, info))
        self._run_job(job, info, "chat", stream, body, [chat.output(opened_by, stream) for _ in range(job.n)])

    def post_completion(self) -> None:
        body = self._json_body()
        refuse_unsupported(body)
        worker, info = self._loaded()
        stream = bool_field(body, "stream")
        top_n = int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        params = sampling_params(body, info.n_vocab)
        params.constraint = self._constraint(body, worker)
        job = Job(self._prompt_tokens(body, worker, info), params, top_n, n=self._choices(body, info))
        self._run_job(job, info, "text", stream, body)

    def post_native_completion(self) -> None:
        """llama.cpp's POST /completion: its field names in, its response shape out."""
        body = completion_body(self._json_body())
        refuse_unsupported(body)
        worker, info = self._loaded()
        stream = bool_field(body, "stream")
        params = sampling_params(body, info.n_vocab)
        params.constraint = self._constraint(body, worker)
        job = Job(self._prompt_tokens(body, worker, info), params, None)
        reply = NativeReply(self, worker.token_bytes, len(job.prompt_tokens), stream,
                            self.server.model_name)
        self._run_job(job, info, "text", stream, body, reply=reply)

    def _prompt_tokens(self, body: dict, worker: EngineWorker, info: ModelInfo) -> list[int]:
        """A completion's prompt (a string, or token ids) as tokens; a 400 naming prompt."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            self._refuse_beyond_context(prompt, info, "prompt")
            tokens = worker.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in prompt):
            tokens = list(prompt)
        else:
            raise RequestError(400, "prompt must be a string or a list of token ids (one prompt "
                                    "per request)", "prompt")
        if not tokens:
            raise RequestError(400, "prompt is empty", "prompt")
        return tokens

    @staticmethod
    def _choices(body: dict, info: ModelInfo) -> int:
        """n: choices of one prompt, each in a slot of its own, so at most the slots."""
        n = int_field(body, "n", 1) or 1
        if n > info.n_slots:
            raise RequestError(400, f"n must be at most {info.n_slots}, this server's slots (each "
                                    "choice takes one; start it with --parallel N for more)", "n")
        return n

    def _constraint(self, body: dict, worker: EngineWorker, forced_call=None):
        """The compiled grammar the request's output must follow (None: free text).
        forced_call: the grammar of the tool call tool_choice demands, if it does."""
        from runtime.constraint import ConstraintError

        requested = requested_grammar(body)
        if forced_call is not None:
            if requested is not None:
                raise RequestError(400, f"tool_choice demands a tool call and {requested[0]} "
                                        "constrains the output too: give only one",
                                   "tool_choice")
            requested = ("tools", forced_call)
        if requested is None:
            return None
        name, grammar = requested
        try:
            return worker.constraint(grammar)
        except ConstraintError as e:
            raise RequestError(400, f"{name}: {e}", name) from None

    def _refuse_beyond_context(self, text: str, info: ModelInfo, param: str) -> None:
        """A 400 for text too long to fit the context whatever its tokens, before
        tokenizing it (which costs time and memory in proportion)."""
        at_least = self.server.worker.fewest_tokens(text)
        if at_least + 1 > info.n_ctx:
            raise RequestError(400, f"the prompt has at least {at_least} tokens ({len(text)} "
                                    f"characters) but the context holds only {info.n_ctx}; "
                                    "shorten it or restart the server with a larger -c",
                               param, "context_length_exceeded")

    # --- generation ---

    def _run_job(self, job: Job, info: ModelInfo, kind: str, stream: bool, body: dict,
                 outputs: list | None = None, reply: Reply | None = None) -> None:
        n_prompt = len(job.prompt_tokens)
        if n_prompt + 1 > info.n_ctx:
            raise RequestError(400, f"the prompt has {n_prompt} tokens but the context holds only "
                                    f"{info.n_ctx} (and at least one token must be generated); "
                                    "shorten it or restart the server with a larger -c",
                               "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        include_usage = False
        options = body.get("stream_options")
        if isinstance(options, dict):
            include_usage = bool(options.get("include_usage"))
        outputs = outputs or [None] * job.n
        reply = reply or Reply(self, self.server.worker.token_bytes, kind, n_prompt, stream,
                               include_usage, self.server.model_name,
                               job.top_logprobs is not None, outputs[0])
        replies = [reply] + [reply.sibling(i, outputs[i]) for i in range(1, job.n)]
        worker = self.server.worker
        try:
            worker.submit(job)
        except QueueFull as e:
            self._discard_body()
            self.send_json(503, error_body(503, f"every slot is busy and {worker.queue_bound} requests "
                                                f"already wait: retry in {e.retry_after} s",
                                           code="server_busy"),
                           extra={"Retry-After": str(e.retry_after)})
            return
        choices, n_gen, timings = [None] * job.n, 0, {}
        try:
            if stream:
                reply.start_stream()
                for other in replies[1:]:
                    other.open_choice()
            while True:
                try:
                    event = job.events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self._client_gone():
                        raise ClientGone()
                    continue
                if event[0] == "piece":
                    replies[event[1]].piece(event[2], event[3])
                    if stream and self._client_gone():
                        raise ClientGone()
                elif event[0] == "done":
                    if self.server.metrics is not None:
                        self.server.metrics.record(event[4])
                    i, finish_reason, n, timings = event[1:]
                    if job.n == 1:
                        reply.finish(finish_reason, n, timings)
                        return
                    choices[i] = replies[i].finish_choice(finish_reason, timings)
                    n_gen += n
                    if all(r.finished for r in replies):
                        reply.end(choices, n_gen, timings)
                        return
                elif event[1] == "cancelled":  # the engine saw the client leave first
                    raise ClientGone()
                else:
                    reply.fail(event[1])
                    return
        except BaseException:
            worker.withdraw(job)
            raise


ROUTES: dict[str, dict[str, Callable]] = {
    "/": {"GET": RequestHandler.get_page},
    "/index.html": {"GET": RequestHandler.get_page},
    "/health": {"GET": RequestHandler.get_health},
    "/v1/models": {"GET": RequestHandler.get_models},
    "/models": {"GET": RequestHandler.get_models},
    "/props": {"GET": RequestHandler.get_props},
    "/slots": {"GET": RequestHandler.get_slots},
    "/metrics": {"GET": RequestHandler.get_metrics},
    "/v1/embeddings": {"POST": RequestHandler.post_embeddings},
    "/embedding": {"POST": RequestHandler.post_native_embedding},
    "/embeddings": {"POST": RequestHandler.post_native_embedding},
    "/v1/chat/completions": {"POST": RequestHandler.post_chat},
    "/chat/completions": {"POST": RequestHandler.post_chat},
    "/v1/completions": {"POST": RequestHandler.post_completion},
    "/completions": {"POST": RequestHandler.post_completion},
    "/tokenize": {"POST": RequestHandler.post_tokenize},
    "/detokenize": {"POST": RequestHandler.post_detokenize},
    "/completion": {"POST": RequestHandler.post_native_completion},
    "/apply-template": {"POST": RequestHandler.post_apply_template},
}
PUBLIC_PATHS = {"/", "/index.html", "/health"}
