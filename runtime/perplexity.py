"""Perplexity of a model on a text, computed the way llama.cpp's `perplexity` tool does.

llama.cpp's default method (tools/perplexity, `perplexity()`), which this follows so that the
numbers compare with published ones:

- the text is tokenized once, with BOS when the model adds one;
- it is cut into consecutive, non-overlapping chunks of n_ctx tokens (a tail shorter than
  n_ctx is dropped); the first token of each chunk is replaced by BOS when the model adds BOS;
- each chunk is evaluated from an empty KV cache, and only its second half is scored: the
  logits at positions first = n_ctx/2 .. n_ctx-2 predict the tokens at first+1 .. n_ctx-1,
  i.e. n_ctx - 1 - first predictions per chunk, each with at least n_ctx/2 tokens of context;
- the negative log-likelihoods (log-softmax over the whole vocabulary) are summed; after each
  chunk the running perplexity is exp(mean NLL);
- the +/- is the standard error of the mean NLL, sqrt((E[nll^2] - E[nll]^2) / (count - 1)),
  carried to the perplexity by its derivative: stderr * ppl.

Log-softmax is computed here in float64 (llama.cpp sums float32 exponentials in double); the
difference is far below the last digit either prints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

ROWS_PER_SOFTMAX = 32  # logits rows converted to float64 at a time (32 x 262k x 8 B = 67 MB)


@dataclass
class PerplexityResult:
    """The outcome of one perplexity run."""

    ppl: float  # exp(mean negative log-likelihood)
    ppl_stderr: float  # llama.cpp's "+/-"
    n_chunks: int
    n_ctx: int
    n_tokens: int  # tokens evaluated: n_chunks * n_ctx
    n_scored: int  # predictions scored: n_chunks * (n_ctx - 1 - n_ctx // 2)
    seconds: float
    running: list[float] = field(default_factory=list)  # the estimate after each chunk

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


def perplexity(engine, tokens: Sequence[int], n_ctx: int,
               on_progress: Callable[[int, int], None] | None = None, *,
               bos_id: int | None = None, n_chunks: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of `engine`'s model over `tokens` (the whole text, tokenized with BOS when
    the model adds one), in chunks of n_ctx tokens.

    bos_id: the token that starts every chunk. By default it is tokens[0] when that is the
    model's BOS token (the tokenizer added it), else chunks keep their own first token,
    as llama.cpp does for models without BOS. n_chunks: at most this many chunks (default:
    every full chunk). After each chunk, on_progress(chunks_done, chunks_total) and
    on_chunk(chunk_number, running_perplexity) are called.
    """
    n_ctx = int(n_ctx)
    if n_ctx < 3:  # n_ctx - 1 - n_ctx // 2 predictions are scored per chunk
        raise ValueError(f"perplexity needs chunks of at least 3 tokens, got {n_ctx}")
    if n_ctx > engine.n_ctx:
        raise ValueError(f"chunks of {n_ctx} tokens do not fit the engine's context of {engine.n_ctx}")
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    total = available if n_chunks is None else min(int(n_chunks), available)
    if total < 1:
        raise ValueError(f"n_chunks must be at least 1, got {n_chunks}")
    if bos_id is None:
        bos_id = _added_bos(engine, tokens)

    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    for c in range(total):
        chunk = [int(t) for t in tokens[c * n_ctx:(c + 1) * n_ctx]]
        if bos_id is not None:
            chunk[0] = int(bos_id)
        nll = chunk_nll(engine, chunk, first)
        nll_sum += float(nll.sum())
        nll2_sum += float(np.square(nll).sum())
        count += len(nll)
        running.append(math.exp(nll_sum / count))
        if on_progress is not None:
            on_progress(c + 1, total)
        if on_chunk is not None:
            on_chunk(c + 1, running[-1])
    seconds = time.perf_counter() - t0

    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    stderr = math.sqrt(variance / (count - 1)) * ppl if variance > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, ppl_stderr=stderr, n_chunks=total, n_ctx=n_ctx,
                            n_tokens=total * n_ctx, n_scored=count, seconds=seconds,
                            running=running)


def chunk_nll(engine, chunk: Sequence[int], first: int) -> np.ndarray:
    """Negative log-likelihoods of chunk[first+1:], each given the tokens before it, with the
    chunk evaluated from an empty cache. float64[len(chunk) - 1 - first]."""
    engine.reset()
    targets = np.asarray(chunk, dtype=np.int64)
    # the last position's logits would predict a token outside the chunk: not computed
    out = []
    for i, logits in engine.prefill_logits(chunk[:-1], start=first):
        out.append(negative_log_likelihoods(logits, targets[i + 1:i + 1 + len(logits)]))
    return np.concatenate(out) if out else np.zeros(0)


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[r])[targets[r]] for each row r, in float64."""
    out = np.empty(len(targets), np.float64)
    for r in range(0, len(targets), ROWS_PER_SOFTMAX):
        x = logits[r:r + ROWS_PER_SOFTMAX].astype(np.float64)
        peak = x.max(axis=1)
        x -= peak[:, None]
        picked = x[np.arange(len(x)), targets[r:r + ROWS_PER_SOFTMAX]]
        np.exp(x, out=x)
        out[r:r + len(x)] = np.log(x.sum(axis=1)) - picked
    return out


def _added_bos(engine, tokens: Sequence[int]) -> int | None:
    """tokens[0] when it is the model's BOS token, i.e. the tokenizer added BOS."""
    if not len(tokens):
        return None
    gguf = getattr(engine.model, "gguf", None)
    bos = gguf.metadata.get("tokenizer.ggml.bos_token_id") if gguf is not None else None
    return int(tokens[0]) if bos is not None and int(tokens[0]) == int(bos) else None
