"""Thinking in a model's answer: `<think>…</think>` (Qwen3, QwQ, DeepSeek-R1 and its distills)
split from the answer into `reasoning_content`, as llama.cpp's server does.

--reasoning-format (llama.cpp's values): `none` leaves the thinking inline in the content;
`auto` and `deepseek` move it to reasoning_content, streamed too; `deepseek-legacy` keeps the
<think> tags in the content and also fills reasoning_content (streamed: inline only).
--reasoning-budget N (llama.cpp's, and its per-request reasoning_budget_tokens): -1 thinks
freely; N >= 0 lets the thinking run N tokens, after which the end of thinking is forced:
the tokens of --reasoning-budget-message, then the end tag (ThinkingBudget). 0 also asks the
template not to think (enable_thinking=false, which Qwen3's template turns into an empty
<think></think>); a model that thinks anyway is closed at once.
Under a grammar (response_format, grammar, a forced tool call) the thinking is free text
and the grammar constrains the answer after it, as llama.cpp's server does: ThinkingBudget
then also says when the grammar waits (while the model thinks) and which tokens it allows
beside the grammar's (the one that opens the thinking, first; a few blanks after it, as
llama.cpp's grammars allow space there), and the budget bounds the thinking as without one.
(gpt-oss thinks in harmony's analysis channel: runtime/tool_call_parsers.py reads those messages;
its budget counts an analysis message's tokens and forces its <|end|>.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

REASONING_FORMATS = ("auto", "deepseek", "deepseek-legacy", "none")
OPEN, CLOSE = "<think>", "</think>"
# harmony (gpt-oss): thinking is an analysis message; the end of a message ends it
HARMONY_OPEN, HARMONY_CLOSE = "<|channel|>analysis<|message|>", "<|end|>"


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


# --- the reasoning budget ---------------------------------------------------------------------

def thinking_tags(template_source: str, harmony: bool) -> tuple[str, str] | None:
    """(start, end) of a model's thinking as its template writes them; None for a model
    that does not think (a budget then has nothing to count)."""
    if harmony:
        return HARMONY_OPEN, HARMONY_CLOSE
    if template_thinks(template_source):
        return OPEN, CLOSE
    return None


@dataclass(frozen=True)
class ReasoningBudget:
    """A request's budget in tokens (llama.cpp's reasoning-budget sampler): `tokens` thinking
    tokens at most (-1: no bound; the thinking is only followed, for a grammar that waits for
    its end), counted from a `start` sequence (or from the first token when the prompt
    opened the thinking); an `end` sequence closes the thinking naturally; when the budget is
    spent, `forced` (the message's tokens, then `end`) is written token by token."""

    tokens: int
    start: tuple[int, ...]
    end: tuple[int, ...]
    forced: tuple[int, ...]
    opened: bool = False

    @classmethod
    def of(cls, tokens: int, tags: tuple[str, str], message: str, prompt_text: str,
           encode: Callable[..., list[int]]) -> ReasoningBudget:
        """The budget of a chat whose thinking is tagged `tags`, as token ids (encode: the
        model's tokenizer's). The tags are the model's own (special tokens parsed); the
        message is plain text, as any text from a request."""
        start, end = (tuple(encode(tag, add_special=False, parse_special=True)) for tag in tags)
        said = tuple(encode(message, add_special=False, parse_special=False)) if message else ()
        return cls(tokens, start, end, said + end, prompt_text.rstrip().endswith(tags[0]))

    @property
    def precedes_grammar(self) -> bool:
        """Whether the thinking can be told from a grammar's answer token by token: the
        prompt opened it, or its start is one token (<think> in Qwen3's and DeepSeek's
        vocabularies). gpt-oss's analysis header is three tokens, the first of which starts
        its other messages too: under a grammar it does not think."""
        return self.opened or len(self.start) == 1

    def counter(self, token_bytes: Callable[[int], bytes], before_grammar: bool = False,
                blanks: Iterable[int] = ()) -> ThinkingBudget:
        """A fresh count for one generation; token_bytes(id): the token's text (a budget
        never ends inside a character); before_grammar: a grammar constrains the answer
        that follows the thinking (precedes_grammar must hold); blanks: the ids of the
        vocabulary's blank tokens (runtime.constraint.ConstraintVocabulary.blank_ids)."""
        if before_grammar and not self.precedes_grammar:
            raise ValueError("this thinking cannot precede a grammar: its start tag is "
                             f"{len(self.start)} tokens and the prompt did not open it")
        return ThinkingBudget(self, token_bytes, before_grammar, blanks)


IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = "idle", "counting", "waiting-utf8", "forcing", "done"
ANSWERING = "answering"  # before a grammar: its answer began, the thinking cannot open again
# tokens a spent budget waits for the current character: a UTF-8 character has at most 4
# bytes, so a real one is whole within 3 more; bytes that never make one are cut anyway
MAX_UTF8_WAIT = 3
# blank tokens a model may write between the end of its thinking and a grammar's answer
# ("\n\n" after </think> is one token in Qwen's vocabulary, two bytes in others)
MAX_BLANKS = 2


class ThinkingBudget:
    """One generation's thinking, counted token by token (llama.cpp's states): idle until the
    start sequence, counting then (the end sequence ends it: done), once `tokens` are spent
    waiting for the current character to be complete, then forcing `forced` (forced_token
    says which token comes next, accept takes each token generated), done again after it.
    A new start sequence after the end opens a fresh budget (a model may think twice).

    before_grammar: a grammar constrains what follows the thinking. The thinking may then
    open only as the first token, and only once; the grammar waits while the model thinks
    (`grammar_waits`); after the thinking, up to MAX_BLANKS blank tokens may come before the
    answer (`beside_grammar` says which tokens are offered beside the grammar's); any other
    token is the answer's (ANSWERING, for good)."""

    def __init__(self, budget: ReasoningBudget, token_bytes: Callable[[int], bytes],
                 before_grammar: bool = False, blanks: Iterable[int] = ()):
        self.budget, self.token_bytes, self.before_grammar = budget, token_bytes, before_grammar
        self._opening = tuple(budget.start[:1])
        self._blanks, self._n_blanks = tuple(int(t) for t in blanks), 0
        self.state, self.remaining, self.position, self._waited = IDLE, budget.tokens, 0, 0
        self._recent: list[int] = []  # the last tokens, to find a start or end sequence
        self._tail = b""  # the last bytes of the thinking's text, for complete characters
        if budget.opened:
            self._open()

    def forced_token(self) -> int | None:
        """The token the generation must take next, None when it samples freely."""
        return self.budget.forced[self.position] if self.state == FORCING else None

    @property
    def grammar_waits(self) -> bool:
        """The model is thinking: a grammar on its answer does not apply yet."""
        return self.state in (COUNTING, WAITING_UTF8, FORCING)

    def beside_grammar(self) -> tuple[int, ...] | None:
        """Before a grammar: the token ids allowed now beside the grammar's, which are not
        the answer's: the start of the thinking as the first token (not with a budget of
        0), blanks after the thinking; None: the grammar's alone."""
        if self.before_grammar and self.state == IDLE and self.budget.tokens != 0:
            return self._opening
        if self.before_grammar and self.state == DONE and self._n_blanks < MAX_BLANKS:
            return self._blanks
        return None

    def accept(self, token: int) -> None:
        """The token generated (sampled or forced)."""
        if self.before_grammar and self.state in (IDLE, DONE):
            beside = self.beside_grammar()
            if beside is None or token not in beside:
                self.state = ANSWERING
            elif self.state == IDLE:
                self._open()
            else:
                self._n_blanks += 1
            return
        if self.state == ANSWERING:
            return
        self._recent = (self._recent + [token])[-max(len(self.budget.start), len(self.budget.end)):]
        if self.state in (IDLE, DONE):
            if self._ends_with(self.budget.start):
                self._open()
        elif self.state == FORCING:
            self.position += 1
            if self.position == len(self.budget.forced):
                self.state = DONE
                self._recent = []
        elif self._ends_with(self.budget.end):  # counting or waiting: the model closed it
            self.state = DONE
            self._recent = []
        else:
            self._tail = (self._tail + self.token_bytes(token))[-4:]
            if self.state == COUNTING:
                self.remaining -= 1
                if self.remaining == 0:
                    self.state = WAITING_UTF8
            else:
                self._waited += 1
            if self.state == WAITING_UTF8 and (utf8_complete(self._tail)
                                               or self._waited >= MAX_UTF8_WAIT):
                self._force()

    def _open(self) -> None:
        self.state, self.remaining, self._recent, self._tail = COUNTING, self.budget.tokens, [], b""
        self._waited = 0
        if self.remaining == 0:
            self._force()

    def _force(self) -> None:
        self.state, self.position, self._recent = FORCING, 0, []

    def _ends_with(self, sequence: tuple[int, ...]) -> bool:
        return bool(sequence) and tuple(self._recent[-len(sequence):]) == sequence


def utf8_complete(data: bytes) -> bool:
    """Whether data does not end inside a UTF-8 character that more bytes could complete:
    it ends with a whole one, is empty, or ends with continuation bytes that no lead byte
    starts (bytes no character can take: waiting for more would never end)."""
    for i in range(1, min(4, len(data)) + 1):
        byte = data[-i]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character
            return i >= (4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1)
    return True
