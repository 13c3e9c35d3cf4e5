"""gpt-oss as a user meets it, on the tiny parity model (tests/parity_models.py): its harmony
tokens end generation where llama.cpp's do; --info explains its experts. The numbers themselves
are checked against llama.cpp in tests/test_parity.py; bundled by `modelrun build` in the
MXFP4_MOE mix it ships in, the frozen runtime serves it to the OpenAI client in
tests/test_model_run.py.
"""

from __future__ import annotations

import re

import pytest

import parity_models as pm


@pytest.fixture(scope="module")
def gpt_oss_f32(parity_model):
    return parity_model("gpt-oss")


def test_harmony_tokens_end_generation_where_llamacpp_does(gpt_oss_f32):
    """<|return|> and <|call|> end a generation, <|end|> (the end of one message, before the
    final channel) does not; <|channel|>, <|message|>, <|start|> are rendered as text."""
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(GGUFFile(gpt_oss_f32).metadata)
    ids = {text: tid for tid, text in pm.HARMONY_TOKENS.items()}
    eog = set(tok.eog_ids)
    assert {ids["<|return|>"], ids["<|call|>"]} <= eog
    assert ids["<|end|>"] not in eog
    assert tok.decode([ids["<|channel|>"], ids["<|message|>"]]) == "<|channel|><|message|>"


def test_info_explains_the_experts(gpt_oss_f32):
    from click.testing import CliRunner

    from runtime.cli import main

    out = CliRunner().invoke(main, ["-m", str(gpt_oss_f32), "--info"]).output
    assert re.search(r"experts\s+8 \(4 used per token\)", out), out
    assert re.search(r"active per token\s+.*of the parameters", out), out
    assert "runs on this build: yes" in out, out
