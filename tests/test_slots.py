"""Several sequences at once: the engine's slots and its batched step.

A batched step runs every sequence's rows through the weight matrices as one matmul, and
attention per sequence over its own cache. Against each sequence decoded alone (matvec):
the integer path rounds activations to 8 bits per token row in both (q8.py quantizes each
row of a batch on its own, as matvec quantizes its one vector) and its dot products are
exact integer sums, so the only difference left is the order in which float32 partial
sums are added (the float formats' matmul multiplies 4 rows at a time, matvec one block
after another): ~1e-6 of the largest logit, which ATOL (1e-4, as tests/test_engine.py)
bounds with room. Greedy tokens must then be identical.
"""

import json
import socket
import threading
import time

import numpy as np
import pytest

from runtime.engine import ContextSizeError, Engine
from runtime.gguf import GGUFFile
from runtime.model import load_model

ATOL = 1e-4
PROMPTS = [[5, 17, 3, 99, 42], [7, 150, 1], [64, 23, 11, 88, 2, 9, 31]]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, synthetic_models):
    path, _ = synthetic_models[request.param]
    return load_model(GGUFFile(path))


def assert_close(a, b):
    assert np.abs(a - b).max() <= ATOL * np.abs(b).max()


def alone(model, prompt, steps):
    """Greedy tokens and every step's logits of one sequence, decoded on its own (matvec)."""
    engine = Engine(model, n_ctx=32)
    logits = [engine.prefill(prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(tokens[-1]))
    return tokens, logits


def test_batched_decode_gives_each_sequence_its_own_tokens_and_logits(model):
    steps = 6
    expected = [alone(model, p, steps) for p in PROMPTS]
    engine = Engine(model, n_ctx=96, n_parallel=3)
    assert engine.n_ctx == 32 and len(engine.slots) == 3
    logits = [engine.prefill(p, slot=i) for i, p in enumerate(PROMPTS)]
    tokens = [[] for _ in PROMPTS]
    for step in range(steps):
        for i in range(3):
            assert_close(logits[i], expected[i][1][step])
            tokens[i].append(int(np.argmax(logits[i])))
        logits = list(engine.step([(i, [tokens[i][-1]]) for i in range(3)]))
    for i in range(3):
        assert tokens[i] == expected[i][0]
        assert_close(logits[i], expected[i][1][steps])
        assert engine.slots[i].tokens == PROMPTS[i] + tokens[i]


def test_a_prefill_chunk_rides_in_the_same_step_as_decoding(model):
    """One step: slot 0 decodes a token while slot 1 prefills a whole prompt."""
    (first, *_), expected0 = alone(model, PROMPTS[0], 1)
    _, expected1 = alone(model, PROMPTS[2], 0)
    engine = Engine(model, n_ctx=64, n_parallel=2)
    engine.prefill(PROMPTS[0], slot=0)
    out = engine.step([(1, PROMPTS[2]), (0, [first])], prefills=1)
    assert_close(out[0], expected1[0])
    assert_close(out[1], expected0[1])
    assert engine.stats["decode_tokens"] == 1


def test_slots_split_the_context_and_reuse_their_own_prefix(model):
    engine = Engine(model, n_ctx=64, n_parallel=2)
    assert engine.n_ctx == 32 and engine.n_ctx_total == 64
    assert engine.kv_cache_bytes == Engine(model, n_ctx=64).kv_cache_bytes  # memory does not grow
    engine.eval(PROMPTS[0], slot=0)
    engine.eval(PROMPTS[1], slot=1)
    # a follow-up of slot 0's conversation goes back to slot 0, and computes only its new tokens
    follow_up = PROMPTS[0] + [77, 78]
    slot = engine.pick_slot(follow_up, [0, 1])
    assert slot == 0
    before = engine.n_computed
    engine.eval(follow_up, slot=slot)
    assert engine.n_computed - before == 2
    assert engine.slots[1].tokens == PROMPTS[1]  # untouched
    # an unrelated prompt takes the least recently used slot
    assert engine.pick_slot([200, 201], [0, 1]) == 1
    with pytest.raises(ContextSizeError, match="--parallel"):
        Engine(model, n_ctx=8, n_parallel=5)


def test_a_copied_slot_continues_like_the_original(model):
    tokens, expected = alone(model, PROMPTS[2], 2)
    engine = Engine(model, n_ctx=64, n_parallel=2)
    engine.prefill(PROMPTS[2], slot=0)
    engine.copy_slot(0, 1)
    assert engine.slots[1].tokens == PROMPTS[2]
    assert_close(engine.decode(tokens[0], slot=1), expected[1])


# --- the server: slots, the queue, n choices ---------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with 2 slots (N_CTX split in two) on the tiny chat model of test_server.py."""
    from conftest import write_synthetic_model_with_tokenizer
    from test_server import MODEL_NAME, N_CTX, loaded_worker, running_server, tokenizer_vocabulary

    path = tmp_path_factory.mktemp("slots") / "tiny.gguf"
    write_synthetic_model_with_tokenizer(path, "qwen3", tokenizer_vocabulary(), seed=3,
                                         more=lambda w: w.add_name(MODEL_NAME), n_ctx_train=N_CTX)
    worker = loaded_worker(path, n_parallel=2)
    worker.queue_limit = 1
    try:
        with running_server(worker) as server:
            yield server
    finally:
        worker.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def streamed_text(client, prompt, **kw):
    return "".join(c.choices[0].text for c in client.completions.create(
        model="any", prompt=prompt, stream=True, **kw))


def test_two_streaming_clients_are_decoded_together(served, client):
    from test_server import NO_EOG, wait_idle

    worker = served.worker
    engine = worker.session.engine
    kw = dict(max_tokens=150, temperature=0, logit_bias=NO_EOG)
    prompts = ["hello world", "the cat is"]
    expected = [streamed_text(client, p, **kw) for p in prompts]  # each alone
    wait_idle(worker)
    steps, decoded = engine.n_steps, engine.stats["decode_tokens"]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = streamed_text(client, prompts[i], **kw)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == {0: expected[0], 1: expected[1]}
    # 2 x 149 decoded tokens: alone that is 298 steps; together most steps carry both
    assert engine.stats["decode_tokens"] - decoded == 2 * 149
    assert engine.n_steps - steps < 0.8 * 2 * 149


def test_a_full_queue_answers_503_with_retry_after(served):
    from test_server import NO_EOG, open_stream, request, wait_idle

    worker = served.worker
    wait_idle(worker)
    busy = [open_stream(served, {"prompt": f"hello {w}", "max_tokens": 250, "temperature": 0,
                                 "logit_bias": NO_EOG}) for w in "ab"]
    waiting = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    data = json.dumps({"prompt": "the", "max_tokens": 2}).encode()
    waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    deadline = time.monotonic() + 10
    while worker.n_waiting == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert worker.n_busy == 2  # both slots still generate (250 tokens each)
    status, response, body = request(served, "POST", "/v1/completions", {"prompt": "is", "max_tokens": 2})
    assert status == 503 and body["error"]["code"] == "server_busy"
    assert 1 <= int(response.getheader("Retry-After")) <= 60
    # hang-ups free the slots and the queue
    waiting.close()
    for sock in busy:
        sock.close()
    wait_idle(worker)
    status, _, body = request(served, "POST", "/v1/completions", {"prompt": "is", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_n_choices_share_the_prompt_and_sample_on_their_own(served, client):
    from test_server import NO_EOG, wait_idle

    kw = dict(model="any", prompt="hello", max_tokens=12, temperature=1.0, logit_bias=NO_EOG)
    singles = [client.completions.create(seed=seed, **kw).choices[0].text for seed in (7, 8)]
    wait_idle(served.worker)
    before = served.worker.session.engine.stats["prefill_tokens"]
    both = client.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == singles  # choice i samples with seed + i
    assert both.usage.completion_tokens == 24
    # the prompt was computed once at most (prefix reuse may skip it)
    assert served.worker.session.engine.stats["prefill_tokens"] - before <= len("hello")
    # streamed, each chunk says its choice
    texts = ["", ""]
    for chunk in client.completions.create(n=2, seed=7, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == singles
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                          n=2, max_tokens=5, temperature=0, logit_bias=NO_EOG)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.completions.create(n=3, **kw)


def test_slots_and_props_report_the_slots(served):
    from test_server import request, wait_idle

    wait_idle(served.worker)
    status, _, props = request(served, "GET", "/props")
    assert status == 200 and props["total_slots"] == 2
    assert props["default_generation_settings"]["n_ctx"] == 256  # 512 split in two
    status, _, slots = request(served, "GET", "/slots")
    assert status == 200 and [s["id"] for s in slots] == [0, 1]
    assert all(s["n_ctx"] == 256 and s["is_processing"] is False for s in slots)
    assert "prompt" not in slots[0]  # the metrics form: no user's text
    served.slots_endpoint = False
    try:
        status, _, body = request(served, "GET", "/slots")
        assert status == 501 and "--no-slots" in body["error"]["message"]
    finally:
        served.slots_endpoint = True
