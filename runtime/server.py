"""HTTP: an OpenAI-compatible API and the chat page, on the standard library.

Threads: the HTTP server runs one thread per connection (ThreadingHTTPServer); ONE engine
thread (EngineWorker) loads the model and runs every generation, taking jobs from a queue.
An HTTP thread never touches the engine, the model or Numba: it parses and validates a
request, tokenizes it (pure Python), puts a Job on the queue and relays the Job's events
to its client. A client that goes away marks its Job cancelled; the engine thread checks
that before every token, and skips queued Jobs that were cancelled before they started.

Endpoints: GET / (the chat page), GET /health, GET /v1/models, GET /props, POST
/v1/chat/completions, POST /v1/completions, POST /tokenize, POST /detokenize (the last three
as llama.cpp's server).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from runtime.chat import ChatTemplate
from runtime.engine import TextGeneration
from runtime.sampling import SamplingParams, TokenLogprobs, logprobs

MAX_BODY_BYTES = 8 * 2**20
MAX_TOP_LOGPROBS = 20
POLL_SECONDS = 0.1  # how often a waiting HTTP thread checks whether its client is still there
PORT_ATTEMPTS = 10
WSAEADDRINUSE = 10048  # Windows' "address in use"

# Request fields that ask for something this server does not do (a 400 when set).
UNSUPPORTED_WHEN_SET = ("tools", "functions", "tool_choice", "function_call", "audio",
                        "modalities", "prediction", "suffix")


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                500: "server_error", 503: "unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# --- the engine thread -------------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What the HTTP threads may know about the loaded model (copied once, read-only)."""

    n_ctx: int
    n_vocab: int


@dataclass
class Job:
    """One generation request on its way through the queue.

    The engine thread puts events on `events`: ("piece", text, [TokenLogprobs]) per emitted
    piece, then ("done", finish_reason, n_generated, timings) or ("error", message).
    """

    prompt_tokens: list[int]
    params: Any  # SamplingParams
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token and N alternatives
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineWorker:
    """The one thread that owns the engine: loads the model, then runs Jobs one by one."""

    def __init__(self, load: Callable[[], Any], on_failure: Callable[[BaseException], None] | None = None):
        self._load = load  # -> an object with .engine and .tokenizer (cli.Session)
        self._on_failure = on_failure
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.state = "loading"  # -> "ok" or "failed"
        self.error: str | None = None
        self.session = None
        self.chat_template = None
        self.info: ModelInfo | None = None
        self.loaded = threading.Event()
        self.current: Job | None = None  # the Job being generated (stop() and tests read it)
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    @property
    def idle(self) -> bool:
        return self.current is None and self.jobs.unfinished_tasks == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs, drop what waits, and end the thread."""
        current = self.current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.events.put(("error", "the server is shutting down"))
            self.jobs.task_done()
        self.jobs.put(None)
        if self.state == "ok":  # a load cannot be interrupted; the daemon thread ends with us
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.session = self._load()
            engine = self.session.engine
            self.info = ModelInfo(n_ctx=engine.n_ctx, n_vocab=engine.model.hp.n_vocab)
            self.chat_template = ChatTemplate.for_model(self.session.gguf.metadata)
        except BaseException as e:  # a UserError from load_session, or a bug: report it, stop
            message = getattr(e, "format_message", lambda: f"{type(e).__name__}: {e}")()
            if not hasattr(e, "format_message"):
                traceback.print_exc()
            self.error, self.state = message, "failed"
            self.loaded.set()
            if self._on_failure:
                self._on_failure(e)
            return
        self.state = "ok"
        self.loaded.set()
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if job.cancelled.is_set():  # its client left while it waited
                    self.counts["skipped"] += 1
                    continue
                self.current = job
                self._generate(job)
            except Exception:
                traceback.print_exc()
                self.counts["failed"] += 1
                job.events.put(("error", "the model failed on this request (see the server log)"))
            finally:
                self.current = None
                self.jobs.task_done()

    def _generate(self, job: Job) -> None:
        engine, tokenizer = self.session.engine, self.session.tokenizer
        generation = _JobGeneration(engine, tokenizer, job)
        t_start = time.perf_counter()
        t_first = None
        sent = 0  # logprob entries already attached to a piece
        for piece in generation:
            if t_first is None:
                t_first = time.perf_counter()
            n = len(generation.tokens)
            job.events.put(("piece", piece, generation.entries[sent:n]))
            sent = n
            if job.cancelled.is_set():
                break  # closes the generator: no further token is computed
        t_end = time.perf_counter()
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.events.put(("error", "cancelled"))
            return
        tail = generation.entries[sent:len(generation.tokens)]
        if tail:
            job.events.put(("piece", "", tail))
        n_gen = len(generation.tokens)
        t_first = t_first or t_end
        timings = {"prompt_n": len(job.prompt_tokens), "prompt_ms": 1000 * (t_first - t_start),
                   "predicted_n": n_gen, "predicted_ms": 1000 * (t_end - t_first)}
        decode_s = t_end - t_first
        timings["predicted_per_second"] = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None
        self.counts["completed"] += 1
        job.events.put(("done", generation.finish_reason, n_gen, timings))


class _JobGeneration(TextGeneration):
    """TextGeneration that stops when its Job is cancelled and records logprobs."""

    def __init__(self, engine, tokenizer, job: Job):
        super().__init__(engine, tokenizer, job.prompt_tokens, job.params)
        self.job = job
        self.entries: list[TokenLogprobs] = []  # one per sampled token, when asked for

    def _next_token(self, logits):
        if self.job.cancelled.is_set():
            self.engine.cancel()  # engine.generate returns right after this token
        token = super()._next_token(logits)
        if self.job.top_logprobs is not None:
            self.entries.append(logprobs(logits, token, self.job.top_logprobs))
        return token


# --- request parsing ---------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty", "repeat_last_n", "logit_bias", "stop")


def _param_of(message: str) -> str:
    """The field a SamplingParams ValueError names: its first word, up to '[' ."""
    return message.split(" ", 1)[0].split("[", 1)[0]


def _int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        raise RequestError(400, f"{name} must be {allowed}, got {value!r}", name)
    return int(value)


def _bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def sampling_params(body: dict, n_vocab: int):
    """SamplingParams from a request body; a 400 naming the field when one is wrong."""
    max_tokens = _int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    given = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, **given)
    except ValueError as e:
        raise RequestError(400, str(e), _param_of(str(e))) from None
    outside = sorted(t for t in params.logit_bias if t >= n_vocab)
    if outside:
        raise RequestError(400, f"logit_bias names token {outside[0]}, outside the vocabulary "
                                f"(ids 0..{n_vocab - 1})", "logit_bias")
    return params


def refuse_unsupported(body: dict) -> None:
    """400 for request fields that ask for what this server does not do."""
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, f"n must be 1 (this server makes one choice per request), got {n!r}", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError(400, f"best_of must be 1, got {best_of!r}", "best_of")
    for name in UNSUPPORTED_WHEN_SET:
        value = body.get(name)
        if value is None or value == [] or value == "" or (name == "tool_choice" and value == "none"):
            continue
        raise RequestError(400, f"{name} is not supported by this server (it runs plain text "
                                "generation)", name)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind != "text":
            raise RequestError(400, f"response_format {kind or fmt!r} is not supported; only "
                                    '{"type": "text"}', "response_format")
    if _bool_field(body, "echo"):
        raise RequestError(400, "echo is not supported", "echo")


# --- the HTTP server ---------------------------------------------------------------------------

def is_loopback_host(host: str) -> bool:
    """Whether a Host header (with or without a port) names this machine's loopback."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_loopback_bind(host: str) -> bool:
    return is_loopback_host(host if ":" not in host else f"[{host}]")


class ModelServer(ThreadingHTTPServer):
    """The HTTP server: holds the worker, the settings and the chat page."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], worker: EngineWorker, model_name: str, *,
                 api_key: str | None = None, cors_origin: str | None = None,
                 max_body: int = MAX_BODY_BYTES, log: bool = True):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)
        self.worker = worker
        self.model_name = model_name
        self.api_key = api_key
        self.cors_origin = cors_origin
        self.max_body = max_body
        self.log = log
        self.loopback_only = _is_loopback_bind(address[0])
        self.created = int(time.time())
        self._page: bytes | None = None

    def handle_error(self, request, client_address) -> None:
        """A client that vanished is routine; anything else is logged, briefly."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
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


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds a connection may sit idle between requests (or stall mid-body)
    server_version = "modelrun"
    sys_version = ""
    server: ModelServer

    # --- plumbing ---

    def log_message(self, format: str, *args) -> None:
        """One line per request on stderr, except the page's /health polling."""
        if self.server.log and not getattr(self, "path", "").startswith("/health"):
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (malformed request line, bad headers...) in
        OpenAI's JSON shape; the connection closes after them."""
        self.close_connection = True
        try:
            self._send_json(code, error_body(code, message or HTTPStatus(code).phrase), close=True)
        except OSError:
            pass

    def _cors_headers(self) -> None:
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
        self._cors_headers()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, close: bool = False, extra: dict | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        self._send_bytes(status, body, "application/json; charset=utf-8", extra, close)

    def _send_request_error(self, e: RequestError, close: bool = False) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 405:
            extra = {"Allow": getattr(e, "allow", "GET, POST")}
        self._send_json(e.status, error_body(e.status, e.message, e.param, e.code, e.type),
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
                self._check_key()
            handler(self)
        except RequestError as e:
            self._discard_body()
            self._send_request_error(e, close=self.close_connection)
        except (BrokenPipeError, ConnectionResetError, ClientGone, socket.timeout):
            self.close_connection = True
        except Exception:
            sys.stderr.write(f"error while serving {method} {self.path}:\n{traceback.format_exc()}")
            self.close_connection = True
            try:
                self._send_json(500, error_body(500, "internal server error (see the server log)"),
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
        """DNS-rebinding protection: a loopback server answers only to loopback names."""
        if not self.server.loopback_only:
            return
        host = self.headers.get("Host")
        if not host or not is_loopback_host(host):
            raise RequestError(403, f"Host {host!r} is not allowed: this server listens on "
                                    "loopback only and answers to localhost / 127.0.0.1 / [::1]",
                               code="host_not_allowed")

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
        self._cors_headers()
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
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > self.server.max_body:
            if length not in (None, "0"):
                self.close_connection = True
            return
        self._body_read = True
        self.rfile.read(int(length))

    def _json_body(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length (chunked uploads are "
                                    "not supported)")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        length = int(length)
        if length > self.server.max_body:
            self.close_connection = True  # the body stays unread: this connection is done
            raise RequestError(413, f"the request body has {length} bytes; the limit is "
                                    f"{self.server.max_body}", code="request_too_large")
        data = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _session(self):
        worker = self.server.worker
        if worker.state == "loading":
            raise RequestError(503, "the model is still loading; try again in a moment",
                               code="model_loading")
        if worker.state != "ok":
            raise RequestError(503, f"the model failed to load: {worker.error}", code="model_failed")
        return worker.session, worker.info

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
            self._send_json(200, {"status": "ok"})
        elif worker.state == "loading":
            self._send_json(503, {"status": "loading", **error_body(503, "the model is loading",
                                                                       code="model_loading")})
        else:
            self._send_json(503, {"status": "failed", **error_body(503, f"the model failed to load: "
                                                                      f"{worker.error}")})

    def get_models(self) -> None:
        info = self.server.worker.info
        meta = {"n_ctx": info.n_ctx, "n_vocab": info.n_vocab} if info else None
        self._send_json(200, {"object": "list", "data": [
            {"id": self.server.model_name, "object": "model", "created": self.server.created,
             "owned_by": "modelrun", "meta": meta}]})

    def get_props(self) -> None:
        """llama.cpp's /props, in part. chat_template is the model's own template, "" when it has
        none (a base model: the chat page then opens in text completion)."""
        session, info = self._session()
        source = session.gguf.metadata.get("tokenizer.chat_template")
        self._send_json(200, {"chat_template": source if isinstance(source, str) else "",
                              "default_generation_settings": {"n_ctx": info.n_ctx},
                              "total_slots": 1})

    def post_tokenize(self) -> None:
        body = self._json_body()
        session, _ = self._session()
        content = body.get("content")
        if not isinstance(content, str):
            raise RequestError(400, f"content must be a string, got {type(content).__name__}", "content")
        parse_special = _bool_field(body, "parse_special") if "parse_special" in body else True
        tokens = session.tokenizer.encode(content, add_special=_bool_field(body, "add_special"),
                                          parse_special=parse_special)
        self._send_json(200, {"tokens": tokens})

    def post_detokenize(self) -> None:
        body = self._json_body()
        session, info = self._session()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in tokens):
            raise RequestError(400, f"tokens must be a list of token ids (integers 0..{info.n_vocab - 1})",
                               "tokens")
        self._send_json(200, {"content": session.tokenizer.decode(tokens)})

    def post_chat(self) -> None:
        from runtime.chat import ChatTemplateError

        body = self._json_body()
        refuse_unsupported(body)
        session, info = self._session()
        stream = _bool_field(body, "stream")
        want_logprobs = _bool_field(body, "logprobs")
        top_n = _int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top_n is not None and not want_logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = sampling_params(body, info.n_vocab)
        if "messages" not in body:
            raise RequestError(400, "messages is required", "messages")
        template = self.server.worker.chat_template
        try:
            tokens = template.tokens(session.tokenizer, body["messages"], add_generation_prompt=True)
        except ChatTemplateError as e:
            raise RequestError(400, f"{e}", "messages") from None
        except ValueError as e:  # validate_messages names the message and what is wrong
            raise RequestError(400, f"{e}", "messages") from None
        job = Job(tokens, params, (top_n or 0) if want_logprobs else None)
        self._run_job(job, info, "chat", stream, body)

    def post_completion(self) -> None:
        body = self._json_body()
        refuse_unsupported(body)
        session, info = self._session()
        stream = _bool_field(body, "stream")
        top_n = _int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        params = sampling_params(body, info.n_vocab)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = session.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in prompt):
            tokens = list(prompt)
        else:
            raise RequestError(400, "prompt must be a string or a list of token ids (one prompt "
                                    "per request)", "prompt")
        if not tokens:
            raise RequestError(400, "prompt is empty", "prompt")
        job = Job(tokens, params, top_n)
        self._run_job(job, info, "text", stream, body)

    # --- generation ---

    def _run_job(self, job: Job, info: ModelInfo, kind: str, stream: bool, body: dict) -> None:
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
        reply = _Reply(self, kind, n_prompt, stream, include_usage, self.server.model_name,
                       job.top_logprobs is not None)
        self.server.worker.submit(job)
        try:
            if stream:
                reply.start_stream()
            while True:
                try:
                    event = job.events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self._client_gone():
                        raise ClientGone()
                    continue
                if event[0] == "piece":
                    reply.piece(event[1], event[2])
                    if stream and self._client_gone():
                        raise ClientGone()
                elif event[0] == "done":
                    reply.finish(event[1], event[2], event[3])
                    return
                else:
                    reply.fail(event[1])
                    return
        except BaseException:
            job.cancel()
            raise


class _Reply:
    """Builds one response (OpenAI chat or text completion), streamed as SSE or whole."""

    def __init__(self, handler: RequestHandler, kind: str, n_prompt: int, stream: bool,
                 include_usage: bool, model: str, logprobs_wanted: bool):
        self.h, self.kind, self.n_prompt, self.stream = handler, kind, n_prompt, stream
        self.logprobs_wanted = logprobs_wanted
        self.include_usage = include_usage
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.text: list[str] = []
        self.entries: list = []
        self.tokenizer = handler.server.worker.session.tokenizer

    # SSE framing: HTTP/1.1 chunked transfer, so the connection can stay open afterwards.

    def start_stream(self) -> None:
        h = self.h
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("X-Accel-Buffering", "no")
        h.send_header("Transfer-Encoding", "chunked")
        h._cors_headers()
        h.end_headers()
        if self.kind == "chat":
            self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def _write_chunk(self, data: bytes) -> None:
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _chunk(self, delta: dict | str, finish_reason: str | None, entries=None, **extra) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": self._text_logprobs(entries, 0),
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "modelrun", "choices": [choice], **extra}

    def piece(self, text: str, entries: list) -> None:
        if self.stream:
            if text or entries:
                offset = sum(len(t) for t in self.text)
                delta = {"content": text} if self.kind == "chat" else text
                chunk = self._chunk(delta, None, entries)
                if self.kind == "text" and entries is not None and chunk["choices"][0]["logprobs"]:
                    chunk["choices"][0]["logprobs"] = self._text_logprobs(entries, offset)
                self._event(chunk)
        self.text.append(text)
        self.entries.extend(entries)

    def _usage(self, n_gen: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_gen,
                "total_tokens": self.n_prompt + n_gen}

    def finish(self, finish_reason: str, n_gen: int, timings: dict) -> None:
        usage = self._usage(n_gen)
        if self.stream:
            last = self._chunk({} if self.kind == "chat" else "", finish_reason, timings=timings)
            for choice in last["choices"]:
                choice["logprobs"] = None
            self._event(last)
            if self.include_usage:
                self._event({"id": self.id, "object": last["object"], "created": self.created,
                             "model": self.model, "choices": [], "usage": usage})
            self._event("[DONE]")
            self._write_chunk(b"")
            return
        text = "".join(self.text)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._chat_logprobs(self.entries), "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._text_logprobs(self.entries, 0),
                      "finish_reason": finish_reason}
        self.h._send_json(200, {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.model, "system_fingerprint": "modelrun",
                                "choices": [choice], "usage": usage, "timings": timings})

    def fail(self, message: str) -> None:
        if message == "cancelled":
            raise ClientGone()
        if self.stream:
            self._event(error_body(500, message))
            self._event("[DONE]")
            self._write_chunk(b"")
        else:
            self.h._send_json(500, error_body(500, message))

    # logprobs in OpenAI's two shapes

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_to_piece(token, special=True)
        return raw.decode("utf-8", "replace"), list(raw)

    def _chat_logprobs(self, entries) -> dict | None:
        if entries is None or not self.logprobs_wanted:
            return None
        content = []
        for e in entries:
            text, raw = self._token_text(e.token)
            top = []
            for tid, lp in e.top:
                t, b = self._token_text(tid)
                top.append({"token": t, "logprob": _finite(lp), "bytes": b})
            content.append({"token": text, "logprob": _finite(e.logprob), "bytes": raw,
                            "top_logprobs": top})
        return {"content": content}

    def _text_logprobs(self, entries, offset: int) -> dict | None:
        if entries is None or not self.logprobs_wanted:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = self._token_text(e.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({self._token_text(t)[0]: _finite(lp) for t, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _finite(x: float) -> float:
    """JSON has no -inf: a banned token's logprob becomes a very small number."""
    return x if math.isfinite(x) else -9999.0


ROUTES: dict[str, dict[str, Callable]] = {
    "/": {"GET": RequestHandler.get_page},
    "/index.html": {"GET": RequestHandler.get_page},
    "/health": {"GET": RequestHandler.get_health},
    "/v1/models": {"GET": RequestHandler.get_models},
    "/models": {"GET": RequestHandler.get_models},
    "/props": {"GET": RequestHandler.get_props},
    "/v1/chat/completions": {"POST": RequestHandler.post_chat},
    "/chat/completions": {"POST": RequestHandler.post_chat},
    "/v1/completions": {"POST": RequestHandler.post_completion},
    "/completions": {"POST": RequestHandler.post_completion},
    "/tokenize": {"POST": RequestHandler.post_tokenize},
    "/detokenize": {"POST": RequestHandler.post_detokenize},
}
PUBLIC_PATHS = {"/", "/index.html", "/health"}
