"""SentencePiece (SPM, tokenizer.ggml.model "llama"): merges over characters by piece score,
with <0xXX> byte fallback."""

from __future__ import annotations

import array

import numpy as np

from runtime.tokenizer.model import PickledWithoutCaches, merge_symbols
from runtime.tokenizer.vocab import (
    SPM_SPACE, SPM_SPACE_UTF8, TokenizerError, Vocab, utf8_of)


class SpmModel(PickledWithoutCaches):
    """SentencePiece-style BPE over characters, driven by piece scores."""

    # At most _CACHE_LIMIT fragments of at most _CACHE_CHARS characters: ~20 MB at worst (a
    # 2M-character prompt is not kept: an entry bound alone let each such prompt stay).
    _CACHE_LIMIT = 1 << 12
    _CACHE_CHARS = 1024
    _CACHES = ("fragment_cache",)

    def __init__(self, vocab: Vocab, scores: np.ndarray, add_space_prefix: bool):
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
        symbols = [utf8_of(c) for c in text.replace(" ", SPM_SPACE)]
        for symbol in merge_symbols(symbols, self.priority, b""):
            tid = piece_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
            else:  # a character outside the vocabulary: one token per UTF-8 byte
                utf8 = symbol.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass")
                ids.extend(self.byte_ids[b] for b in utf8)
        return ids

    def normal_piece(self, piece: bytes) -> bytes:
        return piece.replace(SPM_SPACE_UTF8, b" ")


