"""Byte-level BPE ("gpt2") with merge ranks and a regex pre-tokenizer, and Gemma 4's
SentencePiece-style BPE ("gemma4")."""

from __future__ import annotations

import regex

from runtime.tokenizer.model import WordModel, merge_symbols
from runtime.tokenizer.pretokenizers import PreTokenizer
from runtime.tokenizer.spm import SpmModel
from runtime.tokenizer.vocab import SPM_SPACE, SPM_SPACE_UTF8, PieceIndex, Pieces, Vocab


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


class BpeModel(WordModel):
    """Byte-level BPE with merge ranks and a regex pre-tokenizer (or, for Gemma 4, BPE over
    characters with SentencePiece's spaces)."""

    add_space_prefix = False

    def __init__(self, vocab: Vocab, merges: list[str], pre: PreTokenizer):
        self.vocab = vocab
        self.pre = pre
        self.splitters = [regex.compile(p) if isinstance(p, str) else p for p in pre.patterns]
        # "left right" -> rank; the first occurrence wins, as in llama.cpp. Pieces never
        # contain a space (GPT-2 writes it as U+0120, Gemma 4 as U+2581), so the joined
        # string is a unique key. Indexed as the vocabulary is: a dict of Llama 3's 280k
        # merges took ~30 MiB, this ~8.
        self.merge_ranks = PieceIndex(Pieces(merges), first_wins=True)
        self.byte_ids = [vocab.id_of(f"<0x{b:02X}>") for b in range(256)] \
            if pre.spm_style else None
        if pre.spm_style:  # its words are whole lines: cache them as SPM caches fragments
            self._CACHE_LIMIT, self._CACHE_CHARS = SpmModel._CACHE_LIMIT, SpmModel._CACHE_CHARS
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
        for symbol in merge_symbols(symbols, self.merge_ranks.get, b" "):
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
        for symbol in merge_symbols(symbols, self.merge_ranks.get, b" "):
            tid = piece_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            else:  # a character outside the vocabulary: one <0xXX> token per UTF-8 byte
                ids.extend(tid for tid in map(self.byte_ids.__getitem__, symbol)
                           if tid is not None)
        return ids


    def normal_piece(self, piece: bytes) -> bytes:
        if self.byte_ids is not None:
            return piece.replace(SPM_SPACE_UTF8, b" ")
        text = piece.decode("utf-8", "surrogateescape")
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError:  # a character outside the byte table: keep it as UTF-8
            return b"".join(bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE
                            else c.encode("utf-8", "surrogateescape") for c in text)


