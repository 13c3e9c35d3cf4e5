"""What the fragment models share: the merge loop (SPM and BPE), encoding word by word
with a bounded cache (BPE and WordPiece), and pickling without caches."""

from __future__ import annotations

import heapq
from collections.abc import Callable


class PickledWithoutCaches:
    """Pickles (runtime.tokenizer_cache) with its `_CACHES` empty: they fill while serving,
    possibly while another thread pickles, and a loaded copy should start fresh anyway."""

    _CACHES: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {**self.__dict__, **{name: {} for name in self._CACHES}}


# ---------------------------------------------------------------------------------------------
# The merge loop both models share.

def merge_symbols(symbols: list[bytes], find: Callable[[bytes], float | int | None],
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



class WordModel(PickledWithoutCaches):
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


