"""The parsers of tool calls in a model's text, one per format (runtime/tool_calls.py says
which format a model writes and how each looks): the text back into OpenAI's `tool_calls`,
a name and the arguments as a JSON string.

parse(text, fmt, final) splits text into the content before (and after) the calls and the
calls. While a generation streams, it parses what has come so far (final=False): text that
may still turn out to be the start of a call is held back, and a call counts only once it is
complete, so each partial parse's content is a prefix of the next one's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from runtime.reasoning import held_back
from runtime.tool_calls import DS_CALL, DS_CALL_END, DS_CALLS, DS_CALLS_END, DS_SEP


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str | None = None  # as the model wrote it (Mistral); else made by the server


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    partial: ToolCall | None = None  # a call still coming in: its name, its arguments so far


def parse(text: str, fmt: str, final: bool, extract_reasoning: bool = True) -> Parsed:
    """Content and tool calls of a model's text (for harmony, its reasoning too)."""
    if fmt == "harmony":
        return _parse_harmony(text, final, extract_reasoning)
    start = _call_start(text, fmt)
    if start is None:  # no call: all content, but a possible start of one is held back
        return Parsed(content=text if final else _hold_back(text, _MARKERS[fmt], fmt))
    calls, rest, partial = _SECTION_PARSERS[fmt](text[start:], final)
    if calls is None:  # not (yet) a valid call
        return Parsed(content=text if final else text[:start], partial=partial)
    return Parsed(content=text[:start] + (rest if rest.strip() else ""), calls=calls,
                  partial=partial)


_MARKERS = {"hermes": ("<tool_call>",), "llama3": ("<|python_tag|>",),
            "mistral": ("[TOOL_CALLS]",), "deepseek": (DS_CALLS, DS_CALL), "generic": ()}
_JSON = json.JSONDecoder()


def _call_start(text: str, fmt: str) -> int | None:
    """Where the tool-call section begins, if it does."""
    found = [i for i in (text.find(m) for m in _MARKERS[fmt]) if i >= 0]
    if found:
        return min(found)
    if fmt in ("llama3", "generic"):  # an answer that is a JSON object
        stripped = text.lstrip()
        if stripped.startswith("{"):
            return len(text) - len(stripped)
    return None


def _hold_back(text: str, markers: tuple[str, ...], fmt: str) -> str:
    """text without an ending that could grow into a marker (or, for JSON formats, without
    anything while all of it is blank)."""
    if fmt in ("llama3", "generic") and not text.strip():
        return ""
    return held_back(text, markers)


def _arguments_text(value) -> str | None:
    """Arguments as a JSON object's text; None when they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_from_object(obj) -> ToolCall | None:
    """{"name": N, "arguments"|"parameters": {...}} (or {"function": {...}}) -> a call."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    arguments = _arguments_text(args)
    if not isinstance(name, str) or not name or arguments is None:
        return None
    call_id = obj.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) and call_id else None)


def _decode_json(text: str, pos: int):
    """(value, end) of the JSON value at text[pos:] (after blanks), or None when it is not
    complete or not JSON."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        return _JSON.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


def _parse_hermes(section: str, final: bool):
    """<tool_call>{json}</tool_call> or <tool_call><function=N><parameter=K>V</parameter>...
    repeated; (calls, text after them) or (None, '') when incomplete or invalid."""
    calls, pos = [], 0
    while True:
        rest = section[pos:].lstrip()
        if not rest.startswith("<tool_call>"):
            break
        begin = len(section) - len(rest) + len("<tool_call>")
        end = section.find("</tool_call>", begin)
        if end < 0:
            if not final:  # the next call is coming in
                return calls, "", _partial_call(section[begin:])
            end = len(section)  # the model stopped before closing it
        call = _hermes_call(section[begin:end].strip())
        if call is None:  # not a call: the text from here is content
            return (calls, section[pos:], None) if calls else (None, "", None)
        calls.append(call)
        pos = min(len(section), end + len("</tool_call>"))
    rest = section[pos:]
    if not final and "<tool_call>".startswith(rest.strip()) and rest.strip():
        rest = ""
    return calls, rest, None


_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)


def _hermes_call(body: str) -> ToolCall | None:
    if body.startswith("<function="):
        match = _FUNCTION.match(body)
        if not match:
            return None
        arguments = {}
        for key, value in _PARAMETER.findall(match.group(2)):
            try:
                arguments[key] = json.loads(value)
            except json.JSONDecodeError:
                arguments[key] = value
        return ToolCall(match.group(1), json.dumps(arguments, ensure_ascii=False))
    decoded = _decode_json(body, 0)
    if decoded is None or body[decoded[1]:].strip():
        return None
    return _raw_call(body) or _call_from_object(decoded[0])


# {"name": N, "arguments": ... as most models write a call: the arguments can stream
_NAMED_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _raw_call(text: str) -> ToolCall | None:
    """The call a whole JSON object `text` holds when it is {"name": N, "arguments": {...}
    ...}, with the arguments as the model wrote them (so they equal what streamed of
    them); None for calls written otherwise."""
    match = _NAMED_CALL.match(text)
    if not match:
        return None
    decoded = _decode_json(text, match.end())
    if decoded is None or not isinstance(decoded[0], dict):
        return None
    return ToolCall(json.loads(f'"{match.group(1)}"'), text[match.end():decoded[1]])


def _partial_call(text: str) -> ToolCall | None:
    """The name and the arguments so far of a {"name": N, "arguments": ... still coming in."""
    match = _NAMED_CALL.match(text)
    if not match:
        return None
    return ToolCall(json.loads(f'"{match.group(1)}"'), _json_value_prefix(text[match.end():]))


def _json_value_prefix(text: str) -> str:
    """The start of text that belongs to the JSON object or array it begins with: all of it
    while the value is open, up to its closing bracket once it closed."""
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                return text[:i + 1]
    return text


def _parse_json_calls(section: str, final: bool, after_tag: str = ""):
    """JSON call objects one after another (Llama 3 separates them with ';'), after an
    optional <|python_tag|>; generic's {"tool_calls": [...]} / {"tool_call": ...} /
    {"response": "..."} wrappers too."""
    pos = len(after_tag) if after_tag and section.startswith(after_tag) else 0
    calls, content, partial = [], "", None
    while True:
        decoded = _decode_json(section, pos)
        if decoded is None:
            if not final:
                partial = _partial_call(section[pos:])
            break
        begin, (value, pos) = pos, decoded
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            found = [_call_from_object(c) for c in value["tool_calls"]]
        elif isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
            found = [_call_from_object(value["tool_call"])]
        elif isinstance(value, dict) and isinstance(value.get("response"), str) and len(value) == 1:
            found, content = [], value["response"]
        else:
            found = [_raw_call(section[begin:pos]) or _call_from_object(value)]
        if any(c is None for c in found):
            return None, "", None
        calls += found
        while pos < len(section) and (section[pos].isspace() or section[pos] == ";"):
            pos += 1
        if pos >= len(section) or section[pos] != "{":
            break
    rest = section[pos:]
    if not calls and not content:
        return None, "", partial
    if not final and (rest.strip() in ("", ";") or rest.lstrip().startswith("{")):
        rest = ""  # a separator, or the next call coming in
    return calls, content + rest, partial


def _parse_llama3(section: str, final: bool):
    return _parse_json_calls(section, final, "<|python_tag|>")


def _parse_mistral(section: str, final: bool):
    """[TOOL_CALLS][{...}, ...] or [TOOL_CALLS]name[ARGS]{...} (repeated)."""
    calls, pos = [], 0
    while section.startswith("[TOOL_CALLS]", pos):
        found = _mistral_calls(section, pos + len("[TOOL_CALLS]"))
        if found is None:  # incomplete, or not a call: the text from here is content
            if not final:
                return calls, "", _mistral_partial(section, pos + len("[TOOL_CALLS]"))
            return (calls, section[pos:], None) if calls else (None, "", None)
        calls += found[0]
        pos = found[1]
        while pos < len(section) and section[pos].isspace():
            pos += 1
        if not final and pos < len(section) and "[TOOL_CALLS]".startswith(section[pos:]):
            return calls, "", None
    return calls, section[pos:], None


def _mistral_calls(section: str, pos: int) -> tuple[list[ToolCall], int] | None:
    """The calls after one [TOOL_CALLS] and where they end; None when there are none."""
    decoded = _decode_json(section, pos)
    if decoded is not None and isinstance(decoded[0], list):
        found = [_call_from_object(c) for c in decoded[0]]
        if not found or any(c is None for c in found):
            return None
        return found, decoded[1]
    args_at = section.find("[ARGS]", pos)
    if args_at < 0:
        return None
    name, _, call_id = section[pos:args_at].partition("[CALL_ID]")
    begin = args_at + len("[ARGS]")
    decoded = _decode_json(section, begin)
    if not name.strip() or decoded is None or not isinstance(decoded[0], dict):
        return None
    arguments = section[begin:decoded[1]].lstrip()  # as written: what streamed of them
    return [ToolCall(name.strip(), arguments, call_id.strip() or None)], decoded[1]


def _mistral_partial(section: str, pos: int) -> ToolCall | None:
    """name[ARGS]{... still coming in: its name and arguments so far."""
    args_at = section.find("[ARGS]", pos)
    if args_at < 0:
        return None
    name, _, call_id = section[pos:args_at].partition("[CALL_ID]")
    arguments = _json_value_prefix(section[args_at + len("[ARGS]"):].lstrip())
    return ToolCall(name.strip(), arguments, call_id.strip() or None) if name.strip() else None


def _parse_deepseek(section: str, final: bool):
    """[<｜tool▁calls▁begin｜>] <｜tool▁call▁begin｜>...<｜tool▁call▁end｜> (repeated)
    [<｜tool▁calls▁end｜>]."""
    calls = []
    pos = len(DS_CALLS) if section.startswith(DS_CALLS) else 0
    while True:
        rest = section[pos:].lstrip()
        if not rest.startswith(DS_CALL):
            break
        begin = len(section) - len(rest) + len(DS_CALL)
        end = section.find(DS_CALL_END, begin)
        if end < 0:
            if not final:
                return calls, "", None
            end = len(section)
        call = _deepseek_call(section[begin:end])
        if call is None:
            return (calls, section[pos:], None) if calls else (None, "", None)
        calls.append(call)
        pos = min(len(section), end + len(DS_CALL_END))
    rest = section[pos:].lstrip()
    if rest.startswith(DS_CALLS_END):
        rest = rest[len(DS_CALLS_END):]
    elif not final and (DS_CALLS_END.startswith(rest) or DS_CALL.startswith(rest)):
        rest = ""
    return calls, rest, None


_FENCED = re.compile(r"\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def _deepseek_call(body: str) -> ToolCall | None:
    """function<｜tool▁sep｜>N\n```json\n{...}\n``` (R1) or N<｜tool▁sep｜>{...} (V3.1)."""
    left, sep, right = body.partition(DS_SEP)
    if not sep:
        return None
    if left.strip() == "function":
        name, _, fenced = right.partition("\n")
        match = _FENCED.match(fenced)
        arguments = match.group(1) if match else fenced.strip()
    else:
        name, arguments = left, right.strip()
    decoded = _decode_json(arguments, 0)
    if not name.strip() or decoded is None or not isinstance(decoded[0], dict):
        return None
    return ToolCall(name.strip(), arguments[:decoded[1]].strip())


_SECTION_PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral,
                    "deepseek": _parse_deepseek, "generic": _parse_json_calls}


# --- harmony (gpt-oss) --------------------------------------------------------------------------

_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=<\||\s|$)")


def _parse_harmony(text: str, final: bool, extract_reasoning: bool) -> Parsed:
    """The answer as harmony messages: the prompt ends with `<|start|>assistant`, so the
    first header comes without it. Each message: header <|message|> body, ended by <|end|>,
    <|call|> or <|return|> (or the end of the text). Channel analysis: thinking; final and
    a commentary without recipient: the answer; a recipient functions.N: a call of N."""
    out = Parsed()
    pos = 0
    while pos < len(text):
        body_at = text.find("<|message|>", pos)
        if body_at < 0:  # a header still coming in (or a stray text without one)
            if final:
                out.content += _strip_markup(text[pos:])
            break
        header = text[pos:body_at]
        body_at += len("<|message|>")
        ends = [(i, m) for m in _HARMONY_ENDS if (i := text.find(m, body_at)) >= 0]
        end, marker = min(ends) if ends else (len(text), "")
        body = text[body_at:end]
        complete = bool(marker) or final
        channel = re.search(r"<\|channel\|>(\w+)", header)
        channel = channel.group(1) if channel else ""
        recipient = _RECIPIENT.search(header)
        recipient = recipient.group(1) if recipient else ""
        if recipient.startswith("functions."):
            name = recipient[len("functions."):]
            if not complete:
                out.partial = ToolCall(name, _json_value_prefix(held_back(body, _HARMONY_ENDS).lstrip()))
                break
            arguments = _json_value_prefix(body.lstrip()) or "{}"
            if _arguments_text(arguments) is None:
                out.content += body  # not JSON: say what the model wrote
            else:
                out.calls.append(ToolCall(name, arguments))
        else:
            shown = body if complete else held_back(body, _HARMONY_ENDS)
            if channel == "analysis":
                if extract_reasoning:
                    out.reasoning += shown
                else:
                    out.content += header + "<|message|>" + shown + (marker if complete else "")
            elif not recipient:  # final, or commentary meant for the user
                out.content += shown
        if not marker:
            break
        pos = end + len(marker)
        if text.startswith("<|start|>", pos):
            pos += len("<|start|>")
        elif not "<|start|>".startswith(text[pos:]) or final:
            if text[pos:].strip():
                out.content += _strip_markup(text[pos:]) if final else ""
            break
        else:
            break
    return out


def _strip_markup(text: str) -> str:
    return re.sub(r"<\|[a-z_]+\|>", "", text)
