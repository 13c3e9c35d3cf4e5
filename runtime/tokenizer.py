# SPM, BPE and WordPiece tokenizers built from GGUF metadata, token for token as llama.cpp
# does it (its whole tokenizer test suite runs in tests/test_tokenizer_llamacpp.py).
#
# Every encode runs in two stages, exactly as llama.cpp's llama_vocab::tokenize:
#
# 1. Special-token partition. The text is cut around the literal text of "special" tokens
#    (control, user-defined and unknown types). They are taken longest first: for each such
#    token in turn, every raw fragment left is split at each of its (non-overlapping, leftmost)
#    occurrences. Control/unknown tokens take part only when parse_special is on; user-defined
#    tokens (Gemma's "\n", "\t", runs of spaces; Qwen's <think>) always do. Only the special
#    tokens that occur in the text are tried: an index by their first few characters finds
#    those candidates without scanning thousands of <unusedN> tokens per call. Some special
#    tokens swallow the whitespace before or after them (lstrip/rstrip: Phi-3's, by model
#    name, as llama.cpp decides; the GGUF does not say).
#
# 2. Each raw fragment is tokenized by the model's algorithm:
#
#    SPM ("llama": Llama 1/2, Mistral, Gemma). Optionally prefix a space (add_space_prefix, and
#    only at the start or right after a special token), replace every space by U+2581, split
#    into characters, then repeatedly merge the adjacent pair whose concatenation is a
#    vocabulary piece with the highest score (leftmost pair on ties). A max-heap of candidate
#    pairs over a linked list of symbols makes this O(n log n); entries made stale by an
#    earlier merge are recognised by their length and skipped. A final symbol that is not a
#    piece (a character outside the vocabulary) falls back to one <0xXX> token per UTF-8 byte.
#    Fragment -> ids results are cached (a chat re-encodes the same lines every turn).
#
#    BPE ("gpt2": Llama 3, Qwen, SmolLM, GPT-2...). The pre-tokenizer that
#    tokenizer.ggml.pre names splits the fragment into words with one or more regexes (as
#    llama.cpp writes them) applied in sequence: each splits every piece the previous one
#    left, and text between matches stays a piece of its own. Each word's UTF-8 bytes are
#    mapped to printable characters with GPT-2's byte-to-unicode table, then the adjacent pair
#    with the lowest merge rank (tokenizer.ggml.merges, rank = line number) is merged until no
#    ranked pair is left, with the same heap as SPM. Some pre-tokenizers (llama3) first take a
#    word that is already a whole vocabulary piece as is ("ignore_merges"). Word -> ids
#    results are cached. Regexes llama.cpp runs through std::regex rather than its own
#    splitters are ported to its ECMAScript meaning where Python's differs (DeepSeek's).
#    Gemma 4 ("gemma4") is BPE the SentencePiece way: spaces become U+2581, words are lines,
#    merges run over characters' UTF-8 (no byte table) and fall back to <0xXX> tokens.
#
#    WordPiece ("bert": embedding models). BERT's basic tokenizer (lowercase, strip accents,
#    cut at whitespace and punctuation), then the longest vocabulary piece at each position
#    of each word; a word that cannot be covered is the unknown token.
#
# Decoding concatenates per-token byte pieces: SPM turns U+2581 back into spaces and <0xXX>
# tokens into raw bytes; BPE maps each character back through the inverse byte table;
# user-defined tokens decode to their literal text; control and unknown tokens decode to
# their text only when asked (special=True), as llama.cpp's token_to_piece. StreamDecoder
# turns a stream of token ids into text without ever emitting half a UTF-8 character.
#
# End-of-generation ids follow llama.cpp's rules too: the ids the metadata names (eos, eot,
# eom) plus tokens recognised by their text, which become control tokens. That includes
# "</s>" wherever a vocabulary has it, so Gemma's HTML </s> (id 212) ends a generation there.
"""SPM, BPE and WordPiece tokenizers built from GGUF metadata only, matching llama.cpp token
for token."""

from __future__ import annotations

import array
import codecs
import heapq
import unicodedata
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import regex

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "TokenIdError"]


class TokenizerError(ValueError):
    """The tokenizer refuses this model's metadata or this input; the message says why.

    A ValueError, so callers that caught ValueError before it existed keep working."""


class TokenIdError(TokenizerError, IndexError):
    """A token id outside the vocabulary (an IndexError too, as it was before)."""

# tokenizer.ggml.token_type values (GGUF spec / llama.cpp's llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# What C's isspace() strips around lstrip/rstrip special tokens (llama.cpp uses it on bytes).
_C_SPACES = " \t\n\v\f\r"
SPM_SPACE = "\u2581"  # the "lower one eighth block" SentencePiece writes for a space
_SPM_SPACE_UTF8 = SPM_SPACE.encode()

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

# ---------------------------------------------------------------------------------------------
# BPE pre-tokenizers: tokenizer.ggml.pre -> the regexes llama.cpp applies in sequence.
# Facts from llama.cpp's src/llama-vocab.cpp (llm_tokenizer_bpe); its case-insensitive
# contraction group is spelled out as [sS] etc. there, and so it is here.

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o and Tekken as llama.cpp adapts them: a letter counts as "upper" unless it is a-z and
# as "lower" unless it is A-Z, so every non-ASCII letter is both (and marks are not letters).
_UPPER = r"(?:(?=\p{L})[^a-z])"
_LOWER = r"(?:(?=\p{L})[^A-Z])"
_GPT4O_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
             rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 3.5: Qwen 2's, with combining marks (\p{M}) kept in letter runs.
_QWEN35_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek's regexes without a \p{..} class run in llama.cpp as std::wregex (ECMAScript) over
# the text with every non-ASCII whitespace character replaced by U+000B; ported to `regex`:
# - `\s` matches the same characters either way (ASCII whitespace there, plus the replaced
#   ones; Unicode White_Space here), but a whitespace character written inside a class
#   (U+3000 in U+3000-U+3002, U+1680, U+2000-U+200A, U+2028... in U+0800-U+4E00) can never
#   match there, having been replaced: the classes below leave them out;
# - ECMAScript's `$` is the end of the piece only, which is `\Z` here (`$` also matches
#   before a final newline).
_CJK_RUN = r"(?V1)[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff--\s]+"
# DeepSeek LLM's cased letters (Unicode's Lu/Ll/Lt runs, as its tokenizer.json lists them).
_DEEPSEEK_LLM_LETTERS = (
    r"A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    r"\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    r"\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    r"\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    r"\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    r"\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    r"\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    r"\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    r"\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    r"\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    r"\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    r"\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    r"\U000118a0-\U000118df\U0001e900-\U0001e943")
# ASCII and full-width punctuation, quotes, and U+3001-U+3002 (llama.cpp writes U+3000-U+3002).
_DEEPSEEK_LLM_PUNCT = r"!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002"


# tokenizer.ggml.model values modelrun reads, and what they are.
_TOKENIZER_MODELS = {
    "llama": "SentencePiece/SPM",
    "gpt2": "byte-level BPE",
    "gemma4": "Gemma 4's SentencePiece-style BPE",
    "bert": "WordPiece, for BERT-style embedding models",
}


class _PreTokenizer:
    """How one family of BPE models splits text into words before merging."""

    def __init__(self, patterns: Sequence[str | _DigitGroups], *, ignore_merges: bool = False,
                 add_bos: bool = False, spm_style: bool = False):
        self.patterns = tuple(patterns)
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos  # llama.cpp's default when the metadata has no add_bos_token
        # SentencePiece-style BPE (Gemma 4): spaces become U+2581, words merge over their
        # characters' raw UTF-8 (no byte-to-unicode table), a run of newlines that is a
        # piece is taken whole, and a leftover symbol falls back to <0xXX> byte tokens.
        self.spm_style = spm_style


_LLAMA3 = _PreTokenizer([_LLAMA3_RE], ignore_merges=True, add_bos=True)
_LLAMA3_REGEX_ONLY = _PreTokenizer([_LLAMA3_RE])
_QWEN2 = _PreTokenizer([_QWEN2_RE])
_GPT2 = _PreTokenizer([_GPT2_RE])
_DIGITS_THEN_GPT2 = _PreTokenizer([r"\p{N}", _GPT2_RE])
_DEFAULT = _PreTokenizer([r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"])
_GPT4O = _PreTokenizer([_GPT4O_RE])
_TEKKEN = _PreTokenizer([_TEKKEN_RE], ignore_merges=True, add_bos=True)
_QWEN35 = _PreTokenizer([_QWEN35_RE])
_FALCON = _PreTokenizer([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"])
_DEEPSEEK_CODER = _PreTokenizer([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUN, r"\p{N}"])
# Gemma 4: no word splitting beyond cutting lines from runs of newlines.
_GEMMA4 = _PreTokenizer([r"[^\n]+|\n+"], add_bos=True, spm_style=True)
_DEEPSEEK_LLM = _PreTokenizer([r"[\r\n]", rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+",
                               rf"\s?[{_DEEPSEEK_LLM_PUNCT}]+", r"\s+\Z", _CJK_RUN, r"\p{N}+"])

# DeepSeek V3 (and Hunyuan dense, JoyAI, HY v4): digits in threes, kana/ideograph runs, then
# words that may start with one ASCII punctuation character.
_DEEPSEEK3_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+")
_KANA_CJK_RUN = r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK3 = _PreTokenizer([r"\p{N}{1,3}", _KANA_CJK_RUN,
                            _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
_SPARK2_5 = _PreTokenizer([r"\p{N}{1,3}", _KANA_CJK_RUN,
                           _DEEPSEEK3_WORDS + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"])
_GLM4 = _PreTokenizer([_LLAMA3_RE], ignore_merges=True)
_SEED_CODER = _PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                             r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"])
_UFAKZEKA = _PreTokenizer([r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+"])
_MINICPM5 = _PreTokenizer([r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                          ignore_merges=True)
_LAGUNA = _PreTokenizer([r"[^\n]+|\n+", _QWEN2_RE])
_BAILINGMOE = _PreTokenizer([r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])"
                             r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                             r"|\s*[\r\n]|\s+(?!\S)|\s+"])
_EXAONE_MOE = _PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+"
                             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"])
# BLOOM, Poro, GPT-3 Finnish: everything but whitespace and a few punctuation marks (the
# parentheses and bars are literally in the class, as in their tokenizer.json).
_BLOOM_RE = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_BLOOM = _PreTokenizer([_BLOOM_RE])
_VIKING = _PreTokenizer([_BLOOM_RE, r"\p{N}"])

# Jais 2: Llama 3's, with runs of whitespace cut into power-of-two lengths.
_JAIS2 = _PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                        + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
                        + r"|\s{1,2}(?!\S)|\s{1}"])
# Youtu and Tiny Aya write their letter classes with \p{Lu}, \p{Ll}..., which llama.cpp's
# category-collapsed matching takes as any letter: "[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*
# [\p{Ll}\p{Lm}\p{Lo}\p{M}]+" is a run of letters and marks there, and so it is here.
_MARKED_WORD = rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+{_CONTRACTIONS}?"
_YOUTU = _PreTokenizer([
    r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b"
    r"\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _KANA_CJK_RUN,
    _MARKED_WORD + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    ignore_merges=True)


class _DigitGroups:
    """llama.cpp's own splitter for AFMoE and Tiny Aya digits (no regex: unicode.cpp's
    unicode_regex_split_custom_afmoe): a run of numbers is cut into its leading 1-2 digits,
    then threes; the text before a run stays joined to the run's first group."""

    _RUNS = regex.compile(r"\p{N}+")

    class _Cut:
        __slots__ = ("begin", "end")

        def __init__(self, begin: int, end: int):
            self.begin, self.end = begin, end

        def span(self) -> tuple[int, int]:
            return self.begin, self.end

    def finditer(self, text: str):
        """Pieces as regex matches (words() reads their span()), covering the text up to
        the end of its last run of numbers."""
        begin = 0
        for run in self._RUNS.finditer(text):
            start, stop = run.span()
            cut = start + ((stop - start) % 3 or 3)
            while cut <= stop:
                yield self._Cut(begin, cut)
                begin, cut = cut, cut + 3


_TINY_AYA = _PreTokenizer([_DigitGroups(), _MARKED_WORD + r"|\p{N}{1,3}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
# AFMoE: digits as Tiny Aya's, then runs of CJK, kana, Thai, Lao, Khmer, Myanmar and Hangul
# (llama.cpp's range U+8C48-U+FAFF is written so; it meant U+F900), then DeepSeek V3's words.
_AFMOE = _PreTokenizer([
    _DigitGroups(),
    r"[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
    r"\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f"
    r"\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
    _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
# Granite embedding (multilingual, 97M): GPT-4o's, with marks counted as letters.
_UPPER_OR_MARK = r"(?:(?=[\p{L}\p{M}])[^a-z])"
_LOWER_OR_MARK = r"(?:(?=[\p{L}\p{M}])[^A-Z])"
_GRANITE_EMB_MULTI = _PreTokenizer([
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_OR_MARK}*{_LOWER_OR_MARK}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_OR_MARK}+{_LOWER_OR_MARK}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"], ignore_merges=True)
# Sarvam: Gemma 4's shape (U+2581 spaces, lines as words), without its forced BOS.
_SARVAM = _PreTokenizer([r"[^\n]+|\n+"], spm_style=True)

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), _LLAMA3_REGEX_ONLY),
    **dict.fromkeys(("glm4", "glm5"), _GLM4),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo",
                     "f2llmv2", "solar-open", "grok-2"), _QWEN2),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "modern-bert", "jina-v1-en",
                     "jina-v2-code", "roberta-bpe"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK3),
    "spark2_5": _SPARK2_5,
    "seed-coder": _SEED_CODER,
    "ufakzeka": _UFAKZEKA,
    "minicpm5": _MINICPM5,
    "laguna": _LAGUNA,
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _BAILINGMOE),
    "exaone-moe": _EXAONE_MOE,
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), _BLOOM),
    "viking": _VIKING,
    "jais-2": _JAIS2,
    "youtu": _YOUTU,
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _TINY_AYA),
    "afmoe": _AFMOE,
    "granite-embed-multi-97m": _GRANITE_EMB_MULTI,
    "sarvam-moe": _SARVAM,
    "tekken": _TEKKEN,
    "qwen35": _QWEN35,
    "falcon": _FALCON,
    "deepseek-coder": _DEEPSEEK_CODER,
    "deepseek-llm": _DEEPSEEK_LLM,
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m"), _GEMMA4),
}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_UNICODE = _byte_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}
_BYTE_SYMBOLS = [_BYTE_TO_UNICODE[b].encode() for b in range(256)]  # byte -> its piece, UTF-8


# ---------------------------------------------------------------------------------------------
# The vocabulary: pieces, their types, and the special ids derived from them.

def _as_list(value) -> list:
    """GGUF arrays arrive as lists, numpy arrays or lazy sequences; make a plain list."""
    if value is None:
        return []
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else list(value)


def _utf8(text: str) -> bytes:
    """A piece's or a text's bytes; surrogate escapes (invalid UTF-8 kept from the GGUF, or
    lone surrogates in user text) become the raw bytes they stand for."""
    return text.encode("utf-8", "surrogateescape")


def _piece_bytes_of(tokens) -> list[bytes]:
    """Every token's exact bytes, as llama.cpp keeps them (a few converted vocabularies hold
    fragments of characters). Pieces are kept as bytes, not str: Gemma's 262k pieces are
    mostly non-ASCII (U+2581), which costs a str twice the memory of its UTF-8."""
    bytes_list = getattr(tokens, "bytes_list", None)  # runtime.gguf's lazy StringArray
    if callable(bytes_list):
        return bytes_list()
    return [bytes(p) if isinstance(p, (bytes, bytearray, memoryview)) else _utf8(p)
            for p in _as_list(tokens)]


class _PieceIndex:
    """Piece bytes -> id, by binary search over the pieces' CRC-32s.

    A dict answers faster, but on Gemma's 262k pieces it costs ~19 MB more (its table, and
    an int object per id); encoding is per request, never on the per-token path. Sorting
    the pieces themselves took 0.2 s at start-up; their CRC-32s (C speed, and the same in
    every process, so the index can be pickled) sort in a tenth of that. Pieces that share
    a CRC sit side by side and are told apart by comparing the bytes.
    """

    __slots__ = ("_pieces", "_crcs", "_ids")

    def __init__(self, pieces: list[bytes]):
        crcs = np.fromiter(map(zlib.crc32, pieces), np.int64, len(pieces))
        order = np.argsort(crcs, kind="stable")
        crcs = crcs[order]
        self._pieces = pieces
        self._crcs = array.array("q", crcs.tobytes())
        self._ids = array.array("q", order.astype(np.int64).tobytes())
        for i in np.flatnonzero(crcs[1:] == crcs[:-1]).tolist():  # a few, if any
            later = int(order[i + 1])
            j = i
            while j >= 0 and crcs[j] == crcs[i + 1]:  # every earlier piece with that CRC
                if pieces[int(order[j])] == pieces[later]:
                    raise TokenizerError(f"duplicate token in vocabulary: {pieces[later]!r} "
                                     f"(ids {int(order[j])} and {later})")
                j -= 1

    def get(self, piece: bytes) -> int | None:
        crc = zlib.crc32(piece)
        crcs, ids, pieces = self._crcs, self._ids, self._pieces
        i = bisect_left(crcs, crc)
        while i < len(crcs) and crcs[i] == crc:
            if pieces[ids[i]] == piece:
                return ids[i]
            i += 1
        return None

    def __contains__(self, piece: bytes) -> bool:
        return self.get(piece) is not None

    def __getitem__(self, piece: bytes) -> int:
        tid = self.get(piece)
        if tid is None:
            raise KeyError(piece)
        return tid


class _Vocab:
    """Pieces (as bytes), types, and the lookups every encode and decode needs."""

    _PREFIX_LEN = 4  # characters of a special token's text that index it

    def __init__(self, pieces: list[bytes], types: list[int]):
        n = len(pieces)
        self.pieces = pieces
        self.types = types
        self.piece_to_id = _PieceIndex(pieces)
        self.unknown_id: int | None = None
        # Special tokens that swallow the whitespace before (lstrip) or after (rstrip) them
        # when the text is cut around them; llama.cpp decides by the model's name.
        self.lstrip_ids: frozenset[int] = frozenset()
        self.rstrip_ids: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.pieces)

    def text(self, tid: int) -> str:
        """The piece of tid as text (invalid UTF-8 as surrogate escapes)."""
        return self.pieces[tid].decode("utf-8", "surrogateescape")

    def id_of(self, text: str) -> int | None:
        return self.piece_to_id.get(_utf8(text))

    def find_first(self, texts: frozenset[str]) -> int | None:
        """Lowest id whose piece is one of texts."""
        ids = [tid for tid in map(self.id_of, texts) if tid is not None]
        return min(ids) if ids else None

    def build_special_index(self) -> None:
        """Index control/unknown and user-defined tokens by their first characters."""
        special_kinds = {TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED}
        groups: dict[str, dict[str, tuple[int, int, str]]] = {}
        for tid in [i for i, kind in enumerate(self.types) if kind in special_kinds]:
            piece = self.text(tid)
            groups.setdefault(piece[:self._PREFIX_LEN], {})[piece] = (-len(piece), tid, piece)
        # prefix -> (piece -> (-length, id, piece), the lengths of those pieces)
        self.special_index = {prefix: (by_piece, sorted({len(p) for p in by_piece}))
                              for prefix, by_piece in groups.items()}

    def specials_in(self, text: str, parse_special: bool) -> list[tuple[int, int, str]]:
        """Special tokens whose text occurs in text, longest first (then by id)."""
        found = set()
        for prefix, (by_piece, lengths) in self.special_index.items():
            seen = text.count(prefix)
            if not seen:
                continue
            if seen * len(lengths) < len(by_piece):  # few sightings of a big family (<unusedN>)
                at = text.find(prefix)
                while at >= 0:
                    for length in lengths:
                        entry = by_piece.get(text[at:at + length])
                        if entry is not None:
                            found.add(entry)
                    at = text.find(prefix, at + 1)
            else:
                found.update(entry for piece, entry in by_piece.items() if piece in text)
        if not parse_special:
            found = {entry for entry in found if self.types[entry[1]] == TOKEN_USER_DEFINED}
        return sorted(found)


class _PickledWithoutCaches:
    """Pickles (runtime.tokenizer_cache) with its `_CACHES` empty: they fill while serving,
    possibly while another thread pickles, and a loaded copy should start fresh anyway."""

    _CACHES: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {**self.__dict__, **{name: {} for name in self._CACHES}}


# ---------------------------------------------------------------------------------------------
# The merge loop both models share.

def _merge_symbols(symbols: list[bytes], find: Callable[[bytes], float | int | None],
                   separator: bytes) -> list[bytes]:
    """Merge adjacent symbols until no pair qualifies; return the final symbols.

    A pair (left, right) qualifies when find(left + separator + right) is not None; the
    smallest value merges first, the leftmost pair on ties (llama.cpp's order).
    """
    n = len(symbols)
    if n < 2:
        return symbols
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prev = list(range(-1, n - 1))
    lengths = [len(s) for s in symbols]
    heap = []
    for i in range(n - 1):
        key = find(symbols[i] + separator + symbols[i + 1])
        if key is not None:
            heap.append((key, i, i + 1, lengths[i] + lengths[i + 1]))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, left, right, size = pop(heap)
        left_len, right_len = lengths[left], lengths[right]
        # Stale: one side was merged away, or grew, since this pair was queued.
        if not left_len or not right_len or left_len + right_len != size:
            continue
        merged = symbols[left] + symbols[right]
        symbols[left] = merged
        lengths[left] = size
        lengths[right] = 0
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prev[after] = left
            key = find(merged + separator + symbols[after])
            if key is not None:
                push(heap, (key, left, after, size + lengths[after]))
        before = prev[left]
        if before >= 0:
            key = find(symbols[before] + separator + merged)
            if key is not None:
                push(heap, (key, before, left, lengths[before] + size))
    return [symbols[i] for i in range(n) if lengths[i]]


# ---------------------------------------------------------------------------------------------
# The two models: how a raw fragment becomes ids, and how an id becomes bytes.

class _SpmModel(_PickledWithoutCaches):
    """SentencePiece-style BPE over characters, driven by piece scores."""

    # At most _CACHE_LIMIT fragments of at most _CACHE_CHARS characters: ~20 MB at worst (a
    # 2M-character prompt is not kept: an entry bound alone let each such prompt stay).
    _CACHE_LIMIT = 1 << 12
    _CACHE_CHARS = 1024
    _CACHES = ("fragment_cache",)

    def __init__(self, vocab: _Vocab, scores: np.ndarray, add_space_prefix: bool):
        self.vocab = vocab
        self.add_space_prefix = add_space_prefix
        # Merge priority by id (the highest score merges first), looked up through
        # piece_to_id: a second piece-keyed table would cost memory on a 262k vocabulary.
        self.neg_scores = array.array("d", (-scores).tobytes())
        self.byte_ids: list[int] = []
        for b in range(256):
            tid = vocab.id_of(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = vocab.id_of(chr(b))
            if tid is None:
                tid = vocab.unknown_id
            if tid is None:
                raise TokenizerError(
                    f"SPM vocabulary without <0x{b:02X}> and without an unknown token")
            self.byte_ids.append(tid)
        # Fragments (text between special tokens: for Gemma, mostly single lines) repeat
        # whenever a chat is re-encoded turn after turn.
        self.fragment_cache: dict[str, list[int]] = {}

    def encode_fragment(self, text: str, after_special: bool, out: list[int]) -> None:
        if self.add_space_prefix and after_special:
            text = " " + text
        ids = self.fragment_cache.get(text)
        if ids is None:
            ids = self._encode(text)
            if len(text) <= self._CACHE_CHARS:
                if len(self.fragment_cache) >= self._CACHE_LIMIT:
                    self.fragment_cache.clear()
                self.fragment_cache[text] = ids
        out.extend(ids)

    def priority(self, piece: bytes) -> float | None:
        tid = self.vocab.piece_to_id.get(piece)
        return None if tid is None else self.neg_scores[tid]

    def _encode(self, text: str) -> list[int]:
        piece_to_id = self.vocab.piece_to_id
        ids = []
        symbols = [_utf8(c) for c in text.replace(" ", SPM_SPACE)]
        for symbol in _merge_symbols(symbols, self.priority, b""):
            tid = piece_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            else:  # a character outside the vocabulary: one token per UTF-8 byte
                utf8 = symbol.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass")
                ids.extend(self.byte_ids[b] for b in utf8)
        return ids

    def normal_piece(self, piece: bytes) -> bytes:
        return piece.replace(_SPM_SPACE_UTF8, b" ")


class _WordModel(_PickledWithoutCaches):
    """A model that cuts a fragment into words (`words`) and encodes each word on its own
    (`encode_word`); word -> ids results are cached."""

    # At most _CACHE_LIMIT words of at most _CACHE_CHARS characters: ~30 MB at worst.
    _CACHE_LIMIT = 1 << 16
    _CACHE_CHARS = 32
    _CACHES = ("word_cache",)
    word_cache: dict[str, list[int]]

    def words(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode_word(self, word: str) -> list[int]:
        raise NotImplementedError

    def encode_fragment(self, text: str, after_special: bool, out: list[int]) -> None:
        cache = self.word_cache
        for word in self.words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self.encode_word(word)
                if len(word) <= self._CACHE_CHARS:
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    cache[word] = ids
            out.extend(ids)


class _BpeModel(_WordModel):
    """Byte-level BPE with merge ranks and a regex pre-tokenizer (or, for Gemma 4, BPE over
    characters with SentencePiece's spaces)."""

    add_space_prefix = False

    def __init__(self, vocab: _Vocab, merges: list[str], pre: _PreTokenizer):
        self.vocab = vocab
        self.pre = pre
        self.splitters = [regex.compile(p) if isinstance(p, str) else p for p in pre.patterns]
        # "left right" -> rank; the first occurrence wins, as in llama.cpp. Pieces never
        # contain a space (GPT-2 writes it as U+0120, Gemma 4 as U+2581), so the joined
        # string is a unique key.
        self.merge_ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
        self.byte_ids = [vocab.id_of(f"<0x{b:02X}>") for b in range(256)] \
            if pre.spm_style else None
        if pre.spm_style:  # its words are whole lines: cache them as SPM caches fragments
            self._CACHE_LIMIT, self._CACHE_CHARS = _SpmModel._CACHE_LIMIT, _SpmModel._CACHE_CHARS
        self.word_cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[str]:
        """Split a fragment into pre-tokenizer words (llama.cpp's unicode_regex_split)."""
        if self.pre.spm_style:
            text = text.replace(" ", SPM_SPACE)
        pieces = [text]
        for splitter in self.splitters:
            split = []
            for piece in pieces:
                start = 0
                for match in splitter.finditer(piece):
                    begin, end = match.span()
                    if begin > start:
                        split.append(piece[start:begin])
                    if end > begin:
                        split.append(piece[begin:end])
                    start = end
                if start < len(piece):
                    split.append(piece[start:])
            pieces = split
        return pieces

    def encode_word(self, word: str) -> list[int]:
        piece_to_id = self.vocab.piece_to_id
        if self.byte_ids is not None:
            return self._encode_spm_style(word)
        symbols = [_BYTE_SYMBOLS[b] for b in word.encode("utf-8", "surrogatepass")]
        if self.pre.ignore_merges:
            tid = piece_to_id.get(b"".join(symbols))
            if tid is not None:
                return [tid]
        ids = []
        for symbol in _merge_symbols(symbols, self.merge_ranks.get, b" "):
            tid = piece_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            else:  # merged but not a piece (inconsistent merges): llama.cpp looks up each
                # UTF-8 byte as a one-byte piece, which only ASCII characters can match
                ids.extend(piece_to_id[c] for c in (symbol[i:i + 1] for i in range(len(symbol)))
                           if c[0] < 0x80 and c in piece_to_id)
        return ids

    def _encode_spm_style(self, word: str) -> list[int]:
        piece_to_id = self.vocab.piece_to_id
        if word[0] == "\n" and not word.strip("\n"):  # a run of newlines: whole if a piece
            tid = piece_to_id.get(word.encode())
            if tid is not None:
                return [tid]
        ids = []
        symbols = [c.encode("utf-8", "surrogatepass") for c in word]
        for symbol in _merge_symbols(symbols, self.merge_ranks.get, b" "):
            tid = piece_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            else:  # a character outside the vocabulary: one <0xXX> token per UTF-8 byte
                ids.extend(tid for tid in map(self.byte_ids.__getitem__, symbol)
                           if tid is not None)
        return ids


    def normal_piece(self, piece: bytes) -> bytes:
        if self.byte_ids is not None:
            return piece.replace(_SPM_SPACE_UTF8, b" ")
        text = piece.decode("utf-8", "surrogateescape")
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError:  # a character outside the byte table: keep it as UTF-8
            return b"".join(bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE
                            else c.encode("utf-8", "surrogateescape") for c in text)


# Whitespace as llama.cpp's tables have it (Unicode's White_Space property).
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(map(chr, range(0x2000, 0x200B))))
_CONTROL_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Cs"))
# What CJK ideographs BERT's basic tokenizer isolates (llama.cpp's is_chinese_char, which
# keeps Hugging Face's 0x2B920 where 0x2B820 was meant).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# ASCII text needs none of the per-character rules: controls vanish, then words are runs of
# letters and digits, and every other visible character is a word of its own.
_ASCII_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
_ASCII_WORDS = regex.compile(r"[A-Za-z0-9]+|[^\t\n\v\f\r A-Za-z0-9]")


class _WpmModel(_WordModel):
    """WordPiece (BERT), as llama.cpp's WPM tokenizer.

    BERT's basic tokenizer first: optional accent stripping (each character replaced by the
    first character of its NFD, then marks dropped) and lowercasing (the simple one-character
    mapping), control characters dropped, words cut at whitespace, and every punctuation
    character, ASCII symbol and CJK ideograph made a word of its own. Then each word, with
    U+2581 in front (the GGUF writes word-initial pieces so and "##" continuations bare), is
    covered greedily by the longest vocabulary piece at each byte position; a word that
    cannot be covered becomes the unknown token.
    """

    add_space_prefix = False  # as llama.cpp's WPM: decode keeps the first word's space

    def __init__(self, vocab: _Vocab, *, lowercase: bool, strip_accents: bool):
        if vocab.unknown_id is None:
            raise TokenizerError("WordPiece vocabulary without an unknown token "
                                 "(tokenizer.ggml.unknown_token_id)")
        self.vocab = vocab
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.max_piece_len = max(map(len, vocab.pieces))
        self.word_cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[str]:
        """BERT's basic tokenization of a fragment."""
        if text.isascii():
            text = text.translate(_ASCII_CONTROLS)
            return _ASCII_WORDS.findall(text.lower() if self.lowercase else text)
        words, word = [], []
        for char in text:
            if self.strip_accents:
                char = unicodedata.normalize("NFD", char)[0]
            if char in _WHITESPACE:
                if word:
                    words.append("".join(word))
                    word = []
                continue
            category = unicodedata.category(char)
            if char in "\0\ufffd" or category in _CONTROL_CATEGORIES or \
                    (self.strip_accents and category[0] == "M"):
                continue
            code = ord(char)
            if self.lowercase:
                char = char.lower()[:1] or char  # the simple mapping: U+0130 -> "i"
            if category[0] == "P" or (code < 0x7F and category[0] == "S") or \
                    any(low <= code <= high for low, high in _CJK_RANGES):
                if word:
                    words.append("".join(word))
                    word = []
                words.append(char)
            else:
                word.append(char)
        if word:
            words.append("".join(word))
        return words

    def encode_word(self, word: str) -> list[int]:
        get = self.vocab.piece_to_id.get
        text = _utf8(SPM_SPACE + word)
        n, longest = len(text), self.max_piece_len
        ids, start = [], 0
        while start < n:
            for end in range(min(n, start + longest), start, -1):
                tid = get(text[start:end])
                if tid is not None:
                    ids.append(tid)
                    start = end
                    break
            else:  # no piece starts here: the whole word is unknown
                return [self.vocab.unknown_id]
        return ids

    def normal_piece(self, piece: bytes) -> bytes:
        return piece.replace(_SPM_SPACE_UTF8, b" ")


# ---------------------------------------------------------------------------------------------
# The tokenizer the engine and server use.

def _text(value) -> str | None:
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def _meta_id(metadata: Mapping, key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n_tokens else None


class Tokenizer(_PickledWithoutCaches):
    """Text <-> token ids for one GGUF model, identical to llama.cpp's tokenizer."""

    _CACHES = ("_pieces_cache",)

    def __init__(self, vocab: _Vocab, model: _SpmModel | _BpeModel | _WpmModel, *,
                 model_name: str, bos_id: int | None, eos_id: int | None,
                 eog_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 sep_id: int | None = None):
        self._vocab = vocab
        self._model = model
        self._pieces_cache: dict[int, bytes] = {}
        self.model_name = model_name
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._sep_id = sep_id  # WordPiece: [SEP] closes every add_special encoding
        self._eog_ids = eog_ids
        self.add_bos = add_bos
        self.add_eos = add_eos

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> Tokenizer:
        """Build the tokenizer from GGUF key/values (tokenizer.ggml.*)."""
        model_name = _text(metadata.get("tokenizer.ggml.model"))
        if model_name not in _TOKENIZER_MODELS:
            raise TokenizerError(
                f"unsupported tokenizer model {model_name!r} (tokenizer.ggml.model); "
                "modelrun supports " + ", ".join(f"'{name}' ({what})" for name, what in
                                                 _TOKENIZER_MODELS.items()))
        pieces = _piece_bytes_of(metadata.get("tokenizer.ggml.tokens"))
        if not pieces:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        n = len(pieces)
        if b"" in pieces:  # llama.cpp renames empty pieces so they cannot match
            pieces = [piece or f"[EMPTY_{i}]".encode() for i, piece in enumerate(pieces)]
        types = _as_list(metadata.get("tokenizer.ggml.token_type")) or [TOKEN_NORMAL] * n
        if len(types) < n:
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = types[:n] if isinstance(types[0], int) else [int(t) for t in types[:n]]
        vocab = _Vocab(pieces, types)

        def flag(key: str, default: bool) -> bool:
            value = metadata.get(key)
            return default if value is None else bool(value)

        # llama.cpp's defaults when the metadata names no ids: Llama's for SPM, BERT's for
        # WordPiece. (Its BPE placeholder, id 11, is deliberately not copied: no id is better
        # than a comma.)
        defaults = {"llama": {"bos": 1, "eos": 2, "unknown": 0},
                    "bert": {"bos": 101, "unknown": 100, "seperator": 102}}.get(model_name, {})

        def special_id(name: str) -> int | None:
            found = _meta_id(metadata, f"tokenizer.ggml.{name}_token_id", n)
            if found is None and defaults.get(name, n) < n:
                found = defaults[name]
            return found

        bos_id, eos_id = special_id("bos"), special_id("eos")
        vocab.unknown_id = special_id("unknown")

        if model_name == "llama":
            scores = metadata.get("tokenizer.ggml.scores")
            scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
            if scores.ndim != 1 or len(scores) < n:
                raise TokenizerError(
                    f"tokenizer.ggml.scores has {scores.size} entries for {n} tokens")
            scores = scores[:n]
            model = _SpmModel(vocab, scores, flag("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        elif model_name == "bert":
            lowercase = flag("tokenizer.ggml.normalizer.lowercase", True)
            model = _WpmModel(vocab, lowercase=lowercase, strip_accents=flag(
                "tokenizer.ggml.normalizer.strip_accents", lowercase))
            add_bos_default = True
        else:
            # Gemma 4's tokenizer model implies its pre-tokenizer, whatever the key says.
            pre_name = "gemma4" if model_name == "gemma4" else \
                _text(metadata.get("tokenizer.ggml.pre")) or "default"
            pre = _PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise TokenizerError(
                    f"unsupported BPE pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); known: "
                    + ", ".join(sorted(_PRE_TOKENIZERS)))
            merges = _piece_bytes_of(metadata.get("tokenizer.ggml.merges"))
            if not merges:
                raise TokenizerError("BPE tokenizer without tokenizer.ggml.merges")
            model = _BpeModel(vocab, merges, pre)
            add_bos_default = pre.add_bos

        eog_ids = cls._end_of_generation_ids(metadata, vocab, eos_id)
        cls._strip_attributes(metadata, vocab)
        vocab.build_special_index()

        add_bos = flag("tokenizer.ggml.add_bos_token", add_bos_default)
        sep_id = None
        if model_name == "bert":  # llama.cpp's WPM always adds [CLS] ... [SEP]
            add_bos, sep_id = True, special_id("seperator")  # (the GGUF key's spelling)
            if sep_id is None:
                raise TokenizerError("WordPiece vocabulary without tokenizer.ggml."
                                     "seperator_token_id")
        elif model_name != "llama" and model.pre is _GEMMA4:
            add_bos = True  # llama.cpp overrides a false add_bos_token for Gemma 4
        add_eos = flag("tokenizer.ggml.add_eos_token", False)
        if add_bos and bos_id is None:
            raise TokenizerError(
                "add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if add_eos and eos_id is None:
            raise TokenizerError(
                "add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")
        return cls(vocab, model, model_name=model_name, bos_id=bos_id, eos_id=eos_id,
                   eog_ids=eog_ids, add_bos=add_bos, add_eos=add_eos, sep_id=sep_id)

    @staticmethod
    def _end_of_generation_ids(metadata: Mapping, vocab: _Vocab,
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
            tid = _meta_id(metadata, key, n)
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

    @staticmethod
    def _strip_attributes(metadata: Mapping, vocab: _Vocab) -> None:
        """llama.cpp's per-token lstrip/rstrip, which the GGUF does not carry: it sets them
        by substrings of general.name (lowercased), tokenizer.ggml.pre and the architecture."""
        name = (_text(metadata.get("general.name")) or "").lower()
        pre = _text(metadata.get("tokenizer.ggml.pre")) or ""
        arch = _text(metadata.get("general.architecture")) or ""

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

    # --- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of text (no token spells more bytes than the
        longest piece): refuses text that cannot fit a context before tokenizing it."""
        longest = getattr(self, "_longest_piece", None)
        if longest is None:
            longest = self._longest_piece = max(map(len, self._vocab.pieces), default=1) or 1
        return len(text.encode("utf-8", "surrogatepass")) // (longest + 1)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end a generation: eos, eot, eom and the end-of-turn tokens."""
        return self._eog_ids

    def token_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece, written as in the GGUF (e.g. '<end_of_turn>')."""
        return self._vocab.id_of(piece)

    def is_control(self, token_id: int) -> bool:
        """Control and unknown tokens: hidden by decode unless asked for."""
        return self._vocab.types[token_id] in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    # --- encode ------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True,
               literal_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of text; add_special adds BOS/EOS as the model asks, parse_special turns
        control-token text (e.g. '<start_of_turn>') into those tokens, except where it
        overlaps one of literal_spans ([start, end) of text: a chat's message text, which
        must not forge the template's markers; runtime.chat)."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._bos_id)
        after_special = True  # SPM's space prefix applies at the start and after specials
        fragments = self._partition(text, parse_special)
        if literal_spans and parse_special:
            fragments = self._unparse_in(text, fragments, literal_spans)
        for fragment in fragments:
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
            else:
                self._model.encode_fragment(fragment, after_special, out)
                after_special = False
        if add_special and self.add_eos:
            out.append(self._eos_id)
        if add_special and self._sep_id is not None:
            out.append(self._sep_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut text around special tokens (llama.cpp's tokenizer_st_partition)."""
        if not text:
            return []
        fragments: list[str | int] = [text]
        vocab = self._vocab
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

    def _unparse_in(self, text: str, fragments: list[str | int],
                    spans: Sequence[tuple[int, int]]) -> list[str | int]:
        """fragments with each control/unknown token that overlaps a span turned back into
        its text, as parse_special=False would have left it: the text from the token before
        to the token after that stay (with any whitespace an unparsed token had swallowed
        given back), then cut at user-defined tokens only."""
        vocab = self._vocab
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
                out.extend(self._partition(text[run_start:run_end], False))
            out.append(fragment)
            run_start = end
            if fragment in vocab.rstrip_ids:  # and the whitespace after it
                run_start = placed[i + 1][0] if i + 1 < len(placed) else len(text)
        if run_start < len(text):
            out.extend(self._partition(text[run_start:], False))
        return out

    # --- decode ------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token_id stands for. Control/unknown tokens give their text only when
        special is true (llama.cpp's token_to_piece); pieces may be partial UTF-8."""
        vocab = self._vocab
        if not 0 <= token_id < len(vocab):
            raise TokenIdError(f"token id {token_id} out of range (vocab size {len(vocab)})")
        kind = vocab.types[token_id]
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) and not special:
            return b""
        piece = self._pieces_cache.get(token_id)
        if piece is None:
            raw = vocab.pieces[token_id]
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                piece = raw
            elif kind == TOKEN_NORMAL:
                piece = self._model.normal_piece(raw)
            elif kind == TOKEN_BYTE:
                piece = bytes((int(raw[3:5], 16),))
            else:  # unused and unknown types render as nothing, as in llama.cpp
                piece = b""
            self._pieces_cache[token_id] = piece
        return piece

    def decode(self, tokens: Iterable[int], skip_special: bool = True) -> str:
        """Text of a token sequence.

        As llama.cpp's llama_detokenize with unparse_special = not skip_special: control
        tokens (BOS, <end_of_turn>...) vanish by default, user-defined ones always show, and
        with add_space_prefix (SPM) one leading space of the first token is dropped, undoing
        the prefix encode added. One pass is left out on purpose: the clean-up of spaces
        before punctuation (" ," -> ",") that llama.cpp applies to some BPE vocabularies
        (Llama 3) loses information, and llama-server's completions, streamed or not, are
        built from token pieces without it, as StreamDecoder builds them here.
        """
        special = not skip_special
        pieces = [self.token_to_piece(int(t), special) for t in tokens]
        if pieces and self._model.add_space_prefix:
            if pieces[0].startswith(b" "):
                pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh per-generation StreamDecoder."""
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turns generated token ids into text as they come, one call per token.

    A piece can end inside a multibyte character (byte-fallback tokens, byte-level BPE), so
    feed returns only complete characters and keeps the rest until the next piece.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        """Whatever is held back, with an incomplete trailing character as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
