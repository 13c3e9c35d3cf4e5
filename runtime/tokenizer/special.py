"""Special tokens: cutting text around them (llama.cpp's tokenizer_st_partition), giving
message text back where it must not be parsed, the end-of-generation ids, and the
whitespace some of them swallow (lstrip/rstrip)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from runtime.tokenizer.vocab import (
    TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, Vocab, metadata_id,
    metadata_text)

# What C's isspace() strips around lstrip/rstrip special tokens (llama.cpp uses it on bytes).
_C_SPACES = " \t\n\v\f\r"

# Texts llama.cpp recognises when the metadata does not name the token (llama-vocab.cpp).
_EOT_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
))
_EOM_TEXTS = frozenset(("<|eom_id|>",))
_FIM_PAD_TEXTS = frozenset(("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"))
_FIM_REP_TEXTS = frozenset(("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"))
_FIM_SEP_TEXTS = frozenset(("<|file_sep|>",))
# Tokens that end a generation whatever the metadata says.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
# gpt-oss: llama.cpp always renders these, as user-defined tokens.
_ALWAYS_RENDERED_TEXTS = frozenset(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"))


def end_of_generation_ids(metadata: Mapping, vocab: Vocab,
                          eos_id: int | None) -> frozenset[int]:
    """llama.cpp's special_eog_ids: named ids plus tokens recognised by their text.

    Tokens recognised by text become control tokens (llama.cpp does the same), so they are
    parsed only with parse_special and hidden from plain decoding.
    """
    n = len(vocab)
    types = vocab.types

    def make_control(tid: int | None) -> None:
        if tid is not None and types[tid] != TOKEN_CONTROL:
            types[tid] = TOKEN_CONTROL

    def named_or_found(key: str, texts: frozenset[str]) -> int | None:
        tid = metadata_id(metadata, key, n)
        if tid is None:
            tid = vocab.find_first(texts)
            make_control(tid)
        return tid

    eot_id = named_or_found("tokenizer.ggml.eot_token_id", _EOT_TEXTS)
    eom_id = named_or_found("tokenizer.ggml.eom_token_id", _EOM_TEXTS)
    eog = set()
    for key, texts in (("fim_pad", _FIM_PAD_TEXTS), ("fim_rep", _FIM_REP_TEXTS),
                       ("fim_sep", _FIM_SEP_TEXTS)):
        tid = named_or_found(f"tokenizer.ggml.{key}_token_id", texts)
        if tid is not None:
            eog.add(tid)
    for text in _EOG_TEXTS:
        tid = vocab.id_of(text)
        if tid is not None:
            eog.add(tid)
            make_control(tid)
    for text in _ALWAYS_RENDERED_TEXTS:
        tid = vocab.id_of(text)
        if tid is not None:
            types[tid] = TOKEN_USER_DEFINED
    eog.update(tid for tid in (eos_id, eot_id, eom_id) if tid is not None)

    def eog_id_of(*texts: str) -> int | None:
        ids = [vocab.id_of(t) for t in texts]
        return next((tid for tid in ids if tid in eog), None)

    # Harmony (gpt-oss) and solar-open: <|end|> ends a message, not the generation.
    end_id = eog_id_of("<|end|>")
    if end_id is not None and eog_id_of("<|call|>", "<|calls|>") is not None and (
            eog_id_of("<|return|>") is not None or eog_id_of("<|flush|>") is not None):
        eog.discard(end_id)
        types[end_id] = TOKEN_USER_DEFINED
    # Gemma 4 / PaddleOCR: </s> is an ordinary token there.
    s_id = eog_id_of("</s>")
    if s_id is not None and eog_id_of("<|tool_response>") is not None:
        eog.discard(s_id)
        types[s_id] = TOKEN_NORMAL
    return frozenset(eog)


def strip_attributes(metadata: Mapping, vocab: Vocab) -> None:
    """llama.cpp's per-token lstrip/rstrip, which the GGUF does not carry: it sets them
    by substrings of general.name (lowercased), tokenizer.ggml.pre and the architecture."""
    name = (metadata_text(metadata.get("general.name")) or "").lower()
    pre = metadata_text(metadata.get("tokenizer.ggml.pre")) or ""
    arch = metadata_text(metadata.get("general.architecture")) or ""

    def ids(*texts: str) -> set[int]:
        return {tid for tid in map(vocab.id_of, texts) if tid is not None}

    if any(key in pre for key in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(key in arch for key in ("nomic-bert-moe", "jina-bert-v3")):
        vocab.lstrip_ids = frozenset(ids("<mask>"))
    elif "phi-3" in name or "phi3" in name:  # every special token, but these three
        special = {TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN}
        rstrip = {tid for tid, kind in enumerate(vocab.types) if kind in special}
        vocab.rstrip_ids = frozenset((rstrip | ids("</s>")) - ids("<unk>", "<s>",
                                                                  "<|endoftext|>"))
    elif "modern-bert" in name:
        vocab.lstrip_ids = frozenset(ids("[MASK]"))


def partition(vocab: Vocab, text: str, parse_special: bool) -> list[str | int]:
    """Cut text around special tokens (llama.cpp's tokenizer_st_partition)."""
    if not text:
        return []
    fragments: list[str | int] = [text]
    for _, tid, piece in vocab.specials_in(text, parse_special):
        lstrip, rstrip = tid in vocab.lstrip_ids, tid in vocab.rstrip_ids
        split: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int) or piece not in fragment:
                split.append(fragment)
                continue
            parts = fragment.split(piece)
            for i, part in enumerate(parts):
                if i:
                    split.append(tid)
                    if rstrip:
                        part = part.lstrip(_C_SPACES)
                if lstrip and i < len(parts) - 1:
                    part = part.rstrip(_C_SPACES)
                if part:
                    split.append(part)
        fragments = split
    return fragments


def unparse_in(vocab: Vocab, text: str, fragments: list[str | int],
               spans: Sequence[tuple[int, int]]) -> list[str | int]:
    """fragments with each control/unknown token that overlaps a span turned back into
    its text, as parse_special=False would have left it: the text from the token before
    to the token after that stay (with any whitespace an unparsed token had swallowed
    given back), then cut at user-defined tokens only."""
    placed = []  # (start, end, fragment, stays a token) in text
    pos = 0
    for fragment in fragments:
        piece = fragment if isinstance(fragment, str) else vocab.text(fragment)
        while pos < len(text) and not text.startswith(piece, pos):  # whitespace an
            # lstrip/rstrip token swallowed
            pos += 1
        end = pos + len(piece)
        stays = isinstance(fragment, int) and (
            vocab.types[fragment] == TOKEN_USER_DEFINED
            or not any(start < end and pos < stop for start, stop in spans))
        placed.append((pos, end, fragment, stays))
        pos = end
    if all(stays or isinstance(fragment, str) for _, _, fragment, stays in placed):
        return fragments
    out: list[str | int] = []
    run_start = 0  # where the text after the last token that stays begins
    for i, (start, end, fragment, stays) in enumerate(placed):
        if not stays:
            continue
        if fragment in vocab.lstrip_ids:  # it swallowed the whitespace before it
            run_end = placed[i - 1][1] if i else 0
        else:
            run_end = start
        if run_start < run_end:
            out.extend(partition(vocab, text[run_start:run_end], False))
        out.append(fragment)
        run_start = end
        if fragment in vocab.rstrip_ids:  # and the whitespace after it
            run_start = placed[i + 1][0] if i + 1 < len(placed) else len(text)
    if run_start < len(text):
        out.extend(partition(vocab, text[run_start:], False))
    return out
