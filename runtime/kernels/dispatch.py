"""The three parallel kernels (dequantize, matvec, matmul), generic over the tensor type.

Each format family supplies `decode_<t>(raw, off, nblocks, out, out_off)` and
`dot_<t>(raw, off, nblocks, x, x_off)`; this module switches on the GGML type id once per
row (or chunk of blocks), so one compiled, cacheable kernel serves every format and each
format is written once. Numba cannot cache kernels specialised by closure or by a function
argument (measured: every call re-compiles), hence the switch. Its ids are the named
constants of runtime.ggml_types, which Numba compiles as constants; a type with kernels
(a `family` in that table) and no branch here fails tests/test_kernels.py, and an id with
no branch raises ValueError rather than leave the output unwritten.
"""

import numpy as np
from numba import njit, prange

from runtime.ggml_types import (
    BF16, F16, F32, IQ4_NL, IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
)

from . import floats, iquants, kquants, legacy, mxfp4


@njit(cache=True)
def decode_blocks(type_id, raw, off, nblocks, out, out_off):
    """Decode `nblocks` blocks of type `type_id` at raw[off] into out[out_off:]."""
    if type_id == F32:
        floats.decode_f32(raw, off, nblocks, out, out_off)
    elif type_id == F16:
        floats.decode_f16(raw, off, nblocks, out, out_off)
    elif type_id == BF16:
        floats.decode_bf16(raw, off, nblocks, out, out_off)
    elif type_id == Q4_0:
        legacy.decode_q4_0(raw, off, nblocks, out, out_off)
    elif type_id == Q4_1:
        legacy.decode_q4_1(raw, off, nblocks, out, out_off)
    elif type_id == Q5_0:
        legacy.decode_q5_0(raw, off, nblocks, out, out_off)
    elif type_id == Q5_1:
        legacy.decode_q5_1(raw, off, nblocks, out, out_off)
    elif type_id == Q8_0:
        legacy.decode_q8_0(raw, off, nblocks, out, out_off)
    elif type_id == Q2_K:
        kquants.decode_q2_k(raw, off, nblocks, out, out_off)
    elif type_id == Q3_K:
        kquants.decode_q3_k(raw, off, nblocks, out, out_off)
    elif type_id == Q4_K:
        kquants.decode_q4_k(raw, off, nblocks, out, out_off)
    elif type_id == Q5_K:
        kquants.decode_q5_k(raw, off, nblocks, out, out_off)
    elif type_id == Q6_K:
        kquants.decode_q6_k(raw, off, nblocks, out, out_off)
    elif type_id == IQ4_NL:
        iquants.decode_iq4_nl(raw, off, nblocks, out, out_off)
    elif type_id == IQ4_XS:
        iquants.decode_iq4_xs(raw, off, nblocks, out, out_off)
    elif type_id == MXFP4:
        mxfp4.decode_mxfp4(raw, off, nblocks, out, out_off)
    else:
        raise ValueError("decode_blocks: no kernel for this tensor type id")


@njit(cache=True)
def dot_blocks(type_id, raw, off, nblocks, x, x_off):
    """Dot product of `nblocks` blocks of type `type_id` at raw[off] with x[x_off:]."""
    if type_id == F32:
        return floats.dot_f32_raw(raw, off, nblocks, x, x_off)
    elif type_id == F16:
        return floats.dot_f16(raw, off, nblocks, x, x_off)
    elif type_id == BF16:
        return floats.dot_bf16(raw, off, nblocks, x, x_off)
    elif type_id == Q4_0:
        return legacy.dot_q4_0(raw, off, nblocks, x, x_off)
    elif type_id == Q4_1:
        return legacy.dot_q4_1(raw, off, nblocks, x, x_off)
    elif type_id == Q5_0:
        return legacy.dot_q5_0(raw, off, nblocks, x, x_off)
    elif type_id == Q5_1:
        return legacy.dot_q5_1(raw, off, nblocks, x, x_off)
    elif type_id == Q8_0:
        return legacy.dot_q8_0(raw, off, nblocks, x, x_off)
    elif type_id == Q2_K:
        return kquants.dot_q2_k(raw, off, nblocks, x, x_off)
    elif type_id == Q3_K:
        return kquants.dot_q3_k(raw, off, nblocks, x, x_off)
    elif type_id == Q4_K:
        return kquants.dot_q4_k(raw, off, nblocks, x, x_off)
    elif type_id == Q5_K:
        return kquants.dot_q5_k(raw, off, nblocks, x, x_off)
    elif type_id == Q6_K:
        return kquants.dot_q6_k(raw, off, nblocks, x, x_off)
    elif type_id == IQ4_NL:
        return iquants.dot_iq4_nl(raw, off, nblocks, x, x_off)
    elif type_id == IQ4_XS:
        return iquants.dot_iq4_xs(raw, off, nblocks, x, x_off)
    elif type_id == MXFP4:
        return mxfp4.dot_mxfp4(raw, off, nblocks, x, x_off)
    raise ValueError("dot_blocks: no kernel for this tensor type id")


@njit(cache=True)
def check_type_id(type_id, raw, out):
    """Raise decode_blocks' ValueError for an id it has no branch for, before a parallel
    loop: raised inside one, it reaches Python as a SystemError. (Zero blocks: no work.)"""
    decode_blocks(type_id, raw, 0, 0, out, 0)


# Blocks decoded per parallel work item in dequantize_kernel.
_DEQUANTIZE_CHUNK = 64


@njit(parallel=True, cache=True)
def dequantize_kernel(type_id, raw, nblocks, block_bytes, block_elems, out):
    check_type_id(type_id, raw, out)
    nchunks = (nblocks + _DEQUANTIZE_CHUNK - 1) // _DEQUANTIZE_CHUNK
    for c in prange(nchunks):
        first = c * _DEQUANTIZE_CHUNK
        count = min(_DEQUANTIZE_CHUNK, nblocks - first)
        decode_blocks(type_id, raw, first * block_bytes, count, out, first * block_elems)


@njit(parallel=True, cache=True)
def matvec_kernel(type_id, raw, rows, row_bytes, row_blocks, x, out):
    check_type_id(type_id, raw, out)
    for r in prange(rows):
        out[r] = dot_blocks(type_id, raw, r * row_bytes, row_blocks, x, 0)


@njit(fastmath=True, inline="always")
def _dot4(w, x):
    """The dot products of the 4 rows of w with x: each load of x feeds 4 FMAs."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    for i in range(x.size):
        xi = x[i]
        a0 += w0[i] * xi
        a1 += w1[i] * xi
        a2 += w2[i] * xi
        a3 += w3[i] * xi
    return a0, a1, a2, a3


@njit(parallel=True, fastmath=True, cache=True)
def matmul_kernel(type_id, raw, rows, row_bytes, row_blocks, X, out):
    """Each work item decodes 4 rows once into a private buffer and reuses them for every
    vector of the batch (4 rows at a time halve the loads per multiply-add)."""
    n, cols = X.shape
    check_type_id(type_id, raw, out[0])
    for g in prange((rows + 3) // 4):
        w = np.zeros((4, cols), np.float32)
        first = 4 * g
        count = min(4, rows - first)
        for k in range(count):
            decode_blocks(type_id, raw, (first + k) * row_bytes, row_blocks, w[k], 0)
        for t in range(n):
            a0, a1, a2, a3 = _dot4(w, X[t])
            out[t, first] = a0
            if count > 1:
                out[t, first + 1] = a1
            if count > 2:
                out[t, first + 2] = a2
            if count > 3:
                out[t, first + 3] = a3
