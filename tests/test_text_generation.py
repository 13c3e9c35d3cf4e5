"""TextGeneration: the text-level loop the CLI and the server share."""

import pytest

from runtime.engine import ContextOverflowError, Engine, TextGeneration
from runtime.gguf import GGUFFile
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

PROMPT = "Once upon a time, there was a little"
LLAMACPP = " girl named Lily. She was a very smart girl, and she loved to play with her friends."


@pytest.fixture(scope="module")
def gemma(gemma_path):
    gguf = GGUFFile(gemma_path)
    return Engine.from_gguf(gguf, n_ctx=64), Tokenizer.from_metadata(gguf.metadata)


def generate(gemma, prompt=PROMPT, **params):
    engine, tokenizer = gemma
    generation = TextGeneration(engine, tokenizer, tokenizer.encode(prompt),
                                SamplingParams(temperature=0, **params))
    pieces = list(generation)
    return "".join(pieces), generation


def test_stop_string_spanning_tokens_is_cut_and_not_emitted(gemma):
    text, generation = generate(gemma, max_tokens=30, stop=["smart girl"])
    assert text == " girl named Lily. She was a very "
    assert generation.finish_reason == "stop"


def test_max_tokens_ends_with_length(gemma):
    text, generation = generate(gemma, max_tokens=5)
    assert len(generation.tokens) == 5 and generation.finish_reason == "length"
    assert LLAMACPP.startswith(text)


def test_full_context_ends_with_length(gemma):
    engine, tokenizer = gemma
    n_prompt = len(tokenizer.encode(PROMPT))
    text, generation = generate(gemma)
    assert len(generation.tokens) == engine.n_ctx - n_prompt
    assert generation.finish_reason == "length"


def test_prompt_that_fills_the_context_is_refused_with_both_numbers(gemma):
    with pytest.raises(ContextOverflowError, match="64"):
        generate(gemma, prompt="word " * 80)
