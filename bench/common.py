"""What the benchmarks share: the machine's read bandwidth, measured the same way for all."""

import time

import numpy as np
from numba import njit, prange

WORKING_SET = 512 << 20  # bytes; well past any CPU cache


@njit(parallel=True, fastmath=True, cache=True)
def _read_all(values):
    """Sum of all values (float32, vectorized): the cheapest way to read every byte once."""
    chunks = 256
    per = values.size // chunks
    partial = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        part = values[c * per:(c + 1) * per]
        s = np.float32(0.0)
        for i in range(per):
            s += part[i]
        partial[c] = s
    return partial.sum()


def timed(fn, seconds, rounds=5):
    """Seconds per call of fn(): the best of `rounds` rounds of about seconds/rounds each.

    The best round, not the mean: on a 2-core machine one busy core stalls a parallel
    kernel for a whole scheduler tick, and that is the neighbour's cost, not the kernel's.
    """
    fn()
    best = float("inf")
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / rounds:
                break
        best = min(best, elapsed / n)
    return best


def read_bandwidth(seconds=0.8):
    """Bytes per second this process reads from DRAM with numba's current thread count."""
    values = np.ones(WORKING_SET // 4, np.float32)
    return values.nbytes / timed(lambda: _read_all(values), seconds)
