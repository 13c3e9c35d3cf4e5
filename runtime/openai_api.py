"""OpenAI's API as data: request bodies checked and turned into sampling parameters, and the
responses (chat and text completions, whole or streamed as server-sent events, with
logprobs) built from a generation's pieces. runtime/server.py does the HTTP around it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime import reasoning, tool_calls
from runtime.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20

# Request fields that ask for something this server does not do (a 400 when set).
UNSUPPORTED_WHEN_SET = ("functions", "function_call", "audio", "modalities", "prediction",
                        "suffix")


class RequestError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                500: "server_error", 503: "unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty", "repeat_last_n", "logit_bias", "stop")


def _param_of(message: str) -> str:
    """The field a SamplingParams ValueError names: its first word, up to '[' ."""
    return message.split(" ", 1)[0].split("[", 1)[0]


def int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        raise RequestError(400, f"{name} must be {allowed}, got {value!r}", name)
    return int(value)


def bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def sampling_params(body: dict, n_vocab: int):
    """SamplingParams from a request body; a 400 naming the field when one is wrong."""
    max_tokens = int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", 1)
    given = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, **given)
    except ValueError as e:
        raise RequestError(400, str(e), _param_of(str(e))) from None
    outside = sorted(t for t in params.logit_bias if t >= n_vocab)
    if outside:
        raise RequestError(400, f"logit_bias names token {outside[0]}, outside the vocabulary "
                                f"(ids 0..{n_vocab - 1})", "logit_bias")
    return params


def refuse_unsupported(body: dict) -> None:
    """400 for request fields that ask for what this server does not do."""
    int_field(body, "n", 1)  # how many the slots allow: the server checks (choices)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError(400, f"best_of must be 1, got {best_of!r}", "best_of")
    for name in UNSUPPORTED_WHEN_SET:
        value = body.get(name)
        if value is None or value == [] or value == "":
            continue
        hint = " (use tools and tool_choice)" if name in ("functions", "function_call") else ""
        raise RequestError(400, f"{name} is not supported by this server{hint}", name)
    if bool_field(body, "echo"):
        raise RequestError(400, "echo is not supported", "echo")


def requested_grammar(body: dict):
    """The grammar a request asks its output to follow, as (field, runtime.constraint.Grammar),
    or None: OpenAI's response_format ({"type": "json_object"}, or "json_schema" with
    json_schema.schema), or llama.cpp's `json_schema` (a schema) and `grammar` (GBNF) fields,
    at most one of them. A malformed one is a 400 naming the field."""
    from runtime.constraint import ConstraintError, Grammar

    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "text" or fmt is None:
        fmt = None
    given = [name for name, value in (("response_format", fmt), ("json_schema", body.get("json_schema")),
                                      ("grammar", body.get("grammar"))) if value is not None]
    if len(given) > 1:
        raise RequestError(400, f"{' and '.join(given)} both constrain the output: give only one",
                           given[1])
    if not given:
        return None
    name = given[0]
    try:
        if name == "grammar":
            return name, Grammar.gbnf(body["grammar"])
        if name == "json_schema":
            return name, Grammar.json_schema(body["json_schema"])
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":  # llama.cpp also takes a schema here
            schema = fmt.get("schema")
            return name, Grammar.json_object() if schema is None else Grammar.json_schema(schema)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise RequestError(400, 'response_format json_schema needs "json_schema": '
                                        '{"name": ..., "schema": {...}}', name)
            schema = spec.get("schema")
            return name, Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    except ConstraintError as e:
        raise RequestError(400, f"{name}: {e}", name) from None
    raise RequestError(400, f"response_format {kind or fmt!r} is not supported; use "
                            '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                            '"json_schema": {"name": ..., "schema": {...}}}', name)


# --- chat requests: tools, tool_choice, thinking --------------------------------------------

TOOL_CHOICES = ("auto", "none", "required")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ChatSettings:
    """The server's chat settings (its flags): llama.cpp's --reasoning-format,
    --reasoning-budget and --reasoning-budget-message (runtime/reasoning.py)."""

    reasoning_format: str = "auto"
    reasoning_budget: int = -1
    reasoning_budget_message: str = ""


@dataclass
class ChatRequest:
    """A chat request made ready for the template and the generation."""

    messages: list  # as the template takes them (tool-call arguments as objects)
    template_vars: dict  # tools, enable_thinking, the request's chat_template_kwargs
    fmt: str  # the model's tool-call format (runtime/tool_calls.py)
    tools: list | None  # None: tool calls are not parsed
    tool_choice: Any  # "auto", "none", "required" or {"type": "function", "function": {...}}
    reasoning_format: str
    spell_special: bool  # the generation must spell the format's control tokens
    thinking_budget: int = -1  # thinking tokens at most (-1: no limit)
    budget_message: str = ""  # written before the forced end of thinking

    @property
    def forced(self) -> list | None:
        """The tools one of which must be called (tool_choice required or a named one)."""
        if self.tool_choice == "required":
            return self.tools
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == name]
        return None

    def forced_grammar(self, encode: Callable[..., list[int]], template_source: str,
                       prompt_text: str):
        """The grammar of the forced call (runtime.constraint.Grammar), or None; encode:
        the model's tokenizer's (to find the control tokens of the call's markup)."""
        if not self.forced:
            return None
        return tool_calls.forced_call_grammar(
            self.fmt, self.forced, tool_calls.marker_token_finder(encode), template_source,
            reasoning.prompt_opens_thinking(prompt_text))

    def budget(self, encode: Callable[..., list[int]], template_source: str,
               prompt_text: str) -> reasoning.ReasoningBudget | None:
        """The thinking budget of this chat (None: unlimited, or a model that does not
        think); encode: the model's tokenizer's."""
        tags = reasoning.thinking_tags(template_source, self.fmt == "harmony")
        if self.thinking_budget < 0 or tags is None:
            return None
        return reasoning.ReasoningBudget.of(self.thinking_budget, tags, self.budget_message,
                                            prompt_text, encode)

    def output(self, prompt_text: str, stream: bool) -> ChatOutput:
        return ChatOutput(self.fmt, self.tools is not None, self.reasoning_format,
                          reasoning.prompt_opens_thinking(prompt_text), stream)


def chat_request(body: dict, template_source: str, settings: ChatSettings) -> ChatRequest:
    """Check a chat body's tools, tool_choice, reasoning_format and chat_template_kwargs;
    a 400 naming the field when one is wrong."""
    fmt = tool_calls.detect_format(template_source)
    tools = _tools_field(body.get("tools"))
    choice = _tool_choice_field(body.get("tool_choice"), tools)
    if choice == "none":
        tools = None
    reasoning_format = body.get("reasoning_format", settings.reasoning_format)
    if reasoning_format not in reasoning.REASONING_FORMATS:
        raise RequestError(400, f"reasoning_format must be one of "
                                f"{', '.join(reasoning.REASONING_FORMATS)}, got {reasoning_format!r}",
                           "reasoning_format")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier()
                                                 for k in kwargs):
        raise RequestError(400, "chat_template_kwargs must be an object of template variables",
                           "chat_template_kwargs")
    template_vars = {k: v for k, v in kwargs.items() if k not in ("messages", "add_generation_prompt")}
    budget, message = _budget_fields(body, settings)
    if budget == 0:
        template_vars["enable_thinking"] = False
    messages = template_messages(body.get("messages"), fmt)
    if tools:
        if tool_calls.template_renders_tools(template_source):
            template_vars["tools"] = _template_tools(tools)
        else:  # the template knows no tools: describe them in a system message
            if fmt not in tool_calls.KNOWS_ITS_FORMAT_UNTOLD:
                fmt = "generic"
            messages = _with_system_text(messages, tool_calls.tools_prompt(tools, fmt))
    return ChatRequest(messages, template_vars, fmt, tools, choice, reasoning_format,
                       fmt in tool_calls.SPELLS_SPECIAL_TOKENS, budget, message)


def _budget_fields(body: dict, settings: ChatSettings) -> tuple[int, str]:
    """The thinking budget and its message: llama.cpp's reasoning_budget_tokens (or
    thinking_budget_tokens; -1 or absent: the server's --reasoning-budget) and
    reasoning_budget_message (absent: the server's)."""
    name = "reasoning_budget_tokens" if body.get("reasoning_budget_tokens") is not None \
        else "thinking_budget_tokens"
    budget = int_field(body, name, -1, 2**31 - 1)
    if budget is None or budget == -1:
        budget = settings.reasoning_budget
    message = body.get("reasoning_budget_message")
    if message is None:
        message = settings.reasoning_budget_message
    elif not isinstance(message, str):
        raise RequestError(400, f"reasoning_budget_message must be a string, got "
                                f"{type(message).__name__}", "reasoning_budget_message")
    return budget, message


def _tools_field(tools: Any) -> list | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RequestError(400, f"tools must be a list of functions, got {type(tools).__name__}",
                           "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function"
                and isinstance(function, dict)):
            raise RequestError(400, f'tools[{i}] must be {{"type": "function", "function": '
                                    '{"name": ..., "parameters": {...}}}', "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise RequestError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, "
                                    f"'_', '-' or '.', got {name!r}", "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(400, f"tools[{i}].function.parameters must be a JSON schema "
                                    "object", "tools")
    return tools


def _template_tools(tools: list) -> list:
    """Tools as templates read them: a function without a description or parameters gets
    empty ones (gpt-oss's template, for one, reads both)."""
    return [{**tool, "type": "function", "function": {
        "description": "", "parameters": {"type": "object", "properties": {}}, **tool["function"]}}
        for tool in tools]


def _tool_choice_field(choice: Any, tools: list | None) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise RequestError(400, f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                                    f'{{"type": "function", "function": {{"name": ...}}}}, got '
                                    f"{choice!r}", "tool_choice")
        if choice == "required" and not tools:
            raise RequestError(400, "tool_choice 'required' needs tools", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    names = [t["function"]["name"] for t in tools or ()]
    if name not in names:
        raise RequestError(400, f"tool_choice names the function {name!r}, which is not among "
                                f"the tools ({', '.join(names) or 'none given'})", "tool_choice")
    return choice


def template_messages(messages: Any, fmt: str) -> Any:
    """Messages as chat templates take them (as transformers passes them): an assistant
    message's tool-call arguments as objects, not JSON text; for gpt-oss its reasoning as
    `thinking`. Anything malformed is left for chat.validate_messages to name."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("tool_calls") is not None:
            message = {**message, "tool_calls": _template_tool_calls(message["tool_calls"], i)}
        if (fmt == "harmony" and isinstance(message, dict)
                and isinstance(message.get("reasoning_content"), str)):
            message = {**message, "thinking": message["reasoning_content"]}
            if message.get("tool_calls"):  # gpt-oss's template takes one or the other
                message["content"] = None
        out.append(message)
    return out


def _template_tool_calls(calls: Any, i: int) -> list:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise RequestError(400, f"{where} must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(400, f'{where}[{j}] must be {{"id": ..., "type": "function", '
                                    '"function": {"name": ..., "arguments": "{...}"}}', "messages")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RequestError(400, f"{where}[{j}].function.arguments is not valid JSON",
                                   "messages") from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def _with_system_text(messages: Any, text: str) -> Any:
    if not isinstance(messages, list):
        return messages
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": first["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


class ChatOutput:
    """The assistant's message from the generated text: thinking, content and tool calls,
    whole (message) or as the stream's deltas (each call gives what is new since the last)."""

    def __init__(self, fmt: str, parse_tools: bool, reasoning_format: str, opened: bool,
                 stream: bool):
        self.fmt, self.parse_tools, self.opened = fmt, parse_tools, opened
        self.extract = reasoning_format != "none" and not (
            stream and reasoning_format == "deepseek-legacy")
        self.legacy = reasoning_format == "deepseek-legacy"
        self.sent_reasoning, self.sent_content = "", ""
        self.ids: list[str] = []  # the calls' ids, in order
        self.sent_arguments: list[str] = []  # what streamed of each call's arguments

    def parse(self, text: str, final: bool) -> tool_calls.Parsed:
        if self.fmt == "harmony":
            parsed = tool_calls.parse(text, "harmony", final, self.extract)
            if not self.parse_tools:
                parsed.calls = []
            return parsed
        thought, content = reasoning.split(text, self.opened, final) if self.extract else ("", text)
        if self.parse_tools:
            parsed = tool_calls.parse(content, self.fmt, final)
        else:
            parsed = tool_calls.Parsed(content=content)
        parsed.reasoning = thought
        if self.legacy and thought:
            parsed.content = f"{reasoning.OPEN}{thought}{reasoning.CLOSE}{parsed.content}"
        return parsed

    def _call_dicts(self, calls: list) -> list[dict]:
        self._name_calls(calls)
        return [{"id": self.ids[i], "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(calls)]

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole message, and whether it calls tools."""
        parsed = self.parse(text, True)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.calls:
            message["tool_calls"] = self._call_dicts(parsed.calls)
            message["content"] = parsed.content or None
        return message, bool(parsed.calls)

    def deltas(self, text: str, final: bool) -> list[dict]:
        """The stream's new deltas now that the text so far is `text`."""
        parsed = self.parse(text, final)
        out = []
        if len(parsed.reasoning) > len(self.sent_reasoning) and parsed.reasoning.startswith(
                self.sent_reasoning):
            out.append({"reasoning_content": parsed.reasoning[len(self.sent_reasoning):]})
            self.sent_reasoning = parsed.reasoning
        if len(parsed.content) > len(self.sent_content) and parsed.content.startswith(
                self.sent_content):
            out.append({"content": parsed.content[len(self.sent_content):]})
            self.sent_content = parsed.content
        calls = parsed.calls + ([parsed.partial] if parsed.partial and not final else [])
        n_named = len(self.ids)
        self._name_calls(calls)
        for i, call in enumerate(calls):
            if i >= n_named:  # a new call: its id and name first
                self.sent_arguments.append("")
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            sent = self.sent_arguments[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                out.append({"tool_calls": [{"index": i, "function": {
                    "arguments": call.arguments[len(sent):]}}]})
                self.sent_arguments[i] = call.arguments
        return out

    def _name_calls(self, calls: list) -> None:
        """An id for each call not seen before: the model's own, or a new one."""
        for call in calls[len(self.ids):]:
            self.ids.append(call.id or tool_calls.new_call_id(self.fmt))


# --- responses -----------------------------------------------------------------------------

class Reply:
    """Builds one response (OpenAI chat or text completion), streamed as SSE or whole.

    `handler` is the server's RequestHandler that writes it (send_response, send_header,
    send_cors_headers, end_headers, wfile, send_json); token_bytes(id) spells a token."""

    def __init__(self, handler: Any, token_bytes: Callable[[int], bytes], kind: str, n_prompt: int,
                 stream: bool, include_usage: bool, model: str, logprobs_wanted: bool,
                 output: ChatOutput | None = None):
        self.h, self.kind, self.n_prompt, self.stream = handler, kind, n_prompt, stream
        self.output = output if kind == "chat" else None  # None: the text is the content
        self.logprobs_wanted = logprobs_wanted
        self.include_usage = include_usage
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.text: list[str] = []
        self.entries: list = []
        self.token_bytes = token_bytes
        self.index = 0  # the choice this Reply builds (n > 1: one Reply per choice, see sibling)
        self.finished = False

    def sibling(self, index: int, output: ChatOutput | None = None) -> "Reply":
        """The Reply of another choice of the same response (n > 1): same id, own text."""
        other = Reply(self.h, self.token_bytes, self.kind, self.n_prompt, self.stream, self.include_usage,
                      self.model, self.logprobs_wanted, output)
        other.id, other.created, other.index = self.id, self.created, index
        return other

    # SSE framing: HTTP/1.1 chunked transfer, so the connection can stay open afterwards.

    def start_stream(self) -> None:
        h = self.h
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("X-Accel-Buffering", "no")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_cors_headers()
        h.end_headers()
        self.open_choice()

    def open_choice(self) -> None:
        """A streamed chat choice begins with the assistant's role."""
        if self.kind == "chat":
            self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def _write_chunk(self, data: bytes) -> None:
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _chunk(self, delta: dict | str, finish_reason: str | None, entries=None, **extra) -> dict:
        if self.kind == "chat":
            choice = {"index": self.index, "delta": delta, "logprobs": self._chat_logprobs(entries),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": delta, "logprobs": self._text_logprobs(entries, 0),
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "modelrun", "choices": [choice], **extra}

    def piece(self, text: str, entries: list) -> None:
        self.text.append(text)
        if self.stream and self.output is not None:
            deltas = self.output.deltas("".join(self.text), False)
            if not deltas and entries and self.logprobs_wanted:
                deltas = [{"content": ""}]  # the logprobs of text held back for now
            for i, delta in enumerate(deltas):
                self._event(self._chunk(delta, None, entries if i == 0 else None))
        elif self.stream and (text or entries):
            offset = sum(len(t) for t in self.text[:-1])
            delta = {"content": text} if self.kind == "chat" else text
            chunk = self._chunk(delta, None, entries)
            if self.kind == "text" and entries is not None and chunk["choices"][0]["logprobs"]:
                chunk["choices"][0]["logprobs"] = self._text_logprobs(entries, offset)
            self._event(chunk)
        self.entries.extend(entries)

    def _usage(self, n_gen: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_gen,
                "total_tokens": self.n_prompt + n_gen}

    def finish(self, finish_reason: str, n_gen: int, timings: dict) -> None:
        self.end([self.finish_choice(finish_reason, timings)], n_gen, timings)

    def finish_choice(self, finish_reason: str, timings: dict) -> dict | None:
        """This choice is complete: streamed, its last chunk goes out; whole, its choice."""
        self.finished = True
        text = "".join(self.text)
        if self.output is not None:
            if self.stream:
                for delta in self.output.deltas(text, True):
                    self._event(self._chunk(delta, None))
            message, calls = self.output.message(text)
            if calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        else:
            message = {"role": "assistant", "content": text}
        if self.stream:
            last = self._chunk({} if self.kind == "chat" else "", finish_reason, timings=timings)
            for choice in last["choices"]:
                choice["logprobs"] = None
            self._event(last)
            return None
        if self.kind == "chat":
            return {"index": self.index, "message": message,
                    "logprobs": self._chat_logprobs(self.entries), "finish_reason": finish_reason}
        return {"index": self.index, "text": text, "logprobs": self._text_logprobs(self.entries, 0),
                "finish_reason": finish_reason}

    def end(self, choices: list, n_gen: int, timings: dict) -> None:
        """The response is complete: the choices (whole) or the stream's end, with the usage
        of every choice's n_gen tokens together."""
        usage = self._usage(n_gen)
        if self.stream:
            if self.include_usage:
                self._event({"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                             else "text_completion", "created": self.created,
                             "model": self.model, "choices": [], "usage": usage})
            self._event("[DONE]")
            self._write_chunk(b"")
            return
        self.h.send_json(200, {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.model, "system_fingerprint": "modelrun",
                                "choices": choices, "usage": usage, "timings": timings})

    def fail(self, message: str) -> None:
        if self.stream:
            self._event(error_body(500, message))
            self._event("[DONE]")
            self._write_chunk(b"")
        else:
            self.h.send_json(500, error_body(500, message))

    # logprobs in OpenAI's two shapes

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.token_bytes(token)
        return raw.decode("utf-8", "replace"), list(raw)

    def _chat_logprobs(self, entries) -> dict | None:
        if entries is None or not self.logprobs_wanted:
            return None
        content = []
        for e in entries:
            text, raw = self._token_text(e.token)
            top = []
            for tid, lp in e.top:
                t, b = self._token_text(tid)
                top.append({"token": t, "logprob": _finite(lp), "bytes": b})
            content.append({"token": text, "logprob": _finite(e.logprob), "bytes": raw,
                            "top_logprobs": top})
        return {"content": content}

    def _text_logprobs(self, entries, offset: int) -> dict | None:
        if entries is None or not self.logprobs_wanted:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = self._token_text(e.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({self._token_text(t)[0]: _finite(lp) for t, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _finite(x: float) -> float:
    """JSON has no -inf: a banned token's logprob becomes a very small number."""
    return x if math.isfinite(x) else -9999.0


