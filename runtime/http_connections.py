"""An HTTP server whose connections cannot exhaust it: a bounded number of worker threads
(llama.cpp's --threads-http), and one thread that waits for every connection's request head.

Thread-per-connection (the standard library's ThreadingHTTPServer) gives a thread to each
socket, so 300 clients sending a byte now and then hold 300 threads, and at the usual limit
of 1024 descriptors /health stops answering. Here a connection gets a worker only once its
request line and headers have all arrived: until then it waits in one selector thread,
which costs a descriptor and a buffer, and which closes it when the head does not arrive
within HEAD_SECONDS in total (not per read: a byte every few seconds does not keep it), or
when MAX_WAITING connections already wait (the one with the nearest deadline goes). A worker
then reads the body (a total deadline too: BODY_SECONDS plus a second per 64 KiB), runs the
handler and, for a kept-alive connection, hands it back to the waiting thread. So slow or
idle clients never hold a worker, and a request that has arrived whole, like /health, finds
one unless `workers` requests are being answered at once.
"""

from __future__ import annotations

import heapq
import io
import queue
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

DEFAULT_WORKERS = 16
MAX_WAITING = 256  # connections waiting for a request head
MAX_HEAD_BYTES = 64 * 1024
HEAD_SECONDS = 10.0  # for a request line and headers, from the first byte (or the accept)
IDLE_SECONDS = 60.0  # a kept-alive connection waiting for its next request
BODY_SECONDS = 10.0  # for a body, plus a second per BODY_RATE bytes
BODY_RATE = 64 * 1024


TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
             b"Content-Length: 0\r\n\r\n")


class RequestDeadline(TimeoutError):
    """A request body did not arrive in time."""


class _Waiting:
    """One connection waiting for a whole request head."""

    __slots__ = ("sock", "address", "buffer", "deadline", "idle")

    def __init__(self, sock, address, buffer: bytes, idle: bool):
        self.sock, self.address, self.buffer, self.idle = sock, address, bytearray(buffer), idle
        self.deadline = time.monotonic() + (IDLE_SECONDS if idle and not buffer else HEAD_SECONDS)

    def head_complete(self) -> bool:
        return b"\r\n\r\n" in self.buffer or b"\n\n" in self.buffer


class ConnectionReader(io.RawIOBase):
    """A connection's input: the bytes the waiting thread already read, then the socket.
    read(n) returns n bytes (fewer only at the end), within the body's deadline."""

    def __init__(self, sock: socket.socket, buffered: bytes):
        super().__init__()
        self.sock = sock
        self.buffered = bytearray(buffered)
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def start_body(self, length: int) -> None:
        """The next `length` bytes are a body: they get BODY_SECONDS plus their size's time."""
        self.deadline = time.monotonic() + BODY_SECONDS + length / BODY_RATE

    def _recv(self, n: int) -> bytes:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestDeadline("the request body did not arrive in time")
            self.sock.settimeout(left)
        try:
            return self.sock.recv(n)
        except socket.timeout:
            if self.deadline is not None:
                raise RequestDeadline("the request body did not arrive in time") from None
            raise

    def readinto(self, target) -> int:
        if self.buffered:
            n = min(len(target), len(self.buffered))
            target[:n] = self.buffered[:n]
            del self.buffered[:n]
            return n
        data = self._recv(len(target))
        target[:len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise ValueError("read() needs a size here (the connection stays open)")
        out = bytearray()
        while len(out) < n:
            if self.buffered:
                take = min(n - len(out), len(self.buffered))
                out += self.buffered[:take]
                del self.buffered[:take]
                continue
            chunk = self._recv(min(n - len(out), 1 << 20))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readline(self, limit: int = -1) -> bytes:
        """A line of the head (which the waiting thread read whole), else of the socket."""
        end = self.buffered.find(b"\n")
        if end >= 0 and (limit < 0 or end < limit):
            line = bytes(self.buffered[:end + 1])
            del self.buffered[:end + 1]
            return line
        line = bytearray()
        while limit < 0 or len(line) < limit:
            byte = self.read(1)
            if not byte:
                break
            line += byte
            if byte == b"\n":
                break
        return bytes(line)


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """A handler for BoundedHTTPServer: reads through the connection's ConnectionReader and
    answers one request per worker turn."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own file: its reference would keep the socket open
        self.rfile = self.server.reader_of(self.connection)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def read_body(self, length: int) -> bytes:
        """The request body, within its total deadline."""
        self.rfile.start_body(length)
        try:
            return self.rfile.read(length)
        finally:
            self.rfile.deadline = None
            self.connection.settimeout(self.timeout)  # for writing the answer


class BoundedHTTPServer(HTTPServer):
    """HTTPServer with `workers` threads and one thread waiting for request heads."""

    request_queue_size = 128  # the listening socket's backlog

    def __init__(self, address, handler_class, workers: int = DEFAULT_WORKERS):
        self.workers = workers
        self._ready: queue.Queue = queue.Queue()
        self._readers: dict[socket.socket, ConnectionReader] = {}
        self._incoming: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        super().__init__(address, handler_class)  # binds (or closes all and raises)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Start the threads, then accept. The threads start here, not when binding: a
        process that confines itself in between (runtime.confine) has them confined too."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._wait_for_heads, name="http heads",
                                              daemon=True)]
            self._threads += [threading.Thread(target=self._work, name=f"http {i}", daemon=True)
                              for i in range(self.workers)]
            for thread in self._threads:
                thread.start()
        super().serve_forever(poll_interval)

    # -- the waiting thread ---------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        """A new connection (from serve_forever's accept): it waits for its request head."""
        self._wait(request, client_address, b"", idle=False)

    def _wait(self, sock, address, buffered: bytes, idle: bool) -> None:
        self._incoming.put(_Waiting(sock, address, buffered, idle))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _wait_for_heads(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        waiting: dict[socket.socket, _Waiting] = {}
        while not self._closed.is_set():
            now = time.monotonic()
            nearest = min((w.deadline for w in waiting.values()), default=now + 1.0)
            for key, _ in selector.select(max(0.0, min(nearest - now, 1.0))):
                if key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                w = waiting[key.fileobj]
                try:
                    chunk = w.sock.recv(MAX_HEAD_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    self._drop(selector, waiting, w)
                    continue
                if w.idle and not w.buffer:
                    w.deadline = time.monotonic() + HEAD_SECONDS  # its next request began
                w.buffer += chunk
                self._dispatch_if_whole(selector, waiting, w)
            while True:
                try:
                    w = self._incoming.get_nowait()
                except queue.Empty:
                    break
                try:
                    w.sock.setblocking(False)
                except OSError:
                    self.shutdown_request(w.sock)
                    continue
                waiting[w.sock] = w
                selector.register(w.sock, selectors.EVENT_READ)
                self._dispatch_if_whole(selector, waiting, w)
            now = time.monotonic()
            for w in [w for w in waiting.values() if w.deadline <= now]:
                self._drop(selector, waiting, w)
            if len(waiting) > MAX_WAITING:
                for w in heapq.nsmallest(len(waiting) - MAX_WAITING, waiting.values(),
                                         key=lambda w: (not w.idle, w.deadline)):
                    self._drop(selector, waiting, w)
        for w in list(waiting.values()):
            self._drop(selector, waiting, w)
        selector.close()

    def _dispatch_if_whole(self, selector, waiting, w: _Waiting) -> None:
        if w.head_complete():
            selector.unregister(w.sock)
            del waiting[w.sock]
            self._ready.put(w)
        elif len(w.buffer) > MAX_HEAD_BYTES:
            try:
                w.sock.send(TOO_LARGE)
            except OSError:
                pass
            self._drop(selector, waiting, w)

    def _drop(self, selector, waiting, w: _Waiting) -> None:
        selector.unregister(w.sock)
        del waiting[w.sock]
        self.shutdown_request(w.sock)

    # -- the workers ----------------------------------------------------------------------------

    def reader_of(self, sock: socket.socket) -> ConnectionReader:
        return self._readers[sock]

    def _work(self) -> None:
        while True:
            w = self._ready.get()
            if w is None:
                return
            sock = w.sock
            reader = self._readers[sock] = ConnectionReader(sock, bytes(w.buffer))
            keep = False
            try:
                sock.setblocking(True)
                handler = self.RequestHandlerClass(sock, w.address, self)
                keep = not handler.close_connection and not self._closed.is_set()
            except Exception:
                self.handle_error(sock, w.address)
            finally:
                del self._readers[sock]
            if keep:
                self._wait(sock, w.address, bytes(reader.buffered), idle=True)
            else:
                self.shutdown_request(sock)

    def finish_request(self, request, client_address) -> None:  # not used: see _work
        raise NotImplementedError

    def server_close(self) -> None:
        super().server_close()
        self._closed.set()
        for _ in range(self.workers):
            self._ready.put(None)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._threads:
            self._threads[0].join(5)
        self._wake_r.close()
        self._wake_w.close()
