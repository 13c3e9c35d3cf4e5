"""Constrained decoding (runtime/constraint.py) and its place in the sampler.

The vocabulary is a small SentencePiece one built here (byte fallback, a few multi-character
pieces, a space-prefix word), so the masks can be checked against what each token spells,
computed independently from the tokenizer's pieces.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.constraint import ConstraintError, ConstraintVocabulary, Grammar
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer

WORDS = ["\u2581" + c for c in "abc"] + list("abcdefghijklmnopqrstuvwxyz") + [
    "ye", "yes", "\u2581yes", "no", '{"', '":', "true", "tr", "\u2581", "12", '",', "}"]
EXTRA = 5  # the model's logits are wider than the vocabulary: padded ids no grammar allows


def tokenizer(add_space_prefix: bool = True) -> Tokenizer:
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + WORDS
    types = [2, 3, 3, 3, 3] + [6] * 256 + [1] * len(WORDS)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(WORDS))]
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": add_space_prefix})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer()


@pytest.fixture(scope="module")
def vocab(tok) -> ConstraintVocabulary:
    return ConstraintVocabulary.of(tok, tok.vocab_size + EXTRA)


def spelled(tok, ids) -> list[bytes]:
    return [tok.token_to_piece(int(i)) for i in ids]


def expected_next(tok, sentences: list[bytes], done: bytes) -> set[int]:
    """Tokens whose bytes extend `done` towards one of the sentences (an independent
    reading of the mask: the grammar's language is the finite list `sentences`)."""
    out = set()
    for i in range(tok.vocab_size):
        if tok.is_control(i):
            continue
        piece = tok.token_to_piece(i)
        if piece and any(s.startswith(done + piece) for s in sentences):
            out.add(i)
    return out


def test_the_mask_allows_exactly_the_tokens_that_continue_the_language(tok, vocab):
    matcher = vocab.compile(Grammar.gbnf('root ::= "yes" | "no" | "tr" "ue"')).matcher()
    sentences = [b"yes", b"no", b"true"]
    allowed = matcher.allowed()
    assert allowed.shape == (tok.vocab_size + EXTRA,)
    assert not allowed[tok.vocab_size:].any()  # padding
    assert set(np.flatnonzero(allowed)) == expected_next(tok, sentences, b"")
    assert not allowed[list(tok.eog_ids)].any()  # not complete yet
    # After a multi-character token only "s" can follow: llguidance then allows just the
    # vocabulary's own spelling of the forced text (the piece "s", not the byte <0x73>),
    # and without SentencePiece's space prefix (the piece "▁" would start " s").
    matcher.consume(tok.token_id("ye"))
    assert expected_next(tok, sentences, b"ye") == {tok.token_id("s"), tok.token_id("<0x73>")}
    assert set(np.flatnonzero(matcher.allowed())) == {tok.token_id("s")}
    assert not matcher.accepting and not matcher.finished
    matcher.consume(tok.token_id("s"))
    assert matcher.accepting and matcher.finished
    assert set(np.flatnonzero(matcher.allowed())) == set(tok.eog_ids)  # only the end may follow


def test_mask_sets_disallowed_logits_to_minus_infinity_in_place(tok, vocab):
    matcher = vocab.compile(Grammar.regex("[0-9]+")).matcher()
    logits = np.arange(tok.vocab_size + EXTRA, dtype=np.float32)
    out = matcher.mask(logits)
    assert out is logits
    kept = np.flatnonzero(np.isfinite(logits))
    assert set(spelled(tok, kept)) == {bytes([c]) for c in b"0123456789"} | {b"12"}
    assert np.array_equal(logits[kept], kept.astype(np.float32))


def random_walk(tok, vocab, grammar, seed, steps=200) -> bytes:
    """Follow the grammar with uniformly random allowed tokens until it is finished or an
    end-of-generation token is drawn; the bytes produced."""
    rng = np.random.default_rng(seed)
    matcher = vocab.compile(grammar).matcher()
    out = b""
    for _ in range(steps):
        token = int(rng.choice(np.flatnonzero(matcher.allowed())))
        matcher.consume(token)
        if token in tok.eog_ids:
            assert matcher.accepting
            break
        out += tok.token_to_piece(token)
        if matcher.finished:
            break
    else:
        pytest.fail(f"no end after {steps} tokens: {out!r}")
    return out


SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tag": {"enum": ["yes", "no"]}},
    "required": ["ok", "n", "tag"], "additionalProperties": False}


def test_random_walks_through_a_json_schema_are_valid_json(tok, vocab):
    grammar = Grammar.json_schema(SCHEMA)
    for seed in range(20):
        value = json.loads(random_walk(tok, vocab, grammar, seed))
        assert set(value) == {"ok", "n", "tag"}
        assert isinstance(value["ok"], bool)
        assert type(value["n"]) is int and 0 <= value["n"] <= 99
        assert value["tag"] in ("yes", "no")


def test_json_object_gives_objects(tok, vocab):
    grammar = Grammar.json_object()
    for seed in range(10):
        text = random_walk(tok, vocab, grammar, seed, steps=2000)
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("make, message", [
    (lambda: Grammar.json_schema({"type": "strin"}), "invalid JSON schema: Invalid type: strin"),
    (lambda: Grammar.json_schema({"$ref": "#/nowhere"}), "/nowhere"),
    (lambda: Grammar.json_schema("{not json"), "the JSON schema is not valid JSON"),
    (lambda: Grammar.json_schema([1, 2]), "a JSON schema must be a JSON object, got list"),
    (lambda: Grammar.json_schema({"type": "string", "pattern": "(["}), "unclosed character class"),
    (lambda: Grammar.gbnf('root ::= "a" | b'), "invalid GBNF grammar"),
    (lambda: Grammar.gbnf("root ::= [a-z"), "invalid GBNF grammar"),
    (lambda: Grammar.gbnf(""), "a GBNF grammar must be a non-empty string"),
    (lambda: Grammar.lark("start: foo"), 'invalid Lark grammar: at 1(8): unknown name: "foo"'),
    (lambda: Grammar.regex("(a"), "invalid regular expression"),
])
def test_bad_grammars_say_what_is_wrong(vocab, make, message):
    with pytest.raises(ConstraintError) as e:
        vocab.compile(make())
    assert message in str(e.value)


def test_the_sampler_follows_the_grammar_and_ends_with_it(tok, vocab):
    n = tok.vocab_size + EXTRA
    constraint = vocab.compile(Grammar.gbnf('root ::= "a" [0-9] [0-9]? "}"'))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                         seed=seed, constraint=constraint), n)
        text = b""
        while not sampler.finished:
            logits = rng.normal(size=n).astype(np.float32) * 3
            logits[tok.token_id("b")] = 100  # what the model wants is not allowed
            text += tok.token_to_piece(sampler.sample(logits))
        assert text[:1] == b"a" and text[-1:] == b"}" and text[1:-1].isdigit(), text
    # greedy: the best allowed token; an end-of-generation token only when complete
    sampler = Sampler(SamplingParams(temperature=0, constraint=constraint), n)
    logits = np.zeros(n, np.float32)
    logits[2] = 50  # </s>
    logits[tok.token_id("a")] = 1
    assert sampler.sample(logits) == tok.token_id("a")
    logits[tok.token_id("<0x37>")] = 2
    assert sampler.sample(logits) == tok.token_id("<0x37>")
    assert sampler.sample(logits) == tok.token_id("<0x37>")  # the optional second digit
    assert not sampler.finished
    assert sampler.sample(logits) == tok.token_id("}")  # all that is left: not </s>
    assert sampler.finished
    assert sampler.sample(logits) == 2  # complete: now the end may come


def test_a_constraint_is_shared_by_generations_and_checked_against_the_model(tok, vocab):
    constraint = vocab.compile(Grammar.regex("no"))
    n = tok.vocab_size + EXTRA
    first = Sampler(SamplingParams(temperature=0, constraint=constraint), n)
    first.sample(np.zeros(n, np.float32))
    second = Sampler(SamplingParams(temperature=0, constraint=constraint), n)
    assert second.matcher.n_consumed == 0 and not second.finished
    with pytest.raises(ValueError, match=f"compiled for {n} tokens, the model has 300"):
        Sampler(SamplingParams(constraint=constraint), 300)
    with pytest.raises(ValueError, match="constraint must be a runtime.constraint.Constraint"):
        SamplingParams(constraint="no")


def test_the_vocabulary_is_built_once_per_tokenizer(tok, vocab):
    assert ConstraintVocabulary.of(tok, tok.vocab_size + EXTRA) is vocab


def test_gemmas_vocabulary_digits_and_control_tokens(gemma_metadata):
    """On Gemma's real 262,144-token vocabulary: the tokens allowed where 1-3 digits may
    come are exactly those that spell 1-3 digits; a grammar that writes a control token's
    text gets it as text, never as the control token (so grammar text cannot end a turn)."""
    tok = Tokenizer.from_metadata(gemma_metadata)
    vocab = ConstraintVocabulary(tok, tok.vocab_size)
    digits = vocab.compile(Grammar.regex("[0-9]{1,3}")).matcher().allowed()
    spelled_digits = {i for i in range(tok.vocab_size) if not tok.is_control(i)
                      and 1 <= len(p := tok.token_to_piece(i)) <= 3 and p.isdigit()}
    assert set(np.flatnonzero(digits)) == spelled_digits and len(spelled_digits) >= 10
    end_of_turn = tok.token_id("<end_of_turn>")
    matcher = vocab.compile(Grammar.lark('start: "<end_of_turn>"')).matcher()
    text = b""
    while not matcher.finished:
        allowed = np.flatnonzero(matcher.allowed())
        assert end_of_turn not in allowed
        matcher.consume(int(allowed[0]))
        text += tok.token_to_piece(int(allowed[0]))
    assert text == b"<end_of_turn>"
