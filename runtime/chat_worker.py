"""The chat-template renderer: where untrusted template code runs, bounded in time and
memory, apart from the server, in processes that the server never has to start itself.

Why a process and not a tighter sandbox: a template can grow a string or spin in a great
many ways (`center`, `ljust`, `'%1000000000d'`, `format`, `replace`, `join`,
`tojson(indent=...)`, `~` and `+` in loops, namespace doubling, nested `range` loops, and
jinja2 folds constant expressions at compile time, so some run at load), and a sandbox
must catch every one of them before the allocation happens; one missed gives a stranger's
model file gigabytes of the user's memory or a core for ever. A process is bounded whatever
the template does: its address space may grow by RENDER_MEMORY_BYTES while it answers
(RLIMIT_AS: the allocation fails inside the template, which ends with MemoryError), and a
render that takes longer than RENDER_SECONDS is killed from here (SIGKILL; the next render
gets a fresh process). The server's threads only wait on a pipe, so /health and other
requests go on; the killed process takes its memory with it.

Why a launcher: the serving process gives up running programs once it serves
(runtime.confine), yet a killed renderer must be replaced. So the server runs one program
early, the launcher: the runtime's own executable (the frozen `runtime`, or `python -m
runtime`) with MODELRUN_CHAT_RENDERER set, which runtime/__main__.py turns into `main`
below before it imports anything heavy (no multiprocessing, whose frozen start-up needs its
own care). The launcher imports the sandbox, confines itself (read-only files, no
programs, no sockets: runtime.confine) and waits on a socket; each request there forks a
renderer, a copy of it, already warm and confined, and hands the server the renderer's
pipes (SCM_RIGHTS). The server talks to the renderer over those pipes and kills it by pid:
the launcher reaps its exited renderers only when asked for the next one, and the server
asks only once it is done with the last, so that pid is never another process's.

The launcher starts in the background when the server starts, or when a template is first
made (ChatTemplate.for_model after the model loads), so a launch does not wait for it. It
runs with no descriptors but its socket and stderr, and ends when its socket closes; a
renderer ends when its pipe closes. One renderer serves every template, one render at a
time (renders take milliseconds; a bomb holds the others up to its limit).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


log = logging.getLogger(__name__)

RENDER_SECONDS = 1.0  # wall clock a compile or a render may take
RENDER_MEMORY_BYTES = 64 * 2**20  # address space a render may add to the process
START_SECONDS = 30.0  # for the process to start (a frozen runtime on a busy machine)
QUEUE_SECONDS = 30.0  # waiting for other renders before giving up
ENV_VAR = "MODELRUN_CHAT_RENDERER"
FRAME = struct.Struct(">I")  # every message on the pipes: its length, then JSON
PID = struct.Struct(">i")  # the launcher's answer: a renderer's pid (0: none), with its pipes


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded, that refuses a conversation (its
    raise_exception), that fails on it, that tried something the sandbox forbids, or that
    went over a limit. kind: what went wrong, as the renderer says it ("syntax", "compile",
    "sandbox", "raised", "failed", "output", "limit", "renderer")."""

    def __init__(self, message: str, kind: str = "renderer"):
        super().__init__(message)
        self.kind = kind


class ChatTemplateLimitError(ChatTemplateError):
    """A template that went over the time or memory limit (a bomb, or a conversation far
    too long for it)."""

    def __init__(self, message: str):
        super().__init__(message, "limit")


def _command() -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "runtime"]


def _environment(confine: bool) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_VAR] = f"{RENDER_MEMORY_BYTES},{int(RENDER_SECONDS) + 1},{int(confine)}"
    if not getattr(sys, "frozen", False):  # `-m runtime` must find this checkout's package
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class RendererProcess:
    """One renderer, as the server sees it: its pid and its two pipes."""

    pid: int
    requests: int  # the server writes requests here
    answers: int  # and reads answers here

    def gone(self) -> bool:
        """Whether it has ended (or said something unasked): its answer pipe is readable."""
        return bool(select.select([self.answers], [], [], 0)[0])

    def kill(self) -> None:
        """End it (it may have ended already) and close the pipes."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in (self.requests, self.answers):
            os.close(fd)


class Renderer:
    """The launcher, started once (again only if it died and the server may still run
    programs), and the renderer it forked, replaced after it was killed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._launcher: subprocess.Popen | None = None
        self._control: socket.socket | None = None  # the server's end of the launcher's socket
        self._process: RendererProcess | None = None
        self._ready = False  # the renderer said it is ready
        self.starts = 0  # renderers started so far (tests read it)
        self.confine = True  # the launcher confines itself (runtime.confine); --unsecure: not
        self.unconfined: str | None = None  # why it could not, as the renderer said

    def start(self) -> None:
        """Start the launcher now, if it is not running (returns at once; it gets ready in
        the background). The serving process calls it before it gives up running programs."""
        with self._lock:
            self._ensure_launcher()

    def _ensure_launcher(self) -> socket.socket:
        if self._launcher is not None and self._launcher.poll() is not None:
            self._drop_launcher()
        if self._launcher is None:
            ours, theirs = socket.socketpair()
            try:
                self._launcher = subprocess.Popen(
                    _command(), stdin=theirs, env=_environment(self.confine), close_fds=True,
                    start_new_session=True)
            except PermissionError:  # a confined server (runtime.confine) runs no program
                ours.close()
                raise ChatTemplateError(
                    "the chat template renderer's launcher has ended, and a confined server "
                    "cannot start another: restart modelrun (--unsecure does not confine "
                    "it)") from None
            except OSError as e:
                ours.close()
                raise ChatTemplateError(f"the chat template renderer cannot start: "
                                        f"{e.strerror or e}") from None
            finally:
                theirs.close()
            self._control = ours
        return self._control

    def _ensure_started(self) -> RendererProcess:
        if self._process is not None and self._process.gone():
            self._process.kill()
            self._process = None
        if self._process is None:
            self._process = self._fork()
            self._ready = False
            self.starts += 1
        return self._process

    def _fork(self) -> RendererProcess:
        """A new renderer from the launcher (whose imports may still be under way)."""
        control = self._ensure_launcher()
        try:
            control.settimeout(START_SECONDS)
            control.sendall(b"r")
            data, fds, _, _ = socket.recv_fds(control, PID.size, 2)
        except OSError as e:  # it died, or did not answer in time
            self._drop_launcher()
            raise ChatTemplateError(f"the chat template renderer cannot start: "
                                    f"{e.strerror or e or 'no answer'}") from None
        if len(data) != PID.size or len(fds) != 2 or PID.unpack(data)[0] <= 0:
            for fd in fds:
                os.close(fd)
            self._drop_launcher()
            raise ChatTemplateError("the chat template renderer cannot start: its launcher "
                                    "could not make a process")
        return RendererProcess(PID.unpack(data)[0], *fds)

    def call(self, request: dict) -> dict:
        """Send one request and return its answer; a ChatTemplateLimitError when the
        renderer took too long (it is killed)."""
        try:
            data = json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except (RecursionError, ValueError, TypeError) as e:
            raise ChatTemplateError(f"the conversation cannot be passed to the chat template: "
                                    f"{type(e).__name__}: {e}") from None
        if not self._lock.acquire(timeout=QUEUE_SECONDS):
            raise ChatTemplateError("the chat template renderer is busy with other requests; "
                                    "try again")
        try:
            process = self._ensure_started()
            if not self._ready:
                ready = self._read_frame(process, START_SECONDS)
                if ready is None:
                    self._stop()
                    raise ChatTemplateError("the chat template renderer did not start")
                self._ready = True
                if ready.get("unconfined") and ready["unconfined"] != self.unconfined:
                    self.unconfined = ready["unconfined"]
                    if self.confine:  # said once per reason
                        log.warning("%s", self.unconfined)
            try:
                write_all(process.requests, FRAME.pack(len(data)) + data)
            except OSError:
                pass  # it is gone: reading says how
            answer = self._read_frame(process, RENDER_SECONDS)
            if answer is None:
                overrun = not process.gone()
                self._stop()
                if overrun:
                    raise ChatTemplateLimitError(
                        f"the chat template took longer than the {RENDER_SECONDS:g} s limit "
                        "and was stopped")
                raise ChatTemplateError("the chat template renderer stopped unexpectedly")
            if answer.get("error") == "memory":
                self._stop()  # it ends by itself after saying so; do not wait on it
            return answer
        finally:
            self._lock.release()

    @staticmethod
    def _read_frame(process: RendererProcess, seconds: float) -> dict | None:
        """The next framed answer within `seconds`, or None (none came, or the process ended)."""
        fd = process.answers
        deadline = time.monotonic() + seconds
        buffer, need = bytearray(), FRAME.size
        while len(buffer) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, need - len(buffer))
            if not chunk:
                return None
            buffer += chunk
            if need == FRAME.size and len(buffer) == FRAME.size:
                need += FRAME.unpack(buffer)[0]
        return json.loads(bytes(buffer[FRAME.size:]).decode("utf-8", "surrogatepass"))

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process = None

    def close(self) -> None:
        """Stop the renderer and the launcher (the next render starts them again)."""
        with self._lock:
            self._stop()
            self._drop_launcher()

    def _drop_launcher(self) -> None:
        if self._launcher is not None:
            self._control.close()
            self._launcher.kill()
            self._launcher.wait()
            self._launcher = self._control = None


_RENDERER = Renderer()


def renderer() -> Renderer:
    """The one renderer process of this program."""
    return _RENDERER


def main(setting: str) -> int:
    """The launcher's entry (runtime/__main__.py calls it when ENV_VAR is set): import the
    sandbox, confine this process, then fork a renderer for each request on the socket that
    is its standard input."""
    from runtime import chat_sandbox

    memory, cpu_seconds, confine = (int(v) for v in setting.split(","))
    os.dup2(2, 1)  # a stray print must not reach a pipe
    unconfined = "--unsecure"
    if confine:
        from runtime.confine import confine_renderer

        unconfined = confine_renderer().warning("the chat template renderer")
    return launch(socket.socket(fileno=0), lambda requests, answers: chat_sandbox.serve(
        requests, answers, memory, cpu_seconds, unconfined))


def launch(control: socket.socket, serve: Callable[[int, int], int]) -> int:
    """For each byte read from control: fork a process that runs serve(requests, answers)
    on two new pipes, and send back its pid with the other ends of the pipes. Ends when
    control closes."""
    while True:
        if not control.recv(1):
            return 0
        _reap()
        pipes: list[int] = []
        try:
            pipes += os.pipe()
            pipes += os.pipe()
            pid = os.fork()
        except OSError as e:  # out of processes or descriptors: the server says so
            for fd in pipes:
                os.close(fd)
            print(f"the chat template renderer cannot start: {e}", file=sys.stderr)
            control.sendall(PID.pack(0))
            continue
        requests_r, requests_w, answers_r, answers_w = pipes
        if pid == 0:  # the renderer
            status = 1
            try:
                control.close()
                os.close(requests_w)
                os.close(answers_r)
                status = serve(requests_r, answers_w)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(requests_r)
        os.close(answers_w)
        try:
            socket.send_fds(control, [PID.pack(pid)], [requests_w, answers_r])
        finally:
            os.close(requests_w)
            os.close(answers_r)


def _reap() -> None:
    """Collect the renderers that have ended (killed, or out of memory)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to the pipe fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
