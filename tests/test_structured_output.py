"""Structured output through the HTTP API with the official openai client: response_format
(json_object, json_schema), llama.cpp's `json_schema` and `grammar` (GBNF) fields, on chat and
text completions (and llama.cpp's /completion), streamed and not; every answer parses and
follows its schema or grammar.

The model is test_server.py's tiny random-weight qwen3 with a 320-piece vocabulary (bytes,
letters, a few words): left alone it writes noise, so whatever structure its answers have
comes from the constraint. The schemas are small and bounded (enums, booleans, bounded
integers) so a random model's walk through them ends within a few dozen tokens.
"""

from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")

from test_server import HELLO, client, model_path, request, server, worker  # noqa: E402,F401

SCHEMA = {
    "type": "object",
    "properties": {"a": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}},
    "required": ["a", "n", "ok"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
CLOSE_BRACE = 5 + ord("}")  # the byte piece <0x7D>: test_server's vocabulary has 5 specials first


def check_schema(value) -> None:
    """SCHEMA's rules, checked directly (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and set(value) == {"a", "n", "ok"}, value
    assert value["a"] in ("yes", "no")
    assert type(value["n"]) is int and 0 <= value["n"] <= 99
    assert type(value["ok"]) is bool


def streamed_text(stream) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta.content if hasattr(choice, "delta") else choice.text
            pieces.append(delta or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


@pytest.mark.parametrize("seed", range(2))
def test_json_schema_answers_validate(client, seed):
    reply = client.chat.completions.create(model="any", messages=HELLO, max_tokens=100, seed=seed,
                                           temperature=1.0, response_format=RESPONSE_FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    check_schema(json.loads(choice.message.content))


def test_streamed_json_schema_answer_validates(client):
    text, finish = streamed_text(client.chat.completions.create(
        model="any", messages=HELLO, max_tokens=100, seed=7, temperature=1.0,
        response_format=RESPONSE_FORMAT, stream=True))
    assert finish == "stop"
    check_schema(json.loads(text))


def test_the_clients_parse_helper_gets_its_pydantic_object(client):
    """client.chat.completions.parse sends a pydantic model's strict schema (titles, enums,
    additionalProperties false) and builds the object from the answer."""
    from typing import Literal

    from pydantic import BaseModel

    class Reply(BaseModel):
        answer: Literal["yes", "no"]
        ok: bool

    completion = client.chat.completions.parse(model="any", messages=HELLO, max_tokens=60,
                                               seed=11, temperature=1.0, response_format=Reply)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Reply) and parsed.answer in ("yes", "no")


def test_an_answer_after_a_prompt_that_opened_thinking_follows_the_schema(tmp_path):
    """A template that ends its prompt with <think> (DeepSeek-R1's): the model thinks first,
    free text (here its tags are several byte tokens: this vocabulary has no <think>), the
    budget ends it after 5 tokens, and the schema constrains the answer after it
    (test_reasoning_budget.py checks the exact cut on a vocabulary with the tags as tokens)."""
    from test_server import serving_with_template

    template = ("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
                "<|im_start|><think>\n")
    with serving_with_template(tmp_path, template) as thinking:
        status, _, reply = request(thinking, "POST", "/v1/chat/completions", {
            "messages": HELLO, "max_tokens": 100, "seed": 1, "temperature": 1.0,
            "response_format": RESPONSE_FORMAT, "reasoning_budget_tokens": 5})
    assert status == 200, reply
    message = reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] == "stop", message
    check_schema(json.loads(message["content"]))
    assert message["reasoning_content"]


def test_json_object_gives_an_object(client):
    # a bias towards "}" keeps the random model's object short; the grammar still decides
    # where "}" may go
    for stream in (False, True):
        args = dict(model="any", messages=HELLO, max_tokens=60, seed=3, temperature=1.0,
                    response_format={"type": "json_object"}, logit_bias={str(CLOSE_BRACE): 8})
        if stream:
            text, finish = streamed_text(client.chat.completions.create(**args, stream=True))
        else:
            choice = client.chat.completions.create(**args).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert finish == "stop" and isinstance(json.loads(text), dict), text


GBNF = 'root ::= ("yes" | "no") " " [0-9] [0-9]? "."'


def test_gbnf_grammar_restricts_text_completions(client):
    for seed, stream in ((1, False), (2, True)):
        args = dict(model="any", prompt="hello", max_tokens=20, seed=seed, temperature=1.0,
                    extra_body={"grammar": GBNF})
        if stream:
            text, finish = streamed_text(client.completions.create(**args, stream=True))
        else:
            choice = client.completions.create(**args).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert re.fullmatch(r"(yes|no) [0-9][0-9]?\.", text) and finish == "stop", text
    # and chat, with llama.cpp's json_schema field, and its json_object with a schema
    reply = client.chat.completions.create(model="any", messages=HELLO, max_tokens=100, seed=5,
                                           temperature=1.0, extra_body={"json_schema": SCHEMA})
    check_schema(json.loads(reply.choices[0].message.content))
    reply = client.chat.completions.create(model="any", messages=HELLO, max_tokens=100, seed=8,
                                           temperature=1.0, response_format={
                                               "type": "json_object", "schema": SCHEMA})
    check_schema(json.loads(reply.choices[0].message.content))


def test_llamacpp_completion_takes_grammar_and_json_schema(server):
    status, _, reply = request(server, "POST", "/completion", {
        "prompt": "hello", "n_predict": 20, "seed": 4, "temperature": 1.0, "grammar": GBNF})
    assert status == 200 and re.fullmatch(r"(yes|no) [0-9][0-9]?\.", reply["content"]), reply
    assert reply["stop_type"] == "eos"
    status, _, reply = request(server, "POST", "/completion", {
        "prompt": "hello", "n_predict": 100, "seed": 6, "temperature": 1.0, "json_schema": SCHEMA})
    assert status == 200, reply
    check_schema(json.loads(reply["content"]))


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}},
     "response_format", "response_format: invalid JSON schema: Invalid type: strnig"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/missing"}}}}, "response_format", "/$defs/missing"),
    ({"response_format": {"type": "json_schema"}}, "response_format", 'needs "json_schema"'),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format 'yaml' is not supported"),
    ({"grammar": 'root ::= "a" | missing'}, "grammar", "grammar: invalid GBNF grammar"),
    ({"grammar": 42}, "grammar", "a GBNF grammar must be a non-empty string"),
    ({"json_schema": "not a schema"}, "json_schema", "the JSON schema is not valid JSON"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "grammar",
     "json_schema and grammar both constrain the output"),
])
def test_bad_schemas_and_grammars_get_a_400_that_says_why(server, extra, param, message):
    for path, body in (("/v1/chat/completions", {"messages": HELLO}),
                       ("/v1/completions", {"prompt": "hello"}), ("/completion", {"prompt": "hello"})):
        status, _, reply = request(server, "POST", path, {**body, "max_tokens": 2, **extra})
        assert status == 400, reply
        error = reply["error"]
        assert error["param"] == param and message in error["message"], error
