"""OpenAI's API as data: request bodies checked and turned into sampling parameters, and the
responses (chat and text completions, whole or streamed as server-sent events, with
logprobs) built from a generation's pieces. runtime/server.py does the HTTP around it.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Callable

from runtime.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20

# Request fields that ask for something this server does not do (a 400 when set).
UNSUPPORTED_WHEN_SET = ("tools", "functions", "tool_choice", "function_call", "audio",
                        "modalities", "prediction", "suffix")


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                500: "server_error", 503: "unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty", "repeat_last_n", "logit_bias", "stop")


def _param_of(message: str) -> str:
    """The field a SamplingParams ValueError names: its first word, up to '[' ."""
    return message.split(" ", 1)[0].split("[", 1)[0]


def int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        raise RequestError(400, f"{name} must be {allowed}, got {value!r}", name)
    return int(value)


def bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def sampling_params(body: dict, n_vocab: int):
    """SamplingParams from a request body; a 400 naming the field when one is wrong."""
    max_tokens = int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", 1)
    given = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, **given)
    except ValueError as e:
        raise RequestError(400, str(e), _param_of(str(e))) from None
    outside = sorted(t for t in params.logit_bias if t >= n_vocab)
    if outside:
        raise RequestError(400, f"logit_bias names token {outside[0]}, outside the vocabulary "
                                f"(ids 0..{n_vocab - 1})", "logit_bias")
    return params


def refuse_unsupported(body: dict) -> None:
    """400 for request fields that ask for what this server does not do."""
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, f"n must be 1 (this server makes one choice per request), got {n!r}", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError(400, f"best_of must be 1, got {best_of!r}", "best_of")
    for name in UNSUPPORTED_WHEN_SET:
        value = body.get(name)
        if value is None or value == [] or value == "" or (name == "tool_choice" and value == "none"):
            continue
        raise RequestError(400, f"{name} is not supported by this server (it runs plain text "
                                "generation)", name)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind != "text":
            raise RequestError(400, f"response_format {kind or fmt!r} is not supported; only "
                                    '{"type": "text"}', "response_format")
    if bool_field(body, "echo"):
        raise RequestError(400, "echo is not supported", "echo")


# --- responses -----------------------------------------------------------------------------

class Reply:
    """Builds one response (OpenAI chat or text completion), streamed as SSE or whole.

    `handler` is the server's RequestHandler that writes it (send_response, send_header,
    send_cors_headers, end_headers, wfile, send_json); token_bytes(id) spells a token."""

    def __init__(self, handler: Any, token_bytes: Callable[[int], bytes], kind: str, n_prompt: int,
                 stream: bool, include_usage: bool, model: str, logprobs_wanted: bool):
        self.h, self.kind, self.n_prompt, self.stream = handler, kind, n_prompt, stream
        self.logprobs_wanted = logprobs_wanted
        self.include_usage = include_usage
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.text: list[str] = []
        self.entries: list = []
        self.token_bytes = token_bytes

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
        if self.kind == "chat":
            self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def _write_chunk(self, data: bytes) -> None:
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _chunk(self, delta: dict | str, finish_reason: str | None, entries=None, **extra) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": self._text_logprobs(entries, 0),
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "modelrun", "choices": [choice], **extra}

    def piece(self, text: str, entries: list) -> None:
        if self.stream:
            if text or entries:
                offset = sum(len(t) for t in self.text)
                delta = {"content": text} if self.kind == "chat" else text
                chunk = self._chunk(delta, None, entries)
                if self.kind == "text" and entries is not None and chunk["choices"][0]["logprobs"]:
                    chunk["choices"][0]["logprobs"] = self._text_logprobs(entries, offset)
                self._event(chunk)
        self.text.append(text)
        self.entries.extend(entries)

    def _usage(self, n_gen: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_gen,
                "total_tokens": self.n_prompt + n_gen}

    def finish(self, finish_reason: str, n_gen: int, timings: dict) -> None:
        usage = self._usage(n_gen)
        if self.stream:
            last = self._chunk({} if self.kind == "chat" else "", finish_reason, timings=timings)
            for choice in last["choices"]:
                choice["logprobs"] = None
            self._event(last)
            if self.include_usage:
                self._event({"id": self.id, "object": last["object"], "created": self.created,
                             "model": self.model, "choices": [], "usage": usage})
            self._event("[DONE]")
            self._write_chunk(b"")
            return
        text = "".join(self.text)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._chat_logprobs(self.entries), "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._text_logprobs(self.entries, 0),
                      "finish_reason": finish_reason}
        self.h.send_json(200, {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.model, "system_fingerprint": "modelrun",
                                "choices": [choice], "usage": usage, "timings": timings})

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


