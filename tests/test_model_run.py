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
