"""Chat templates: a conversation -> the prompt, text and tokens, a model was trained on.

A template is Jinja2 source that ships in the model file (`tokenizer.chat_template`), so it
is untrusted code: it runs in a sandbox (runtime.chat_sandbox: jinja2's immutable sandbox,
rendering as Hugging Face transformers does) inside a separate process bounded in time and
memory (runtime.chat_worker says why a process). A template that goes over a limit gets a
ChatTemplateLimitError (the server answers 400); one that does so when the model loads (or
does not compile) is replaced by the built-in template for the architecture, with a warning.

Message text never becomes control tokens: the tokens of a prompt read the template's own
markers (`<start_of_turn>`...) as special tokens and the text that came from the messages
as plain text (llama.cpp's parse_special=false), so a user who types `<end_of_turn>` cannot
close their turn and open the model's. Where message text landed comes from the sandbox
(it renders with placeholders); for a template that rewrites message text beyond stripping
it, that is unknown, and a message holding a control token's text is refused instead.

Models without a template get a built-in one chosen by architecture (see builtin_name).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.chat_worker import (RENDER_MEMORY_BYTES, ChatTemplateError, ChatTemplateLimitError,
                                 renderer)

__all__ = ["ChatTemplate", "ChatTemplateError", "ChatTemplateLimitError", "Prompt",
           "validate_messages", "builtin_name", "BUILTIN_TEMPLATES", "ROLES"]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
TRIAL_CONVERSATION = [{"role": "user", "content": "Hello"}]  # rendered once at load


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

_PREFIXES = {"sandbox": "the chat template tried something the sandbox forbids: ",
             "compile": "the chat template cannot be compiled: ",
             "failed": "the chat template failed on this conversation: "}


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text, and where in it the messages' text landed ([start, end)
    spans; None when the template rewrote message text too much to tell)."""

    text: str
    message_spans: list[tuple[int, int]] | None
    message_strings: list[str]  # every string the messages held (roles aside)

    def tokens(self, tokenizer) -> list[int]:
        """The prompt's token ids (BOS as the tokenizer adds it): the template's markers
        as special tokens, the messages' text as plain text."""
        if self.message_spans is not None:
            return tokenizer.encode(self.text, literal_spans=self.message_spans)
        for text in self.message_strings:
            if tokenizer.encode(text, False, True) != tokenizer.encode(text, False, False):
                raise ChatTemplateError(
                    "a message holds the text of one of the model's control tokens, and this "
                    "model's chat template rewrites messages in a way that cannot keep it "
                    "apart from its own markers; remove it from the message")
        return tokenizer.encode(self.text)


def _message_strings(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [s for k, v in value.items() if k not in ("role", "type")
                for s in _message_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _message_strings(v)]
    return [value] if isinstance(value, str) and value else []


class ChatTemplate:
    """A chat template: Jinja2 source plus the BOS/EOS strings it may write. Making one
    compiles it in the renderer (a ChatTemplateError when it does not compile)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom",
                 *, check: bool = True):
        if not isinstance(source, str):
            raise ChatTemplateError("a chat template is Jinja2 source text, "
                                    f"got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._name = name  # where it came from: "tokenizer.chat_template", "builtin:gemma"...
        self._settled = threading.Event()  # for_model's check at load is done
        self._settled.set()
        if check:
            self._call({"op": "compile", "source": source})

    @property
    def name(self) -> str:
        self._settled.wait()
        return self._name

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    def _call(self, request: dict) -> dict:
        """One request to the renderer; its failures as ChatTemplateErrors."""
        answer = renderer().call(request)
        error, message = answer.get("error"), answer.get("message", "")
        if error is None:
            return answer
        if error == "memory":
            raise ChatTemplateLimitError(f"the chat template needed more than the "
                                         f"{RENDER_MEMORY_BYTES >> 20} MB memory limit and was "
                                         "stopped")
        if error == "sandbox" and request["op"] == "compile":
            message = f"the chat template was refused: {message}"
        elif error in _PREFIXES:
            message = _PREFIXES[error] + message
        raise ChatTemplateError(message, error)  # syntax, raised (its raise_exception), output

    def _render(self, messages: list[dict], add_generation_prompt: bool, find_spans: bool,
                extra: dict) -> dict:
        self._settled.wait()
        context = {"tools": None, "documents": None, "bos_token": self.bos_token,
                   "eos_token": self.eos_token, **extra,
                   "messages": validate_messages(messages),
                   "add_generation_prompt": bool(add_generation_prompt)}
        return self._call({"op": "render", "source": self.source, "context": context,
                           "find_spans": find_spans})

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation. extra: template variables some templates
        read (tools, documents, enable_thinking, date_string...)."""
        return self._render(messages, add_generation_prompt, False, extra)["text"]

    def prompt(self, messages: list[dict], add_generation_prompt: bool = True,
               **extra: Any) -> Prompt:
        """The prompt for a conversation, with where its messages' text landed; without
        the BOS the template wrote at its start (the tokenizer adds its own)."""
        answer = self._render(messages, add_generation_prompt, True, extra)
        text, spans = answer["text"], answer["spans"]
        cut = len(text) - len(self.drop_leading_bos(text))
        if spans is not None:
            spans = [(max(start, cut) - cut, end - cut) for start, end in spans if end > cut]
        return Prompt(text[cut:], spans, _message_strings(validate_messages(messages)))

    def drop_leading_bos(self, text: str) -> str:
        """text without the BOS the template wrote at its start: for a tokenizer that adds
        BOS itself, so the prompt holds one (llama.cpp does the same)."""
        if self.bos_token and text.startswith(self.bos_token):
            return text[len(self.bos_token):]
        return text

    @classmethod
    def for_model(cls, metadata: Mapping[str, Any]) -> ChatTemplate:
        """The model's own template (GGUF `tokenizer.chat_template`) or the built-in one for
        its architecture: when the model has none, or when its template does not compile,
        or goes over a limit or breaks the sandbox on a trial conversation. That check runs
        in the background (a launch does not wait for the renderer to start); renders wait
        for it."""
        bos = _token_text(metadata, "tokenizer.ggml.bos_token_id")
        eos = _token_text(metadata, "tokenizer.ggml.eos_token_id")
        source = metadata.get("tokenizer.chat_template")
        fallback = builtin_name(metadata)
        if not (isinstance(source, str) and source.strip()):
            return cls(BUILTIN_TEMPLATES[fallback], bos, eos, name=f"builtin:{fallback}",
                       check=False)
        template = cls(source, bos, eos, name="tokenizer.chat_template", check=False)
        template._settled.clear()
        threading.Thread(target=template._check_at_load, args=(fallback,), daemon=True,
                         name="chat template check").start()
        return template

    def _check_at_load(self, fallback: str) -> None:
        try:
            self._call({"op": "compile", "source": self.source})
            self._call({"op": "render", "source": self.source, "find_spans": False,
                        "context": {"tools": None, "documents": None, "bos_token": self.bos_token,
                                    "eos_token": self.eos_token, "messages": TRIAL_CONVERSATION,
                                    "add_generation_prompt": True}})
        except ChatTemplateError as e:
            # its own raise_exception or a failure may be about this conversation only; a
            # renderer that cannot start fails every template alike
            if e.kind in ("syntax", "compile", "sandbox", "output", "limit"):
                self._fall_back(str(e) + (" (on a trial conversation)" if e.kind == "limit" else ""),
                                fallback)
        finally:
            self._settled.set()

    def _fall_back(self, why: str, fallback: str) -> None:
        log.warning("%s; using the built-in %s template instead", why, fallback)
        self.source = BUILTIN_TEMPLATES[fallback]
        self._name = f"builtin:{fallback}"


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
