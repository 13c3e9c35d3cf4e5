"""Kernels for ggml's first quantization formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Every block holds 32 weights; all fields are little-endian.
- Q4_0 (18 bytes): d:f16, qs[16]. Weight i is d * (q_i - 8), where q_i is the low nibble
  of qs[i] for i < 16 and the high nibble of qs[i - 16] for i >= 16.
- Q4_1 (20 bytes): d:f16, m:f16, qs[16]. Weight i is d * q_i + m, nibbles as in Q4_0.
- Q5_0 (22 bytes): d:f16, qh:u32, qs[16]. q_i gains a fifth bit, bit i of qh;
  weight i is d * (q_i - 16).
- Q5_1 (24 bytes): d:f16, m:f16, qh:u32, qs[16]. Weight i is d * q_i + m, q_i as in Q5_0.
- Q8_0 (34 bytes): d:f16, qs[32] as int8. Weight i is d * qs[i].

Each block is one vector operation of 32 built from a field recipe in simd.py; with a
minimum m, sum(w * x) = d * sum(q * x) + m * sum(x).
"""

import numpy as np
from numba import njit

from .common import read_f16
from .simd import bits_decode, bits_dot, sum32

# Field recipes: 32 nibbles from 16 bytes, with a fifth bit from the 32-bit qh for Q5;
# signed bytes for Q8_0.
_Q4 = dict(n=32, a_mask=15, a_nibbles=True)
_Q5 = dict(n=32, a_mask=15, a_nibbles=True, b_kind="bits32", b_mask=1, b_lshift=4)
_dot_q4_0, _dec_q4_0 = bits_dot(ibias=8, **_Q4), bits_decode(ibias=8, **_Q4)
_dot_q4_1, _dec_q4_1 = bits_dot(**_Q4), bits_decode(**_Q4)
_dot_q5_0, _dec_q5_0 = bits_dot(ibias=16, **_Q5), bits_decode(ibias=16, **_Q5)
_dot_q5_1, _dec_q5_1 = bits_dot(**_Q5), bits_decode(**_Q5)
_dot_q8_0, _dec_q8_0 = bits_dot(n=32, signed=True), bits_decode(n=32, signed=True)

_ZERO = np.float32(0.0)


@njit(cache=True)
def decode_q4_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o, w = off + 18 * b, out_off + 32 * b
        d = read_f16(raw, o)
        _dec_q4_0(raw, o + 2, 0, 0, 0, d, _ZERO, out, w)


@njit(fastmath=True, cache=True)
def dot_q4_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o, xo = off + 18 * b, x_off + 32 * b
        acc += read_f16(raw, o) * _dot_q4_0(raw, o + 2, 0, 0, 0, x, xo)
    return acc


@njit(cache=True)
def decode_q4_1(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o, w = off + 20 * b, out_off + 32 * b
        d, m = read_f16(raw, o), read_f16(raw, o + 2)
        _dec_q4_1(raw, o + 4, 0, 0, 0, d, m, out, w)


@njit(fastmath=True, cache=True)
def dot_q4_1(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o, xo = off + 20 * b, x_off + 32 * b
        s = _dot_q4_1(raw, o + 4, 0, 0, 0, x, xo)
        acc += read_f16(raw, o) * s + read_f16(raw, o + 2) * sum32(x, xo)
    return acc


@njit(cache=True)
def decode_q5_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o, w = off + 22 * b, out_off + 32 * b
        d = read_f16(raw, o)
        _dec_q5_0(raw, o + 6, 0, o + 2, 0, d, _ZERO, out, w)


@njit(fastmath=True, cache=True)
def dot_q5_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o, xo = off + 22 * b, x_off + 32 * b
        s = _dot_q5_0(raw, o + 6, 0, o + 2, 0, x, xo)
        acc += read_f16(raw, o) * s
    return acc


@njit(cache=True)
def decode_q5_1(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o, w = off + 24 * b, out_off + 32 * b
        d, m = read_f16(raw, o), read_f16(raw, o + 2)
        _dec_q5_1(raw, o + 8, 0, o + 4, 0, d, m, out, w)


@njit(fastmath=True, cache=True)
def dot_q5_1(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o, xo = off + 24 * b, x_off + 32 * b
        s = _dot_q5_1(raw, o + 8, 0, o + 4, 0, x, xo)
        acc += read_f16(raw, o) * s + read_f16(raw, o + 2) * sum32(x, xo)
    return acc


@njit(cache=True)
def decode_q8_0(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 34 * b
        _dec_q8_0(raw, o + 2, 0, 0, 0, read_f16(raw, o), _ZERO, out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_q8_0(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 34 * b
        acc += read_f16(raw, o) * _dot_q8_0(raw, o + 2, 0, 0, 0, x, x_off + 32 * b)
    return acc
