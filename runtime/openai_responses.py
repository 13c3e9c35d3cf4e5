"""OpenAI's responses as data: a chat or text completion built from a generation's pieces,
whole or streamed as server-sent events, with logprobs in OpenAI's two shapes; n choices of
one prompt share one response. runtime/llamacpp_api.py's NativeReply is llama.cpp's shape.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Callable

from runtime.openai_api import error_body
from runtime.openai_chat import ChatOutput


class Reply:
    """Builds one response (OpenAI chat or text completion), streamed as SSE or whole.

    `handler` is the server's RequestHandler that writes it (send_response, send_header,
    send_cors_headers, end_headers, wfile, send_json); token_bytes(id) spells a token."""

    def __init__(self, handler: Any, token_bytes: Callable[[int], bytes], kind: str, n_prompt: int,
                 stream: bool, include_usage: bool, model: str, logprobs_wanted: bool,
                 output: ChatOutput | None = None):
        self.h, self.kind, self.n_prompt, self.stream = handler, kind, n_prompt, stream
        self.output = output if kind == "chat" else None  # None: the text is the content
        self.logprobs_wanted = logprobs_wanted
        self.include_usage = include_usage
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.text: list[str] = []
        self.entries: list = []
        self.token_bytes = token_bytes
        self.index = 0  # the choice this Reply builds (n > 1: one Reply per choice, see sibling)
        self.finished = False

    def sibling(self, index: int, output: ChatOutput | None = None) -> "Reply":
        """The Reply of another choice of the same response (n > 1): same id, own text."""
        other = Reply(self.h, self.token_bytes, self.kind, self.n_prompt, self.stream, self.include_usage,
                      self.model, self.logprobs_wanted, output)
        other.id, other.created, other.index = self.id, self.created, index
        return other

    # SSE framing: HTTP/1.1 chunked transfer, so the connection can stay open afterwards.

    def start_stream(self) -> None:
        h = self.h
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("X-Accel-Buffering", "no")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_cors_headers()
        h.end_headers()
        self.open_choice()

    def open_choice(self) -> None:
        """A streamed chat choice begins with the assistant's role."""
        if self.kind == "chat":
            self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def _write_chunk(self, data: bytes) -> None:
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _chunk(self, delta: dict | str, finish_reason: str | None, entries=None, **extra) -> dict:
        if self.kind == "chat":
            choice = {"index": self.index, "delta": delta, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": delta, "logprobs": self._text_logprobs(entries, 0),
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "modelrun", "choices": [choice], **extra}

    def piece(self, text: str, entries: list) -> None:
        self.text.append(text)
        if self.stream and self.output is not None:
            deltas = self.output.deltas("".join(self.text), False)
            if not deltas and entries and self.logprobs_wanted:
                deltas = [{"content": ""}]  # the logprobs of text held back for now
            for i, delta in enumerate(deltas):
                self._event(self._chunk(delta, None, entries if i == 0 else None))
        elif self.stream and (text or entries):
            offset = sum(len(t) for t in self.text[:-1])
            delta = {"content": text} if self.kind == "chat" else text
            chunk = self._chunk(delta, None, entries)
            if self.kind == "text" and entries is not None and chunk["choices"][0]["logprobs"]:
                chunk["choices"][0]["logprobs"] = self._text_logprobs(entries, offset)
            self._event(chunk)
        self.entries.extend(entries)

    def _usage(self, n_gen: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_gen,
                "total_tokens": self.n_prompt + n_gen}

    def finish(self, finish_reason: str, n_gen: int, timings: dict) -> None:
        self.end([self.finish_choice(finish_reason, timings)], n_gen, timings)

    def finish_choice(self, finish_reason: str, timings: dict) -> dict | None:
        """This choice is complete: streamed, its last chunk goes out; whole, its choice."""
        self.finished = True
        text = "".join(self.text)
        if self.output is not None:
            if self.stream:
                for delta in self.output.deltas(text, True):
                    self._event(self._chunk(delta, None))
            message, calls = self.output.message(text)
            if calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        else:
            message = {"role": "assistant", "content": text}
        if self.stream:
            last = self._chunk({} if self.kind == "chat" else "", finish_reason, timings=timings)
            for choice in last["choices"]:
                choice["logprobs"] = None
            self._event(last)
            return None
        if self.kind == "chat":
            return {"index": self.index, "message": message,
                    "logprobs": self._chat_logprobs(self.entries), "finish_reason": finish_reason}
        return {"index": self.index, "text": text, "logprobs": self._text_logprobs(self.entries, 0),
                "finish_reason": finish_reason}

    def end(self, choices: list, n_gen: int, timings: dict) -> None:
        """The response is complete: the choices (whole) or the stream's end, with the usage
        of every choice's n_gen tokens together."""
        usage = self._usage(n_gen)
        if self.stream:
            if self.include_usage:
                self._event({"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                             else "text_completion", "created": self.created,
                             "model": self.model, "choices": [], "usage": usage})
            self._event("[DONE]")
            self._write_chunk(b"")
            return
        self.h.send_json(200, {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.model, "system_fingerprint": "modelrun",
                                "choices": choices, "usage": usage, "timings": timings})

    def fail(self, message: str) -> None:
        if self.stream:
            self._event(error_body(500, message))
            self._event("[DONE]")
            self._write_chunk(b"")
        else:
            self.h.send_json(500, error_body(500, message))

    # logprobs in OpenAI's two shapes

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.token_bytes(token)
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
