"""BPE pre-tokenizers: tokenizer.ggml.pre -> the regexes llama.cpp applies in sequence.

Facts from llama.cpp's src/llama-vocab.cpp (llm_tokenizer_bpe); its case-insensitive
contraction group is spelled out as [sS] etc. there, and so it is here."""

from __future__ import annotations

from collections.abc import Sequence

import regex

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



class PreTokenizer:
    """How one family of BPE models splits text into words before merging."""

    def __init__(self, patterns: Sequence[str | DigitGroups], *, ignore_merges: bool = False,
                 add_bos: bool = False, spm_style: bool = False):
        self.patterns = tuple(patterns)
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos  # llama.cpp's default when the metadata has no add_bos_token
        # SentencePiece-style BPE (Gemma 4): spaces become U+2581, words merge over their
        # characters' raw UTF-8 (no byte-to-unicode table), a run of newlines that is a
        # piece is taken whole, and a leftover symbol falls back to <0xXX> byte tokens.
        self.spm_style = spm_style


_LLAMA3 = PreTokenizer([_LLAMA3_RE], ignore_merges=True, add_bos=True)
_LLAMA3_REGEX_ONLY = PreTokenizer([_LLAMA3_RE])
_QWEN2 = PreTokenizer([_QWEN2_RE])
_GPT2 = PreTokenizer([_GPT2_RE])
_DIGITS_THEN_GPT2 = PreTokenizer([r"\p{N}", _GPT2_RE])
_DEFAULT = PreTokenizer([r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"])
_GPT4O = PreTokenizer([_GPT4O_RE])
_TEKKEN = PreTokenizer([_TEKKEN_RE], ignore_merges=True, add_bos=True)
_QWEN35 = PreTokenizer([_QWEN35_RE])
_FALCON = PreTokenizer([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"])
_DEEPSEEK_CODER = PreTokenizer([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUN, r"\p{N}"])
# Gemma 4: no word splitting beyond cutting lines from runs of newlines.
GEMMA4 = PreTokenizer([r"[^\n]+|\n+"], add_bos=True, spm_style=True)
_DEEPSEEK_LLM = PreTokenizer([r"[\r\n]", rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+",
                              rf"\s?[{_DEEPSEEK_LLM_PUNCT}]+", r"\s+\Z", _CJK_RUN, r"\p{N}+"])

# DeepSeek V3 (and Hunyuan dense, JoyAI, HY v4): digits in threes, kana/ideograph runs, then
# words that may start with one ASCII punctuation character.
_DEEPSEEK3_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+")
_KANA_CJK_RUN = r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK3 = PreTokenizer([r"\p{N}{1,3}", _KANA_CJK_RUN,
                           _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
_SPARK2_5 = PreTokenizer([r"\p{N}{1,3}", _KANA_CJK_RUN,
                          _DEEPSEEK3_WORDS + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"])
_GLM4 = PreTokenizer([_LLAMA3_RE], ignore_merges=True)
_SEED_CODER = PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                            r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"])
_UFAKZEKA = PreTokenizer([r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+"])
_MINICPM5 = PreTokenizer([r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                         ignore_merges=True)
_LAGUNA = PreTokenizer([r"[^\n]+|\n+", _QWEN2_RE])
_BAILINGMOE = PreTokenizer([r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])"
                            r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                            r"|\s*[\r\n]|\s+(?!\S)|\s+"])
_EXAONE_MOE = PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+"
                            r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"])
# BLOOM, Poro, GPT-3 Finnish: everything but whitespace and a few punctuation marks (the
# parentheses and bars are literally in the class, as in their tokenizer.json).
_BLOOM_RE = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_BLOOM = PreTokenizer([_BLOOM_RE])
_VIKING = PreTokenizer([_BLOOM_RE, r"\p{N}"])

# Jais 2: Llama 3's, with runs of whitespace cut into power-of-two lengths.
_JAIS2 = PreTokenizer([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                       + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
                       + r"|\s{1,2}(?!\S)|\s{1}"])
# Youtu and Tiny Aya write their letter classes with \p{Lu}, \p{Ll}..., which llama.cpp's
# category-collapsed matching takes as any letter: "[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*
# [\p{Ll}\p{Lm}\p{Lo}\p{M}]+" is a run of letters and marks there, and so it is here.
_MARKED_WORD = rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+{_CONTRACTIONS}?"
_YOUTU = PreTokenizer([
    r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b"
    r"\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _KANA_CJK_RUN,
    _MARKED_WORD + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    ignore_merges=True)


class DigitGroups:
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


_TINY_AYA = PreTokenizer([DigitGroups(), _MARKED_WORD + r"|\p{N}{1,3}"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
# AFMoE: digits as Tiny Aya's, then runs of CJK, kana, Thai, Lao, Khmer, Myanmar and Hangul
# (llama.cpp's range U+8C48-U+FAFF is written so; it meant U+F900), then DeepSeek V3's words.
_AFMOE = PreTokenizer([
    DigitGroups(),
    r"[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
    r"\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f"
    r"\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
    _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
# Granite embedding (multilingual, 97M): GPT-4o's, with marks counted as letters.
_UPPER_OR_MARK = r"(?:(?=[\p{L}\p{M}])[^a-z])"
_LOWER_OR_MARK = r"(?:(?=[\p{L}\p{M}])[^A-Z])"
_GRANITE_EMB_MULTI = PreTokenizer([
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_OR_MARK}*{_LOWER_OR_MARK}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_OR_MARK}+{_LOWER_OR_MARK}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"], ignore_merges=True)
# Sarvam: Gemma 4's shape (U+2581 spaces, lines as words), without its forced BOS.
_SARVAM = PreTokenizer([r"[^\n]+|\n+"], spm_style=True)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
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
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m"), GEMMA4),
}


