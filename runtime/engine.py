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

from runtime.hparams import (DEFAULT_CTX_CHECKPOINTS, DEFAULT_KV_CACHE_TYPE, DEFAULT_N_CTX,  # noqa: F401 (in hparams for runtime.memory)
                             PREFILL_CHUNK, default_n_ctx)
from runtime.model import KVCache, Transformer, load_model
from runtime.model.recurrent import HybridCache

# Context checkpoints (a recurrent state's copies, runtime.model.recurrent), as llama.cpp's
# server takes them: at the start of a prompt's last two prefill batches, which it ends
# CHECKPOINT_TAIL and CHECKPOINT_TAIL + one batch (its micro-batch; here a prefill chunk)
# before the prompt's end. The same prompt sent again (a regenerated answer), or a next chat
# turn whose template re-renders the end of the last one (a thinking model's reasoning
# dropped), resumes from the one a few tokens back instead of from token 0.
CHECKPOINT_TAIL = 4
CHECKPOINT_MIN_STEP = 8192  # llama.cpp's --checkpoint-min-step: the spacing kept when the list is full


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


class Slot:
    """One sequence's room in the engine (llama.cpp's slot): its own cache of the engine's
    per-sequence context, and the tokens whose K/V fill its positions 0..len-1, kept after a
    request ends so the next one that starts the same way computes only what differs."""

    def __init__(self, id: int, cache: KVCache):
        self.id, self.cache = id, cache
        self.tokens: list[int] = []
        self.last_used = 0  # the engine's step count when it last ran (least recently used first)
        self.checkpoint_at: list[int] = []  # positions of the prompt being prefilled to save the state at
        self.request = 0  # the engine's number of the prompt the slot runs


class Engine:
    """Owns a model and its slots' caches; evaluates tokens and generates.

    n_ctx is the context ONE sequence may fill. With n_parallel slots the context asked for
    (`n_ctx` here, -c on the command line) is split among them as llama.cpp splits it
    (each gets n_ctx // n_parallel): memory does not grow with the slots. Every method
    that runs one sequence takes its slot (0 by default: the one-user front ends);
    `step` runs several at once.

    n_ctx_checkpoints (llama.cpp's --ctx-checkpoints): context checkpoints kept per slot of a
    model whose cache cannot drop a suffix (a hybrid model's recurrent state); 0: none, and
    a prompt that does not continue the slot's sequence is computed from its first token.
    """

    def __init__(self, model: Transformer, n_ctx: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 cache_type_k: str = DEFAULT_KV_CACHE_TYPE, cache_type_v: str = DEFAULT_KV_CACHE_TYPE,
                 n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS,
                 checkpoint_min_step: int = CHECKPOINT_MIN_STEP):
        self.model = model
        train_ctx = model.hp.n_ctx_train
        self.n_ctx_total = default_n_ctx(train_ctx) if n_ctx is None else int(n_ctx)
        if not 0 < self.n_ctx_total <= train_ctx:
            raise ContextSizeError(f"n_ctx {self.n_ctx_total} must be between 1 and the model's context {train_ctx}")
        self.n_parallel = int(n_parallel)
        if not 1 <= self.n_parallel <= self.n_ctx_total // 2:
            raise ContextSizeError(f"{self.n_parallel} slots cannot share a context of {self.n_ctx_total} "
                                   f"(each needs at least 2 positions): raise -c or lower --parallel")
        self.n_ctx = self.n_ctx_total // self.n_parallel
        self.slots = [Slot(i, model.new_cache(self.n_ctx, cache_type_k, cache_type_v))
                      for i in range(self.n_parallel)]
        self.prefill_chunk = max(1, int(prefill_chunk))
        if int(n_ctx_checkpoints) < 0:
            raise ValueError(f"--ctx-checkpoints must be 0 (none) or more, got {n_ctx_checkpoints}")
        # only a cache that cannot be cut back (llama.cpp asks its memory the same) takes them
        self.n_ctx_checkpoints = int(n_ctx_checkpoints) if isinstance(self.slots[0].cache, HybridCache) else 0
        self.checkpoint_min_step = int(checkpoint_min_step)
        self.n_requests = 0  # prompts started (reuse_prefix), numbering their checkpoints
        self.n_computed = 0  # tokens run through the model since creation (prefix reuse shows here)
        self.n_steps = 0
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    @classmethod
    def from_gguf(cls, gguf_file, n_ctx: int | None = None, **kw) -> "Engine":
        return cls(load_model(gguf_file), n_ctx=n_ctx, **kw)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(slot.cache.nbytes for slot in self.slots)

    @property
    def tokens(self) -> list[int]:
        """Slot 0's tokens (the one-user front ends run there)."""
        return self.slots[0].tokens

    @property
    def cache(self):
        return self.slots[0].cache

    # --- evaluating tokens ---------------------------------------------------------------

    def reset(self, slot: int | None = None) -> None:
        """Forget the cached tokens of a slot, or of all (the K/V memory is simply overwritten later)."""
        for s in self.slots if slot is None else [self.slots[slot]]:
            s.cache.keep(0, len(s.tokens))  # and its checkpoints
            s.tokens, s.checkpoint_at = [], []

    def check_fits(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"the {what} has {n_tokens} tokens but the context holds only {self.n_ctx}")

    def step(self, work: list[tuple[int, list[int]]], prefills: int = 0) -> np.ndarray:
        """One forward pass of several slots: work is [(slot, tokens)], each slot's tokens
        appended to its sequence (one for a decode step, a chunk for a prefill), all through
        the weight matrices as one batch; the first `prefills` items are prompt chunks (the
        rest decoded tokens, as the stats count them). Returns float32[len(work), n_vocab]:
        each slot's last token's logits."""
        sequences = []
        for slot_id, tokens in work:
            slot = self.slots[slot_id]
            self.check_fits(len(slot.tokens) + len(tokens), "conversation" if len(tokens) == 1 else "prompt")
            sequences.append((tokens, len(slot.tokens), slot.cache))
        t0 = time.perf_counter()
        if len(work) == 1:  # one token: matvec (forward_batch would take the same path)
            tokens, start, cache = sequences[0]
            logits = self.model.forward(np.array(tokens), start, cache)[None]
        else:
            logits = self.model.forward_batch(sequences)
        elapsed = time.perf_counter() - t0
        self.n_steps += 1
        n_total = sum(len(tokens) for _, tokens in work)
        for i, (slot_id, tokens) in enumerate(work):
            slot = self.slots[slot_id]
            slot.tokens.extend(int(t) for t in tokens)
            slot.last_used = self.n_steps
            self._take_checkpoint(slot)
            kind = "prefill" if i < prefills else "decode"
            self.stats[f"{kind}_tokens"] += len(tokens)
            self.stats[f"{kind}_s"] += elapsed * len(tokens) / n_total
        self.n_computed += n_total
        return logits

    def prefill(self, tokens: Iterable[int], slot: int = 0) -> np.ndarray:
        """Append tokens to a slot's cache in chunks through matmul; logits of the last one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self.check_fits(len(self.slots[slot].tokens) + len(tokens), "prompt")
        logits, done = None, 0
        while done < len(tokens):
            chunk = self.next_chunk(slot, tokens[done:])
            logits = self.step([(slot, chunk)], prefills=1)[0]
            done += len(chunk)
        if len(tokens) > 1:
            return_freed_memory()  # the batch's activations (~18 MB for 512 tokens on Gemma)
        return logits

    def prefill_logits(self, tokens: Iterable[int], start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Append tokens like prefill (slot 0), yielding the logits of every token from index
        `start` on, one batch at a time, as (i, float32[k, n_vocab]): row j is the
        distribution of the token that follows tokens[i + j].

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

    def decode(self, token: int, slot: int = 0) -> np.ndarray:
        """Append one token to a slot through matvec; its logits."""
        return self.step([(slot, [int(token)])])[0]

    def next_chunk(self, slot: int, tokens: list[int]) -> list[int]:
        """The first of `tokens` (what is left of a prompt) to prefill in the next step: at
        most a prefill chunk, ending where the slot is to save a checkpoint."""
        s = self.slots[slot]
        n = min(len(tokens), self.prefill_chunk)
        for pos in s.checkpoint_at:
            if len(s.tokens) < pos < len(s.tokens) + n:
                n = pos - len(s.tokens)
                break
        return tokens[:n]

    def _take_checkpoint(self, s: Slot) -> None:
        """Save the slot's state if it has reached a position planned for a checkpoint."""
        while s.checkpoint_at and s.checkpoint_at[0] <= len(s.tokens):
            if s.checkpoint_at.pop(0) == len(s.tokens):
                s.cache.checkpoint(self.n_ctx_checkpoints, self.checkpoint_min_step, s.request)

    def reuse_prefix(self, tokens: list[int], slot: int = 0) -> list[int]:
        """Keep the longest common prefix of `tokens` and the slot's cached tokens (at least
        one token is left to compute, for its logits; the cache may keep fewer, see
        KVCache.keep: a hybrid model's resumes from its newest checkpoint within the prefix),
        drop the rest of the slot, and return the tokens still to compute. Plans the
        prompt's checkpoints (CHECKPOINT_TAIL): the first, where computing starts when that is
        within the last two chunks, is taken at once."""
        if not tokens:
            raise ValueError("a prompt needs at least one token")
        self.check_fits(len(tokens), "prompt")
        s = self.slots[slot]
        keep = common_prefix(s.tokens, tokens)
        keep = s.cache.keep(min(keep, len(tokens) - 1), len(s.tokens))
        del s.tokens[keep:]
        self.n_requests += 1
        s.request = self.n_requests
        s.checkpoint_at = []
        if self.n_ctx_checkpoints:
            end = len(tokens) - CHECKPOINT_TAIL
            s.checkpoint_at = sorted({max(keep, end - self.prefill_chunk), max(keep, end)})
            self._take_checkpoint(s)
        return tokens[keep:]

    def eval(self, tokens: Iterable[int], slot: int = 0) -> np.ndarray:
        """Logits after `tokens` in a slot, computing only what its cache does not already
        hold: the longest common prefix with its cached tokens is kept (reuse_prefix). If
        `tokens` is exactly the cached sequence, its last token is recomputed (its logits
        were not kept)."""
        tokens = [int(t) for t in tokens]
        return self.prefill(self.reuse_prefix(tokens, slot), slot)

    def copy_slot(self, source: int, dest: int) -> None:
        """Make slot dest hold what slot source holds (one prompt, several choices)."""
        src, dst = self.slots[source], self.slots[dest]
        dst.cache.copy_from(src.cache, len(src.tokens))
        dst.tokens = list(src.tokens)
        dst.checkpoint_at, dst.request = [], src.request  # its prompt is done; its checkpoints copied

    def pick_slot(self, tokens: list[int], free: Iterable[int]) -> int:
        """Of the free slots, the one whose cached tokens share the longest prefix with
        `tokens` (its cache is reused), else the least recently used (as llama.cpp picks)."""
        return max(free, key=lambda i: (common_prefix(self.slots[i].tokens, tokens),
                                        -self.slots[i].last_used))

    # --- generation ----------------------------------------------------------------------

    def generate(self, prompt_tokens: Iterable[int], sampler_fn: Callable[[np.ndarray], int],
                 max_tokens: int, stop_ids: Iterable[int] = (),
                 cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield up to max_tokens sampled tokens after the prompt (in slot 0).

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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextGeneration:
    """One prompt's continuation as text: sampling, end-of-generation tokens, stop strings,
    and streaming that never splits a UTF-8 character. Iterate it for text pieces; after the
    loop, `finish_reason` is "stop" (an end-of-generation token or a stop string) or
    "length" (max_tokens, or the context is full) and `tokens` holds what was generated.

    The CLI and the server both use it, so every front end stops and streams the same way.
    Iterating runs it alone in its slot; the server's scheduler (runtime.worker) instead
    drives several at once: `start` gives the prompt still to compute, then for each set of
    logits (`feed`) `advance` samples one token and says whether it must be decoded next
    (`pending`), the decoding of all of them being one engine step. `cancel`, set from any
    thread, ends it before the next token (and without the rest of a partly decoded
    character or a held-back stop-string prefix). `budget` (a runtime.reasoning.ReasoningBudget)
    bounds the thinking: once it is spent, the end of thinking is forced token by token; with
    a grammar too (params.constraint), the grammar constrains the answer after the thinking.
    """

    def __init__(self, engine: Engine, tokenizer, prompt_tokens: list[int], params,
                 cancel: threading.Event | None = None, slot: int = 0, budget=None):
        from runtime.sampling import Sampler, StopMatcher

        engine.check_fits(len(prompt_tokens) + 1, "prompt")
        self.engine, self.tokenizer, self.params, self.slot = engine, tokenizer, params, slot
        self.prompt_tokens = list(prompt_tokens)
        self.cancel = cancel or threading.Event()
        self.sampler = Sampler(params, engine.model.hp.n_vocab)
        self.stop_matcher = StopMatcher(params.stop)
        self.decoder = None  # made at the first token, once skip_special is settled
        self.stop_ids = frozenset(int(t) for t in tokenizer.eog_ids)
        room = engine.n_ctx - len(self.prompt_tokens)
        self.limit = room if params.max_tokens is None else min(params.max_tokens, room)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.skip_special = True  # control tokens give no text (False: their text)
        self.finished = False
        self.logits: np.ndarray | None = None
        self.pending: int | None = None  # the sampled token the next step must decode
        self.thinking = None if budget is None else budget.counter(
            lambda token: tokenizer.token_to_piece(token, special=False),
            before_grammar=params.constraint is not None,
            blanks=params.constraint.vocabulary.blank_ids if params.constraint is not None else ())

    def _next_token(self, logits: np.ndarray) -> int:
        # the slot's cached tokens are exactly the prompt and what was generated so far
        history = self.engine.slots[self.slot].tokens
        thinking = self.thinking
        if thinking is None:
            return self.sampler.sample(logits, history)
        token = thinking.forced_token()
        if token is None:
            token = self.sampler.sample(logits, history, grammar=not thinking.grammar_waits,
                                        besides=thinking.beside_grammar())
        thinking.accept(token)
        return token

    def start(self) -> list[int]:
        """The prompt tokens its slot does not hold yet (prefix reuse): to prefill."""
        return self.engine.reuse_prefix(self.prompt_tokens, self.slot)

    def feed(self, logits: np.ndarray) -> None:
        """The logits after the last token computed (the prompt's, then each pending one's)."""
        self.logits, self.pending = logits, None

    def advance(self) -> str:
        """Sample the next token from the logits fed; the text it completes. Sets `finished`
        (and finish_reason) when the generation ends, else `pending`: the token to decode."""
        if self.cancel.is_set():
            self.finished = True
            return ""
        token = int(self._next_token(self.logits))
        self.logits = None
        if token in self.stop_ids:  # an end-of-generation token: not part of the text
            self.finish_reason = "stop"
            return self._end()
        self.tokens.append(token)
        if self.decoder is None:
            self.decoder = self.tokenizer.stream_decoder(skip_special=self.skip_special)
        text = self.stop_matcher.push(self.decoder.feed(token))
        if self.stop_matcher.stopped:
            self.finish_reason, self.finished = "stop", True
            return text
        if self.sampler.finished:  # a grammar is complete: nothing may follow
            self.finish_reason = "stop"
            return text + self._end()
        if self.cancel.is_set():
            self.finished = True
            return text
        if len(self.tokens) >= self.limit:
            # the last token is not fed back: nothing will read its logits
            self.finish_reason = "length"
            return text + self._end()
        self.pending = token
        return text

    def _end(self) -> str:
        """Finish: the held-back text (the rest of a character, a partial stop string)."""
        self.finished = True
        tail = self.stop_matcher.push(self.decoder.flush()) if self.decoder else ""
        return tail + self.stop_matcher.flush()

    def __iter__(self) -> Iterator[str]:
        engine = self.engine
        self.feed(engine.prefill(self.start(), self.slot))
        while True:
            text = self.advance()
            if text:
                yield text
            if self.finished:
                return
            self.feed(engine.decode(self.pending, self.slot))
