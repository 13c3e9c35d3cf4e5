"""The HTTP plumbing every endpoint shares: a request routed, checked (host, origin, API
key, content type), its JSON body read within its limits, and answers sent as JSON; the
model's readiness (a 503 while it loads) and a client that went away seen from the socket.

The endpoints (runtime/server.py, completion_endpoints.py, embedding_endpoints.py) are
functions of the handler; the server's `routes` table maps a path and a method to one.
Every failure becomes a JSON error in OpenAI's shape, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import traceback
from http import HTTPStatus
from typing import Any

from runtime.http_checks import (check_json_depth, content_length, host_allowed,
                                 is_json_content_type, origin_allowed)
from runtime.http_connections import BoundedRequestHandler, RequestDeadline
from runtime.openai_api import RequestError, error_body
from runtime.terminal import printable
from runtime.worker import EngineWorker, ModelInfo


class ClientGone(Exception):
    """The client closed its connection."""


class RequestHandler(BoundedRequestHandler):
    """One connection's requests: routed by the server's `routes` (path -> method ->
    endpoint(handler)), checked, answered in JSON. `server` is runtime.server's ModelServer
    (its worker, settings and routes)."""

    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds a connection may sit idle between requests (or stall mid-body)
    server_version = "modelrun"
    sys_version = ""

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

    def send_bytes(self, status: int, body: bytes, content_type: str,
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
        self.send_bytes(status, body, "application/json; charset=utf-8", extra, close)

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
            route = self.server.routes.get(path)
            if route is None:
                raise RequestError(404, f"no such endpoint: {path}", code="not_found")
            handler = route.get(method)
            if handler is None:
                e = RequestError(405, f"{path} does not accept {method}; use "
                                      f"{' or '.join(sorted(route))}", code="method_not_allowed")
                e.allow = ", ".join(sorted(route))
                raise e
            if path not in self.server.public_paths:
                self._check_origin()
                self._check_key()
            if method == "POST" and not is_json_content_type(self.headers.get("Content-Type")):
                raise RequestError(415, f"{path} takes a JSON body: send it with Content-Type: "
                                        "application/json", code="unsupported_media_type")
            handler(self)
        except RequestError as e:
            self.discard_body()
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

    def discard_body(self) -> None:
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

    def json_body(self) -> dict:
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

    def loaded(self) -> tuple[EngineWorker, ModelInfo]:
        """The worker and its model's facts, or a 503 while it loads or when it failed to."""
        worker = self.server.worker
        if worker.state == "loading":
            raise RequestError(503, "the model is still loading; try again in a moment",
                               code="model_loading")
        if worker.state != "ok":
            raise RequestError(503, f"the model failed to load: {worker.error}", code="model_failed")
        return worker, worker.info

    def client_gone(self) -> bool:
        """True when the client closed its side (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def refuse_beyond_context(self, text: str, info: ModelInfo, param: str) -> None:
        """A 400 for text too long to fit the context whatever its tokens, before
        tokenizing it (which costs time and memory in proportion)."""
        at_least = self.server.worker.fewest_tokens(text)
        if at_least + 1 > info.n_ctx:
            raise RequestError(400, f"the prompt has at least {at_least} tokens ({len(text)} "
                                    f"characters) but the context holds only {info.n_ctx}; "
                                    "shorten it or restart the server with a larger -c",
                               param, "context_length_exceeded")
