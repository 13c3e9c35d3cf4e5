"""Tool calls and thinking in a model's text: each format parsed whole and streamed (deltas
assembled back), and round trips through real models' chat templates (llama.cpp's
collection): a template writes an assistant's tool calls in its model's format, and the
parser must read back the same calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import reasoning
from runtime.openai_api import RequestError
from runtime.openai_chat import ChatOutput, ChatSettings, chat_request, template_messages
from runtime.tool_calls import detect_format



@pytest.fixture(scope="module")
def templates() -> Path:
    """llama.cpp's chat template collection, from the llama-cpp-python sdist on PyPI."""
    import llamacpp_vocab

    try:
        return llamacpp_vocab.templates_dir()
    except llamacpp_vocab.VocabUnavailable as e:
        pytest.skip(f"llama.cpp's template collection is unavailable: {e}")

CASES = [  # (format, model text, content, [(name, arguments)], reasoning)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               "</tool_call>", "Let me check.\n", [("get_weather", {"city": "Paris"})], ""),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
               '{"name": "b", "arguments": {"q": "x"}}\n</tool_call>', "", [("a", {}), ("b", {"q": "x"})], ""),
    ("hermes", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
               "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", "",
     [("get_weather", {"city": "Paris", "days": 3})], ""),
    ("hermes", "Use <tool_call> tags like <tool_call>this</tool_call>.",
     "Use <tool_call> tags like <tool_call>this</tool_call>.", [], ""),
    ("hermes", "<think>\nWeather is needed.\n</think>\n\n<tool_call>\n"
               '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})], "Weather is needed.\n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"})], ""),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
     "", [("a", {}), ("b", {"x": 1})], ""),
    ("llama3", '{"not": "a call"}', '{"not": "a call"}', [], ""),
    ("llama3", "Paris is sunny.", "Paris is sunny.", [], ""),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
     "", [("get_weather", {"city": "Paris"})], ""),
    ("mistral", 'ok [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f2[CALL_ID]xyz123456[ARGS]{}',
     "ok ", [("get_weather", {"city": "Paris"}), ("f2", {})], ""),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                 '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "",
     [("get_weather", {"city": "Paris"})], ""),
    ("deepseek", "<think>\nCall it.\n</think>\n\nSure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>a"
                 '<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜><｜tool▁call▁begin｜>b<｜tool▁sep｜>{}'
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Sure.", [("a", {"x": 1}), ("b", {})],
     "Call it.\n"),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}', "",
     [("get_weather", {"city": "Paris"})], ""),
    ("generic", '{"response": "hi"}', "hi", [], ""),
    ("generic", "plain answer", "plain answer", [], ""),
    ("harmony", "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
                'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
     "", [("get_weather", {"city": "Paris"})], "Need the weather."),
    ("harmony", "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
                "<|message|>Hello there", "Hello there", [], "Think."),
]


def assemble(deltas: list[dict]) -> dict:
    """A streamed message put together as a client does (by tool-call index)."""
    out = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for delta in deltas:
        out["content"] += delta.get("content", "")
        out["reasoning_content"] += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            slot = out["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            slot["name"] += call.get("function", {}).get("name", "")
            slot["arguments"] += call.get("function", {}).get("arguments", "")
    return out


@pytest.mark.parametrize("fmt,text,content,calls,thought", CASES)
def test_each_format_parses_whole_and_streamed(fmt, text, content, calls, thought):
    output = ChatOutput(fmt, True, "auto", False, stream=False)
    message, has_calls = output.message(text)
    assert has_calls == bool(calls)
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in message.get("tool_calls", [])]
    assert got == calls
    assert (message["content"] or "") == content
    assert message.get("reasoning_content", "") == thought
    # streamed one character at a time: the same message, and no markup leaks as content
    streaming = ChatOutput(fmt, True, "auto", False, stream=True)
    deltas = [d for i in range(len(text) + 1) for d in streaming.deltas(text[:i], False)]
    deltas += streaming.deltas(text, True)
    whole = assemble(deltas)
    assert whole["content"] == content and whole["reasoning_content"] == thought
    assert [(c["name"], json.loads(c["arguments"])) for c in whole["tool_calls"].values()] == calls
    assert all(c["id"] for c in whole["tool_calls"].values())
    # where the model writes the arguments as one JSON value, they stream as they come
    fragments = [c for d in deltas for c in d.get("tool_calls", ()) if c["function"]["arguments"]]
    if "<function=" not in text and fmt in ("hermes", "llama3", "harmony") or "[ARGS]" in text:
        # (fed one character at a time: one fragment per character of the arguments)
        assert len(fragments) == sum(len(c["arguments"]) for c in whole["tool_calls"].values())
    for delta in deltas:  # an id and a name come first, then the arguments
        for call in delta.get("tool_calls", []):
            assert ("id" in call) == ("name" in call.get("function", {}))


def test_a_call_id_the_model_wrote_is_kept_and_mistral_ids_are_nine_characters():
    output = ChatOutput("mistral", True, "auto", False, stream=False)
    message, _ = output.message('[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[CALL_ID]xyz123456[ARGS]{}')
    ids = [c["id"] for c in message["tool_calls"]]
    assert ids[1] == "xyz123456" and len(ids[0]) == 9 and ids[0].isalnum()
    hermes = ChatOutput("hermes", True, "auto", False, stream=False)
    message, _ = hermes.message('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert message["tool_calls"][0]["id"].startswith("call_")


def test_without_tools_the_markup_stays_content():
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    message, calls = ChatOutput("hermes", False, "auto", False, stream=False).message(text)
    assert not calls and message["content"] == text


@pytest.mark.parametrize("fmt,opened,text,thought,content", [
    ("generic", False, "<think>\nHmm.\n</think>\n\nHi!", "Hmm.\n", "Hi!"),
    ("generic", True, "Hmm, the prompt opened it.</think>Hi!", "Hmm, the prompt opened it.", "Hi!"),
    ("generic", False, "No thinking here.", "", "No thinking here."),
    ("generic", False, "<think>cut off by max_tokens", "cut off by max_tokens", ""),
])
def test_thinking_is_split_from_the_answer(fmt, opened, text, thought, content):
    message, _ = ChatOutput(fmt, False, "auto", opened, stream=False).message(text)
    assert message.get("reasoning_content", "") == thought and message["content"] == content
    streaming = ChatOutput(fmt, False, "deepseek", opened, stream=True)
    deltas = [d for i in range(len(text) + 1) for d in streaming.deltas(text[:i], False)]
    whole = assemble(deltas + streaming.deltas(text, True))
    assert whole["reasoning_content"] == thought and whole["content"] == content


def test_reasoning_format_none_and_legacy():
    text = "<think>Hmm.</think>Hi!"
    message, _ = ChatOutput("generic", False, "none", False, stream=False).message(text)
    assert message == {"role": "assistant", "content": text}
    message, _ = ChatOutput("generic", False, "deepseek-legacy", False, stream=False).message(text)
    assert message["reasoning_content"] == "Hmm." and message["content"] == text
    streaming = ChatOutput("generic", False, "deepseek-legacy", False, stream=True)
    assert assemble(streaming.deltas(text, True)) == {"content": text, "reasoning_content": "",
                                                      "tool_calls": {}}
    harmony = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi"
    message, _ = ChatOutput("harmony", False, "none", False, stream=False).message(harmony)
    assert "reasoning_content" not in message and "Think." in message["content"]
    assert message["content"].endswith("Hi")


def test_prompt_opens_thinking():
    assert reasoning.prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not reasoning.prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_request_checks_and_settings():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    chat = chat_request(body, "{{ tools }}<tool_call>", ChatSettings(reasoning_budget=0))
    assert chat.fmt == "hermes" and chat.template_vars["enable_thinking"] is False
    # a function without a description or parameters gets empty ones (gpt-oss's template reads them)
    assert chat.template_vars["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object"}}}]
    # a template that does not read tools: they are described in a system message
    chat = chat_request(body, "{{ messages }}", ChatSettings())
    assert chat.fmt == "generic" and "tools" not in chat.template_vars
    assert chat.messages[0]["role"] == "system" and '"name": "f"' in chat.messages[0]["content"]
    # DeepSeek's templates show calls but not tools: told about them, it calls its own way
    chat = chat_request(body, "{{ messages }}<｜tool▁calls▁begin｜>", ChatSettings())
    assert chat.fmt == "deepseek" and chat.spell_special
    assert '"name": "f"' in chat.messages[0]["content"] and "tool_calls" not in chat.messages[0]["content"]
    assert chat_request({**body, "tool_choice": "none"}, "", ChatSettings()).tools is None
    for bad, param in [({"tools": "f"}, "tools"), ({"tools": [{"function": {"name": ""}}]}, "tools"),
                       ({"tool_choice": "sometimes"}, "tool_choice"),
                       ({"tools": None, "tool_choice": "required"}, "tool_choice"),
                       ({"reasoning_format": "loud"}, "reasoning_format"),
                       ({"chat_template_kwargs": [1]}, "chat_template_kwargs")]:
        with pytest.raises(RequestError) as caught:
            chat_request({**body, **bad}, "", ChatSettings())
        assert caught.value.param == param and caught.value.status == 400


def test_tool_call_arguments_go_back_to_templates_as_objects():
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "x", "content": "2"}]
    out = template_messages(messages, "hermes")
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and out[1] == messages[1]
    with pytest.raises(RequestError):
        template_messages([{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{not json"}}]}], "hermes")


# --- round trips through real chat templates ------------------------------------------------------

ROUND_TRIPS = {  # template -> (format, what ends the assistant's turn in the rendered text)
    "Qwen-Qwen2.5-7B-Instruct": ("hermes", "<|im_end|>"),
    "Qwen-Qwen3-0.6B": ("hermes", "<|im_end|>"),
    "Qwen3.5-4B": ("hermes", "<|im_end|>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3", "<|eot_id|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", "</s>"),
    "unsloth-mistral-Devstral-Small-2507": ("mistral", "</s>"),
    "openai-gpt-oss-120b": ("harmony", "<|start|>functions"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek", "<｜end▁of▁sentence｜>"),
    "deepseek-ai-DeepSeek-V3.1": ("deepseek", "<｜end▁of▁sentence｜>"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_a_templates_own_tool_calls_parse_back(name, templates):
    from runtime.chat import ChatTemplate

    path = templates / f"{name}.jinja"
    fmt, turn_end = ROUND_TRIPS[name]
    source = path.read_text()
    assert detect_format(source) == fmt
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "days": {"type": "integer"}}}}}]
    user = {"role": "user", "content": "Weather in Paris?"}
    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    conversation = [user, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"}]
    template = ChatTemplate(source, "<s>", "</s>")
    before = template.render(template_messages([user], fmt), True, tools=tools)
    after = template.render(template_messages(conversation, fmt), False, tools=tools)
    if fmt == "harmony":  # the prompt ends with <|start|>assistant; the call's header names it
        before = before[:-len("assistant")]
    if before.endswith("<think>\n"):  # Qwen 3.5 writes an empty thought before a call
        before = before[:-len("<think>\n")]
    if fmt == "deepseek":  # the prompt opens a thought that the history's turn does not show
        before = before[:before.rindex("<｜Assistant｜>") + len("<｜Assistant｜>")]
    assert after.startswith(before), (before[-200:], after[len(before) - 200:])
    answer = after[len(before):].split(turn_end)[0]
    if fmt == "harmony":
        answer = answer[len("assistant"):]
    message, has_calls = ChatOutput(fmt, True, "auto", False, stream=False).message(answer)
    assert has_calls, answer
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == [("get_weather", {"city": "Paris", "days": 2})]
    assert not (message["content"] or "").strip(), answer


# --- forced calls: the grammar of each format, walked at random ---------------------------------

MARKERS = ["[TOOL_CALLS]", "[ARGS]", "<|channel|>", "<|constrain|>", "<|message|>", "<|python_tag|>",
           "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
           "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"]
FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "stop_timer", "parameters": {
        "type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"],
        "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def marker_tokenizer():
    """A SentencePiece vocabulary whose call markers are control tokens, as in the models'."""
    from runtime.tokenizer import Tokenizer

    specials = ["<unk>", "<s>", "</s>"] + MARKERS
    words = list("abcdefghijklmnopqrstuvwxyz") + ['{"', '":', "true", "false", "\u2581"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + words
    types = [2] + [3] * (len(specials) - 1) + [6] * 256 + [1] * len(words)
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(words))],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_space_prefix": False})


def valid_arguments(name: str, arguments: dict) -> bool:
    if name == "get_weather":
        return (set(arguments) == {"city", "days"} and arguments["city"] in ("Paris", "Rome")
                and type(arguments["days"]) is int and 1 <= arguments["days"] <= 9)
    return set(arguments) == {"now"} and isinstance(arguments["now"], bool)


@pytest.mark.parametrize("fmt,source", [("hermes", ""), ("llama3", ""), ("mistral", ""),
                                        ("mistral", "[ARGS]"), ("harmony", ""), ("generic", ""),
                                        ("deepseek", "```json"), ("deepseek", "")])
def test_a_forced_call_is_always_a_valid_call(marker_tokenizer, fmt, source):
    """Random walks through the forced-call grammar (any allowed token, uniformly) always
    parse back into one call of a given tool whose arguments follow its schema."""
    import numpy as np

    from runtime.constraint import ConstraintVocabulary
    from runtime.tool_call_grammar import forced_call_grammar, marker_token_finder

    tok = marker_tokenizer
    grammar = forced_call_grammar(fmt, FORCED_TOOLS, marker_token_finder(tok.encode), source)
    constraint = ConstraintVocabulary.of(tok, tok.vocab_size).compile(grammar)
    rng = np.random.default_rng(0)
    for walk in range(8):
        matcher = constraint.matcher()
        ids = []
        while not matcher.finished:
            token = int(rng.choice(np.flatnonzero(matcher.allowed())))
            if token in tok.eog_ids:
                break
            matcher.consume(token)
            ids.append(token)
            assert len(ids) < 400, tok.decode(ids, skip_special=False)
        text = tok.decode(ids, skip_special=False)
        for marker in MARKERS_OF[fmt]:  # the markup is its tokens, never spelled out
            assert tok.encode(marker, False, True)[0] in ids, (marker, ids)
        output = ChatOutput(fmt, True, "auto", False, stream=False)
        message, has_calls = output.message(text)
        assert has_calls and not message["content"], text
        (call,) = message["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert valid_arguments(call["function"]["name"], arguments), text
        # laid out as the templates write calls: json.dumps' separators, no other blanks
        assert call["function"]["arguments"] == json.dumps(arguments), text


MARKERS_OF = {"hermes": [], "llama3": [], "generic": [], "mistral": ["[TOOL_CALLS]"],
              "harmony": ["<|channel|>", "<|constrain|>", "<|message|>"],
              "deepseek": ["<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"]}


def test_gpt_oss_takes_back_a_turn_with_thinking_content_and_a_call(templates):
    """gpt-oss's template refuses an assistant turn with both content and thinking beside a
    call, and reads every tool's description: the server adapts what clients send."""
    from runtime.chat import ChatTemplate

    path = templates / "openai-gpt-oss-120b.jinja"
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need it.",
                "tool_calls": [{"id": "a", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    chat = chat_request({"messages": history, "tools": tools}, path.read_text(), ChatSettings())
    text = ChatTemplate(path.read_text()).render(chat.messages, True, **chat.template_vars)
    assert "<|channel|>analysis<|message|>Need it.<|end|>" in text
    assert 'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>' in text
