"""Thinking in a model's answer: `<think>…</think>` (Qwen3, QwQ, DeepSeek-R1 and its distills)
split from the answer into `reasoning_content`, as llama.cpp's server does.

--reasoning-format (llama.cpp's values): `none` leaves the thinking inline in the content;
`auto` and `deepseek` move it to reasoning_content, streamed too; `deepseek-legacy` keeps the
<think> tags in the content and also fills reasoning_content (streamed: inline only).
--reasoning-budget: -1 thinks freely; 0 asks the template not to think (enable_thinking=false,
which Qwen3's template turns into an empty <think></think>), as llama.cpp's -1 and 0.
(gpt-oss thinks in harmony's analysis channel: runtime/tool_calls.py reads those messages.)
"""

from __future__ import annotations

REASONING_FORMATS = ("auto", "deepseek", "deepseek-legacy", "none")
REASONING_BUDGETS = (-1, 0)
OPEN, CLOSE = "<think>", "</think>"


def template_thinks(template_source: str) -> bool:
    """Whether a chat template is a thinking model's (it writes or reads <think>)."""
    return OPEN in (template_source or "")


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the prompt itself opened the thinking (DeepSeek-R1's template ends its
    generation prompt with <think>): the answer then starts inside it."""
    return prompt_text.rstrip().endswith(OPEN)


def split(text: str, opened: bool, final: bool) -> tuple[str, str]:
    """(reasoning, content) of an answer. opened: the prompt opened <think>. While the
    answer streams (final=False), text that may still be a tag is held back, so each
    partial split is a prefix of the next."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(OPEN):
            if not final and OPEN.startswith(stripped):  # blank, or a tag coming in
                return "", ""
            return "", text
        text = stripped[len(OPEN):]
    end = text.find(CLOSE)
    if end < 0:
        if final:  # thinking that never closed (out of tokens): it is still thinking
            return text.lstrip(), ""
        return held_back(text, (CLOSE,)).lstrip(), ""
    return text[:end].lstrip(), text[end + len(CLOSE):].lstrip()


def held_back(text: str, markers: tuple[str, ...]) -> str:
    """text without an ending that could still grow into one of the markers."""
    longest = max((len(m) for m in markers), default=0)
    for i in range(max(0, len(text) - longest + 1), len(text)):
        if any(m.startswith(text[i:]) for m in markers):
            return text[:i]
    return text
