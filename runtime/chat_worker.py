"""The chat-template renderer process: where untrusted template code runs, bounded in time
and memory, apart from the server.

Why a process and not a tighter sandbox: a template can grow a string or spin in a great
many ways (`center`, `ljust`, `'%1000000000d'`, `format`, `replace`, `join`,
`tojson(indent=...)`, `~` and `+` in loops, namespace doubling, nested `range` loops, and
jinja2 folds constant expressions at compile time, so some run at load), and a sandbox
must catch every one of them before the allocation happens; one missed gives a stranger's
model file gigabytes of the user's memory or a core for ever. A process is bounded whatever
the template does: its address space may grow by RENDER_MEMORY_BYTES while it answers
(RLIMIT_AS: the allocation fails inside the template, which ends with MemoryError), and a
render that takes longer than RENDER_SECONDS is killed from here (SIGKILL; the next render
starts a fresh process). The server's threads only wait on a pipe, so /health and other
requests go on; the killed process takes its memory with it.

The process is the runtime's own executable (the frozen `runtime`, or `python -m
runtime`) with MODELRUN_CHAT_RENDERER set: runtime/__main__.py turns into the renderer
before it imports anything heavy (no multiprocessing, whose frozen start-up needs its own
care). It starts in the background when a template is first made (ChatTemplate.for_model
after the model loads), so a launch does not wait for it; it runs with no descriptors but
its pipes and stderr, and ends when its pipe closes. One process serves every template,
one render at a time (renders take milliseconds; a bomb holds the others up to its limit).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path


log = logging.getLogger(__name__)

RENDER_SECONDS = 1.0  # wall clock a compile or a render may take
RENDER_MEMORY_BYTES = 64 * 2**20  # address space a render may add to the process
START_SECONDS = 30.0  # for the process to start (a frozen runtime on a busy machine)
QUEUE_SECONDS = 30.0  # waiting for other renders before giving up
ENV_VAR = "MODELRUN_CHAT_RENDERER"
FRAME = struct.Struct(">I")  # every message on the pipes: its length, then JSON


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


class Renderer:
    """The renderer process, started on demand and again after it was killed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._ready = False  # the process said it is ready (its imports are done)
        self.starts = 0  # processes started so far (tests read it)
        self.confine = True  # the process confines itself (runtime.confine); --unsecure: not
        self.unconfined: str | None = None  # why it could not, as it said when it started

    def start(self) -> None:
        """Start the process now, if it is not running (returns at once)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is not None:
            self._process = None
        if self._process is None:
            try:
                self._process = subprocess.Popen(
                    _command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    env=_environment(self.confine), close_fds=True, start_new_session=True)
            except OSError as e:
                raise ChatTemplateError(f"the chat template renderer cannot start: "
                                        f"{e.strerror or e}") from None
            self._ready = False
            self.starts += 1
        return self._process

    def call(self, request: dict) -> dict:
        """Send one request and return its answer; a ChatTemplateLimitError when the
        process took too long (it is killed) or ran out of its CPU time."""
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
                    self._kill(process)
                    raise ChatTemplateError("the chat template renderer did not start "
                                            f"(exit status {process.returncode})")
                self._ready = True
                if ready.get("unconfined") and ready["unconfined"] != self.unconfined:
                    self.unconfined = ready["unconfined"]
                    if self.confine:  # said once per reason
                        log.warning("%s", self.unconfined)
            try:
                process.stdin.write(FRAME.pack(len(data)) + data)
                process.stdin.flush()
            except OSError:
                pass  # it is gone: reading says how
            answer = self._read_frame(process, RENDER_SECONDS)
            if answer is None:
                overrun = process.poll() is None or process.returncode == -signal.SIGXCPU
                self._kill(process)
                if overrun:
                    raise ChatTemplateLimitError(
                        f"the chat template took longer than the {RENDER_SECONDS:g} s limit "
                        "and was stopped")
                raise ChatTemplateError("the chat template renderer stopped unexpectedly "
                                        f"(exit status {process.returncode})")
            if answer.get("error") == "memory":
                self._kill(process)  # it ends by itself after saying so; do not wait on it
            return answer
        finally:
            self._lock.release()

    @staticmethod
    def _read_frame(process: subprocess.Popen, seconds: float) -> dict | None:
        """The next framed answer within `seconds`, or None (none came, or the process ended)."""
        fd = process.stdout.fileno()
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

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._kill(self._process)
                self._process = None


_RENDERER = Renderer()


def renderer() -> Renderer:
    """The one renderer process of this program."""
    return _RENDERER


def main(setting: str) -> int:
    """The renderer process's entry (runtime/__main__.py calls it when ENV_VAR is set)."""
    from runtime import chat_sandbox

    memory, cpu_seconds, confine = (int(v) for v in setting.split(","))
    return chat_sandbox.main(memory, cpu_seconds, bool(confine))
