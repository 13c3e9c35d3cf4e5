"""Kernels for ggml's first quantization formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Every block holds 32 weights; all fields are little-endian.
- Q4_0 (18 bytes): d:f16, qs[16]. Weight i is d * (q_i - 8), where q_i is the low nibble
  of qs[i] for i < 16 and the high nibble of qs[i - 16] for i >= 16.
- Q4_1 (20 bytes): d:f16, m:f16, qs[16]. Weight i is d * q_i + m, nibbles as in Q4_0.
- Q5_0 (22 bytes): d:f16, qh:u32, qs[16]. q_i gains a fifth bit, bit i of qh;
  weight i is d * (q_i - 16).
- Q5_1 (24 bytes): d:f16, m:f16, qh:u32, qs[16]. Weight i is d * q_i + m, q_i as in Q5_0.
- Q8_0 (34 bytes): d:f16, qs[32] as int8. Weight i is d * qs[i].

The four nibble formats share one decoder and one dot: a weight is scale * (q - zero) + bias,
so sum(w * x) = scale * (sum(q * x) - zero * sum(x)) + bias * sum(x). Decoders are bit-exact
with ggml (no fastmath, same operation order); dots use fastmath and float32 accumulators.
"""

import numpy as np
from numba import njit

from .common import read_f16


@njit(inline="always")
def _read_u32(raw, off):
    return (np.uint32(raw[off]) | (np.uint32(raw[off + 1]) << np.uint32(8))
            | (np.uint32(raw[off + 2]) << np.uint32(16)) | (np.uint32(raw[off + 3]) << np.uint32(24)))


@njit(inline="always")
def _decode_nibbles(raw, qs_off, qh, scale, zero, bias, out, out_off):
    """out[out_off:+32] = scale * (q - zero) + bias for the 16 nibble bytes at qs_off (qh: fifth bits, or 0).

    No fastmath here: the expression is evaluated as ggml writes it, so results are bit-exact.
    """
    qs = raw[qs_off:qs_off + 16]
    lo = out[out_off:out_off + 16]
    hi = out[out_off + 16:out_off + 32]
    for i in range(16):
        q = np.int32(qs[i])
        ql = (q & np.int32(15)) | (np.int32((qh >> np.uint32(i)) & np.uint32(1)) << np.int32(4))
        qu = (q >> np.int32(4)) | (np.int32((qh >> np.uint32(i + 16)) & np.uint32(1)) << np.int32(4))
        lo[i] = scale * (np.float32(ql) - zero) + bias
        hi[i] = scale * (np.float32(qu) - zero) + bias


@njit(inline="always", fastmath=True)
def _dot_nibbles(raw, qs_off, qh, x, x_off):
    """(sum(q * x), sum(x)) over one block of 32, the q as in _decode_nibbles."""
    qs = raw[qs_off:qs_off + 16]
    xl = x[x_off:x_off + 16]
    xu = x[x_off + 16:x_off + 32]
    s = np.float32(0.0)
    sx = np.float32(0.0)
    for i in range(16):
        q = np.int32(qs[i])
        ql = (q & np.int32(15)) | (np.int32((qh >> np.uint32(i)) & np.uint32(1)) << np.int32(4))
        qu = (q >> np.int32(4)) | (np.int32((qh >> np.uint32(i + 16)) & np.uint32(1)) << np.int32(4))
        s += np.float32(ql) * xl[i] + np.float32(qu) * xu[i]
        sx += xl[i] + xu[i]
    return s, sx


@njit(cache=True)
def decode_q4_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 18 * b
        _decode_nibbles(raw, o + 2, np.uint32(0), read_f16(raw, o), np.float32(8.0), np.float32(0.0), out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_q4_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 18 * b
        s, sx = _dot_nibbles(raw, o + 2, np.uint32(0), x, x_off + 32 * b)
        acc += read_f16(raw, o) * (s - np.float32(8.0) * sx)
    return acc


@njit(cache=True)
def decode_q4_1(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 20 * b
        _decode_nibbles(raw, o + 4, np.uint32(0), read_f16(raw, o), np.float32(0.0), read_f16(raw, o + 2), out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_q4_1(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 20 * b
        s, sx = _dot_nibbles(raw, o + 4, np.uint32(0), x, x_off + 32 * b)
        acc += read_f16(raw, o) * s + read_f16(raw, o + 2) * sx
    return acc


@njit(cache=True)
def decode_q5_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 22 * b
        _decode_nibbles(raw, o + 6, _read_u32(raw, o + 2), read_f16(raw, o), np.float32(16.0), np.float32(0.0),
                        out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_q5_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 22 * b
        s, sx = _dot_nibbles(raw, o + 6, _read_u32(raw, o + 2), x, x_off + 32 * b)
        acc += read_f16(raw, o) * (s - np.float32(16.0) * sx)
    return acc


@njit(cache=True)
def decode_q5_1(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 24 * b
        _decode_nibbles(raw, o + 8, _read_u32(raw, o + 4), read_f16(raw, o), np.float32(0.0), read_f16(raw, o + 2),
                        out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_q5_1(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 24 * b
        s, sx = _dot_nibbles(raw, o + 8, _read_u32(raw, o + 4), x, x_off + 32 * b)
        acc += read_f16(raw, o) * s + read_f16(raw, o + 2) * sx
    return acc


@njit(cache=True)
def decode_q8_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 34 * b
        d = read_f16(raw, o)
        qs = raw[o + 2:o + 34].view(np.int8)
        w = out[out_off + 32 * b:out_off + 32 * b + 32]
        for i in range(32):
            w[i] = d * np.float32(qs[i])


@njit(fastmath=True, cache=True)
def dot_q8_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 34 * b
        qs = raw[o + 2:o + 34].view(np.int8)
        xv = x[x_off + 32 * b:x_off + 32 * b + 32]
        s = np.float32(0.0)
        for i in range(32):
            s += np.float32(qs[i]) * xv[i]
        acc += read_f16(raw, o) * s
    return acc
