"""The chat-template sandbox: Jinja2 rendering as Hugging Face does it, run only inside the
renderer processes (runtime.chat_worker forks them; `serve` is a renderer's loop).

A template is Jinja2 source that ships in the model file, so it is untrusted code. It is
rendered in jinja2's ImmutableSandboxedEnvironment, with changes that make a probe fail
loudly instead of quietly:

- touching an unsafe attribute (`''.__class__`, `cycler.__init__.__globals__`,
  `messages.append`...) raises at once. Stock jinja2 returns an Undefined that renders as
  an empty string, so a template could probe the sandbox and carry on.
- `*` and `**` refuse results that would eat the memory or the CPU (`'x' * 10**10`,
  `2 ** 2 ** 40`), and the rendered text has a size cap: quick, clear refusals of the
  plain cases. They are not what bounds a template: the process's limits are (time and
  memory, runtime.chat_worker), since `center`, `format`, `replace`, `join`, `~` in a loop
  and nested loops have no guard here.

Otherwise it renders exactly as Hugging Face transformers does (apply_chat_template):
trim_blocks and lstrip_blocks, the loopcontrols extension, `{% generation %}` blocks
accepted and ignored, a `tojson` filter like HF's (no HTML escaping, ensure_ascii=False,
indent), and the helpers real templates call: raise_exception(msg), strftime_now(fmt),
bos_token, eos_token, add_generation_prompt, tools/documents (None unless given).

Where message text lands: a prompt is rendered twice, once with the messages and once with
each string in them replaced by a unique placeholder. Where the second rendering put a
placeholder, the first put that string (or it stripped): aligning the two gives the spans
of the prompt that came from the messages, which the tokenizer then reads as plain text, so
a user cannot type the model's control tokens into a turn (runtime.chat). A template that
changes message text in other ways (or branches on it) gives no alignment: `spans` is None.
"""

from __future__ import annotations

import json
import os
import re
import resource
from datetime import datetime
from collections.abc import Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from runtime.chat_worker import FRAME, write_all

MAX_OUTPUT_CHARS = 4 * 2**20  # a rendered prompt: more than any context holds (~4 chars a token)
MAX_REPEAT_ITEMS = 2**20  # `seq * n` results
MAX_INT_BITS = 2**16  # `a ** b` and `a * b` results on integers


class TemplateRaised(Exception):
    """The template's own raise_exception(message)."""


class OutputTooLarge(Exception):
    """The rendered text passed MAX_OUTPUT_CHARS."""


# --- the sandbox -------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Sandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment that raises on unsafe attributes and huge arithmetic."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            "objects is not allowed")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        if operator == "*":
            if _is_int(left) and _is_int(right):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise SecurityError("integer product too large")
            else:
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                repeatable = isinstance(seq, (str, list, tuple)) and _is_int(n)
                if repeatable and len(seq) * n > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"repeating a {type(seq).__name__} {n} times is too large")
        return super().call_binop(context, operator, left, right)


class _NoTemplateFiles(jinja2.BaseLoader):
    """include / import / extends: a chat template is one string and reads no files."""

    def get_source(self, environment, template):
        raise SecurityError(f"a chat template cannot load other templates ({template!r})")


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: HF templates mark the assistant's text
    with it (for training masks); rendering a prompt ignores the tag."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any = "") -> None:
    raise TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (jinja2's own escapes <, >, & and ' for HTML). A
    generator (`tools | map(attribute='function')` in llama.cpp's DeepSeek-R1 template) is
    written as the list it yields, as llama.cpp's template engine does; transformers' would
    refuse it."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys, default=_iterated)


def _iterated(value: Any) -> list:
    if isinstance(value, Iterator):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, loader=_NoTemplateFiles(),
                   extensions=["jinja2.ext.loopcontrols", _GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()
_COMPILED: dict[str, jinja2.Template] = {}  # source -> template, for this process's life
MAX_COMPILED = 8


def compile_template(source: str) -> jinja2.Template:
    template = _COMPILED.get(source)
    if template is None:
        template = _ENV.from_string(source)
        if len(_COMPILED) >= MAX_COMPILED:
            _COMPILED.clear()
        _COMPILED[source] = template
    return template


def _render(template: jinja2.Template, context: dict) -> str:
    pieces, size = [], 0
    for piece in template.generate(context):
        size += len(piece)
        if size > MAX_OUTPUT_CHARS:
            raise OutputTooLarge(f"the chat template wrote more than {MAX_OUTPUT_CHARS} characters")
        pieces.append(piece)
    return "".join(pieces)


# --- where message text lands ------------------------------------------------------------------

def _with_placeholders(value: Any, marker: str, strings: list[str]) -> Any:
    """value with every non-empty string (but roles and part types, which templates compare)
    replaced by marker<index>marker; strings collects the originals by index."""
    if isinstance(value, dict):
        return {k: v if k in ("role", "type") else _with_placeholders(v, marker, strings)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_with_placeholders(v, marker, strings) for v in value]
    if isinstance(value, str) and value:
        strings.append(value)
        return f"{marker}{len(strings) - 1}{marker}"
    return value


def _align(text: str, marked: str, marker: str, strings: list[str]) -> list[list[int]] | None:
    """Spans [start, end) of text that hold message strings: marked is text rendered with
    placeholders; each placeholder stands for its string, or that string stripped (what
    `| trim` and `.strip()` make of it). None when the two renderings do not line up."""
    parts = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", marked)
    if not text.startswith(parts[0]):
        return None
    pos, spans = len(parts[0]), []
    for k in range(1, len(parts), 2):
        value, after = strings[int(parts[k])], parts[k + 1]
        for candidate in dict.fromkeys((value, value.strip(), value.lstrip(), value.rstrip())):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and text.startswith(after, end):
                break
        else:
            return None
        if end > pos:
            spans.append([pos, end])
        pos = end + len(after)
    return spans if pos == len(text) else None


def render_prompt(source: str, context: dict, find_spans: bool) -> dict:
    """{"text": the prompt, "spans": where message strings landed (or None)}."""
    template = compile_template(source)
    text = _render(template, context)
    spans = None
    if find_spans:
        marker = "\ue000" + os.urandom(8).hex() + "\ue001"
        strings: list[str] = []
        messages = _with_placeholders(context["messages"], marker, strings)
        spans = _align(text, _render(template, {**context, "messages": messages}), marker, strings)
    return {"text": text, "spans": spans}


# --- the renderer process ----------------------------------------------------------------------

def _answer(request: dict) -> dict:
    """One request -> one answer; every failure becomes {"error": kind, "message": ...}."""
    try:
        if request["op"] == "compile":
            compile_template(request["source"])
            return {"ok": True}
        return render_prompt(request["source"], request["context"], request["find_spans"])
    except jinja2.TemplateSyntaxError as e:
        return {"error": "syntax", "message": f"the chat template has a syntax error on line "
                                              f"{e.lineno}: {e.message}"}
    except SecurityError as e:
        return {"error": "sandbox", "message": str(e)}
    except TemplateRaised as e:
        return {"error": "raised", "message": str(e)}
    except OutputTooLarge as e:
        return {"error": "output", "message": str(e)}
    except MemoryError:
        return {"error": "memory", "message": ""}
    except RecursionError:
        return {"error": "failed", "message": "RecursionError: nesting too deep"}
    except Exception as e:
        return {"error": "compile" if request["op"] == "compile" else "failed",
                "message": f"{type(e).__name__}: {e}"}


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send(fd: int, answer: dict) -> None:
    data = json.dumps(answer).encode()
    write_all(fd, FRAME.pack(len(data)) + data)


def _vm_bytes() -> int | None:
    """This process's address space (what RLIMIT_AS counts), or None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _limit(kind: int, soft: int, usual: tuple[int, int]) -> None:
    """Lower kind's soft limit to soft (never above the usual one)."""
    if usual[0] != resource.RLIM_INFINITY:
        soft = min(soft, usual[0])
    resource.setrlimit(kind, (soft, usual[1]))


def serve(fd_in: int, fd_out: int, memory_bytes: int, cpu_seconds: int,
          unconfined: str | None) -> int:
    """A renderer's loop (runtime.chat_worker forks it from its launcher): framed JSON
    requests on fd_in, answers on fd_out. While a request is answered, the address space may
    grow by memory_bytes and the CPU time by cpu_seconds (the server's wall-clock deadline
    is the tighter one; this is the backstop should the server be gone). After running out
    of memory it answers and exits: the server asks for a fresh renderer. unconfined: why
    the launcher is not confined (runtime.confine), said in the ready message."""
    usual = {kind: resource.getrlimit(kind) for kind in (resource.RLIMIT_AS, resource.RLIMIT_CPU)}
    _send(fd_out, {"ready": True, "unconfined": unconfined})
    while True:
        head = _read_exactly(fd_in, FRAME.size)
        if head is None:
            return 0
        body = _read_exactly(fd_in, FRAME.unpack(head)[0])
        if body is None:
            return 0
        request = json.loads(body.decode("utf-8", "surrogatepass"))
        vm = _vm_bytes()
        if vm is not None:
            _limit(resource.RLIMIT_AS, vm + memory_bytes, usual[resource.RLIMIT_AS])
        used = resource.getrusage(resource.RUSAGE_SELF)
        _limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + 1 + cpu_seconds,
               usual[resource.RLIMIT_CPU])
        answer = _answer(request)
        try:
            data = json.dumps(answer, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except MemoryError:
            answer = {"error": "memory", "message": ""}
            data = json.dumps(answer).encode()
        for kind, limits in usual.items():
            resource.setrlimit(kind, limits)
        write_all(fd_out, FRAME.pack(len(data)) + data)
        if answer.get("error") == "memory":
            return 0
