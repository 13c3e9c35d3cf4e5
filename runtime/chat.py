"""Chat templates: a conversation -> the prompt text a model was trained on.

A template is Jinja2 source that ships in the model file (`tokenizer.chat_template`), so
it is untrusted input: it is rendered in jinja2's ImmutableSandboxedEnvironment, with two
changes that make a probe fail loudly instead of quietly:

- touching an unsafe attribute (`''.__class__`, `cycler.__init__.__globals__`,
  `messages.append`...) raises at once. Stock jinja2 returns an Undefined that renders as
  an empty string, so a template could probe the sandbox and carry on.
- `*` and `**` refuse results that would eat the memory or the CPU (`'x' * 10**10`,
  `2 ** 2 ** 40`), and the rendered text has a size cap. (A template can still loop for
  long: jinja2 has no time limit; range() is capped at 100,000 items per call.)

Otherwise it renders exactly as Hugging Face transformers does (apply_chat_template):
trim_blocks and lstrip_blocks, the loopcontrols extension, `{% generation %}` blocks
accepted and ignored, a `tojson` filter like HF's (no HTML escaping, ensure_ascii=False,
indent), and the helpers real templates call: raise_exception(msg), strftime_now(fmt),
bos_token, eos_token, add_generation_prompt, tools/documents (None unless given).

Models without a template get a built-in one chosen by architecture (see builtin_name).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = ["ChatTemplate", "ChatTemplateError", "validate_messages", "builtin_name",
           "BUILTIN_TEMPLATES", "ROLES"]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")

MAX_OUTPUT_CHARS = 16 * 2**20  # a rendered prompt is at most a context's worth of text
MAX_REPEAT_ITEMS = 2**20  # `seq * n` results
MAX_INT_BITS = 2**16  # `a ** b` and `a * b` results on integers


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded, that refuses a conversation (its
    raise_exception), that fails on it, or that tried something the sandbox forbids."""


# --- the sandbox -------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Sandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment that raises on unsafe attributes and huge arithmetic."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            "objects is not allowed")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        if operator == "*":
            if _is_int(left) and _is_int(right):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise SecurityError("integer product too large")
            else:
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                repeatable = isinstance(seq, (str, list, tuple)) and _is_int(n)
                if repeatable and len(seq) * n > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"repeating a {type(seq).__name__} {n} times is too large")
        return super().call_binop(context, operator, left, right)


class _NoTemplateFiles(jinja2.BaseLoader):
    """include / import / extends: a chat template is one string and reads no files."""

    def get_source(self, environment, template):
        raise SecurityError(f"a chat template cannot load other templates ({template!r})")


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: HF templates mark the assistant's text
    with it (for training masks); rendering a prompt ignores the tag."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any = "") -> None:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, loader=_NoTemplateFiles(),
                   extensions=["jinja2.ext.loopcontrols", _GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


# --- messages ----------------------------------------------------------------------------------

def validate_messages(messages: Any) -> list[dict]:
    """Check an OpenAI-style message list; new dicts with `content` always a string.

    Content may be a string or a list of {"type": "text", "text": ...} parts (joined with
    newlines, as llama.cpp's server does); an assistant message that carries tool_calls may
    have no content. Other keys (tool_calls, name, tool_call_id...) pass through for the
    templates that use them. A ValueError says which message and what is wrong.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {role, content} objects, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must hold at least one message")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ValueError(f"{where}.content[{j}] must be a text part "
                                     '{"type": "text", "text": ...} (this model reads text '
                                     f"only), got {kind!r}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        checked.append({**message, "role": role, "content": content})
    return checked


# --- templates ---------------------------------------------------------------------------------

class ChatTemplate:
    """A chat template: Jinja2 source plus the BOS/EOS strings it may write."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom"):
        if not isinstance(source, str):
            raise ChatTemplateError("a chat template is Jinja2 source text, "
                                    f"got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name  # where it came from: "tokenizer.chat_template", "builtin:gemma"...
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template has a syntax error on line {e.lineno}: "
                                    f"{e.message}") from None
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template was refused: {e}") from None
        except Exception as e:  # e.g. nesting too deep for the compiler
            raise ChatTemplateError("the chat template cannot be compiled: "
                                    f"{type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation. extra: template variables some templates
        read (tools, documents, enable_thinking, date_string...)."""
        context = {"tools": None, "documents": None, "bos_token": self.bos_token,
                   "eos_token": self.eos_token, **extra,
                   "messages": validate_messages(messages),
                   "add_generation_prompt": bool(add_generation_prompt)}
        pieces, size = [], 0
        try:
            for piece in self._template.generate(context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(
                        f"the chat template wrote more than {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(
                f"the chat template tried something the sandbox forbids: {e}") from None
        except Exception as e:
            raise ChatTemplateError(f"the chat template failed on this conversation: "
                                    f"{type(e).__name__}: {e}") from None
        return "".join(pieces)

    def drop_leading_bos(self, text: str) -> str:
        """text without the BOS the template wrote at its start: for a tokenizer that adds
        BOS itself, so the prompt holds one (llama.cpp does the same)."""
        if self.bos_token and text.startswith(self.bos_token):
            return text[len(self.bos_token):]
        return text

    @classmethod
    def for_model(cls, metadata: Mapping[str, Any]) -> ChatTemplate:
        """The model's own template (GGUF `tokenizer.chat_template`) or, when it has none or
        it does not compile, the built-in one for its architecture."""
        bos = _token_text(metadata, "tokenizer.ggml.bos_token_id")
        eos = _token_text(metadata, "tokenizer.ggml.eos_token_id")
        source = metadata.get("tokenizer.chat_template")
        fallback = builtin_name(metadata)
        if isinstance(source, str) and source.strip():
            try:
                return cls(source, bos, eos, name="tokenizer.chat_template")
            except ChatTemplateError as e:
                log.warning("%s; using the built-in %s template instead", e, fallback)
        return cls(BUILTIN_TEMPLATES[fallback], bos, eos, name=f"builtin:{fallback}")


def _token_text(metadata: Mapping[str, Any], key: str) -> str:
    """The text of the token whose id metadata[key] holds; '' when unknown."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_id = metadata.get(key)
    if tokens is None or token_id is None:
        return ""
    token_id = int(token_id)
    return str(tokens[token_id]) if 0 <= token_id < len(tokens) else ""


# --- built-in templates ------------------------------------------------------------------------

GEMMA_ARCHITECTURES = {"gemma", "gemma2", "gemma3", "gemma3n"}
LLAMA3_HEADER_ID = 128006  # <|start_header_id|> in Llama 3's vocabulary


def builtin_name(metadata: Mapping[str, Any]) -> str:
    """Which built-in template suits a model: gemma for Gemma, llama3 for a Llama with
    Llama 3's vocabulary, chatml for everything else (Qwen 2/3 included)."""
    arch = str(metadata.get("general.architecture", ""))
    if arch in GEMMA_ARCHITECTURES:
        return "gemma"
    if arch == "llama" and _has_llama3_vocabulary(metadata):
        return "llama3"
    return "chatml"


def _has_llama3_vocabulary(metadata: Mapping[str, Any]) -> bool:
    if metadata.get("tokenizer.ggml.pre") == "llama-bpe":  # llama.cpp's name for Llama 3's
        return True
    tokens = metadata.get("tokenizer.ggml.tokens")
    return (tokens is not None and len(tokens) > LLAMA3_HEADER_ID
            and tokens[LLAMA3_HEADER_ID] == "<|start_header_id|>")


BUILTIN_TEMPLATES = {
    # Gemma's turns; "assistant" is "model"; the system prompt opens the first user turn
    # (Gemma has no system role), as the Gemma 3 instruct models' own template does.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{% set first_user_prefix = '' %}"
        "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Meta-Llama-3-8B-Instruct's own template
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # ChatML, as transformers' former default template
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
