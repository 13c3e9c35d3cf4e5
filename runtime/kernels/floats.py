"""Kernels for the unquantized types: F32, F16 and BF16.

Layout: a plain little-endian array, one element per "block".
- F32: 4 bytes, IEEE binary32.
- F16: 2 bytes, IEEE binary16; converted through the 65,536-entry table in common.py.
- BF16: 2 bytes, the upper half of a binary32 (value = bits << 16 reinterpreted).

Each type has `decode_<t>(raw, off, n, out, out_off)` and `dot_<t>(raw, off, n, x, x_off)`,
with the same signatures as the quantized families so the dispatcher treats all alike.
"""

import numpy as np
from numba import njit

from .common import F16_TO_F32, dot_f32


@njit(fastmath=True, cache=True)
def decode_f32(raw, off, n, out, out_off):
    out[out_off:out_off + n] = raw[off:off + 4 * n].view(np.float32)


@njit(fastmath=True, cache=True)
def dot_f32_raw(raw, off, n, x, x_off):
    return dot_f32(raw[off:off + 4 * n].view(np.float32), 0, x, x_off, n)


@njit(fastmath=True, cache=True)
def decode_f16(raw, off, n, out, out_off):
    bits = raw[off:off + 2 * n].view(np.uint16)
    o = out[out_off:out_off + n]
    for i in range(n):
        o[i] = F16_TO_F32[bits[i]]


@njit(fastmath=True, cache=True)
def dot_f16(raw, off, n, x, x_off):
    bits = raw[off:off + 2 * n].view(np.uint16)
    xv = x[x_off:x_off + n]
    s = np.float32(0.0)
    for i in range(n):
        s += F16_TO_F32[bits[i]] * xv[i]
    return s


@njit(fastmath=True, cache=True)
def decode_bf16(raw, off, n, out, out_off):
    bits = raw[off:off + 2 * n].view(np.uint16)
    o = out[out_off:out_off + n].view(np.uint32)
    for i in range(n):
        o[i] = np.uint32(bits[i]) << np.uint32(16)


@njit(fastmath=True, cache=True)
def dot_bf16(raw, off, n, x, x_off):
    w = np.empty(n, np.float32)
    decode_bf16(raw, off, n, w, 0)
    return dot_f32(w, 0, x, x_off, n)
