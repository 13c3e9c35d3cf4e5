"""runtime.http_connections: slow and idle clients never hold a worker; heads and bodies
have total deadlines (issue 16, finding 6). Loopback only, every loop bounded."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import closing

import pytest

from conftest import serving_in_thread
from runtime import http_connections as hc


class EchoHandler(hc.BoundedRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(b"ok")

    def do_POST(self) -> None:
        try:
            body = self.read_body(int(self.headers["Content-Length"]))
        except hc.RequestDeadline:
            self.close_connection = True
            return
        self._answer(json.dumps({"got": len(body)}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serving(workers: int = 2):
    return serving_in_thread(hc.BoundedHTTPServer(("127.0.0.1", 0), EchoHandler, workers=workers))


def get(server, path="/health", timeout=5.0) -> tuple[int, float]:
    t0 = time.perf_counter()
    with closing(http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                            timeout=timeout)) as conn:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0


def seconds_until_closed_while_trickling(s: socket.socket, limit: float = 4.0) -> float:
    """Send a byte every 0.1 s (each read is quick) until the server closes; the time it
    took (limit when it never did)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            s.sendall(b"x")
            s.settimeout(0.1)
            if s.recv(1) == b"":
                break
        except socket.timeout:
            continue
        except OSError:
            break
    return time.monotonic() - t0


def test_three_hundred_trickling_sockets_do_not_stop_health():
    """Before: 300 sockets sending a byte now and then held 300 threads."""
    with serving(workers=2) as server:
        slow = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
                s.sendall(b"GET /he")
                slow.append(s)
            for _ in range(5):
                for s in slow[:50]:
                    try:
                        s.sendall(b"a")
                    except OSError:
                        pass
                status, seconds = get(server)
                assert status == 200 and seconds < 1.0, seconds
            assert threading.active_count() < 40  # no thread per socket
        finally:
            for s in slow:
                s.close()


def test_a_head_that_trickles_past_its_deadline_is_closed(monkeypatch):
    monkeypatch.setattr(hc, "HEAD_SECONDS", 0.5)
    with serving() as server:
        with closing(socket.create_connection(("127.0.0.1", server.server_address[1]),
                                              timeout=5)) as s:
            assert seconds_until_closed_while_trickling(s) < 2.0


def test_a_body_that_trickles_past_its_deadline_is_dropped(monkeypatch):
    monkeypatch.setattr(hc, "BODY_SECONDS", 0.5)
    with serving(workers=1) as server:
        with closing(socket.create_connection(("127.0.0.1", server.server_address[1]),
                                              timeout=5)) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            assert seconds_until_closed_while_trickling(s) < 2.0
        assert get(server)[0] == 200  # the one worker is free again


def test_keep_alive_and_pipelined_requests_still_work():
    with serving(workers=1) as server:
        with closing(http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                                timeout=5)) as conn:
            for n in (0, 10, 100_000):
                conn.request("POST", "/", body=b"x" * n)
                assert json.loads(conn.getresponse().read()) == {"got": n}
        with closing(socket.create_connection(("127.0.0.1", server.server_address[1]),
                                              timeout=5)) as s:
            s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while data.count(b"ok") < 2:
                chunk = s.recv(4096)
                assert chunk
                data += chunk
            assert data.count(b"HTTP/1.1 200") == 2


def test_an_over_long_head_gets_431():
    with serving() as server:
        with closing(socket.create_connection(("127.0.0.1", server.server_address[1]),
                                              timeout=5)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (hc.MAX_HEAD_BYTES + 10))
            assert s.recv(100).startswith(b"HTTP/1.1 431")


def test_idle_keep_alive_connections_do_not_hold_workers():
    with serving(workers=1) as server:
        conns = [http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
                 for _ in range(5)]
        try:
            for conn in conns:
                conn.request("GET", "/")
                assert conn.getresponse().read() == b"ok"
            assert get(server)[1] < 1.0  # five idle kept-alive connections, one worker
        finally:
            for conn in conns:
                conn.close()
