"""Tool calls in a model's output: which format a model writes them in (detect_format), and
how a model whose template does not show the tools is told of them. The parsers that turn
its text back into OpenAI's `tool_calls` are runtime/tool_call_parsers.py's; the grammar of
a call tool_choice forces is runtime/tool_call_grammar.py's.

Each family of models was trained to call tools its own way; the chat template shows which
(as llama.cpp's common/chat.cpp tells them apart):

  hermes   Hermes 2/3, Qwen 2.5/3:   <tool_call>{"name": N, "arguments": {...}}</tool_call>
           Qwen3-Coder, Qwen 3.5:    <tool_call><function=N><parameter=K>V</parameter></function></tool_call>
  llama3   Llama 3.1-3.3:            {"name": N, "parameters": {...}}  (or after <|python_tag|>)
  mistral  Mistral Nemo/Small:       [TOOL_CALLS][{"name": N, "arguments": {...}, "id": I}]
           newer Mistral templates:  [TOOL_CALLS]N[ARGS]{...}  (optionally N[CALL_ID]I[ARGS]{...})
  harmony  gpt-oss:                  <|channel|>commentary to=functions.N <|constrain|>json<|message|>{...}<|call|>
           (the whole answer is harmony messages: analysis is thinking, final the answer)
  deepseek DeepSeek R1 (distills):   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N
                                     ```json {...} ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
           DeepSeek V3.1:            ...<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...
  generic  any other template: the tools are described in a system message and the model is
           asked to answer {"tool_calls": [{"name": N, "arguments": {...}}]} or {"response": "..."}
"""

from __future__ import annotations

import json
import re
import secrets
import string
from functools import lru_cache

FORMATS = ("hermes", "llama3", "mistral", "harmony", "deepseek", "generic")

# formats whose markers are control tokens: the generation must spell them out
SPELLS_SPECIAL_TOKENS = {"llama3", "mistral", "harmony", "deepseek"}

# formats whose templates show calls but not the tools: the model is told about the tools
# in a system message and calls them its own way
KNOWS_ITS_FORMAT_UNTOLD = {"deepseek"}

# DeepSeek's markers
DS_CALLS, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@lru_cache(maxsize=16)
def detect_format(template_source: str) -> str:
    """The tool-call format of a chat template's model (see the module's docstring)."""
    src = template_source or ""
    if "<|channel|>" in src:
        return "harmony"
    if "[TOOL_CALLS]" in src:
        return "mistral"
    if DS_CALLS in src:
        return "deepseek"
    if "<tool_call>" in src:
        return "hermes"
    if "<|start_header_id|>" in src and ("<|python_tag|>" in src or "ipython" in src):
        return "llama3"
    return "generic"


def template_renders_tools(template_source: str) -> bool:
    """Whether a template reads the `tools` variable (else the server describes them)."""
    return bool(re.search(r"\btools\b", template_source or ""))


def new_call_id(fmt: str) -> str:
    """An id for a call the model did not name: Mistral's templates insist on 9 letters or
    digits; others take OpenAI's call_ form."""
    alphabet = string.ascii_letters + string.digits
    if fmt == "mistral":
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def tools_prompt(tools: list[dict], fmt: str) -> str:
    """The system text that tells a model whose template does not show tools about them:
    for a model with no tool format of its own, also how to call them (generic JSON)."""
    described = json.dumps([t["function"] for t in tools], ensure_ascii=False, indent=1)
    text = ("You can call these functions (each given with the JSON schema of its parameters):\n"
            f"{described}")
    if fmt != "generic":  # the model knows its own way of calling them
        return text
    return (f"{text}\n\nTo call one or more of them, answer with only a JSON object:\n"
            '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}\n'
            "Otherwise answer normally.")
