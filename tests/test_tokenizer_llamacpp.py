"""Every tokenizer in llama.cpp's own test suite, run as its tests/test-tokenizer-0 runs them.

llama.cpp's vocabulary-only GGUFs come with inputs and the ids llama.cpp gives them
(add_special=false, parse_special=false); each must come out here id for id. The files are
fetched once per machine from the llama-cpp-python sdist on PyPI (tests/llamacpp_vocab.py);
without PyPI the tests skip, saying why.
"""

import json
import pickle
from pathlib import Path

import pytest
from llamacpp_vocab import (VocabUnavailable, load_cases, names_with_cases, vocab_dir, vocab_names,
                            vocab_path)

from runtime.gguf import GGUFFile
from runtime.tokenizer import PRE_TOKENIZERS, Tokenizer, TokenizerError

# The vocabularies with expected ids in llama-cpp-python 0.3.36's llama.cpp; a new sdist that
# adds one fails test_the_suite_is_the_one_named_here until it is added here.
TESTED = ("bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4",
          "gpt-2", "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact",
          "starcoder")
# Vocabularies shipped without cases, and the tokenizer models modelrun refuses among them.
UNTESTED_REFUSED = {"nomic-bert-moe": "'t5'"}


@pytest.fixture(scope="session")
def llamacpp_models():
    try:
        return vocab_dir()
    except VocabUnavailable as e:
        pytest.skip(f"{e}; these tests need PyPI, or MODELRUN_LLAMACPP_MODELS naming a folder "
                    "with llama.cpp's models/ggml-vocab-* files")


@pytest.fixture(scope="session")
def tokenizer_of(llamacpp_models):
    """name -> the Tokenizer built from that vocabulary's metadata (once per session)."""
    built = {}

    def get(name: str) -> Tokenizer:
        if name not in built:
            metadata = GGUFFile(vocab_path(llamacpp_models, name)).metadata
            built[name] = Tokenizer.from_metadata(metadata)
        return built[name]

    return get


def _mismatches(tokenizer, cases: dict[str, list[int]]) -> list[str]:
    wrong = []
    for text, expected in cases.items():
        got = tokenizer.encode(text, add_special=False, parse_special=False)
        if got != expected:
            wrong.append(f"{text[:60]!r}: expected {expected[:16]}, got {got[:16]}")
    return wrong


def test_the_suite_is_the_one_named_here(llamacpp_models):
    assert tuple(names_with_cases(llamacpp_models)) == TESTED


@pytest.mark.parametrize("name", TESTED)
def test_every_case_gives_llamacpps_ids(name, llamacpp_models, tokenizer_of):
    cases = load_cases(llamacpp_models, name)
    assert len(cases) >= 40  # the suite's shared inputs, not an empty file
    wrong = _mismatches(tokenizer_of(name), cases)
    assert not wrong, f"{len(wrong)} of {len(cases)} cases differ:\n" + "\n".join(wrong[:10])


@pytest.mark.parametrize("name", TESTED)
def test_a_pickled_tokenizer_gives_the_same_ids(name, llamacpp_models, tokenizer_of):
    """runtime.tokenizer_cache keeps built tokenizers as pickles; every kind must survive."""
    copy = pickle.loads(pickle.dumps(tokenizer_of(name), protocol=pickle.HIGHEST_PROTOCOL))
    assert not _mismatches(copy, load_cases(llamacpp_models, name))


def test_special_tokens_and_add_special_give_llamacpps_ids(llamacpp_models, tokenizer_of):
    """test-tokenizer-0 never parses special tokens; llama.cpp's ids for texts around each
    vocabulary's special tokens, with add_special and parse_special on, are committed in
    tests/data (Phi-3's special tokens swallow the whitespace after them, BERT's encodings
    close with [SEP], Gemma 4 always adds BOS...)."""
    cases = json.loads((Path(__file__).parent / "data" /
                        "llamacpp_vocab_special_tokens.json").read_text())["cases"]
    assert sorted(cases) == sorted(TESTED)
    wrong = [f"{name} {text!r}: expected {ids}, got {got}"
             for name, pairs in cases.items() for text, ids in pairs
             if (got := tokenizer_of(name).encode(text, add_special=True,
                                                  parse_special=True)) != ids]
    assert not wrong, "\n".join(wrong[:10])


def test_every_pre_tokenizer_name_gives_llamacpps_ids(llamacpp_models):
    """llama.cpp's ids for every tokenizer.ggml.pre name modelrun accepts (llama-bpe's
    vocabulary with the name rewritten, 20 texts; tests/data). A tokenizer is built for one
    name per pre-tokenizer (0.4 s each); the other names must resolve to the same one."""
    reference = json.loads((Path(__file__).parent / "data" /
                            "llamacpp_pre_tokenizers.json").read_text())
    by_name = {name: group["ids"] for group in reference["groups"] for name in group["names"]}
    assert sorted(by_name) == sorted(PRE_TOKENIZERS)
    metadata = dict(GGUFFile(vocab_path(llamacpp_models, reference["vocabulary"])).metadata)
    tried: dict[int, str] = {}  # id of a pre-tokenizer -> the name it was tried with
    for name, expected in sorted(by_name.items()):
        pre = PRE_TOKENIZERS[name]
        if id(pre) in tried:
            assert expected == by_name[tried[id(pre)]], (name, tried[id(pre)])
            continue
        tried[id(pre)] = name
        tokenizer = Tokenizer.from_metadata({**metadata, "tokenizer.ggml.pre": name})
        got = [tokenizer.encode(text, add_special=False, parse_special=False)
               for text in reference["texts"]]
        assert got == expected, name


def test_vocabularies_without_cases_build_or_are_refused_clearly(llamacpp_models):
    for name in sorted(set(vocab_names(llamacpp_models)) - set(TESTED)):
        metadata = GGUFFile(vocab_path(llamacpp_models, name)).metadata
        if name in UNTESTED_REFUSED:
            with pytest.raises(TokenizerError, match=UNTESTED_REFUSED[name]):
                Tokenizer.from_metadata(metadata)
        else:
            assert Tokenizer.from_metadata(metadata).encode("Hello world", add_special=False)


def test_an_unknown_pre_tokenizer_is_refused_not_guessed(llamacpp_models):
    """A name llama.cpp knows and modelrun does not (Kimi K2's, split by custom code there)
    must not fall back to another regex: that would tokenize silently wrong."""
    metadata = dict(GGUFFile(vocab_path(llamacpp_models, "qwen2")).metadata)
    metadata["tokenizer.ggml.pre"] = "kimi-k2"
    with pytest.raises(TokenizerError, match="unsupported BPE pre-tokenizer 'kimi-k2'"):
        Tokenizer.from_metadata(metadata)
