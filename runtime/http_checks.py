"""What a request must be before the server does any work for it: the checks that keep a web
page, a rebinding DNS name or a malformed request from using the server (runtime.http_handler
applies them; each returns a refusal's message or raises ValueError, nothing here sends).

- Host: the server answers only to names that are its own. A page on evil.example can make
  a browser resolve evil.example to 127.0.0.1 or to this machine's address (DNS rebinding),
  after which the browser treats the server as evil.example's; the Host header still says
  evil.example, so a Host allow-list ends that, for a loopback and a network bind alike.
- Origin and Content-Type: a page may send a "simple" cross-site POST (text/plain, no
  preflight) without reading the answer; it still starts a generation. JSON endpoints take
  only application/json (which a browser sends cross-site only after a CORS preflight that
  this server refuses unless --cors names the origin), and a foreign Origin is refused.
- Content-Length: ASCII digits only (str.isdigit() accepts '²' and other digits).
- JSON: nested at most MAX_JSON_DEPTH deep (a deeper body hit the interpreter's recursion
  limit later, as a 500).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

MAX_JSON_DEPTH = 64
_DIGITS = re.compile(r"[0-9]{1,18}")


def content_length(value: str | None) -> int | None:
    """The Content-Length header's value, or None when it is absent; ValueError when it is
    not plain ASCII digits."""
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"Content-Length must be a number of bytes, got {value!r}")
    return int(value)


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError when value (parsed JSON) nests lists and objects deeper than limit."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise ValueError(f"the JSON body nests more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def is_json_content_type(value: str | None) -> bool:
    """application/json, with or without parameters (charset=utf-8)."""
    return bool(value) and value.split(";", 1)[0].strip().lower() == "application/json"


def host_name(host: str) -> str:
    """The name in a Host header, without its port and brackets, lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_host(host: str) -> bool:
    """Whether a Host header (with or without a port) names this machine's loopback."""
    return is_loopback_name(host_name(host))


def is_loopback_name(name: str) -> bool:
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def machine_names(bind_host: str) -> set[str]:
    """The names and addresses this machine answers to, as a Host header may give them: the
    host name (short and fully qualified), the addresses those resolve to, the address the
    server is bound to (unless it is a wildcard) and every loopback name."""
    names = {"localhost", "localhost."}
    for name in {socket.gethostname(), socket.getfqdn()}:
        if not name:
            continue
        names.add(name.lower())
        try:
            for info in socket.getaddrinfo(name, None):
                names.add(info[4][0].split("%", 1)[0].lower())
        except OSError:
            pass
    bind = bind_host.strip("[]").lower()
    if bind not in ("", "0.0.0.0", "::"):
        names.add(bind)
    return names


def host_allowed(host: str | None, allowed: set[str]) -> bool:
    """Whether a request's Host header names this server: a loopback name or address, or a
    name in allowed (machine_names plus --allowed-host)."""
    if not host:
        return False
    name = host_name(host)
    return is_loopback_name(name) or name in allowed or name.rstrip(".") in allowed


def origin_allowed(origin: str | None, host: str | None, cors_origin: str | None) -> bool:
    """Whether a browser request from origin may use the API: no Origin (not a browser, or
    a same-origin GET), the server's own page (the Origin names the Host it asked), or the
    origin --cors names ("*": any)."""
    if origin is None:
        return True
    if cors_origin and (cors_origin == "*" or origin.rstrip("/") == cors_origin.rstrip("/")):
        return True
    if origin == "null" or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme == "http" and parts.netloc.lower() == host.strip().lower()
