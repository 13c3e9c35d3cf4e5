"""GGUF string arrays (token vocabularies) read lazily out of the mapped file.

runtime.gguf's parser only walks an array's length prefixes (skip_strings) to find where it
ends; StringArray decodes a string when someone reads it, so a header with 262,144 tokens
parses in milliseconds. No bounds checks here: the parser has checked the whole array."""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

_U64 = struct.Struct("<Q")  # a string's length prefix


_WALK_WITHOUT_INDEX = 1024  # strings this near the start are found without indexing all


def skip_strings(src: Any, pos: int, count: int) -> int:
    """Where `count` length-prefixed strings from pos end (no bounds checks: struct.error
    or OverflowError past the end); the hot loop of a vocabulary's parse."""
    unpack = _U64.unpack_from
    for _ in repeat(None, count):
        pos += 8 + unpack(src, pos)[0]
    return pos


class StringArray(Sequence[str]):
    """A GGUF array of strings, decoded on demand.

    Parsing only walks the length prefixes (to find where the array ends); len() is instant.
    The first access builds an index of where each string starts, except for one of the
    first 1024 strings, which is found by walking there (the index of Gemma's 262k strings
    takes 50 ms). Strings decode with errors="replace"; bytes_at and bytes_list give the
    exact bytes.
    """

    __slots__ = ("_keepalive", "_src", "_first", "_count", "_starts")

    def __init__(self, keepalive: memoryview, src: Any, first: int, count: int):
        # src: the bytes holding the array, in an object whose slices are bytes when it can be
        # (decodes fastest), else a memoryview; first: position of the first length prefix
        # in src. keepalive holds a buffer export, so the mapping outlives GGUFFile.close().
        self._keepalive = keepalive
        self._src = src
        self._first = first
        self._count = count
        self._starts: array | None = None

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<StringArray of {self._count} strings>"

    def _index(self) -> array:
        """Start of each string's bytes, plus a final entry 8 past the end (so end = next - 8)."""
        if self._starts is None:
            starts = array("q")
            append = starts.append
            unpack = _U64.unpack_from
            src = self._src
            pos = self._first
            for _ in repeat(None, self._count):
                pos += 8
                append(pos)
                pos += unpack(src, pos - 8)[0]
            append(pos + 8)
            self._starts = starts
        return self._starts

    def bytes_at(self, i: int) -> bytes:
        """The exact bytes of string i."""
        n = self._count
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"string index {i} out of range for {n} strings")
        if self._starts is None and i < _WALK_WITHOUT_INDEX:  # (a BOS or EOS lookup)
            pos = skip_strings(self._src, self._first, i)
            return bytes(self._src[pos + 8:skip_strings(self._src, pos, 1)])
        starts = self._index()
        return bytes(self._src[starts[i]:starts[i + 1] - 8])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        return self.bytes_at(i).decode("utf-8", "replace")

    def _raw_strings(self) -> Iterator[Any]:
        """Each string's bytes (as a slice of the source), in order."""
        starts, src = self._index(), self._src
        return (src[a:b - 8] for a, b in zip(starts, starts[1:]))

    def __iter__(self) -> Iterator[str]:
        return (str(s, "utf-8", "replace") for s in self._raw_strings())

    def tolist(self) -> list[str]:
        return [str(s, "utf-8", "replace") for s in self._raw_strings()]

    def bytes_list(self) -> list[bytes]:
        """Every string's exact bytes, in order: one pass over the length prefixes (this is
        the tokenizer's start-up path, 262k strings for Gemma)."""
        src = self._src
        unpack = _U64.unpack_from
        out = []
        keep = out.append
        pos = self._first
        for _ in repeat(None, self._count):
            end = pos + 8 + unpack(src, pos)[0]
            keep(src[pos + 8:end])
            pos = end
        return out if isinstance(src, (bytes, mmap.mmap)) else [bytes(s) for s in out]
