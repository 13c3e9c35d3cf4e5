"""The three parallel kernels (dequantize, matvec, matmul), generic over the tensor type.

Each format family supplies `decode_<t>(raw, off, nblocks, out, out_off)` and
`dot_<t>(raw, off, nblocks, x, x_off)`; this module switches on the GGML type id once per
row (or chunk of blocks), so one compiled, cacheable kernel serves every format and each
format is written once. Numba cannot cache kernels specialised by closure or by a function
argument (measured: every call re-compiles), hence the switch.
"""

import numpy as np
from numba import njit, prange

from . import floats, iquants, kquants, legacy


@njit(cache=True)
def decode_blocks(type_id, raw, off, nblocks, out, out_off):
    """Decode `nblocks` blocks of type `type_id` at raw[off] into out[out_off:]."""
    if type_id == 0:
        floats.decode_f32(raw, off, nblocks, out, out_off)
    elif type_id == 1:
        floats.decode_f16(raw, off, nblocks, out, out_off)
    elif type_id == 30:
        floats.decode_bf16(raw, off, nblocks, out, out_off)
    elif type_id == 2:
        legacy.decode_q4_0(raw, off, nblocks, out, out_off)
    elif type_id == 3:
        legacy.decode_q4_1(raw, off, nblocks, out, out_off)
    elif type_id == 6:
        legacy.decode_q5_0(raw, off, nblocks, out, out_off)
    elif type_id == 7:
        legacy.decode_q5_1(raw, off, nblocks, out, out_off)
    elif type_id == 8:
        legacy.decode_q8_0(raw, off, nblocks, out, out_off)
    elif type_id == 10:
        kquants.decode_q2_k(raw, off, nblocks, out, out_off)
    elif type_id == 11:
        kquants.decode_q3_k(raw, off, nblocks, out, out_off)
    elif type_id == 12:
        kquants.decode_q4_k(raw, off, nblocks, out, out_off)
    elif type_id == 13:
        kquants.decode_q5_k(raw, off, nblocks, out, out_off)
    elif type_id == 14:
        kquants.decode_q6_k(raw, off, nblocks, out, out_off)
    elif type_id == 20:
        iquants.decode_iq4_nl(raw, off, nblocks, out, out_off)
    elif type_id == 23:
        iquants.decode_iq4_xs(raw, off, nblocks, out, out_off)


@njit(cache=True)
def dot_blocks(type_id, raw, off, nblocks, x, x_off):
    """Dot product of `nblocks` blocks of type `type_id` at raw[off] with x[x_off:]."""
    if type_id == 0:
        return floats.dot_f32_raw(raw, off, nblocks, x, x_off)
    elif type_id == 1:
        return floats.dot_f16(raw, off, nblocks, x, x_off)
    elif type_id == 30:
        return floats.dot_bf16(raw, off, nblocks, x, x_off)
    elif type_id == 2:
        return legacy.dot_q4_0(raw, off, nblocks, x, x_off)
    elif type_id == 3:
        return legacy.dot_q4_1(raw, off, nblocks, x, x_off)
    elif type_id == 6:
        return legacy.dot_q5_0(raw, off, nblocks, x, x_off)
    elif type_id == 7:
        return legacy.dot_q5_1(raw, off, nblocks, x, x_off)
    elif type_id == 8:
        return legacy.dot_q8_0(raw, off, nblocks, x, x_off)
    elif type_id == 10:
        return kquants.dot_q2_k(raw, off, nblocks, x, x_off)
    elif type_id == 11:
        return kquants.dot_q3_k(raw, off, nblocks, x, x_off)
    elif type_id == 12:
        return kquants.dot_q4_k(raw, off, nblocks, x, x_off)
    elif type_id == 13:
        return kquants.dot_q5_k(raw, off, nblocks, x, x_off)
    elif type_id == 14:
        return kquants.dot_q6_k(raw, off, nblocks, x, x_off)
    elif type_id == 20:
        return iquants.dot_iq4_nl(raw, off, nblocks, x, x_off)
    elif type_id == 23:
        return iquants.dot_iq4_xs(raw, off, nblocks, x, x_off)
    return np.float32(np.nan)


# Blocks decoded per parallel work item in dequantize_kernel.
_DEQUANTIZE_CHUNK = 64


@njit(parallel=True, cache=True)
def dequantize_kernel(type_id, raw, nblocks, block_bytes, block_elems, out):
    nchunks = (nblocks + _DEQUANTIZE_CHUNK - 1) // _DEQUANTIZE_CHUNK
    for c in prange(nchunks):
        first = c * _DEQUANTIZE_CHUNK
        count = min(_DEQUANTIZE_CHUNK, nblocks - first)
        decode_blocks(type_id, raw, first * block_bytes, count, out, first * block_elems)


@njit(parallel=True, cache=True)
def matvec_kernel(type_id, raw, rows, row_bytes, row_blocks, x, out):
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
