"""llama.cpp's own endpoints (runtime/llamacpp_api.py): /completion in its native shape,
streamed and not, and /apply-template; answers checked against the OpenAI endpoints of the
same server on the same tiny model (tests/test_server.py's), greedy so both are exact."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from test_server import HELLO, NO_EOG, client, model_path, request, server, worker  # noqa: E402,F401


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines()
            if line.startswith("data: ")]


def test_native_completion_matches_the_openai_one(server, client):
    whole = client.completions.create(model="any", prompt="the world is", max_tokens=8,
                                      temperature=0, logit_bias=NO_EOG)
    body = {"prompt": "the world is", "n_predict": 8, "temperature": 0, "logit_bias": NO_EOG}
    status, _, answer = request(server, "POST", "/completion", body)
    assert status == 200, answer
    assert answer["content"] == whole.choices[0].text
    assert answer["stop"] is True and answer["stop_type"] == "limit"
    assert answer["tokens_predicted"] == 8
    assert answer["tokens_evaluated"] == whole.usage.prompt_tokens
    assert isinstance(answer["timings"], dict)

    status, response, text = request(server, "POST", "/completion", {**body, "stream": True})
    assert status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    assert "[DONE]" not in text  # llama.cpp's native stream has none
    events = sse_events(text)
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == whole.choices[0].text
    assert events[-1]["tokens_predicted"] == 8


def test_native_completion_takes_token_ids(server, worker):
    tokens = worker.encode("the world is")
    status, _, by_ids = request(server, "POST", "/completion",
                                {"prompt": tokens, "n_predict": 4, "temperature": 0})
    _, _, by_text = request(server, "POST", "/completion",
                            {"prompt": "the world is", "n_predict": 4, "temperature": 0})
    assert status == 200 and by_ids["content"] == by_text["content"]


def test_n_predict_minus_one_runs_until_the_context_is_full():
    from runtime.llamacpp_api import completion_body

    assert "max_tokens" not in completion_body({"prompt": "x", "n_predict": -1})
    assert "max_tokens" not in completion_body({"prompt": "x"})
    assert completion_body({"prompt": "x", "n_predict": 5, "max_tokens": 9})["max_tokens"] == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n_predict": 0}, "n_predict"),
    ({"prompt": "x", "n_predict": -2}, "n_predict"),
    ({"prompt": "x", "n_predict": "8"}, "n_predict"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
])
def test_native_completion_bad_fields_get_a_400_naming_them(server, body, param):
    status, _, answer = request(server, "POST", "/completion", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_apply_template_gives_the_prompt_chat_would_run(server, worker):
    status, _, answer = request(server, "POST", "/apply-template", {"messages": HELLO})
    assert status == 200
    assert answer["prompt"] == worker.chat_prompt(HELLO).text
    assert "hello world" in answer["prompt"]
    status, _, answer = request(server, "POST", "/apply-template", {"messages": "hi"})
    assert status == 400 and answer["error"]["param"] == "messages"


def test_models_lists_the_context_and_capabilities(client, worker, monkeypatch):
    model = client.models.list().data[0]
    assert model.context_length == worker.info.n_ctx
    chat = ["chat", "tools"] if worker.model_chat_template() else []
    assert model.capabilities == ["completion", *chat]
    # a model with its own chat template, served with --embeddings, lists those too
    from test_server import running_server

    monkeypatch.setattr(worker, "model_chat_template", lambda: "{{ messages }}")
    with running_server(worker, embeddings=True) as other:
        status, _, body = request(other, "GET", "/v1/models")
    assert body["data"][0]["capabilities"] == ["completion", "chat", "tools", "embeddings"]
    assert body["models"][0]["capabilities"] == body["data"][0]["capabilities"]


def test_metrics_count_what_was_generated(worker):
    """GET /metrics with --metrics: Prometheus' text format (parsed back with the
    prometheus_client package), llama.cpp's names, counts that add up what was served."""
    from prometheus_client.parser import text_string_to_metric_families

    from test_server import running_server

    with running_server(worker) as plain:
        status, _, answer = request(plain, "GET", "/metrics")
        assert status == 501 and "--metrics" in answer["error"]["message"]
    with running_server(worker, metrics=True) as server:
        done = []
        for prompt, n in (("the world is", 5), ("hello", 3)):
            status, _, answer = request(server, "POST", "/completion",
                                        {"prompt": prompt, "n_predict": n, "logit_bias": NO_EOG})
            assert status == 200
            done.append(answer)
        status, response, text = request(server, "GET", "/metrics")
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain")
    samples = {s.name: s.value for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert samples["llamacpp:prompt_tokens_total"] == sum(a["tokens_evaluated"] for a in done)
    assert samples["llamacpp:tokens_predicted_total"] == 8
    assert samples["llamacpp:n_tokens_max"] == max(a["tokens_evaluated"] + a["tokens_predicted"]
                                                   for a in done)
    assert samples["llamacpp:prompt_seconds_total"] > 0
    assert samples["llamacpp:predicted_tokens_seconds"] > 0
    assert samples["llamacpp:requests_processing"] == 0
    assert samples["llamacpp:requests_deferred"] == 0
    assert "# TYPE llamacpp:tokens_predicted_total counter" in text  # as llama.cpp writes it
