"""The engine: one model, one KV cache, and the loop that turns a prompt into tokens.

One Engine object per model, owned by one thread (not thread-safe by design: the server
talks to that thread through a queue). The cache remembers which tokens it holds, so a
follow-up turn of a chat only computes the tokens after the shared prefix.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from runtime.hparams import (DEFAULT_KV_CACHE_TYPE, DEFAULT_N_CTX, PREFILL_CHUNK,  # noqa: F401 (in hparams for runtime.memory)
                             default_n_ctx)
from runtime.model import KVCache, Transformer, load_model


def return_freed_memory() -> None:
    """Hand memory freed since the last call back to the OS. glibc keeps freed heap (and,
    having seen a big block freed, serves later big blocks from the heap too), so without
    this a process holds its largest prefill's activations for good. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ContextOverflowError(ValueError):
    """A prompt (plus what must follow it) that does not fit the context window."""


class ContextSizeError(ValueError):
    """A context size the model cannot have (outside 1..its training context)."""


class Engine:
    """Owns a model and its KV cache; evaluates tokens and generates."""

    def __init__(self, model: Transformer, n_ctx: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 cache_type_k: str = DEFAULT_KV_CACHE_TYPE, cache_type_v: str = DEFAULT_KV_CACHE_TYPE):
        self.model = model
        train_ctx = model.hp.n_ctx_train
        self.n_ctx = default_n_ctx(train_ctx) if n_ctx is None else int(n_ctx)
        if not 0 < self.n_ctx <= train_ctx:
            raise ContextSizeError(f"n_ctx {self.n_ctx} must be between 1 and the model's context {train_ctx}")
        self.cache = KVCache(model.hp, self.n_ctx, cache_type_k, cache_type_v)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.tokens: list[int] = []  # the tokens whose K/V fill cache positions 0..len-1
        self.n_computed = 0  # tokens run through the model since creation (prefix reuse shows here)
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    @classmethod
    def from_gguf(cls, gguf_file, n_ctx: int | None = None, **kw) -> "Engine":
        return cls(load_model(gguf_file), n_ctx=n_ctx, **kw)

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    # --- evaluating tokens ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget the cached tokens (the K/V memory is simply overwritten later)."""
        self.tokens = []

    def check_fits(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"the {what} has {n_tokens} tokens but the context holds only {self.n_ctx}")

    def prefill(self, tokens: Iterable[int]) -> np.ndarray:
        """Append tokens to the cache in chunks through matmul; logits of the last one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self.check_fits(len(self.tokens) + len(tokens), "prompt")
        t0 = time.perf_counter()
        logits = None
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            logits = self.model.forward(np.array(chunk), len(self.tokens), self.cache)
            self.tokens.extend(chunk)
            self.n_computed += len(chunk)
        self.stats["prefill_tokens"] += len(tokens)
        self.stats["prefill_s"] += time.perf_counter() - t0
        if len(tokens) > 1:
            return_freed_memory()  # the batch's activations (~18 MB for 512 tokens on Gemma)
        return logits

    def prefill_logits(self, tokens: Iterable[int], start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Append tokens like prefill, yielding the logits of every token from index `start`
        on, one batch at a time, as (i, float32[k, n_vocab]): row j is the distribution of
        the token that follows tokens[i + j].

        For scoring a text (perplexity): a batch at a time, so a big vocabulary never holds
        every position's logits at once; and batches break at `start`, so the tokens before
        it cost no output projection.
        """
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill_logits needs at least one token")
        self.check_fits(len(self.tokens) + len(tokens), "text")
        start = min(max(int(start), 0), len(tokens))
        step = self.prefill_chunk
        bounds = [*range(0, start, step), *range(start, len(tokens), step), len(tokens)]
        for a, b in zip(bounds, bounds[1:]):
            chunk = tokens[a:b]
            t0 = time.perf_counter()
            logits = self.model.forward(np.array(chunk), len(self.tokens), self.cache,
                                        all_logits=a >= start)
            self.tokens.extend(chunk)
            self.n_computed += len(chunk)
            self.stats["prefill_tokens"] += len(chunk)
            self.stats["prefill_s"] += time.perf_counter() - t0
            if a >= start:
                yield a, logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token through matvec; its logits."""
        self.check_fits(len(self.tokens) + 1, "conversation")
        t0 = time.perf_counter()
        logits = self.model.forward(np.array([int(token)]), len(self.tokens), self.cache)
        self.tokens.append(int(token))
        self.n_computed += 1
        self.stats["decode_tokens"] += 1
        self.stats["decode_s"] += time.perf_counter() - t0
        return logits

    def eval(self, tokens: Iterable[int]) -> np.ndarray:
        """Logits after `tokens`, computing only what the cache does not already hold.

        The longest common prefix of `tokens` and the cached tokens is kept; the rest of
        the cache is dropped and the new suffix is prefilled. If `tokens` is exactly the
        cached sequence, its last token is recomputed (its logits were not kept).
        """
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("eval needs at least one token")
        self.check_fits(len(tokens), "prompt")
        keep = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # at least one token to compute logits from
        del self.tokens[keep:]
        return self.prefill(tokens[keep:])

    # --- generation ----------------------------------------------------------------------

    def generate(self, prompt_tokens: Iterable[int], sampler_fn: Callable[[np.ndarray], int],
                 max_tokens: int, stop_ids: Iterable[int] = (),
                 cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield up to max_tokens sampled tokens after the prompt.

        Stops at a token in stop_ids (not yielded), at max_tokens, at the end of the
        context, or before the next token once `cancel` is set (from any thread). The
        prompt reuses the cached prefix.
        """
        cancel = cancel or threading.Event()
        stop = set(int(t) for t in stop_ids)
        logits = self.eval(prompt_tokens)
        for i in range(max_tokens):
            if cancel.is_set():
                return
            token = int(sampler_fn(logits))
            if token in stop:
                return
            yield token
            if i + 1 == max_tokens or cancel.is_set() or len(self.tokens) >= self.n_ctx:
                # the last token is not fed back: nothing will read its logits
                return
            logits = self.decode(token)


class TextGeneration:
    """One prompt's continuation as text: sampling, end-of-generation tokens, stop strings,
    and streaming that never splits a UTF-8 character. Iterate it for text pieces; after the
    loop, `finish_reason` is "stop" (an end-of-generation token or a stop string) or
    "length" (max_tokens, or the context is full) and `tokens` holds what was generated.

    The CLI and the server both use it, so every front end stops and streams the same way.
    `cancel`, set from any thread, ends it before the next token (and without the rest of
    a partly decoded character or a held-back stop-string prefix).
    """

    def __init__(self, engine: Engine, tokenizer, prompt_tokens: list[int], params,
                 cancel: threading.Event | None = None):
        from runtime.sampling import Sampler, StopMatcher

        engine.check_fits(len(prompt_tokens) + 1, "prompt")
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.prompt_tokens = list(prompt_tokens)
        self.cancel = cancel or threading.Event()
        self.sampler = Sampler(params, engine.model.hp.n_vocab)
        self.stop_matcher = StopMatcher(params.stop)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.skip_special = True  # control tokens give no text (False: their text)

    def _next_token(self, logits: np.ndarray) -> int:
        # the engine's cached tokens are exactly the prompt and what was generated so far
        return self.sampler.sample(logits, self.engine.tokens)

    def __iter__(self) -> Iterator[str]:
        engine, params = self.engine, self.params
        room = engine.n_ctx - len(self.prompt_tokens)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        decoder = self.tokenizer.stream_decoder(skip_special=self.skip_special)
        self.finish_reason = "length"
        for token in engine.generate(self.prompt_tokens, self._next_token, limit, self.tokenizer.eog_ids,
                                     self.cancel):
            self.tokens.append(token)
            text = self.stop_matcher.push(decoder.feed(token))
            if text:
                yield text
            if self.stop_matcher.stopped:  # returning closes engine.generate: no more tokens
                self.finish_reason = "stop"
                return
            if self.sampler.finished:  # a grammar is complete: nothing may follow
                break
        if self.cancel.is_set():
            return
        if len(self.tokens) < limit or self.sampler.finished:
            self.finish_reason = "stop"  # ended by an end-of-generation token
        tail = self.stop_matcher.push(decoder.flush())
        tail += self.stop_matcher.flush()
        if tail:
            yield tail
