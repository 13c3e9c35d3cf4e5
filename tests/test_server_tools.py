"""Tool calls and thinking through the server, with the official openai client.

A tiny random model cannot be made to write a tool call, so its words come from a test hook:
ScriptedWorker is the real engine worker (the model loads, the chat template renders in its
sandbox, the prompt is tokenized) whose generation step hands out scripted text pieces
instead of sampled ones. Everything between the pieces and the client is the server's own:
the parsing, the stream's deltas, finish_reason. One test runs the real model with tools.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from conftest import write_synthetic_model_with_tokenizer  # noqa: E402
from runtime.openai_chat import ChatSettings  # noqa: E402
from runtime.worker import EngineWorker  # noqa: E402
from test_gptoss import gpt_oss_f32  # noqa: E402,F401  (a fixture)
from test_server import N_CTX, loaded_worker, running_server, tokenizer_vocabulary  # noqa: E402

# a Qwen-like template: tools in a system turn, calls as <tool_call>, thinking switchable
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "\nCall one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = ['Let me look.\n<tool', '_call>\n{"name": "get_weather", ', '"arguments": {"city": ',
        '"Paris"}}\n</tool_', 'call>']
THINK = ["<think>", "\nThe user", " greets me.\n", "</th", "ink>\n\n", "Hello!"]


class ScriptedWorker(EngineWorker):
    """The engine worker with a test hook: while `script` is set, a generation hands out
    its pieces instead of sampling; `prompts` records every prompt it was given."""

    script: list[str] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[list[int]] = []

    def _start(self, job, slots):
        self.prompts.append(job.prompt_tokens)
        if self.script is None:
            return super()._start(job, slots)
        for piece in self.script:
            job.events.put(("piece", 0, piece, []))
        job.events.put(("done", 0, "stop", len(self.script), {}))
        return None

    def last_prompt(self) -> str:
        return self.decode(self.prompts[-1])


# call markers as the models' vocabularies have them: Qwen's user-defined, Mistral's control
MARKERS = {"<tool_call>": 4, "</tool_call>": 4, "[TOOL_CALLS]": 3, "[ARGS]": 3}


def vocabulary():
    """test_server's vocabulary, plus the call markers as single tokens."""
    tokens, scores, types = tokenizer_vocabulary()
    return tokens + list(MARKERS), scores + [0.0] * len(MARKERS), types + list(MARKERS.values())


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tiny.gguf"
    write_synthetic_model_with_tokenizer(path, "qwen3", vocabulary(), seed=3,
                                         more=lambda w: w.add_chat_template(TEMPLATE),
                                         n_ctx_train=N_CTX)
    worker = loaded_worker(path, ScriptedWorker)
    yield worker
    worker.stop()


def client_of(server):
    # a forced call is ~80 tokens of the tiny model: a second on a quiet machine, much
    # longer on a loaded one
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                         max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(worker):
    with running_server(worker) as server:
        yield client_of(server)


@pytest.fixture
def script(worker):
    def set_script(pieces):
        worker.script = pieces
    yield set_script
    worker.script = None


def test_a_tool_call_whole(client, worker, script):
    script(CALL)
    response = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "Tools: get_weather" in worker.last_prompt()  # the tools went into the template


def test_a_tool_call_streamed(client, script):
    script(CALL)
    chunks = list(client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me look.\n"  # the markup never shows as content
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].index == 0 and calls[0].id and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_content(client, worker, script):
    script(CALL)
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        choice = client.chat.completions.create(model="x", messages=ASK, **extra).choices[0]
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.content == "".join(CALL)
        assert "Tools:" not in worker.last_prompt()


def test_calls_and_tool_results_flow_back_into_the_template(client, worker, script):
    script(["It is sunny in Paris."])
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model="x", messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == "It is sunny in Paris."
    prompt = worker.last_prompt()
    # (the text after a marker token decodes with SentencePiece's space in front)
    assert '<tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<tool_response>sunny, 21 C</tool_response>" in prompt


def test_thinking_comes_as_reasoning_content(client, script):
    script(THINK)
    message = client.chat.completions.create(model="x", messages=ASK).choices[0].message
    assert message.content == "Hello!" and message.reasoning_content == "The user greets me.\n"
    chunks = list(client.chat.completions.create(model="x", messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user greets me.\n"
    assert "".join(d.content or "" for d in deltas) == "Hello!"


def test_reasoning_flags(worker, script):
    script(THINK)
    settings = ChatSettings(reasoning_format="none", reasoning_budget=0)
    with running_server(worker, chat_settings=settings) as server:
        client = client_of(server)
        message = client.chat.completions.create(model="x", messages=ASK).choices[0].message
        assert message.content == "".join(THINK) and not getattr(message, "reasoning_content", None)
        assert worker.last_prompt().endswith("<think>\n\n</think>\n\n")  # enable_thinking=false
        # a request may ask for its own reasoning_format, as llama.cpp's server allows
        message = client.chat.completions.create(model="x", messages=ASK, extra_body={
            "reasoning_format": "deepseek"}).choices[0].message
        assert message.reasoning_content == "The user greets me.\n"


def test_the_real_model_with_tools_answers(client, worker):
    """No hook: the random model writes what it writes, and the answer is well formed."""
    response = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, max_tokens=8,
                                              temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert response.usage.completion_tokens <= 8
    assert "Tools: get_weather" in worker.last_prompt()


BOUNDED_TOOLS = [  # schemas whose every value is short: a random model's answer stays small
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object", "properties": {"loud": {"type": "boolean"}}, "required": ["loud"],
        "additionalProperties": False}}}]


def follows_its_schema(call) -> bool:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return (set(arguments) == {"city", "days"} and arguments["city"] in ("Paris", "Rome", "Oslo")
                and type(arguments["days"]) is int and 1 <= arguments["days"] <= 7)
    return call.function.name == "set_alarm" and set(arguments) == {"loud"} and isinstance(
        arguments["loud"], bool)


def test_tool_choice_required_makes_the_random_model_call_a_tool(client):
    """No hook: constrained decoding makes the random model's answer one valid call."""
    response = client.chat.completions.create(model="x", messages=ASK, tools=BOUNDED_TOOLS,
                                              tool_choice="required", seed=0, max_tokens=120)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert follows_its_schema(call), call
    assert not choice.message.content


def test_a_named_tool_choice_streamed(client):
    named = {"type": "function", "function": {"name": "set_alarm"}}
    chunks = list(client.chat.completions.create(model="x", messages=ASK, tools=BOUNDED_TOOLS,
                                                 tool_choice=named, seed=1, max_tokens=120,
                                                 stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].function.name == "set_alarm"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert isinstance(json.loads(arguments)["loud"], bool)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_and_a_response_format_at_once_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="x", messages=ASK, tools=BOUNDED_TOOLS,
                                       tool_choice="required",
                                       response_format={"type": "json_object"})
    assert caught.value.body["param"] == "tool_choice"


# Mistral's newer call format, whose markers are control tokens the text must spell out
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}{% for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]"
    "{{ c.function.arguments | tojson }}{% endfor %}</s>"
    "{%- else %}{{ m.content }}</s>{% endif %}{% endfor %}")


def test_markers_that_are_control_tokens_reach_the_parser(client, worker):
    """A Mistral-style template: the forced call's [TOOL_CALLS] and [ARGS] are control
    tokens, which a plain answer never shows; here they are spelled out for the parser, and
    the client sees only the call."""
    from runtime.chat import ChatTemplate

    model_template = worker.chat_template
    worker.chat_template = ChatTemplate(MISTRAL_TEMPLATE, "<s>", "</s>")  # the test hook
    try:
        response = client.chat.completions.create(
            model="x", messages=ASK, tools=BOUNDED_TOOLS[1:], seed=0, max_tokens=60,
            tool_choice="required")
    finally:
        worker.chat_template = model_template
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert follows_its_schema(call) and call.function.name == "set_alarm"
    assert len(call.id) == 9 and call.id.isalnum()  # what Mistral's templates insist on


@pytest.mark.parametrize("args,says", [
    (["--reasoning-budget", "-2"], "--reasoning-budget"),
    (["--reasoning-budget", "lots"], "--reasoning-budget"),
    (["--reasoning-format", "loud"], "--reasoning-format")])
def test_reasoning_flags_are_checked_before_anything_loads(args, says):
    from click.testing import CliRunner

    from runtime.cli import main

    result = CliRunner().invoke(main, ["-m", "no-such.gguf", *args])
    assert result.exit_code == 2 and says in result.output


def test_the_real_model_thinks_when_a_grammar_makes_it(client):
    """No hook: llama.cpp's `grammar` field makes the random model write a <think> block,
    and the server returns it as reasoning_content, whole and streamed."""
    grammar = 'root ::= "<think>" [a-z]{2,12} "</think>" [a-z]{2,8}'
    message = client.chat.completions.create(model="x", messages=ASK, seed=0, max_tokens=60,
                                             extra_body={"grammar": grammar}).choices[0].message
    assert message.reasoning_content.isalpha() and message.content.isalpha(), message
    chunks = list(client.chat.completions.create(model="x", messages=ASK, seed=0, max_tokens=60,
                                                 stream=True, extra_body={"grammar": grammar}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content


@pytest.fixture(scope="module")
def gpt_oss_client(gpt_oss_f32):
    """The tiny gpt-oss model (tests/parity_models.py: harmony's tokens and chat template),
    served."""
    worker = loaded_worker(gpt_oss_f32)
    try:
        with running_server(worker) as server:
            yield client_of(server)
    finally:
        worker.stop()


def test_gpt_oss_calls_a_tool_in_harmony(gpt_oss_client):
    """No hook: the forced call is written in harmony's tokens (<|channel|>commentary
    to=functions.N <|constrain|>json<|message|>...), spelled out for the parser, and comes back
    as one call. (The tiny gpt-oss decodes slowly for its size, its 128k-token output layer:
    one request.)"""
    named = {"type": "function", "function": {"name": "set_alarm"}}
    response = gpt_oss_client.chat.completions.create(
        model="x", messages=ASK, tools=BOUNDED_TOOLS, tool_choice=named, seed=0, max_tokens=40)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    (call,) = choice.message.tool_calls
    assert follows_its_schema(call) and call.function.name == "set_alarm"
