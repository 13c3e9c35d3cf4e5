"""The HTTP server: OpenAI-compatible API (through the official openai client), errors,
safety checks, many clients at once, and the `python -m runtime` serving path.

The model is a tiny synthetic qwen3 (tests/conftest.py) with a small SentencePiece
vocabulary added here, so generation is fast and deterministic under greedy sampling.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from conftest import READY_LIMIT_S, serving_in_thread, wait_until_serving  # noqa: E402
from runtime.gguf import GGUFFile  # noqa: E402
from runtime.server import ModelServer, bind_server, is_loopback_host  # noqa: E402
from runtime.session import load_session  # noqa: E402
from runtime.worker import EngineWorker  # noqa: E402

N_CTX = 512
MODEL_NAME = "tiny-test"
# the chatml end-of-turn and the SPM end of sequence: banned where a test needs "length"
IM_END, EOS = 4, 2
NO_EOG = {str(IM_END): -100, str(EOS): -100}


def tokenizer_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary of 320 pieces: specials, chatml markers, all 256 bytes
    (so any text encodes) and a few words."""
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581" + c for c in letters] + list(letters) + [
        "\u2581the", "\u2581and", "\u2581is", "\u2581hello", "\u2581world", "\u2581", "."]
    tokens = specials + byte_pieces + words
    types += [6] * 256 + [1] * len(words)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(words))]
    assert len(tokens) == 320
    return tokens, scores, types


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A synthetic qwen3 model that carries tokenizer metadata (a server needs one)."""
    from conftest import write_synthetic_model_with_tokenizer

    path = tmp_path_factory.mktemp("server") / "tiny.gguf"
    write_synthetic_model_with_tokenizer(path, "qwen3", tokenizer_vocabulary(), seed=3,
                                         more=lambda w: w.add_name(MODEL_NAME), n_ctx_train=N_CTX)
    return path


def running_server(worker: EngineWorker, **settings):
    """A ModelServer on a free loopback port, serving in a thread."""
    return serving_in_thread(ModelServer(("127.0.0.1", 0), worker, MODEL_NAME, log=False,
                                         **settings))


def loaded_worker(model_path, kind=EngineWorker, **session_args) -> EngineWorker:
    """A started worker (of class `kind`) with the model at model_path loaded (load_session's
    session_args: n_parallel...)."""
    gguf_file = GGUFFile(model_path)
    worker = kind(lambda: load_session(gguf_file, N_CTX, 0, **session_args))
    worker.start()
    assert worker.loaded.wait(READY_LIMIT_S) and worker.state == "ok", worker.error
    return worker


@pytest.fixture(scope="module")
def worker(model_path):
    worker = loaded_worker(model_path)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def server(worker):
    with running_server(worker) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def request(server, method, path, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request over a fresh connection."""
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)) as conn:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type", "")
        parsed = json.loads(payload) if kind.startswith("application/json") else payload.decode()
        return response.status, response, parsed


def wait_idle(worker, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not worker.idle:
        assert time.monotonic() < deadline, "the engine is still busy"
        time.sleep(0.01)


HELLO = [{"role": "user", "content": "hello world"}]


# --- basics --------------------------------------------------------------------------------

def test_health_models_and_page(server):
    status, _, body = request(server, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [MODEL_NAME]
    assert body["data"][0]["meta"]["n_ctx"] == N_CTX
    status, response, page = request(server, "GET", "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "<title>" in page and "/v1/chat/completions" in page
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert response.getheader("Access-Control-Allow-Origin") is None


def test_health_says_loading_until_the_model_is_loaded(model_path):
    release = threading.Event()
    gguf_file = GGUFFile(model_path)

    def slow_load():
        assert release.wait(30)
        return load_session(gguf_file, 64, 0)

    worker = EngineWorker(slow_load)
    worker.start()
    try:
        with running_server(worker) as server:
            status, _, body = request(server, "GET", "/health")
            assert status == 503 and body["status"] == "loading"
            status, _, body = request(server, "POST", "/v1/completions", {"prompt": "hi"})
            assert status == 503 and body["error"]["code"] == "model_loading"
            release.set()
            assert worker.loaded.wait(60)
            status, _, body = request(server, "GET", "/health")
            assert (status, body) == (200, {"status": "ok"})
    finally:
        release.set()
        worker.stop()


def test_chat_completion_with_usage_and_length(client, server):
    out = client.chat.completions.create(model="any", messages=HELLO, max_tokens=6,
                                         temperature=0, logit_bias=NO_EOG)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == MODEL_NAME
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    rendered = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    _, _, tokens = request(server, "POST", "/tokenize", {"content": rendered, "add_special": True})
    assert out.usage.prompt_tokens == len(tokens["tokens"])
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    # the same request, with max_completion_tokens instead
    again = client.chat.completions.create(model="any", messages=HELLO, max_completion_tokens=6,
                                           temperature=0, logit_bias=NO_EOG)
    assert again.choices[0].message.content == choice.message.content


def test_streamed_chat_equals_the_whole_answer(client):
    args = dict(model="any", messages=HELLO, max_tokens=10, temperature=0, logit_bias=NO_EOG)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **args))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_completion_streamed_and_not(client):
    args = dict(model="any", prompt="the world is", max_tokens=8, temperature=0, logit_bias=NO_EOG)
    whole = client.completions.create(**args)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    pieces = list(client.completions.create(stream=True, **args))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_same_seed_gives_the_same_text(client):
    def sample(seed):
        out = client.chat.completions.create(model="any", messages=HELLO, max_tokens=16,
                                             temperature=1.5, top_p=1, seed=seed, logit_bias=NO_EOG,
                                             extra_body={"top_k": 0, "min_p": 0})
        return out.choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))  # the seed matters


def test_stop_string_cuts_the_text(client):
    args = dict(model="any", prompt="hello", max_tokens=24, temperature=0, logit_bias=NO_EOG)
    full = client.completions.create(**args).choices[0].text
    assert len(full) >= 8
    stop = full[4:7]
    cut = client.completions.create(stop=[stop], **args).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **args))
    assert "".join(p.choices[0].text for p in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="any", messages=HELLO, max_tokens=5, temperature=0,
                                         logit_bias=NO_EOG, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(entry.token for entry in content) == out.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the likeliest
        assert entry.logprob == pytest.approx(values[0])
    plain = client.chat.completions.create(model="any", messages=HELLO, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_streamed_and_not(client):
    args = dict(model="any", prompt="the", max_tokens=4, temperature=0, logit_bias=NO_EOG, logprobs=2)
    out = client.completions.create(**args).choices[0]
    assert len(out.logprobs.tokens) == len(out.logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in out.logprobs.top_logprobs)
    assert out.logprobs.text_offset == sorted(out.logprobs.text_offset)
    streamed = [p.choices[0].logprobs for p in client.completions.create(stream=True, **args)]
    tokens = [t for lp in streamed if lp for t in lp.tokens]
    assert tokens == out.logprobs.tokens


def test_tokenize_and_detokenize(server):
    status, _, body = request(server, "POST", "/tokenize", {"content": "hello world", "add_special": True})
    assert status == 200 and body["tokens"][0] == 1  # BOS
    _, _, plain = request(server, "POST", "/tokenize", {"content": "hello world"})
    assert plain["tokens"] == body["tokens"][1:]
    status, _, text = request(server, "POST", "/detokenize", {"tokens": plain["tokens"]})
    assert (status, text) == (200, {"content": "hello world"})
    status, _, error = request(server, "POST", "/detokenize", {"tokens": [1, 99999]})
    assert status == 400 and error["error"]["param"] == "tokens"


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": "many"}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"seed": "x"}, "seed"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f g", "parameters": {}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "strin"}}}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_parameters_get_a_400_naming_them(client, extra, param):
    args = {"model": "any", "messages": HELLO, "max_tokens": 2}
    # llama.cpp's own fields, and wrong types the client would refuse, go as extra_body
    outside = {k: v for k, v in extra.items() if k in ("top_k", "min_p", "repeat_penalty", "stream")}
    args.update({k: v for k, v in extra.items() if k not in outside})
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**args, extra_body=outside)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and param.split("_")[0] in error["message"]


def test_prompt_over_the_context_gets_both_token_counts(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="any", prompt="hello world " * 400, max_tokens=2)
    message = caught.value.body["message"]
    n_prompt = int(re.search(r"has (\d+) tokens", message).group(1))
    assert n_prompt > N_CTX and f"only {N_CTX}" in message
    assert caught.value.body["code"] == "context_length_exceeded"


def test_http_level_errors(server):
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, _, body = request(server, "GET", "/v2/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, response, body = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and response.getheader("Allow") == "POST"
    status, _, _ = request(server, "DELETE", "/v1/models")
    assert status == 405


def test_a_body_over_the_limit_gets_413_without_being_read(server):
    with closing(socket.create_connection(("127.0.0.1", server.port), timeout=10)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 9000000\r\n\r\n{\"prompt\":")
        reply = sock.makefile("rb").read()  # the server answers and closes
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_keep_alive_carries_several_requests(server):
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)) as conn:
        for body in (b"{not json", json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), None):
            conn.request("POST" if body else "GET", "/v1/completions" if body else "/health", body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 400)
        assert conn.sock is not None  # the same connection all along


def test_only_loopback_host_names_are_answered(server):
    for host in ("evil.example", "192.168.1.10:8080", "localhost.evil.example"):
        status, _, body = request(server, "GET", "/health", headers={"Host": host})
        assert status == 403 and body["error"]["code"] == "host_not_allowed", host
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1:9", "127.1.2.3", "[::1]:80"):
        status, _, _ = request(server, "GET", "/health", headers={"Host": host})
        assert status == 200, host
    assert is_loopback_host("[::1]") and not is_loopback_host("[::2]")


def test_api_key(worker):
    with running_server(worker, api_key="s3cret") as server:
        base = f"http://127.0.0.1:{server.port}/v1"
        wrong = openai.OpenAI(base_url=base, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        status, response, body = request(server, "GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert response.getheader("WWW-Authenticate") == "Bearer"
        right = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert [m.id for m in right.models.list()] == [MODEL_NAME]
        assert request(server, "GET", "/health")[0] == 200  # open, for load balancers and the page
        assert request(server, "GET", "/")[0] == 200


def test_cors_only_for_the_named_origin(worker, server):
    origin = "http://localhost:3000"
    status, _, _ = request(server, "OPTIONS", "/v1/chat/completions", headers={"Origin": origin})
    assert status == 405  # no CORS without --cors
    with running_server(worker, cors_origin=origin) as cors_server:
        status, response, _ = request(cors_server, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204 and response.getheader("Access-Control-Allow-Origin") == origin
        assert "POST" in response.getheader("Access-Control-Allow-Methods")
        status, response, _ = request(cors_server, "GET", "/v1/models", headers={"Origin": origin})
        assert status == 200 and response.getheader("Access-Control-Allow-Origin") == origin


# --- many clients ----------------------------------------------------------------------------

def open_stream(server, body) -> socket.socket:
    """A raw streaming request whose response headers and first event have arrived."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    received = b""
    while b"data: " not in received:
        more = sock.recv(4096)
        assert more, received
        received += more
    return sock


def test_a_client_that_hangs_up_stops_its_generation(server, worker):
    wait_idle(worker)
    engine = worker.session.engine
    before_tokens, before = engine.stats["decode_tokens"], dict(worker.counts)
    sock = open_stream(server, {"prompt": "hello", "max_tokens": 400, "temperature": 0,
                                "logit_bias": NO_EOG})
    sock.close()
    wait_idle(worker)
    assert worker.counts["cancelled"] == before["cancelled"] + 1
    # it stops a token or two after the hang-up is seen; the rest is thread scheduling
    assert engine.stats["decode_tokens"] - before_tokens < 50  # of the 400 asked for


@pytest.fixture(scope="module")
def gemma_server(gemma_path):
    """The real Gemma 3 270M (~20-30 tokens/s here): slow enough to keep the engine busy."""
    gguf_file = GGUFFile(gemma_path)
    worker = EngineWorker(lambda: load_session(gguf_file, 256, 0))
    worker.start()
    assert worker.loaded.wait(READY_LIMIT_S) and worker.state == "ok", worker.error
    try:
        with running_server(worker) as server:
            yield server
    finally:
        worker.stop()


def test_a_queued_request_whose_client_left_is_skipped(gemma_server):
    server, worker = gemma_server, gemma_server.worker
    busy = open_stream(server, {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0})
    queued = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    queued.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    deadline = time.monotonic() + 10
    while worker.n_waiting == 0:  # it waits behind the running one
        assert time.monotonic() < deadline
        time.sleep(0.005)
    queued.close()
    time.sleep(3 * 0.1)  # its HTTP thread notices within a poll interval
    assert worker.n_busy == 1  # the first one still runs (200 tokens take seconds)
    busy.close()
    wait_idle(worker)
    assert worker.counts == {"completed": 0, "cancelled": 1, "skipped": 1, "failed": 0}
    # and the engine answers the next one
    status, _, body = request(server, "POST", "/v1/completions",
                              {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_sixteen_clients_at_once(server, worker, client):
    prompts = ["hello", "the world", "a b c", "is it"]
    expected = {p: client.completions.create(model="any", prompt=p, max_tokens=6, temperature=0,
                                             logit_bias=NO_EOG).choices[0].text for p in prompts}
    wait_idle(worker)
    before = dict(worker.counts)
    results, errors = {}, []

    def whole(i, prompt):
        out = client.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0,
                                        logit_bias=NO_EOG)
        results[i] = (prompt, out.choices[0].text)

    def streamed(i, prompt):
        text = "".join(p.choices[0].text for p in client.completions.create(
            model="any", prompt=prompt, max_tokens=6, temperature=0, logit_bias=NO_EOG, stream=True))
        results[i] = (prompt, text)

    def hang_up(i, prompt):
        open_stream(server, {"prompt": prompt, "max_tokens": 300, "logit_bias": NO_EOG}).close()

    def run(kind, i, prompt):
        try:
            kind(i, prompt)
        except Exception as e:  # reported below, with the client's number
            errors.append((i, repr(e)))

    rng = random.Random(5)
    kinds = [whole, streamed] * 6 + [hang_up] * 4
    rng.shuffle(kinds)
    threads = [threading.Thread(target=run, args=(kind, i, prompts[i % 4])) for i, kind in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert len(results) == 12
    for prompt, text in results.values():
        assert text == expected[prompt]  # every client got its own answer
    wait_idle(worker)
    assert worker.n_waiting == 0 and worker.n_busy == 0
    done = {k: worker.counts[k] - before[k] for k in worker.counts}
    assert done["completed"] >= 12 and done["failed"] == 0
    assert done["completed"] + done["cancelled"] + done["skipped"] == 16
    # and it still answers
    assert client.completions.create(model="any", prompt="hello", max_tokens=6, temperature=0,
                                     logit_bias=NO_EOG).choices[0].text == expected["hello"]


# --- python -m runtime -------------------------------------------------------------------------

def free_port_run(count: int) -> int:
    """A port p with p..p+count-1 free at the moment."""
    for _ in range(50):
        start = random.randint(20000, 60000)
        held = []
        try:
            for p in range(start, start + count):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                held.append(s)
        except OSError:
            for s in held:
                s.close()
            continue
        for s in held:
            s.close()
        return start
    pytest.skip("no run of free ports")


def cli(spawn, *args, **popen_args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return spawn([sys.executable, "-m", "runtime", *args], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, env=env, **popen_args)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_serving_from_the_command_line(model_path, spawn):
    """Started as a non-interactive shell starts a background job (SIGINT ignored), Ctrl-C
    still stops the server cleanly."""
    port = free_port_run(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = cli(spawn, "-m", str(model_path), "--port", str(port), "-c", "128",
                   "--metrics", "--embeddings", "--pooling", "last", preexec_fn=_ignore_sigint)
        wait_until_serving(proc, port + 1)
        line = proc.stdout.readline()  # printed before serving starts
        assert f"http://127.0.0.1:{port + 1}/" in line, line
        status, _, body = request(SimpleNamespace(port=port + 1), "POST", "/v1/chat/completions",
                                  {"messages": HELLO, "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        for path, body in (("/metrics", None), ("/v1/embeddings", {"input": "hello"})):
            status, _, answer = request(SimpleNamespace(port=port + 1),
                                        "GET" if body is None else "POST", path, body)
            assert status == 200, (path, answer)  # the flags reach the server
        confined = "NoNewPrivs:\t1" in Path(f"/proc/{proc.pid}/status").read_text()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=READY_LIMIT_S)
    assert proc.returncode == 0, stderr
    assert f"port {port} is in use; trying {port + 1}" in stderr
    assert "Traceback" not in stderr
    from runtime.confine import availability

    if availability().startswith("Landlock"):  # it served, and its renderer ran, confined
        assert confined and "without Landlock" not in stderr, stderr
        assert "Permission denied" not in stderr, stderr  # (Numba's lock in /dev/shm was)


def test_serving_fails_clearly_when_no_port_is_free(model_path, spawn):
    port = free_port_run(10)
    taken = []
    for p in range(port, port + 10):
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        s.listen()
        taken.append(s)
    try:
        proc = cli(spawn, "-m", str(model_path), "--port", str(port))
        _, stderr = proc.communicate(timeout=READY_LIMIT_S)
        assert proc.returncode == 1
        assert f"ports {port}-{port + 9}" in stderr and "all in use" in stderr
        assert "Traceback" not in stderr
    finally:
        for s in taken:
            s.close()


def test_bind_server_uses_the_next_free_port():
    said = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def make(address):
            s = socket.socket()
            s.bind(address)
            return s

        try:
            bound = bind_server("127.0.0.1", port, make, say=said.append)
        except OSError:
            pytest.skip("the next port is taken too")
        with bound:
            assert bound.getsockname()[1] > port
    assert said and said[0].startswith(f"port {port} is in use")


# --- template bombs (issue 16, findings 1-2) ---------------------------------------------------

def _chat_test(name: str):
    import test_chat

    return getattr(test_chat, name)


@pytest.mark.parametrize("bomb", _chat_test("LIMIT_BOMBS"))
def test_a_template_bomb_gets_a_400_and_health_stays_quick(server, worker, bomb):
    from runtime.chat import ChatTemplate

    kept = worker.chat_template
    worker.chat_template = ChatTemplate(bomb, check=False)
    answers = []
    try:
        thread = threading.Thread(target=lambda: answers.append(request(
            server, "POST", "/v1/chat/completions",
            {"messages": _chat_test("CONVERSATION"), "max_tokens": 1})))
        thread.start()
        health_seconds = []
        while thread.is_alive() or not health_seconds:
            t0 = time.perf_counter()
            status, _, _ = request(server, "GET", "/health")
            health_seconds.append(time.perf_counter() - t0)
            assert status == 200
            time.sleep(0.05)
        thread.join()
    finally:
        worker.chat_template = kept
    status, _, body = answers[0]
    assert status == 400 and body["error"]["param"] == "messages"
    assert re.search(r"limit|more than \d+ characters", body["error"]["message"])
    assert max(health_seconds) < 1.0, health_seconds
    # and the next chat request is served as usual
    status, _, _ = request(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
    assert status == 200


# --- /props (issue 17: the chat page asks whether the model has a chat template) -----------------

def test_props_give_the_models_own_chat_template(server, tmp_path):
    status, _, body = request(server, "GET", "/props")  # this model has no template of its own
    assert status == 200 and body == {"chat_template": "", "default_generation_settings": {"n_ctx": N_CTX},
                                      "total_slots": 1}
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with serving_with_template(tmp_path, template) as templated:
        status, _, body = request(templated, "GET", "/props")
    assert status == 200 and body["chat_template"] == template


@contextmanager
def serving_with_template(folder, template: str):
    """A server of this module's tiny model with `template` as its chat template."""
    from conftest import write_synthetic_model_with_tokenizer

    path = folder / "templated.gguf"
    write_synthetic_model_with_tokenizer(path, "qwen3", tokenizer_vocabulary(), seed=3, n_ctx_train=N_CTX,
                                         more=lambda w: w.add_chat_template(template))
    worker = loaded_worker(path)
    try:
        with running_server(worker) as server:
            yield server
    finally:
        worker.stop()


# --- issue 16, findings 6-11: the HTTP server's edges ------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}


def test_a_cross_site_simple_post_starts_nothing(server, worker):
    """Finding 7: a web page could POST text/plain (no CORS preflight) and start a generation."""
    wait_idle(worker)
    before = dict(worker.counts)
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=json.dumps(CHAT).encode(),
                              headers={"Content-Type": "text/plain",
                                       "Origin": "http://evil.example"})
    assert status in (403, 415), body
    status, _, body = request(server, "POST", "/v1/chat/completions", raw=json.dumps(CHAT).encode(),
                              headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]["message"]
    status, _, body = request(server, "POST", "/v1/chat/completions", CHAT,
                              headers={"Origin": "http://evil.example"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert worker.counts == before and worker.idle
    # the server's own page (same origin) is served
    status, _, _ = request(server, "POST", "/v1/chat/completions", CHAT,
                           headers={"Origin": f"http://127.0.0.1:{server.port}",
                                    "Host": f"127.0.0.1:{server.port}"})
    assert status == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/no/such/route"])
def test_a_content_length_of_unicode_digits_gets_an_answer(server, path):
    """Finding 8: 'Content-Length: ²' passed str.isdigit(), then int() failed; on unknown
    routes the connection just dropped."""
    with closing(socket.create_connection(("127.0.0.1", server.port), timeout=10)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: ²\r\n\r\n{}".encode())
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400" if path.startswith("/v1") else b"HTTP/1.1 404"), reply


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  json.dumps({"messages": json.loads("[" * 200 + "]" * 200)}).encode()])
def test_json_nested_thousands_deep_is_a_400(server, body):
    """Finding 8: RecursionError -> 500 with a traceback."""
    status, _, answer = request(server, "POST", "/v1/chat/completions", raw=body)
    assert status == 400 and "nest" in answer["error"]["message"]


def test_an_over_long_prompt_is_refused_before_it_is_tokenized(server, worker, monkeypatch):
    """Finding 9: text was tokenized (time and memory in proportion) before the length check."""
    tokenizer = worker.session.tokenizer
    calls = []
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or [1])
    for path, body in [("/v1/completions", {"prompt": "hello world " * 200_000, "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [
                           {"role": "user", "content": "hello world " * 200_000}], "max_tokens": 1})]:
        status, _, answer = request(server, "POST", path, body)
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert calls == []


def test_allowed_host_names_and_a_network_bind(worker):
    """Finding 10: with a non-loopback --host, the Host check was off (DNS rebinding)."""
    from runtime.http_checks import machine_names

    with running_server(worker, allowed_hosts=("model.lan",)) as loopback:
        assert request(loopback, "GET", "/health", headers={"Host": "model.lan:8080"})[0] == 200
        assert request(loopback, "GET", "/health", headers={"Host": "evil.example"})[0] == 403
    with running_server(worker) as network:
        # as a server bound to 0.0.0.0 sets itself up (the test itself stays on loopback)
        network.loopback_only = False
        network.allowed_hosts = machine_names("0.0.0.0")
        status, _, body = request(network, "GET", "/health", headers={"Host": "evil.example"})
        assert status == 403 and "this machine's names" in body["error"]["message"]
        host = socket.gethostname()
        assert request(network, "GET", "/health", headers={"Host": f"{host}:8080"})[0] == 200


def test_three_hundred_slow_sockets_leave_health_quick(server):
    """Finding 6: every connection got a thread; 300 sockets trickling a byte each kept 300
    threads, and at 1024 descriptors /health stopped answering."""
    slow = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        threads = threading.active_count()
        for _ in range(5):
            for s in slow[::10]:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
            t0 = time.perf_counter()
            status, _, _ = request(server, "GET", "/health")
            assert status == 200 and time.perf_counter() - t0 < 1.0
        assert threads < 100  # no thread per socket
    finally:
        for s in slow:
            s.close()


def test_the_request_log_escapes_terminal_controls(worker, capfd):
    """Finding 11: the request line was printed raw."""
    server = ModelServer(("127.0.0.1", 0), worker, MODEL_NAME, log=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with closing(socket.create_connection(("127.0.0.1", server.port), timeout=10)) as sock:
            sock.sendall(b"GET /\x1b]0;pwned\x07\x1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            sock.makefile("rb").read()
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in err and "\x1b" not in err
