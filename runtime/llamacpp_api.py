"""llama.cpp's own server API beside OpenAI's, as data: POST /completion (its native text
completion: n_predict, the sampling fields, a prompt string or token ids; streamed as its
SSE, one JSON object per piece and no [DONE]) and the shapes /apply-template answers with.

The names and shapes are those of llama.cpp's tools/server (server-task.cpp's
to_json_non_oaicompat and its partial form), so its clients and its web UI read them."""

from __future__ import annotations

from typing import Any

from runtime.openai_api import RequestError, error_body, int_field
from runtime.openai_responses import Reply

# Native field -> the OpenAI-style name runtime.openai_api.sampling_params reads.
_RENAMED = {"n_predict": "max_tokens"}


def completion_body(body: dict) -> dict:
    """A /completion body in the OpenAI field names sampling_params and the server's prompt
    check read: n_predict (-1: until the context is full, as llama.cpp) becomes max_tokens."""
    n_predict = int_field(body, "n_predict", -1)
    if n_predict == 0:
        raise RequestError(400, "n_predict must be -1 (until the context is full) or at least 1, "
                                "got 0", "n_predict")
    out = {k: v for k, v in body.items() if k not in _RENAMED and k != "max_tokens"}
    if n_predict is not None and n_predict > 0:
        out["max_tokens"] = n_predict
    return out


def _stop_type(finish_reason: str) -> str:
    """llama.cpp's stop_type: "limit" when n_predict or the context ran out, else "eos"
    (the model ended, or a stop string did)."""
    return "limit" if finish_reason == "length" else "eos"


class NativeReply(Reply):
    """One /completion response in llama.cpp's shape, whole or streamed.

    Streamed: each piece is `data: {"content": piece, "stop": false, ...}`, and the last
    event carries stop: true with the counts and timings; there is no [DONE] line."""

    def __init__(self, handler: Any, token_bytes, n_prompt: int, stream: bool, model: str):
        super().__init__(handler, token_bytes, "text", n_prompt, stream, False, model, False)

    def piece(self, text: str, entries: list) -> None:
        self.text.append(text)
        if self.stream and text:
            self._event({"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": 0})

    def finish(self, finish_reason: str, n_gen: int, timings: dict) -> None:
        text = "".join(self.text)
        last = {"content": "" if self.stream else text, "tokens": [], "stop": True,
                "model": self.model, "index": 0, "id_slot": 0, "tokens_predicted": n_gen,
                "tokens_evaluated": self.n_prompt, "stop_type": _stop_type(finish_reason),
                "stopping_word": "", "truncated": False, "has_new_line": "\n" in text,
                "timings": timings}
        if self.stream:
            self._event(last)
            self._write_chunk(b"")
        else:
            self.h.send_json(200, last)

    def fail(self, message: str) -> None:
        if self.stream:
            self._event(error_body(500, message))
            self._write_chunk(b"")
        else:
            self.h.send_json(500, error_body(500, message))
