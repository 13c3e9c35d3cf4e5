"""What the benchmarks share: the machine's read bandwidth, measured the same way for all."""

import time

import numpy as np
from numba import njit, prange

WORKING_SET = 512 << 20  # bytes; well past any CPU cache


@njit(parallel=True, cache=True)
def _read_all(words):
    """Sum of all words: the cheapest way to read every byte once."""
    chunks = 256
    per = words.size // chunks
    partial = np.zeros(chunks, np.uint64)
    for c in prange(chunks):
        s = np.uint64(0)
        for i in range(c * per, (c + 1) * per):
            s += words[i]
        partial[c] = s
    return partial.sum()


def timed(fn, seconds):
    """Mean seconds per call of fn() over about `seconds` of calls (after one warm-up)."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def read_bandwidth(seconds=0.8):
    """Bytes per second this process reads from DRAM with numba's current thread count."""
    words = np.ones(WORKING_SET // 8, np.uint64)
    return words.nbytes / timed(lambda: _read_all(words), seconds)
