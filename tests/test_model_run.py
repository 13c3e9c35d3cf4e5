"""model.run as a user meets it: the real frozen runtime, bundled with a model, started as
`./tiny.run --nobrowser --port P` on an empty cache, answering the OpenAI client.

test_container.py covers the container with a stand-in runtime (fast, every edge case);
test_payload.py the frozen runtime on its own. This joins the two, once, for real: the
`runtime_payload` fixture builds the payload once per tree (conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from bundler.cli import main as modelrun
from conftest import READY_LIMIT_S, wait_until_serving
from test_container import write_fake_payload, write_tiny_model
from test_server_tools import BOUNDED_TOOLS, follows_its_schema
from test_server_tools import test_the_real_model_thinks_when_a_grammar_makes_it as thinks_under_a_grammar

KERNELS_LINE = re.compile(r"^kernels: (\S+), (\d+) from cache, (\d+) compiled$", re.M)


def user_env(cache: Path) -> dict[str, str]:
    """A user's environment: an empty cache, nothing of this venv or of numba's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "MODELRUN_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "XDG_CACHE_HOME": str(cache)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(modelrun, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def ask_hi(port: int, model: str, max_tokens: int = 4):
    """One greedy chat request "hi" through the OpenAI client: (client, reply), the reply
    checked to be a finished completion of at least one token."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens >= 1
    return client, reply


@pytest.fixture(scope="module")
def tiny_run(runtime_payload, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_run")
    model = write_tiny_model(root / "tiny.gguf", seed=2)
    out = root / "tiny.run"
    invoke("build", model, "-o", out, "--runtime", runtime_payload, "--name", "tiny")
    return out


def test_served_from_an_empty_cache_answers_openai_and_compiles_nothing(tiny_run, runtime_payload,
                                                                       tmp_path, spawn):
    port = free_port()
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = spawn([tiny_run, "--nobrowser", "--port", str(port), "-c", "128"],
                     env=user_env(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=stderr,
                     cwd=tmp_path)
    wait_until_serving(proc, port, log=stderr_path.read_text)
    client, _ = ask_hi(port, "tiny")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # structured output: the payload ships llguidance (its native module and metadata)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert json.loads(reply.choices[0].message.content) in ({"ok": True}, {"ok": False}), reply
    proc.send_signal(signal.SIGINT)
    proc.wait(READY_LIMIT_S)
    log = stderr_path.read_text()
    assert "Traceback" not in log, log
    found = KERNELS_LINE.search(log)
    assert found and int(found.group(2)) > 0 and found.group(3) == "0", log
    # unpacked into the user's cache, under the payload's sha256; the tokenizer kept beside
    payload_sha = hashlib.sha256(runtime_payload.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "modelrun"
    assert sorted(p.name for p in cache.iterdir()) == sorted([payload_sha, "tokenizers"])
    assert len(list((cache / "tokenizers").glob("*.pickle"))) == 1


def test_inspect_names_the_runtime_and_verify_passes(tiny_run, runtime_payload):
    build_id = runtime_payload.resolve().name.removeprefix("runtime-").removesuffix(".tar.gz")
    assert build_id in invoke("inspect", tiny_run)
    invoke("verify", tiny_run)


def test_upgrade_from_another_runtime_keeps_the_weights(tiny_run, runtime_payload, tmp_path, spawn):
    """An old file made with another runtime, upgraded to the real one, runs like the file
    built with the real one, and extracts to the same GGUF bytes."""
    old = tmp_path / "old.run"
    fake = write_fake_payload(tmp_path / "fake.tar.gz", marker="old")
    extracted = tmp_path / "model.gguf"
    invoke("extract", tiny_run, "-o", extracted)
    invoke("build", extracted, "-o", old, "--runtime", fake)
    new = tmp_path / "new.run"
    invoke("upgrade", old, "-o", new, "--runtime", runtime_payload)
    again = tmp_path / "again.gguf"
    invoke("extract", new, "-o", again)
    assert again.read_bytes() == extracted.read_bytes()
    env = user_env(tmp_path / "cache")
    args = ["-p", "hi", "-n", "4", "--temp", "0"]
    ran = []
    for f in (new, tiny_run):  # one after the other, as before: the second finds the runtime unpacked
        proc = spawn([f, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ran.append((*proc.communicate(timeout=300), proc.returncode))
    assert ran[0][2] == 0 and ran[0][0] == ran[1][0], ran[0][1]


# --- the families proven against llama.cpp in tests/test_parity.py, frozen -----------------------

# Each family's tiny parity model (conftest.parity_model), bundled in the quantization the
# family ships in: gpt-oss's experts in MXFP4 (llama.cpp's MXFP4_MOE), the others Q4_K_M.
# Gemma 4's carry its own vocabulary and chat template, and its sliding and global layers,
# per-layer inputs and shared K/V (the MoE variant: experts beside the FFN, no shared K/V).
FAMILIES = {"qwen3moe": "Q4_K_M", "gpt-oss": "MXFP4_MOE", "qwen35": "Q4_K_M", "qwen35moe": "Q4_K_M",
            "gemma4": "Q4_K_M", "gemma4-moe": "Q4_K_M"}


@pytest.fixture(scope="module")
def families_served(runtime_payload, parity_model, tmp_path_factory, spawn_for_module):
    """{arch: (OpenAI client, its stderr log)}: each family's model.run, built by `modelrun
    build --quantize`, serving from one user cache (the first launch unpacks the runtime),
    with the cache's kernel files before any request (kernel_files below)."""
    root = tmp_path_factory.mktemp("families")
    env = user_env(root / "cache")
    served = {}
    for arch, qtype in FAMILIES.items():
        run = root / f"{arch}.run"
        invoke("build", parity_model(arch), "-o", run, "--runtime", runtime_payload, "--name", arch,
               "--quantize", qtype)
        port, log = free_port(), root / f"{arch}.stderr"
        with open(log, "w") as stderr:
            proc = spawn_for_module([run, "--nobrowser", "--port", str(port), "-c", "512"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr, cwd=root)
        wait_until_serving(proc, port, log=log.read_text)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                               timeout=READY_LIMIT_S)
        served[arch] = client, proc, log
    yield served, root / "cache", kernel_files(root / "cache")


def kernel_files(cache: Path) -> set[Path]:
    """The kernel cache files of the unpacked runtime: a kernel compiled on the user's machine
    is saved there, so a new file means a signature the payload did not precompile."""
    return set(cache.glob("modelrun/*/**/*.nb[ic]"))


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_family_bundled_answers_a_streamed_chat(families_served, arch):
    (served, _, _) = families_served
    client, _, log = served[arch]
    chunks = list(client.chat.completions.create(
        model=arch, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"]) and chunks[-1].usage.completion_tokens >= 1, chunks
    assert text or finish == ["stop"], chunks
    # the chat template rendered the turn (ChatML's, harmony's or Gemma 4's markup around "hi")
    assert chunks[-1].usage.prompt_tokens > 5, chunks[-1].usage
    found = KERNELS_LINE.search(log.read_text())
    assert found and int(found.group(2)) > 0 and found.group(3) == "0", log.read_text()


def test_the_openai_client_gets_tool_calls_and_reasoning(families_served):
    """No hook: random models write what a grammar lets them. A forced tool call (tool_choice
    named or "required") is decoded under the grammar of one call in the model's own format
    (runtime/tool_calls.forced_call_grammar): gpt-oss's harmony tokens, streamed; the generic
    JSON of a template without tools (the qwen3moe model's ChatML), whole. Thinking: llama.cpp's
    `grammar` field makes the qwen3moe model write `<think>…</think>` before its answer, which
    comes back as reasoning_content, whole and streamed."""
    (served, _, _) = families_served
    ask = [{"role": "user", "content": "hi"}]
    gpt_oss, qwen = served["gpt-oss"][0], served["qwen3moe"][0]
    named = {"type": "function", "function": {"name": "set_alarm"}}
    chunks = list(gpt_oss.chat.completions.create(model="gpt-oss", messages=ask, tools=BOUNDED_TOOLS,
                                                  tool_choice=named, max_tokens=40, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls and calls[0].function.name == "set_alarm", chunks
    assert isinstance(json.loads("".join(tc.function.arguments or "" for tc in calls))["loud"], bool)
    assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]

    reply = qwen.chat.completions.create(model="qwen3moe", messages=ask, tools=BOUNDED_TOOLS,
                                         tool_choice="required", max_tokens=60, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls" and not reply.choices[0].message.content, reply
    (call,) = reply.choices[0].message.tool_calls
    assert follows_its_schema(call), call

    thinks_under_a_grammar(qwen)


def test_the_families_stop_cleanly_having_compiled_nothing(families_served):
    """Last in this file: each family's model.run stops on Ctrl-C without a traceback, and no
    request made it compile a kernel (the payload precompiled every signature they used)."""
    (served, cache, before) = families_served
    for arch, (_, proc, log) in served.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(READY_LIMIT_S)
        assert "Traceback" not in log.read_text(), (arch, log.read_text())
    assert before and kernel_files(cache) == before, sorted(map(str, kernel_files(cache) - before))
