"""runtime.http_checks: the request checks, on their own (tests/test_server.py sends the
attacks through a real server)."""

import json
import socket

import pytest

from runtime.http_checks import (check_json_depth, content_length, host_allowed, is_json_content_type,
                                 machine_names, origin_allowed)


@pytest.mark.parametrize("value", ["²", "1²", "١٢", "+5", "-1", "0x10", "1e3", "", " ", "5 5",
                                   "9" * 19])
def test_content_length_is_ascii_digits_only(value):
    with pytest.raises(ValueError, match="Content-Length must be a number of bytes"):
        content_length(value)


def test_content_length_values():
    assert content_length(None) is None
    assert content_length("0") == 0 and content_length(" 1234 ") == 1234


def test_json_depth():
    check_json_depth(json.loads("[" * 64 + "]" * 64))
    check_json_depth({"messages": [{"role": "user", "content": "x" * 100}]})
    with pytest.raises(ValueError, match="more than 64 levels"):
        check_json_depth(json.loads("[" * 65 + "]" * 65))
    with pytest.raises(ValueError, match="more than 64 levels"):
        check_json_depth(json.loads('{"a":' * 70 + "1" + "}" * 70))


@pytest.mark.parametrize("value, ok", [
    ("application/json", True), ("application/json; charset=utf-8", True),
    ("Application/JSON", True), ("text/plain", False), ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False), (None, False), ("", False),
    ("application/jsonp", False),
])
def test_json_content_type(value, ok):
    assert is_json_content_type(value) is ok


def test_hosts():
    allowed = machine_names("0.0.0.0") | {"model.lan"}
    assert socket.gethostname().lower() in allowed
    for host in ("127.0.0.1:8080", "localhost", "[::1]:80", "model.lan:8080", "MODEL.LAN",
                 f"{socket.gethostname()}:8080"):
        assert host_allowed(host, allowed), host
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "", None,
                 "model.lan.evil.example"):
        assert not host_allowed(host, allowed), host
    assert "192.0.2.7" in machine_names("192.0.2.7")


@pytest.mark.parametrize("origin, host, cors, ok", [
    (None, "127.0.0.1:8080", None, True),  # curl, the openai client
    ("http://127.0.0.1:8080", "127.0.0.1:8080", None, True),  # the server's own page
    ("http://evil.example", "127.0.0.1:8080", None, False),
    ("http://127.0.0.1:9999", "127.0.0.1:8080", None, False),  # another local server's page
    ("https://127.0.0.1:8080", "127.0.0.1:8080", None, False),
    ("null", "127.0.0.1:8080", None, False),  # a sandboxed frame, a file:// page
    ("https://app.example", "127.0.0.1:8080", "https://app.example", True),
    ("https://other.example", "127.0.0.1:8080", "https://app.example", False),
    ("https://any.example", "127.0.0.1:8080", "*", True),
])
def test_origins(origin, host, cors, ok):
    assert origin_allowed(origin, host, cors) is ok
