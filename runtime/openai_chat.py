"""OpenAI's chat requests as data: tools, tool_choice, the thinking settings and the
messages made ready for the model's chat template (ChatRequest), and the assistant's message
read back from the generated text (ChatOutput): its thinking, content and tool calls, whole
or as a stream's deltas. The formats themselves are runtime/tool_calls.py's (with
tool_call_parsers.py and tool_call_grammar.py) and runtime/reasoning.py's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from runtime import reasoning, tool_call_parsers, tool_calls
from runtime.tool_call_grammar import forced_call_grammar, marker_token_finder
from runtime.openai_api import RequestError, int_field

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

    def forced_grammar(self, encode: Callable[..., list[int]], template_source: str):
        """The grammar of the forced call (runtime.constraint.Grammar), or None; encode:
        the model's tokenizer's (to find the control tokens of the call's markup)."""
        if not self.forced:
            return None
        return forced_call_grammar(self.fmt, self.forced, marker_token_finder(encode),
                                   template_source)

    def budget(self, encode: Callable[..., list[int]], template_source: str,
               prompt_text: str, constrained: bool = False) -> reasoning.ReasoningBudget | None:
        """The thinking budget of this chat (None: unlimited, or a model that does not
        think, or whose tags its vocabulary cannot write); encode: the model's tokenizer's.
        constrained: a grammar constrains the answer, which then comes after the thinking,
        followed even without a bound (None: the grammar decides from the first token, for
        thinking that cannot be told from its answer; ReasoningBudget.precedes_grammar)."""
        tags = reasoning.thinking_tags(template_source, self.fmt == "harmony")
        if (self.thinking_budget < 0 and not constrained) or tags is None:
            return None
        budget = reasoning.ReasoningBudget.of(self.thinking_budget, tags, self.budget_message,
                                              prompt_text, encode)
        if not (budget.start and budget.end) or (constrained and not budget.precedes_grammar):
            return None
        return budget

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

    def parse(self, text: str, final: bool) -> tool_call_parsers.Parsed:
        if self.fmt == "harmony":
            parsed = tool_call_parsers.parse(text, "harmony", final, self.extract)
            if not self.parse_tools:
                parsed.calls = []
            return parsed
        thought, content = reasoning.split(text, self.opened, final) if self.extract else ("", text)
        if self.parse_tools:
            parsed = tool_call_parsers.parse(content, self.fmt, final)
        else:
            parsed = tool_call_parsers.Parsed(content=content)
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
