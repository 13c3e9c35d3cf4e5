"""The vocabulary: pieces (as bytes), their types, the piece -> id index, and the errors
every part of the tokenizer raises."""

from __future__ import annotations

import array
import zlib
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from itertools import accumulate

import numpy as np

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

SPM_SPACE = "\u2581"  # the "lower one eighth block" SentencePiece writes for a space
SPM_SPACE_UTF8 = SPM_SPACE.encode()


def as_list(value) -> list:
    """GGUF arrays arrive as lists, numpy arrays or lazy sequences; make a plain list."""
    if value is None:
        return []
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else list(value)


def utf8_of(text: str) -> bytes:
    """A piece's or a text's bytes; surrogate escapes (invalid UTF-8 kept from the GGUF, or
    lone surrogates in user text) become the raw bytes they stand for."""
    return text.encode("utf-8", "surrogateescape")


def piece_bytes_of(tokens) -> list[bytes]:
    """Every token's exact bytes, as llama.cpp keeps them (a few converted vocabularies hold
    fragments of characters). Pieces are kept as bytes, not str: Gemma's 262k pieces are
    mostly non-ASCII (U+2581), which costs a str twice the memory of its UTF-8."""
    bytes_list = getattr(tokens, "bytes_list", None)  # runtime.gguf's lazy StringArray
    if callable(bytes_list):
        return bytes_list()
    return [bytes(p) if isinstance(p, (bytes, bytearray, memoryview)) else utf8_of(p)
            for p in as_list(tokens)]


def metadata_text(value) -> str | None:
    """A metadata string (bytes from some readers) as str."""
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def metadata_id(metadata: Mapping, key: str, n_tokens: int) -> int | None:
    """A token id the metadata names, or None when absent or outside the vocabulary."""
    value = metadata.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n_tokens else None


class Pieces(Sequence):
    """Every piece's bytes, in one buffer with their end offsets. A list of bytes objects
    costs an object header per piece: on Gemma's 262k pieces ~15 MB, this ~4 MB."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, pieces: list[bytes]):
        self._blob = b"".join(pieces)
        self._ends = array.array("q", accumulate(map(len, pieces)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ends = self._ends
        end = ends[i]  # an IndexError past either end, as a list's
        i %= len(ends)
        return self._blob[ends[i - 1] if i else 0:end]

    def __iter__(self):
        blob, start = self._blob, 0
        for end in self._ends:
            yield blob[start:end]
            start = end


class PieceIndex:
    """Piece bytes -> id, by binary search over the pieces' CRC-32s.

    A dict answers faster, but on Gemma's 262k pieces it costs ~19 MB more (its table, and
    an int object per id); encoding is per request, never on the per-token path. Sorting
    the pieces themselves took 0.2 s at start-up; their CRC-32s (C speed, and the same in
    every process, so the index can be pickled) sort in a tenth of that. Pieces that share
    a CRC sit side by side and are told apart by comparing the bytes.
    """

    __slots__ = ("_pieces", "_crcs", "_ids")

    def __init__(self, pieces: Sequence[bytes], first_wins: bool = False):
        """first_wins: a piece that occurs twice maps to its first index (BPE merges, as
        llama.cpp ranks them), else it is refused (a vocabulary)."""
        crcs = np.fromiter(map(zlib.crc32, pieces), np.int64, len(pieces))
        order = np.argsort(crcs, kind="stable")  # equal pieces stay in index order
        crcs = crcs[order]
        self._pieces = pieces
        self._crcs = array.array("I", crcs.astype(np.uint32).tobytes())  # CRC-32s: 4 bytes each
        self._ids = array.array("i", order.astype(np.int32).tobytes())
        if first_wins:
            return
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


class Vocab:
    """Pieces (as bytes), types, and the lookups every encode and decode needs."""

    _PREFIX_LEN = 4  # characters of a special token's text that index it

    def __init__(self, pieces: list[bytes], types: list[int]):
        self.pieces = Pieces(pieces)
        self.types = array.array("i", types)  # 4 bytes a token, not a list's 8
        self.piece_to_id = PieceIndex(self.pieces)
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
        return self.piece_to_id.get(utf8_of(text))

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

