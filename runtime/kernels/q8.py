"""matvec and matmul on 8-bit activations: quantize x once, then integer dot products.

As ggml does (its vec_dot_type): the activations are rounded to int8 blocks once per call,
kind Q8_0 (a float32 scale per 32) for the formats with blocks of 32 and kind Q8_K (per
256) for the k-quants, with int16 sums per 16 beside them (layout in q8dot.py). Each output
is then an integer dot product of the weight row's quant indices with those bytes.
Rounding x to yd * yq moves each element by at most yd / 2, so a result moves by at most
sum(|w| * yd / 2): the error ggml's own CPU kernels make.

One launch per call: the activations are quantized on the calling thread (or, for a batch,
in a parallel loop over its vectors) in the same compiled function as the parallel loop
over rows. Several matrices that share one input (Q, K and V; gate and up) go through one
launch too: `raws` is a tuple of their blocks and the rows of all of them are one range.
"""

import numpy as np
from numba import njit, prange

from runtime.ggml_types import Q8_0_ACTIVATION_TYPES, Q8_K_ACTIVATION_TYPES

from .common import F16_TO_F32
from . import q8dot, q8gemm

# GGML type ids with an integer path, by the activation block each one reads (the ggml_types
# table's `activations`).
Q8_0_TYPES = Q8_0_ACTIVATION_TYPES  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4
Q8_K_TYPES = Q8_K_ACTIVATION_TYPES  # Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS
INTEGER_TYPES = frozenset(Q8_0_TYPES + Q8_K_TYPES)


@njit(inline="always")
def activation_block(type_id):
    """Elements per activation scale for the type: 256 for the k-quants, else 32."""
    return 256 if type_id in Q8_K_TYPES else 32


@njit(inline="always")
def _round_to_f16(d, bits):
    """The float32 d (>= 0) rounded to the nearest f16 value (ties to even), subnormals
    included: how ggml stores a Q8_0 block's scale. bits: a uint32[1] to move d through."""
    if d < np.float32(2.0 ** -14):  # f16 subnormals: multiples of 2^-24
        return np.float32(np.rint(d * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24))
    value = bits.view(np.float32)
    value[0] = d
    b = bits[0]
    bits[0] = (b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return value[0]


@njit(cache=True)
def _magnitude_bits(words, first, count):
    """The bits of max |x| over x[first:first + count] (x's bits as uint32 `words`): the
    maximum taken on the bits with the sign cleared, as non-negative floats order as their
    bits do (a float maximum does not vectorize; this does)."""
    top = np.uint32(0)
    for i in range(first, first + count):
        top = max(top, words[i] & np.uint32(0x7FFFFFFF))
    return top


@njit(cache=True)
def _round_scaled(x, first, count, inv, yq):
    """yq = round(x * inv), halves to even, over [first, first + count) (its own function, so
    that the loop vectorizes)."""
    for i in range(first, first + count):
        yq[i] = np.int8(np.int32(np.rint(x[i] * inv)))


@njit(fastmath=False, cache=True)
def quantize_activations(x, block, yq, yd, ys):
    """x (float32, length a multiple of `block`) -> yq int8 with |yq| <= 127 and yd per block,
    as ggml's quantize_row_q8_0 (block 32: d = max|x| / 127 stored as f16, q = round(x / d)
    with the unrounded d) and quantize_row_q8_K (block 256: d in float32); ys = sums of yq
    per 16. Nothing allocates per block."""
    n = x.size
    words = x.view(np.uint32)
    bits = np.empty(1, np.uint32)
    for b in range(n // block):
        bits[0] = _magnitude_bits(words, b * block, block)
        amax = bits.view(np.float32)[0]
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)  # as ggml: not 1 / d
        yd[b] = _round_to_f16(d, bits) if block == 32 else d
        _round_scaled(x, b * block, block, inv, yq)
    for g in range(n // 16):
        s = np.int32(0)
        for i in range(16):
            s += np.int32(yq[16 * g + i])
        ys[g] = np.int16(s)


# The row dots, each one switch over the formats of the integer path (q8dot.type_switch).
_row_dot = q8dot.ROW_DOT
_row_dot_blocked = q8dot.ROW_DOT_BLOCKED
_row_dot_wide = q8dot.ROW_DOT_WIDE
_TOKENS = q8dot.MATMUL_TOKENS
_WIDE = q8dot.WIDE_TOKENS
_WIDE_TYPES = q8dot.WIDE_TYPES
if not set(_WIDE_TYPES) <= set(Q8_K_TYPES):
    raise ImportError("q8dot.WIDE_TYPES must be k-quants: matmul gives them Q8_K activations")
if not (set(q8gemm.LEGACY_GEMM_TYPES) <= set(Q8_0_TYPES)
        and set(q8gemm.GEMM_TYPES) - set(q8gemm.LEGACY_GEMM_TYPES) <= set(Q8_K_TYPES)):
    raise ImportError("q8gemm.LEGACY_GEMM_TYPES must be the GEMM's formats that read Q8_0 activations")


@njit(cache=True)
def dot_row(type_id, raw, off, nblocks, yq, yd, ys, yblock):
    """The integer dot of one weight row (type `type_id`) with activations from block
    `yblock`; NaN for a type without an integer path (never reached)."""
    return _row_dot(type_id, raw, off, nblocks, yq, yd, ys, yblock, 0, F16_TO_F32)


@njit(cache=True)
def dot_row_blocked(type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride):
    """The integer dots of one weight row with q8dot.MATMUL_TOKENS activation vectors, the
    first from block `yblock` on, the next ones `ystride` blocks apart."""
    return _row_dot_blocked(type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride, F16_TO_F32)


@njit(inline="always")
def is_wide(type_id):
    """Whether matmul runs the type's rows q8dot.WIDE_TOKENS vectors at a time."""
    return type_id in _WIDE_TYPES


@njit(cache=True)
def dot_row_wide(type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride):
    """dot_row_blocked for q8dot.WIDE_TOKENS vectors, for the types in q8dot.WIDE_TYPES."""
    return _row_dot_wide(type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride, F16_TO_F32)


@njit(inline="always")
def _needs(type_ids, block):
    for t in type_ids:
        if activation_block(t) == block:
            return True
    return False


@njit(parallel=True, cache=True)
def matvec_kernel(type_ids, raws, row_counts, row_bytes, cols, x, outs):
    """outs[m][r] = row r of matrix m (raws[m], type type_ids[m]) . x, for every matrix m."""
    n_small, n_big = cols // 32, cols // 256
    q_small = np.empty(cols, np.int8)
    d_small = np.empty(n_small, np.float32)
    q_big = np.empty(cols, np.int8)
    d_big = np.empty(max(n_big, 1), np.float32)
    sums_small = np.empty(cols // 16, np.int16)
    sums_big = np.empty(cols // 16, np.int16)
    if _needs(type_ids, 32):
        quantize_activations(x, 32, q_small, d_small, sums_small)
    if _needs(type_ids, 256):
        quantize_activations(x, 256, q_big, d_big, sums_big)
    m_count = len(type_ids)
    starts = np.zeros(m_count + 1, np.int64)
    for m in range(m_count):
        starts[m + 1] = starts[m] + row_counts[m]
    for r in prange(starts[m_count]):
        m = 0
        while r >= starts[m + 1]:
            m += 1
        t = type_ids[m]
        row = r - starts[m]
        if activation_block(t) == 32:
            outs[m][row] = dot_row(t, raws[m], row * row_bytes[m], n_small, q_small, d_small, sums_small, 0)
        else:
            outs[m][row] = dot_row(t, raws[m], row * row_bytes[m], n_big, q_big, d_big, sums_big, 0)


# Rows per work item of matmul: their blocks stay in L1 while every vector of the batch
# (its int8 bytes, in L2) passes over them. The GEMM's tile is as many rows.
_MATMUL_ROWS = q8gemm.ROWS
# Batches of at least this many vectors run the formats of q8gemm.GEMM_TYPES through the
# GEMM (fewer: the 4-vector row dots, which decode no tile).
GEMM_MIN_TOKENS = 16


@njit(inline="always")
def _uses_gemm(type_id, n):
    return n >= GEMM_MIN_TOKENS and q8gemm.has_gemm(type_id)


@njit(parallel=True, cache=True)
def matmul_kernel(type_ids, raws, row_counts, row_bytes, cols, X, outs):
    """outs[m][t, r] = row r of matrix m . X[t] for every matrix m and vector t."""
    n = X.shape[0]
    n_small, n_big = cols // 32, cols // 256
    q_small = np.empty(n * cols, np.int8)
    d_small = np.empty(n * n_small, np.float32)
    s_small = np.empty(n * cols // 16, np.int16)
    q_big = np.empty(n * cols, np.int8)
    d_big = np.empty(max(n * n_big, 1), np.float32)
    s_big = np.empty(n * cols // 16, np.int16)
    small, big = _needs(type_ids, 32), _needs(type_ids, 256)
    for t in prange(n):
        c0, c1 = t * cols, (t + 1) * cols
        if small:
            quantize_activations(X[t], 32, q_small[c0:c1], d_small[t * n_small:(t + 1) * n_small],
                                 s_small[c0 // 16:c1 // 16])
        if big:
            quantize_activations(X[t], 256, q_big[c0:c1], d_big[t * n_big:(t + 1) * n_big],
                                 s_big[c0 // 16:c1 // 16])
    gemm_small = gemm_big = False
    for ty in type_ids:
        if _uses_gemm(ty, n):
            if activation_block(ty) == 32:
                gemm_small = True
            else:
                gemm_big = True
    groups = (n + q8gemm.LANES - 1) // q8gemm.LANES
    groups_small = groups if gemm_small else 0
    groups_big = groups if gemm_big else 0
    xi_small, ysi_small, ydi_small = q8gemm.interleaved(groups_small, cols, 32)
    xi_big, ysi_big, ydi_big = q8gemm.interleaved(groups_big, cols, 256)
    for group in prange(max(groups_small, groups_big)):
        if group < groups_small:
            q8gemm.interleave(q_small, s_small, d_small, n, cols, 32, xi_small, ysi_small, ydi_small, group)
        if group < groups_big:
            q8gemm.interleave(q_big, s_big, d_big, n, cols, 256, xi_big, ysi_big, ydi_big, group)
    m_count = len(type_ids)
    starts = np.zeros(m_count + 1, np.int64)
    for m in range(m_count):
        starts[m + 1] = starts[m] + (row_counts[m] + _MATMUL_ROWS - 1) // _MATMUL_ROWS
    for g in prange(starts[m_count]):
        m = 0
        while g >= starts[m + 1]:
            m += 1
        ty = type_ids[m]
        raw = raws[m]
        out = outs[m]
        first = (g - starts[m]) * _MATMUL_ROWS
        if _uses_gemm(ty, n):
            if activation_block(ty) == 32:
                q8gemm.gemm_rows(ty, raw, row_bytes[m], row_counts[m], first, cols, xi_small, ysi_small, ydi_small,
                                 n, out)
            else:
                q8gemm.gemm_rows(ty, raw, row_bytes[m], row_counts[m], first, cols, xi_big, ysi_big, ydi_big, n, out)
            continue
        last = min(first + _MATMUL_ROWS, row_counts[m])
        small_blocks = activation_block(ty) == 32
        nb = n_small if small_blocks else n_big
        for row in range(first, last):
            off = row * row_bytes[m]
            t = 0
            if is_wide(ty):  # k-quants only: Q8_K activations
                while t + _WIDE <= n:
                    wide = dot_row_wide(ty, raw, off, nb, q_big, d_big, s_big, t * nb, nb)
                    for j in range(_WIDE):
                        out[t + j, row] = wide[j]
                    t += _WIDE
            while t + _TOKENS <= n:
                if small_blocks:
                    sums = dot_row_blocked(ty, raw, off, nb, q_small, d_small, s_small, t * nb, nb)
                else:
                    sums = dot_row_blocked(ty, raw, off, nb, q_big, d_big, s_big, t * nb, nb)
                for j in range(_TOKENS):
                    out[t + j, row] = sums[j]
                t += _TOKENS
            while t < n:
                if small_blocks:
                    out[t, row] = dot_row(ty, raw, off, nb, q_small, d_small, s_small, t * nb)
                else:
                    out[t, row] = dot_row(ty, raw, off, nb, q_big, d_big, s_big, t * nb)
                t += 1
