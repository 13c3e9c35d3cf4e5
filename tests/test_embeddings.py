"""Embeddings (runtime/embeddings.py; /v1/embeddings and /embedding with --embeddings): our
pooled hidden states against llama.cpp's on the same file, and the endpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

import parity_models as pm
from make_embedding_reference import reference_path
from runtime.embeddings import hidden_states, model_pooling, normalize, pool
from runtime.gguf import GGUFFile
from runtime.model import load_model

# The F32 parity model's states agree with llama.cpp's to float32 summation order: measured
# below 1e-6 of the largest component (7e-7 at most); 1e-4 of it (the parity tests' F32 bound) is the limit.
RTOL = 1e-4


@pytest.fixture(scope="module")
def llama_parity(tmp_path_factory):
    """(our model, llama.cpp's embeddings of its first tokens) for the llama parity model."""
    import llamacpp_vocab

    try:
        folder = llamacpp_vocab.vocab_dir()
    except llamacpp_vocab.VocabUnavailable as e:
        pytest.skip(f"llama.cpp's test vocabularies are unavailable: {e}")
    reference = json.loads(reference_path("llama").read_text())
    path = tmp_path_factory.mktemp("embeddings") / "llama-F32.gguf"
    digest = pm.write_model(path, "llama", llamacpp_vocab.vocab_path(folder, reference["vocab"]))
    assert digest == reference["sha256"], "the parity model changed: rerun make_embedding_reference.py"
    return load_model(GGUFFile(path)), reference


@pytest.mark.parametrize("pooling", ["none", "mean", "cls", "last"])
def test_pooled_states_match_llamacpp(llama_parity, pooling):
    model, reference = llama_parity
    states = hidden_states(model, reference["tokens"], ("f32", "f32"))  # as llama.cpp ran
    ours = pool(states, pooling)
    theirs = np.array(reference["embeddings"][pooling], np.float32)
    assert ours.shape == theirs.shape
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= RTOL * scale
    if pooling != "none":  # and normalized as llama.cpp's server does (L2 by default)
        expected = theirs / np.sqrt(np.sum(theirs.astype(np.float64) ** 2))
        assert np.allclose(normalize(ours), expected, atol=RTOL)


# --- the endpoints, on tests/test_server.py's tiny model (no pooling_type: llama.cpp's none) ---

from test_server import model_path, request, running_server, worker  # noqa: E402,F401


def expected_embedding(worker, text: str) -> np.ndarray:
    """Mean of the model's final states, L2-normalized, computed here with NumPy."""
    def states(session):
        cache = session.engine.slots[0].cache
        return hidden_states(session.engine.model, worker.encode(text), (cache.type_k, cache.type_v))

    mean = worker.on_engine_thread(states).astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_openai_embeddings_with_mean_pooling(worker):
    openai = pytest.importorskip("openai")
    texts = ["hello world", "the world is"]
    with running_server(worker, embeddings=True, pooling="mean") as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                               max_retries=0, timeout=60)
        answer = client.embeddings.create(model="any", input=texts)  # base64, as it asks
        floats = client.embeddings.create(model="any", input=texts, encoding_format="float")
        status, _, native = request(server, "POST", "/embedding", {"content": texts[0]})
    assert [d.index for d in answer.data] == [0, 1]
    n_tokens = sum(len(worker.encode(t)) for t in texts)
    assert answer.usage.prompt_tokens == n_tokens
    for text, got, as_float in zip(texts, answer.data, floats.data):
        want = expected_embedding(worker, text)
        assert len(got.embedding) == worker.session.engine.model.hp.n_embd
        assert np.allclose(got.embedding, want, atol=1e-5)
        assert np.allclose(as_float.embedding, got.embedding, atol=0)
    assert status == 200 and np.allclose(native[0]["embedding"][0], answer.data[0].embedding)


def test_pooling_none_gives_token_rows_natively_and_a_400_from_openais(worker):
    with running_server(worker, embeddings=True) as server:  # the model names no pooling
        status, _, native = request(server, "POST", "/embedding", {"content": "hello world"})
        assert status == 200
        assert len(native[0]["embedding"]) == len(worker.encode("hello world"))
        status, _, answer = request(server, "POST", "/v1/embeddings", {"input": "hello"})
        assert status == 400 and "--pooling mean" in answer["error"]["message"]


@pytest.mark.parametrize("body", [{"input": []}, {"input": [3.5]}, {"input": [[]]},
                                  {"input": {"a": 1}}, {"input": [[999999]]},
                                  {"input": "x", "encoding_format": "hex"},
                                  {"input": "x", "embd_normalize": -3}])
def test_bad_embedding_requests_get_a_400(worker, body):
    with running_server(worker, embeddings=True, pooling="mean") as server:
        status, _, answer = request(server, "POST", "/v1/embeddings", body)
    assert status == 400, answer


def test_without_the_flag_embeddings_are_not_served(worker):
    with running_server(worker) as server:
        status, _, answer = request(server, "POST", "/v1/embeddings", {"input": "hello"})
    assert status == 501 and "--embeddings" in answer["error"]["message"]


def test_model_pooling_from_metadata():
    assert model_pooling({"general.architecture": "llama"}) == "none"
    assert model_pooling({"general.architecture": "bert", "bert.pooling_type": 1}) == "mean"
    assert model_pooling({"general.architecture": "qwen3", "qwen3.pooling_type": 3}) == "last"
