"""WordPiece ("bert"): BERT's basic tokenizer, then the longest piece at each position."""

from __future__ import annotations

import unicodedata

import regex

from runtime.tokenizer.model import WordModel
from runtime.tokenizer.vocab import SPM_SPACE, SPM_SPACE_UTF8, TokenizerError, Vocab, utf8_of


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


class WpmModel(WordModel):
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

    def __init__(self, vocab: Vocab, *, lowercase: bool, strip_accents: bool):
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
        text = utf8_of(SPM_SPACE + word)
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
        return piece.replace(SPM_SPACE_UTF8, b" ")


