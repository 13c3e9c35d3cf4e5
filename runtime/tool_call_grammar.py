"""The grammar of a forced tool call (tool_choice "required" or a named function): one call
of one of the tools in the model's own format, its markup literal (as the marker's token when
it is one) around JSON that follows the function's parameters schema; decoding under it
(runtime/constraint.py) makes the answer such a call, whatever the model would have written.
"""

from __future__ import annotations

import json
from typing import Callable

from runtime.tool_calls import DS_CALL, DS_CALL_END, DS_CALLS, DS_CALLS_END, DS_SEP


def forced_call_grammar(fmt: str, tools: list[dict], marker_token: Callable[[str], int | None],
                        template_source: str = ""):
    """The grammar (runtime.constraint.Grammar, llguidance's Lark) of one call of one of
    `tools` in the model's own format: its literal markup around a JSON value that follows
    the function's parameters schema. marker_token(text): the id of the one token that is
    `text`, None when there is none (a marker that is a token is written as that token, as
    the model was trained to, and a control token can be produced no other way). A
    thinking model's thinking comes before it, unconstrained (runtime/reasoning.py)."""
    from runtime.constraint import Grammar

    if not tools:
        raise ValueError("a forced call needs at least one tool")

    def lit(text: str) -> str:
        token = marker_token(text)
        return f"<[{token}]>" if token is not None else json.dumps(text, ensure_ascii=False)

    def as_written(schema: dict) -> str:  # JSON laid out as templates write it (tojson)
        return json.dumps({**schema, "x-guidance": _JSON_LAYOUT})

    def parameters(tool: dict) -> dict:
        return tool["function"].get("parameters") or {"type": "object"}

    def schema(name_key: str, args_key: str) -> str:
        options = [{"type": "object", "properties": {
            name_key: {"const": t["function"]["name"]}, args_key: parameters(t)},
            "required": [name_key, args_key], "additionalProperties": False} for t in tools]
        return as_written(options[0] if len(options) == 1 else {"anyOf": options})

    def per_tool(make: Callable[[str, str], str]) -> str:
        rules = [f"call{i}: {make(t['function']['name'], as_written(parameters(t)))}"
                 for i, t in enumerate(tools)]
        return "call: " + " | ".join(f"call{i}" for i in range(len(tools))) + "\n" + "\n".join(rules)

    if fmt == "hermes":
        body = f'{lit("<tool_call>")} "\\n" %json{schema("name", "arguments")} "\\n" {lit("</tool_call>")}'
    elif fmt == "llama3":
        body = f'%json{schema("name", "parameters")}'
    elif fmt == "mistral" and "[ARGS]" in template_source:
        body = f'{lit("[TOOL_CALLS]")} call\n' + per_tool(
            lambda name, params: f'{json.dumps(name)} {lit("[ARGS]")} %json{params}')
    elif fmt == "mistral":
        body = (f'{lit("[TOOL_CALLS]")} "[" %json{schema("name", "arguments")} "]"')
    elif fmt == "deepseek" and "```json" in template_source:  # R1
        body = f'{lit(DS_CALLS)} {lit(DS_CALL)} "function" {lit(DS_SEP)} call\n' + per_tool(
            lambda name, params: f'{json.dumps(name)} "\\n```json\\n" %json{params} "\\n```" '
                                 f'{lit(DS_CALL_END)} {lit(DS_CALLS_END)}')
    elif fmt == "deepseek":  # V3.1
        body = f'{lit(DS_CALLS)} {lit(DS_CALL)} call\n' + per_tool(
            lambda name, params: f'{json.dumps(name)} {lit(DS_SEP)} %json{params} '
                                 f'{lit(DS_CALL_END)} {lit(DS_CALLS_END)}')
    elif fmt == "harmony":
        body = f'{lit("<|channel|>")} "commentary to=functions." call\n' + per_tool(
            lambda name, params: f'{json.dumps(name)} " " {lit("<|constrain|>")} "json" '
                                 f'{lit("<|message|>")} %json{params}')
    else:
        call = json.loads(schema("name", "arguments"))
        del call["x-guidance"]
        body = "%json" + as_written({"type": "object", "properties": {"tool_calls": {
            "type": "array", "minItems": 1, "maxItems": 1, "items": call}},
            "required": ["tool_calls"], "additionalProperties": False})
    return Grammar.lark("start: " + body)


# a forced call's JSON: one line, ", " and ": " between items (as json.dumps and Jinja's
# tojson write it, so as the models saw their calls in training), no whitespace elsewhere
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def marker_token_finder(encode: Callable[..., list[int]]) -> Callable[[str], int | None]:
    """marker_token for forced_call_grammar from a tokenizer's encode: the id of the one
    token a marker's text is (control tokens and user-defined ones such as Qwen's
    <tool_call>, which the model writes as that token, never spelled out)."""
    def marker_token(text: str) -> int | None:
        ids = encode(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None
    return marker_token
