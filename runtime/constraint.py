"""Constrained decoding: a grammar the generated tokens must follow (structured output).

llguidance (Rust, the engine llama.cpp, vLLM and SGLang use) does the parsing: it compiles a
grammar against the model's vocabulary and, before each token, says which tokens may come
next as a bitmask over the vocabulary (a few microseconds to a fraction of a millisecond a
token, thanks to its token trie and "slices"). This module wraps it in three steps:

    grammar = Grammar.json_schema(schema)     # or .json_object(), .lark(text), .gbnf(text),
                                              # .regex(text): pure data, no model needed
    vocab = ConstraintVocabulary.of(tokenizer, n_vocab)   # once per model, then cached
    constraint = vocab.compile(grammar)       # checked: ConstraintError says what is wrong

then `SamplingParams(constraint=constraint)`: the Sampler starts a fresh TokenMatcher from it
for each generation (a Constraint is immutable and may serve any number of them), looks only
at the tokens the grammar allows next (as if every other logit were -inf, before any other
stage: top-k/p and the draw never see the rest), lets an end-of-generation token through
only where the grammar is complete, and feeds the chosen token back. `Sampler.finished`
turns true when the grammar can take nothing more, and the generation loop stops there.

Every bad schema or grammar, wherever it is found (converting GBNF, compiling, checking
against the vocabulary), becomes a ConstraintError (a ValueError) whose message names the
problem; the HTTP layer answers it with a 400.

For tool calls (runtime/tool_call_grammar.py): a Lark grammar can put literal markup around a JSON
value that follows a schema, e.g.
    Grammar.lark('start: "<tool_call>" %json{"type": "object", ...} "</tool_call>"')
and name a special (control) token of the vocabulary as `<|name|>` or by id as `<[12345]>`.

JSON schemas compile with bounded whitespace (a space, or one or two newlines and up to 20
spaces or tabs of indent, as llama.cpp's JSON grammars allow), so a small model cannot loop
on whitespace forever.

Cost: building the vocabulary's token trie takes 2-3 s for a 262k-token vocabulary (and
holds Python's GIL), so it is done lazily, the first time a model needs a constraint, then
kept (ConstraintVocabulary.of). The per-token mask: bench/constraint.py.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["ConstraintError", "Grammar", "ConstraintVocabulary", "Constraint", "TokenMatcher"]

# JSON whitespace between tokens: none, a space, or line breaks with an indent (bounded).
JSON_WHITESPACE = r"(?:\x20|\n{1,2}[\x20\t]{0,20})?"


class ConstraintError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


def _llguidance():
    import llguidance

    return llguidance


# --- grammars, independent of any model ----------------------------------------------------

@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's own form (a JSON string), made from one of the kinds an
    API request may carry. `kind` says what it was made from (for messages)."""

    kind: str
    definition: str

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """Any JSON value that validates against `schema` (a dict, or a JSON text of one)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object, got "
                                  f"{type(schema).__name__}")
        try:
            definition = _llguidance().LLMatcher.grammar_from_json_schema(
                schema, overrides={"whitespace_pattern": JSON_WHITESPACE})
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        return cls("JSON schema", definition)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        """llguidance's Lark dialect (Lark plus %json{schema}, <|special|> tokens, ...)."""
        cls._check_text("Lark grammar", text)
        return cls("Lark grammar", _llguidance().LLMatcher.grammar_from_lark(text))

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        """llama.cpp's GBNF (the `grammar` field of llama.cpp's server), converted by
        llguidance to its Lark dialect."""
        cls._check_text("GBNF grammar", text)
        try:
            return cls("GBNF grammar", _llguidance().grammar_from("gbnf", text))
        except ValueError as e:
            raise ConstraintError(f"invalid GBNF grammar: {e}") from None

    @classmethod
    def regex(cls, text: str) -> "Grammar":
        """Text that matches a regular expression (Rust regex syntax), as a whole."""
        cls._check_text("regular expression", text)
        return cls("regular expression", _llguidance().LLMatcher.grammar_from_regex(text))

    @staticmethod
    def _check_text(what: str, text) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError(f"a {what} must be a non-empty string, got {text!r:.60}")


# --- the model's side ------------------------------------------------------------------------

class ConstraintVocabulary:
    """llguidance's view of one model's vocabulary: every token's bytes (control tokens
    marked as special, so no grammar text can produce them by accident) and the
    end-of-generation tokens, which a grammar allows only where it is complete.

    `n_vocab` is the model's logits width, which may exceed the tokenizer's count (padded
    output rows); the extra ids are empty tokens that no grammar allows."""

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    def __init__(self, tokenizer, n_vocab: int):
        llg = _llguidance()
        n_tok = tokenizer.vocab_size
        if n_vocab < n_tok:
            raise ValueError(f"n_vocab {n_vocab} is smaller than the tokenizer's {n_tok} tokens")
        self.n_vocab = int(n_vocab)
        self.eog_ids = sorted(tokenizer.eog_ids)
        pieces = [tokenizer.token_to_piece(i, True) for i in range(n_tok)]
        # tokens of blanks only (a thinking model writes "\n\n" between </think> and the
        # answer a grammar constrains: runtime/reasoning.py lets a few through)
        self.blank_ids = np.array([i for i, piece in enumerate(pieces) if piece
                                   and not piece.strip(b" \t\n\r") and not tokenizer.is_control(i)],
                                  dtype=np.int64)
        wrapper = _TokenizerView(tokenizer, pieces)
        self.lltokenizer = llg.LLTokenizer(llg.TokenizerWrapper(wrapper), n_vocab=self.n_vocab,
                                           eos_token=self.eog_ids or None)

    @classmethod
    def of(cls, tokenizer, n_vocab: int) -> "ConstraintVocabulary":
        """The vocabulary of this tokenizer, built on first use (seconds for a big
        vocabulary) and kept for as long as the tokenizer lives. Thread-safe."""
        with cls._cache_lock:
            built = cls._cache.get(tokenizer)
            if built is None or built.n_vocab != n_vocab:
                built = cls._cache[tokenizer] = cls(tokenizer, n_vocab)
            return built

    def compile(self, grammar: Grammar) -> "Constraint":
        """The grammar checked and compiled against this vocabulary."""
        llg = _llguidance()
        matcher = llg.LLMatcher(self.lltokenizer, grammar.definition, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {grammar.kind}: {_first_lines(matcher.get_error())}")
        return Constraint(self, grammar, matcher)


def _first_lines(message: str, limit: int = 600) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads from a tokenizer: the tokens' bytes, the
    special ids, and an encoder (used for its token healing and forced text)."""

    def __init__(self, tokenizer, pieces: list[bytes]):
        self._tokenizer = tokenizer
        self.tokens = pieces
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else (
            min(tokenizer.eog_ids) if tokenizer.eog_ids else None)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(len(pieces)) if tokenizer.is_control(i)]

    def __call__(self, text) -> list[int]:
        """The tokens of text as it would be tokenized in the middle of other text.

        llguidance tokenizes the bytes a grammar forces and steers the model to exactly
        those tokens, so this must not add SentencePiece's space prefix (which the
        tokenizer's encode adds at the start of a text, as llama.cpp's does): the
        fragment encoder is called as for text that follows other text."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        model = getattr(self._tokenizer, "_model", None)
        if getattr(model, "add_space_prefix", False) and hasattr(model, "encode_fragment"):
            out: list[int] = []
            model.encode_fragment(text, False, out)
            return out
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


class Constraint:
    """A grammar compiled for one vocabulary: immutable, shared by any number of
    generations, each of which follows it with its own TokenMatcher."""

    def __init__(self, vocabulary: ConstraintVocabulary, grammar: Grammar, matcher):
        self.vocabulary = vocabulary
        self.grammar = grammar
        self._pristine = matcher  # never advanced: matcher() copies it

    @property
    def n_vocab(self) -> int:
        return self.vocabulary.n_vocab

    def matcher(self) -> "TokenMatcher":
        return TokenMatcher(self._pristine.deep_copy(), self.vocabulary.n_vocab)


class TokenMatcher:
    """One generation's progress through a grammar.

    allowed() is the current bitmask expanded to one bool per token (computed once per
    step, into a preallocated buffer: llguidance writes the 32-bit words in place and NumPy
    unpacks them, no Python loop over the vocabulary); mask(logits) sets the disallowed
    logits to -inf in place; consume(token) advances. `finished`: nothing but an
    end-of-generation token may follow (the grammar is complete and cannot grow)."""

    def __init__(self, matcher, n_vocab: int):
        self._matcher = matcher
        self.n_vocab = n_vocab
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._allowed: np.ndarray | None = None
        self.n_consumed = 0

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError("constrained decoding failed: "
                                  f"{_first_lines(self._matcher.get_error())}")

    def bitmask(self) -> np.ndarray:
        """int32[(n_vocab + 31) // 32]: the allowed tokens, bit i % 32 of word i // 32,
        written in place by llguidance (which drops the GIL meanwhile)."""
        self._check()
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        self._check()
        return words

    def allowed(self) -> np.ndarray:
        """bool[n_vocab]: the tokens the grammar allows next."""
        if self._allowed is None:
            words = self.bitmask()
            bits = np.unpackbits(words.view(np.uint8), count=self.n_vocab, bitorder="little")
            self._allowed = bits.view(np.bool_)
            if not self._allowed.any():
                raise ConstraintError("constrained decoding failed: the grammar allows no "
                                      "token here")
        return self._allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits (float32[n_vocab]) with every disallowed token at -inf, in place."""
        np.copyto(logits, np.float32(-np.inf), where=~self.allowed())
        return logits

    def consume(self, token: int) -> None:
        """Advance past token (which must be allowed)."""
        if not self._matcher.consume_token(int(token)):
            raise ConstraintError(f"constrained decoding failed: token {token} does not "
                                  f"follow the grammar ({_first_lines(self._matcher.get_error())})")
        self._allowed = None
        self.n_consumed += 1

    @property
    def accepting(self) -> bool:
        """The text so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()
