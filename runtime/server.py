"""HTTP: an OpenAI-compatible API and the chat page, on the standard library.

Threads: a bounded pool of HTTP threads (runtime/http_connections.py); ONE engine thread
(runtime/worker.py's EngineWorker) loads the model and runs every generation, taking jobs
from a queue. An HTTP thread never touches the engine, the model or Numba: it parses and
validates a request (runtime/openai_api.py), tokenizes it through the worker's text
interface (pure Python), puts a Job on the queue and relays the Job's events to its client.
A client that goes away cancels its Job.

The rooms: this module holds the server (its settings, binding a free port), the endpoints
that describe it (GET / the chat page, /health, /v1/models, /props, /slots, /metrics; POST
/tokenize, /detokenize as llama.cpp's) and the table of routes; runtime/http_handler.py the
plumbing every request goes through (routing, checks, JSON bodies and answers);
runtime/completion_endpoints.py the generation endpoints (chat and text completions,
llama.cpp's /completion and /apply-template); runtime/embedding_endpoints.py the embeddings.
"""

from __future__ import annotations

import errno
import socket
import sys
import time
import traceback
from typing import Callable

from runtime import completion_endpoints, embedding_endpoints
from runtime.http_checks import is_loopback_host, machine_names
from runtime.http_connections import DEFAULT_WORKERS, BoundedHTTPServer
from runtime.http_handler import RequestHandler
from runtime.openai_api import RequestError, bool_field, error_body
from runtime.openai_chat import ChatSettings
from runtime.worker import EngineWorker

MAX_BODY_BYTES = 8 * 2**20
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
        self.routes = ROUTES  # path -> method -> endpoint(handler)
        self.public_paths = PUBLIC_PATHS  # no API key or Origin check

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



# --- the endpoints that describe the server ------------------------------------------------

def get_page(h: RequestHandler) -> None:
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    h.send_bytes(200, h.server.page(), "text/html; charset=utf-8",
                 {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


def get_health(h: RequestHandler) -> None:
    worker = h.server.worker
    if worker.state == "ok":
        h.send_json(200, {"status": "ok"})
    elif worker.state == "loading":
        h.send_json(503, {"status": "loading", **error_body(503, "the model is loading",
                                                            code="model_loading")})
    else:
        h.send_json(503, {"status": "failed", **error_body(503, f"the model failed to load: "
                                                           f"{worker.error}")})


def get_models(h: RequestHandler) -> None:
    """The one model, with its context and what it can be asked for (as llama.cpp's
    /v1/models, and Ollama's "models" list that some apps read instead)."""
    worker = h.server.worker
    info = worker.info
    entry = {"id": h.server.model_name, "object": "model", "created": h.server.created,
             "owned_by": "modelrun",
             "meta": {"n_ctx": info.n_ctx, "n_vocab": info.n_vocab} if info else None}
    if info:
        entry["context_length"] = info.n_ctx
        entry["capabilities"] = _capabilities(h, worker)
    h.send_json(200, {"object": "list", "data": [entry], "models": [
        {"name": h.server.model_name, "model": h.server.model_name,
         "capabilities": entry.get("capabilities", [])}]})


def _capabilities(h: RequestHandler, worker: EngineWorker) -> list[str]:
    """completion always; chat and tools when the model has its own chat template (a
    base model has none: the page opens it in text completion); embeddings when the
    server was started with --embeddings."""
    found = ["completion"]
    if worker.model_chat_template():
        found += ["chat", "tools"]
    if h.server.embeddings:
        found.append("embeddings")
    return found


def get_props(h: RequestHandler) -> None:
    """llama.cpp's /props, in part. chat_template is the model's own template, "" when it has
    none (a base model: the chat page then opens in text completion)."""
    worker, info = h.loaded()
    h.send_json(200, {"chat_template": worker.model_chat_template(),
                      "default_generation_settings": {"n_ctx": info.n_ctx},
                      "total_slots": info.n_slots})


def get_slots(h: RequestHandler) -> None:
    """llama.cpp's GET /slots: each slot's state; with ?fail_on_no_slot, a 503 when none
    is idle (a load balancer's probe)."""
    if not h.server.slots_endpoint:
        raise RequestError(501, "this server does not serve /slots (it was started with --no-slots)",
                           code="not_supported")
    worker, _ = h.loaded()
    slots = worker.slots_state()
    query = h.path.partition("?")[2]
    if "fail_on_no_slot" in query and all(s["is_processing"] for s in slots):
        raise RequestError(503, "no slot available", code="unavailable")
    h.send_json(200, slots)


def get_metrics(h: RequestHandler) -> None:
    """llama.cpp's GET /metrics (runtime.metrics), with --metrics."""
    if h.server.metrics is None:
        raise RequestError(501, "this server does not serve /metrics (start it with --metrics)",
                           code="not_supported")
    from runtime.metrics import CONTENT_TYPE

    h.send_bytes(200, h.server.metrics.render(), CONTENT_TYPE)


def post_tokenize(h: RequestHandler) -> None:
    body = h.json_body()
    worker, _ = h.loaded()
    content = body.get("content")
    if not isinstance(content, str):
        raise RequestError(400, f"content must be a string, got {type(content).__name__}", "content")
    parse_special = bool_field(body, "parse_special") if "parse_special" in body else True
    tokens = worker.encode(content, add_special=bool_field(body, "add_special"),
                           parse_special=parse_special)
    h.send_json(200, {"tokens": tokens})


def post_detokenize(h: RequestHandler) -> None:
    body = h.json_body()
    worker, info = h.loaded()
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in tokens):
        raise RequestError(400, f"tokens must be a list of token ids (integers 0..{info.n_vocab - 1})",
                           "tokens")
    h.send_json(200, {"content": worker.decode(tokens)})


ROUTES: dict[str, dict[str, Callable]] = {
    "/": {"GET": get_page},
    "/index.html": {"GET": get_page},
    "/health": {"GET": get_health},
    "/v1/models": {"GET": get_models},
    "/models": {"GET": get_models},
    "/props": {"GET": get_props},
    "/slots": {"GET": get_slots},
    "/metrics": {"GET": get_metrics},
    "/v1/embeddings": {"POST": embedding_endpoints.post_embeddings},
    "/embedding": {"POST": embedding_endpoints.post_native_embedding},
    "/embeddings": {"POST": embedding_endpoints.post_native_embedding},
    "/v1/chat/completions": {"POST": completion_endpoints.post_chat},
    "/chat/completions": {"POST": completion_endpoints.post_chat},
    "/v1/completions": {"POST": completion_endpoints.post_completion},
    "/completions": {"POST": completion_endpoints.post_completion},
    "/tokenize": {"POST": post_tokenize},
    "/detokenize": {"POST": post_detokenize},
    "/completion": {"POST": completion_endpoints.post_native_completion},
    "/apply-template": {"POST": completion_endpoints.post_apply_template},
}
PUBLIC_PATHS = {"/", "/index.html", "/health"}
