"""gpt-oss as a user meets it: the tiny parity model (tests/parity_models.py) quantized to the
MXFP4_MOE mix it ships in and bundled by `modelrun build`, then served and asked through the
OpenAI client; its harmony tokens end generation where llama.cpp's do; --info explains its
experts. The numbers themselves are checked against llama.cpp in tests/test_parity.py.

The model.run here carries a stand-in runtime (test_container.write_fake_payload: this
checkout's `python -m runtime`), so the test costs seconds, not a frozen build.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

import parity_models as pm
from conftest import READY_LIMIT_S, wait_until_serving
from test_container import write_fake_payload
from test_model_run import ask_hi, free_port, invoke


@pytest.fixture(scope="module")
def gpt_oss_f32(tmp_path_factory):
    import llamacpp_vocab

    try:
        folder = llamacpp_vocab.vocab_dir()
    except llamacpp_vocab.VocabUnavailable as e:
        pytest.skip(f"llama.cpp's test vocabularies are unavailable: {e}")
    path = tmp_path_factory.mktemp("gpt_oss") / "gpt-oss-F32.gguf"
    pm.write_model(path, "gpt-oss", llamacpp_vocab.vocab_path(folder, pm.SPECS["gpt-oss"]["vocab"]))
    return path


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


def test_bundled_with_mxfp4_experts_answers_a_chat_request(gpt_oss_f32, tmp_path, spawn):
    payload = write_fake_payload(tmp_path / "runtime.tar.gz")
    run = tmp_path / "gpt-oss.run"
    invoke("build", gpt_oss_f32, "-o", run, "--runtime", payload, "--name", "gpt-oss",
           "--quantize", "MXFP4_MOE")
    port = free_port()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = spawn([run, "--nobrowser", "--port", str(port), "-c", "256"],
                     stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
    wait_until_serving(proc, port, log=log.read_text)
    _, reply = ask_hi(port, "gpt-oss", max_tokens=6)
    # the harmony template rendered the turn: system message, user message, assistant start
    assert reply.usage.prompt_tokens > 20
    proc.send_signal(signal.SIGINT)
    proc.wait(READY_LIMIT_S)
    assert "Traceback" not in log.read_text(), log.read_text()
