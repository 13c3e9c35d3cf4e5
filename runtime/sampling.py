"""Logits -> token, with llama.cpp's sampler semantics; stop strings over streamed text.

The chain is llama.cpp's default one, in its order, after the grammar:

    grammar -> logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> draw

- grammar (SamplingParams.constraint, runtime/constraint.py): tokens the grammar does not
  allow next get -inf; the drawn token is fed back to it, and `Sampler.finished` says when
  the grammar can take no more (only an end-of-generation token could follow).
- logit bias: add `logit_bias[id]` to that token's logit (-inf bans it).
- penalties, over the tokens in the last `repeat_last_n` of the history (prompt included,
  as llama-server feeds it): a token seen c > 0 times there gets its logit divided by
  `repeat_penalty` when positive and multiplied by it otherwise, then
  `c * frequency_penalty + presence_penalty` subtracted.
- top-k keeps the k largest logits; top-p the smallest set of most likely tokens whose
  probabilities (softmax of what is left) add up to at least p; min-p the tokens whose
  probability is at least min_p times the largest one. All three look at the distribution
  at temperature 1: temperature comes last, as in llama.cpp, and only reshapes what is kept.
- temperature <= 0 is greedy: the argmax after bias and penalties.

This runs once per generated token over the whole vocabulary (262,144 entries for Gemma),
so nothing argsorts the vocabulary: top-k is an argpartition, top-p needs only its cut-off
logit (a partition, or a plain value sort), exponentials are float32 with float64 sums, and
prefix sums go block by block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SamplingParams", "Sampler", "TokenLogprobs", "logprobs", "StopMatcher"]


# --- parameters ------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real(name: str, value, allowed: str, ok) -> float:
    """value as a float if it is a real number that passes ok(); else a ValueError naming it."""
    if not _is_number(value) or math.isnan(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _integer(name: str, value, allowed: str, ok) -> int:
    """value as an int if it is integral (40 or 40.0) and passes ok(); else a ValueError."""
    if not _is_number(value) or not math.isfinite(value) or int(value) != value or not ok(int(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _token_id(key) -> int:
    """A logit_bias key: an int, or a decimal string as JSON object keys arrive."""
    if isinstance(key, str) and key.strip().lstrip("+").isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
        raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
    return int(key)


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Defaults are llama.cpp's.

    validate() (run on construction) checks every field, normalizes it (numbers to
    int/float, logit_bias keys to ints, a single stop string to a list) and raises a
    ValueError whose message starts with the field's name and states the allowed range.
    """

    temperature: float = 0.8  # 0 (or less) = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # window of the history the penalties look at; 0 = off, -1 = all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # None (or -1) = a fresh random seed
    max_tokens: int | None = None  # None = until end of generation or of the context
    stop: list[str] = field(default_factory=list)
    constraint: Any = None  # a runtime.constraint.Constraint: the grammar the output follows

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.temperature = _real("temperature", self.temperature,
                                 "a number >= 0 (0 = greedy)", lambda v: 0 <= v < math.inf)
        self.top_k = _integer("top_k", self.top_k, "an integer >= 0 (0 = off)", lambda v: v >= 0)
        self.top_p = _real("top_p", self.top_p, "a number between 0 and 1 (1 = off)",
                           lambda v: 0 <= v <= 1)
        self.min_p = _real("min_p", self.min_p, "a number between 0 and 1 (0 = off)",
                           lambda v: 0 <= v <= 1)
        self.repeat_penalty = _real("repeat_penalty", self.repeat_penalty,
                                    "a number > 0 (1 = off)", lambda v: 0 < v < math.inf)
        self.repeat_last_n = _integer("repeat_last_n", self.repeat_last_n,
                                      "an integer >= -1 (0 = off, -1 = the whole history)",
                                      lambda v: v >= -1)
        self.presence_penalty = _real("presence_penalty", self.presence_penalty,
                                      "a number between -2 and 2 (0 = off)", lambda v: -2 <= v <= 2)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty,
                                       "a number between -2 and 2 (0 = off)", lambda v: -2 <= v <= 2)
        self.logit_bias = self._checked_logit_bias(self.logit_bias)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, "an integer >= 0 (None or -1 = random)",
                                 lambda v: v >= -1)
            if self.seed == -1:
                self.seed = None
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens,
                                       "an integer >= 1 (None = no limit)", lambda v: v >= 1)
        self.stop = self._checked_stop(self.stop)
        if self.constraint is not None and not hasattr(self.constraint, "matcher"):
            raise ValueError("constraint must be a runtime.constraint.Constraint, got "
                             f"{type(self.constraint).__name__}")

    @staticmethod
    def _checked_logit_bias(bias) -> dict[int, float]:
        if bias is None:
            return {}
        if not isinstance(bias, Mapping):
            raise ValueError("logit_bias must map token ids (integers >= 0) to numbers "
                             f"(-inf bans a token), got {type(bias).__name__}")
        checked = {}
        for key, value in bias.items():
            token = _token_id(key)
            checked[token] = _real(f"logit_bias[{token}]", value, "a finite number or -inf",
                                   lambda v: v < math.inf)
        return checked

    @staticmethod
    def _checked_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Iterable) or isinstance(stop, Mapping):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        stop = list(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop must be a string or a list of non-empty strings, "
                                 f"got {s!r} in it")
        return stop


# --- the sampler -----------------------------------------------------------------------------

class Sampler:
    """Draws tokens from logits as SamplingParams say; owns its random generator.

    The same seed and settings reproduce the same tokens. One Sampler per generation (its
    generator's state advances with every draw).
    """

    def __init__(self, params: SamplingParams, n_vocab: int):
        params.validate()
        n_vocab = _integer("n_vocab", n_vocab, "an integer >= 1", lambda v: v >= 1)
        outside = sorted(t for t in params.logit_bias if t >= n_vocab)
        if outside:
            raise ValueError(f"logit_bias names token {outside[0]}, outside the vocabulary "
                             f"(ids 0..{n_vocab - 1})")
        self.params = params
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(params.seed)
        self._bias_ids = np.fromiter(params.logit_bias.keys(), np.int64, len(params.logit_bias))
        self._bias_values = np.fromiter(params.logit_bias.values(), np.float32, len(params.logit_bias))
        self._all_ids = np.arange(n_vocab)
        # greedy also when the temperature is too small for float32 (it divides the logits)
        self._greedy = np.float32(params.temperature) == 0
        self.matcher = None  # a runtime.constraint.TokenMatcher, when a grammar constrains
        if params.constraint is not None:
            if params.constraint.n_vocab != n_vocab:
                raise ValueError(f"the constraint was compiled for {params.constraint.n_vocab} "
                                 f"tokens, the model has {n_vocab}")
            self.matcher = params.constraint.matcher()
            self._grammar_eog = np.asarray(params.constraint.vocabulary.eog_ids, dtype=np.int64)

    @property
    def finished(self) -> bool:
        """The grammar is complete and can take nothing more: end the generation here."""
        return self.matcher is not None and self.matcher.finished

    # The stages, each usable on its own (tests and post-sampling probabilities use them).

    def adjusted_logits(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """A float32 copy of the logits after the grammar (-inf where it forbids), logit
        bias and penalties."""
        x = self._adjusted(logits, history)
        if self.matcher is not None:
            self.matcher.mask(x)
        self._check_left(x)
        return x

    def _adjusted(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """adjusted_logits without the grammar's mask or the checks: sample() and
        distribution() then look only at the ids the grammar allows (_candidates)."""
        x = np.array(logits, dtype=np.float32)  # always a copy: the caller's logits stay as they are
        if x.shape != (self.n_vocab,):
            raise ValueError(f"expected {self.n_vocab} logits, got an array of shape {x.shape}")
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_values
        p = self.params
        penalized = (p.repeat_penalty != 1.0 or p.presence_penalty != 0.0
                     or p.frequency_penalty != 0.0)
        if penalized and p.repeat_last_n != 0 and len(history):
            window = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
            tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            inside = (tokens >= 0) & (tokens < self.n_vocab)
            tokens, counts = tokens[inside], counts[inside]
            v = x[tokens]
            if p.repeat_penalty != 1.0:
                v = np.where(v <= 0, v * np.float32(p.repeat_penalty), v / np.float32(p.repeat_penalty))
            v = v - (counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
            x[tokens] = v
        return x

    def _check_left(self, values: np.ndarray) -> None:
        top = values.max()
        if np.isnan(top):
            raise ValueError("the logits contain NaN: nothing to sample from")
        if top == -np.inf:
            raise ValueError("every token is banned (logit -inf after logit_bias"
                             + (" and the grammar" if self.matcher is not None else "")
                             + "): nothing to sample")

    def _chain(self, logits: np.ndarray, history: Sequence[int], grammar: bool = True,
               besides: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray] | int:
        """The greedy token, or (ids, unnormalized weights) to draw from. With a grammar,
        only the ids it allows are looked at (no mask over the whole vocabulary); while it
        waits (grammar=False) any token but an end of generation (sample() says why)."""
        x = self._adjusted(logits, history)
        if self.matcher is not None and not grammar:
            x[self._grammar_eog] = -np.inf
        ids = self._candidates(grammar, besides)
        self._check_left(x if ids is None else x[ids])
        if self._greedy:
            if ids is None:
                return int(np.argmax(x))
            return int(ids[np.argmax(x[ids])])
        return self._filtered(x, ids)

    def distribution(self, logits: np.ndarray,
                     history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities): what sample() draws from, after the whole chain."""
        chosen = self._chain(logits, history)
        if isinstance(chosen, int):
            return np.array([chosen]), np.array([1.0])
        ids, weights = chosen
        keep = weights > 0
        ids, weights = ids[keep], weights[keep]
        return ids, weights / weights.sum(dtype=np.float64)

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), grammar: bool = True,
               besides: Sequence[int] | None = None) -> int:
        """The next token. history: every token so far (prompt and generated), for penalties.
        With a grammar, the token is also fed to it: call sample() once per generated token.
        A thinking model's grammar constrains the answer after its thinking
        (runtime/reasoning.py): grammar=False while it thinks (nothing is fed to the
        grammar, and no end of generation may come, for the answer must follow); besides:
        token ids allowed beside the grammar's, not fed to it when drawn (the one that opens
        the thinking before the answer, blanks after it)."""
        chosen = self._chain(logits, history, grammar, besides)
        if isinstance(chosen, int):
            token = chosen
        else:
            ids, weights = chosen
            token = int(ids[_prefix_index(weights, self.rng.random(), "right")])
        if self.matcher is not None and grammar and not (besides and token in besides):
            self.matcher.consume(token)
        return token

    def _candidates(self, grammar: bool = True, besides: Sequence[int] | None = None) -> np.ndarray | None:
        """The ids a grammar allows (None: all), and `besides`. The filters then look at
        these only: a partition over a vocabulary of mostly -inf is ~20x slower than over
        real values (NumPy's introselect on many equal keys: 21 vs 1.2 ms for 262k)."""
        if self.matcher is None or not grammar:
            return None
        ids = np.flatnonzero(self.matcher.allowed())
        return ids if not besides else np.union1d(ids, np.asarray(besides, dtype=np.int64))

    def _filtered(self, x: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """top-k, top-p, min-p, then temperature over the ids (all by default): the ids
        left and their (unnormalized) softmax weights, float32 (~10x faster exp than
        float64 over a whole vocabulary; every sum of them is float64)."""
        p = self.params
        if ids is None:
            ids, vals = self._all_ids, x
        else:
            vals = x[ids]
        n = vals.size
        if 0 < p.top_k < n:
            top = np.argpartition(vals, n - p.top_k)[n - p.top_k:]
            ids, vals = ids[top], vals[top]
        if p.top_p < 1.0:
            keep = _top_p_mask(vals, p.top_p)
            ids, vals = ids[keep], vals[keep]
        if p.min_p > 0.0:
            keep = vals >= vals.max() + np.float32(math.log(p.min_p))  # p_i >= min_p * p_max
            ids, vals = ids[keep], vals[keep]
        return ids, np.exp((vals - vals.max()) / np.float32(p.temperature))


_BLOCK = 1024  # prefix sums over a whole vocabulary go block by block


def _prefix_index(w: np.ndarray, fraction: float, side: str) -> int:
    """The first i where the running sum of the weights w reaches fraction * sum(w): `>=`
    with side="left" (top-p's cut), `>` with side="right" (a draw with fraction uniform
    in [0, 1), which then picks i with probability w[i] / sum(w)). Never a zero weight.

    A float64 cumulative sum of 262k float32 values costs ~4.6 ms here; float64 sums of
    1024-wide blocks, then a cumulative sum inside the one block the answer is in, ~0.2.
    """
    n = w.size
    if side == "left" and fraction <= 0:
        return int(np.argmax(w > 0))
    offset = 0
    if n <= 4 * _BLOCK:
        run = np.cumsum(w, dtype=np.float64)
        target = fraction * run[-1]
    else:
        full = n - n % _BLOCK
        sums = w[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
        if full < n:
            sums = np.append(sums, w[full:].sum(dtype=np.float64))
        blocks = np.cumsum(sums)
        target = fraction * blocks[-1]
        b = min(int(np.searchsorted(blocks, target, side)), blocks.size - 1)
        if b:
            target -= blocks[b - 1]
        offset = b * _BLOCK
        run = np.cumsum(w[offset:offset + _BLOCK], dtype=np.float64)
    i = min(int(np.searchsorted(run, target, side)), run.size - 1)
    if w[offset + i] == 0:  # only when rounding pushed the target past the last weight
        i = int(np.flatnonzero(w[offset:offset + i + 1])[-1])
    return offset + i


def _top_p_mask(vals: np.ndarray, p: float) -> np.ndarray:
    """Which of vals form the smallest most-likely set whose softmax mass reaches p (at
    least one token).

    Only the cut-off logit is needed, not an order of the tokens. On a large set, the 1024
    largest values (a partition, ~0.3 ms for 262k) usually hold the mass already; if not,
    all values are sorted (values only, SIMD, ~1.6 ms; an argsort takes 8-40 ms). Tokens
    tied at the cut-off are taken in the order they come until the set is full.
    """
    n = vals.size
    top = vals.max()
    s = None
    if n > 4 * _BLOCK:
        w = np.exp(vals - top)
        head = np.sort(np.partition(vals, n - _BLOCK)[n - _BLOCK:])[::-1]
        mass = np.cumsum(np.exp(head - top), dtype=np.float64)
        cut = int(np.searchsorted(mass, p * w.sum(dtype=np.float64), side="left"))
        if cut < _BLOCK:
            s = head
    if s is None:
        s = np.sort(vals)[::-1]
        cut = _prefix_index(np.exp(s - top), p, "left")
    edge = s[cut]
    keep = vals > edge
    ties = np.flatnonzero(vals == edge)[:cut + 1 - int(np.count_nonzero(keep))]
    keep[ties] = True
    return keep


# --- log-probabilities for the API -----------------------------------------------------------

@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability and the top alternatives (id, logprob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def logprobs(logits: np.ndarray, token: int, top_n: int = 0) -> TokenLogprobs:
    """Log-probabilities of the model's raw distribution (softmax of the logits as they
    came out, before bias, penalties, filters and temperature): what OpenAI's `logprobs` /
    `top_logprobs` report."""
    x = np.asarray(logits, dtype=np.float32)
    top_n = _integer("top_n", top_n, "an integer >= 0", lambda v: v >= 0)
    m = float(x.max())
    log_z = m + math.log(np.exp(x - np.float32(m)).sum(dtype=np.float64))
    top: list[tuple[int, float]] = []
    k = min(top_n, x.size)
    if k:
        kth = np.partition(x, x.size - k)[x.size - k]  # the k-th largest logit
        above = np.flatnonzero(x > kth)
        idx = np.concatenate([above, np.flatnonzero(x == kth)[:k - above.size]])
        idx = idx[np.lexsort((idx, -x[idx]))]  # best first; equal logits by id
        top = [(int(i), float(x[i]) - log_z) for i in idx]
    return TokenLogprobs(int(token), float(x[int(token)]) - log_z, top)


# --- stop strings ----------------------------------------------------------------------------

class StopMatcher:
    """Cuts streamed text at the first stop string, never emitting any part of it.

    push(piece) returns the text that is safe to emit now: a tail that could still grow
    into a stop string is held back until the next pieces decide it. The stop that
    completes first wins (the longest one when several complete at the same character), so
    the result does not depend on how the text was split into pieces. Once a stop string
    is hit, `stopped` is True, `matched` names it, and everything from it on is dropped.
    flush() releases the held-back tail when generation ends for another reason.
    """

    def __init__(self, stop: Sequence[str]):
        stop = SamplingParams._checked_stop(stop)
        self.stops = stop
        self._longest = max((len(s) for s in stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        if not self.stops:
            self._held = ""
            return text
        hit = None  # (end, -length, stop)
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (hit is None or (i + len(s), -len(s)) < hit[:2]):
                hit = (i + len(s), -len(s), s)
        if hit is not None:
            end, neg_len, s = hit
            self.stopped, self.matched, self._held = True, s, ""
            return text[:end + neg_len]
        hold = self._partial_tail(text)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        """The held-back text, at the end of a generation that no stop string ended."""
        if self.stopped:
            return ""
        text, self._held = self._held, ""
        return text

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
