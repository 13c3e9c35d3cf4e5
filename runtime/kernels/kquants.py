"""Kernels for ggml's k-quant formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Every super-block holds 256 weights, split into sub-blocks that each carry a small integer
scale (and for some formats a min) relative to the super-block's f16 factor(s). All fields
are little-endian. "Element e" below is the weight's index inside its super-block.

- Q2_K (84 bytes): scales[16], qs[64], d:f16, dmin:f16. Sixteen sub-blocks of 16; byte
  scales[g] holds sub-block g's scale (low nibble) and min (high nibble). The 2-bit q of
  element e = 128h + 32j + l (h < 2, j < 4, l < 32) is bits 2j..2j+1 of qs[32h + l].
  Weight = d * scale * q - dmin * min.
- Q3_K (110 bytes): hmask[32], qs[64], scales[12], d:f16. Sixteen sub-blocks of 16. Element
  e = 128h + 32j + l has low bits as in Q2_K and a high bit, bit 4h + j of hmask[l];
  q = low - 4 when that bit is 0, else low (so q is in -4..3). The sixteen 6-bit scales:
  sub-block g's low 4 bits are the low (g < 8) or high (g >= 8) nibble of scales[g % 8],
  its high 2 bits are bits 2(g // 4).. of scales[8 + g % 4]; the scale is that value - 32.
  Weight = d * scale * q.
- Q4_K (144 bytes): d:f16, dmin:f16, scales[12], qs[128]. Eight sub-blocks of 32, each with
  a 6-bit scale and a 6-bit min packed into the 12 bytes: for j < 4, scale j is
  scales[j] & 63 and min j is scales[j + 4] & 63; for j >= 4, scale j is
  (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4 and min j is
  (scales[j + 4] >> 4) | (scales[j] >> 6) << 4. Element 64c + l (c < 4, l < 32) is the low
  nibble of qs[32c + l] (sub-block 2c), element 64c + 32 + l its high nibble (sub-block 2c+1).
  Weight = d * scale * q - dmin * min.
- Q5_K (176 bytes): d:f16, dmin:f16, scales[12], qh[32], qs[128]. As Q4_K, with a fifth
  bit for element 32k + l (k < 8) in bit k of qh[l], so q is in 0..31.
- Q6_K (210 bytes): ql[128], qh[64], scales[16] as int8, d:f16. Sixteen sub-blocks of 16.
  Element 128h + 32j + l (h < 2, j < 4, l < 32) has its low 4 bits in the low (j < 2) or
  high (j >= 2) nibble of ql[64h + 32(j % 2) + l], its high 2 bits in bits 2j..2j+1 of
  qh[32h + l]; q = that 6-bit value - 32. Weight = d * scales[e // 16] * q.

Dots never materialize the weights: a sub-block with scale s and min m contributes
d*s*sum(q*x) - dmin*m*sum(x), both sums taken in one pass over x, in float32 (fastmath
lets LLVM vectorize them). Integer work is done on int32 values: Numba's default int64
promotion would keep the loops scalar.
"""

import numpy as np
from numba import njit

from .common import read_f16

I32_2 = np.int32(2)
I32_3 = np.int32(3)
I32_4 = np.int32(4)
I32_6 = np.int32(6)
I32_15 = np.int32(15)
I32_32 = np.int32(32)
I32_63 = np.int32(63)


@njit(inline="always")
def _scale_min_k4(scales, j):
    """Q4_K/Q5_K: the 6-bit (scale, min) of sub-block j from the 12 packed bytes `scales`."""
    if j < 4:
        sc = np.int32(scales[j]) & I32_63
        m = np.int32(scales[j + 4]) & I32_63
    else:
        sc = (np.int32(scales[j + 4]) & I32_15) | ((np.int32(scales[j - 4]) >> I32_6) << I32_4)
        m = (np.int32(scales[j + 4]) >> I32_4) | ((np.int32(scales[j]) >> I32_6) << I32_4)
    return sc, m


@njit(inline="always")
def _q3_k_scale(scales, g):
    """Q3_K: the signed scale of sub-block g from the 12 packed bytes `scales`."""
    low = (np.int32(scales[g % 8]) >> (I32_4 * np.int32(g // 8))) & I32_15
    high = (np.int32(scales[8 + g % 4]) >> (I32_2 * np.int32(g // 4))) & I32_3
    return (low | (high << I32_4)) - I32_32


# ---------------------------------------------------------------------------------------- Q2_K

@njit(cache=True, fastmath=True)
def decode_q2_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q2_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        o = off + 84 * b
        scales = raw[o:o + 16]
        d = read_f16(raw, o + 80)
        dmin = read_f16(raw, o + 82)
        for h in range(2):
            qs = raw[o + 16 + 32 * h:o + 48 + 32 * h]
            for j in range(4):
                shift = I32_2 * np.int32(j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    s = np.int32(scales[g])
                    dl = d * np.float32(s & I32_15)
                    ml = dmin * np.float32(s >> I32_4)
                    q = qs[16 * half:16 * half + 16]
                    w = out[out_off + 256 * b + 16 * g:out_off + 256 * b + 16 * g + 16]
                    for l in range(16):
                        w[l] = dl * np.float32((np.int32(q[l]) >> shift) & I32_3) - ml


@njit(cache=True, fastmath=True)
def dot_q2_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q2_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 84 * b
        scales = raw[o:o + 16]
        sum_qx = np.float32(0.0)
        sum_mx = np.float32(0.0)
        for h in range(2):
            qs = raw[o + 16 + 32 * h:o + 48 + 32 * h]
            for j in range(4):
                shift = I32_2 * np.int32(j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    q = qs[16 * half:16 * half + 16]
                    xs = x[x_off + 256 * b + 16 * g:x_off + 256 * b + 16 * g + 16]
                    qx = np.float32(0.0)
                    sx = np.float32(0.0)
                    for l in range(16):
                        qx += np.float32((np.int32(q[l]) >> shift) & I32_3) * xs[l]
                        sx += xs[l]
                    s = np.int32(scales[g])
                    sum_qx += np.float32(s & I32_15) * qx
                    sum_mx += np.float32(s >> I32_4) * sx
        acc += read_f16(raw, o + 80) * sum_qx - read_f16(raw, o + 82) * sum_mx
    return acc


# ---------------------------------------------------------------------------------------- Q3_K

@njit(cache=True, fastmath=True)
def decode_q3_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q3_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        o = off + 110 * b
        hmask = raw[o:o + 32]
        scales = raw[o + 96:o + 108]
        d = read_f16(raw, o + 108)
        for h in range(2):
            qs = raw[o + 32 + 32 * h:o + 64 + 32 * h]
            for j in range(4):
                shift = I32_2 * np.int32(j)
                bit = np.int32(4 * h + j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    dl = d * np.float32(_q3_k_scale(scales, g))
                    q = qs[16 * half:16 * half + 16]
                    hm = hmask[16 * half:16 * half + 16]
                    w = out[out_off + 256 * b + 16 * g:out_off + 256 * b + 16 * g + 16]
                    for l in range(16):
                        low = (np.int32(q[l]) >> shift) & I32_3
                        high = (np.int32(hm[l]) >> bit) & np.int32(1)
                        w[l] = dl * np.float32(low + (high << I32_2) - I32_4)


@njit(cache=True, fastmath=True)
def dot_q3_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q3_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 110 * b
        hmask = raw[o:o + 32]
        scales = raw[o + 96:o + 108]
        sum_qx = np.float32(0.0)
        for h in range(2):
            qs = raw[o + 32 + 32 * h:o + 64 + 32 * h]
            for j in range(4):
                shift = I32_2 * np.int32(j)
                bit = np.int32(4 * h + j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    q = qs[16 * half:16 * half + 16]
                    hm = hmask[16 * half:16 * half + 16]
                    xs = x[x_off + 256 * b + 16 * g:x_off + 256 * b + 16 * g + 16]
                    qx = np.float32(0.0)
                    for l in range(16):
                        low = (np.int32(q[l]) >> shift) & I32_3
                        high = (np.int32(hm[l]) >> bit) & np.int32(1)
                        qx += np.float32(low + (high << I32_2) - I32_4) * xs[l]
                    sum_qx += np.float32(_q3_k_scale(scales, g)) * qx
        acc += read_f16(raw, o + 108) * sum_qx
    return acc


# ---------------------------------------------------------------------------------------- Q4_K

@njit(cache=True, fastmath=True)
def decode_q4_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q4_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        o = off + 144 * b
        d = read_f16(raw, o)
        dmin = read_f16(raw, o + 2)
        scales = raw[o + 4:o + 16]
        for c in range(4):
            sc0, m0 = _scale_min_k4(scales, 2 * c)
            sc1, m1 = _scale_min_k4(scales, 2 * c + 1)
            d0 = d * np.float32(sc0)
            d1 = d * np.float32(sc1)
            min0 = dmin * np.float32(m0)
            min1 = dmin * np.float32(m1)
            q = raw[o + 16 + 32 * c:o + 48 + 32 * c]
            w = out[out_off + 256 * b + 64 * c:out_off + 256 * b + 64 * c + 64]
            for l in range(32):
                qi = np.int32(q[l])
                w[l] = d0 * np.float32(qi & I32_15) - min0
                w[32 + l] = d1 * np.float32(qi >> I32_4) - min1


@njit(cache=True, fastmath=True)
def dot_q4_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q4_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 144 * b
        scales = raw[o + 4:o + 16]
        sum_qx = np.float32(0.0)
        sum_mx = np.float32(0.0)
        for c in range(4):
            q = raw[o + 16 + 32 * c:o + 48 + 32 * c]
            xa = x[x_off + 256 * b + 64 * c:x_off + 256 * b + 64 * c + 32]
            xb = x[x_off + 256 * b + 64 * c + 32:x_off + 256 * b + 64 * c + 64]
            qx0 = np.float32(0.0)
            qx1 = np.float32(0.0)
            sx0 = np.float32(0.0)
            sx1 = np.float32(0.0)
            for l in range(32):
                qi = np.int32(q[l])
                qx0 += np.float32(qi & I32_15) * xa[l]
                qx1 += np.float32(qi >> I32_4) * xb[l]
                sx0 += xa[l]
                sx1 += xb[l]
            sc0, m0 = _scale_min_k4(scales, 2 * c)
            sc1, m1 = _scale_min_k4(scales, 2 * c + 1)
            sum_qx += np.float32(sc0) * qx0 + np.float32(sc1) * qx1
            sum_mx += np.float32(m0) * sx0 + np.float32(m1) * sx1
        acc += read_f16(raw, o) * sum_qx - read_f16(raw, o + 2) * sum_mx
    return acc


# ---------------------------------------------------------------------------------------- Q5_K

@njit(cache=True, fastmath=True)
def decode_q5_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q5_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        o = off + 176 * b
        d = read_f16(raw, o)
        dmin = read_f16(raw, o + 2)
        scales = raw[o + 4:o + 16]
        qh = raw[o + 16:o + 48]
        for c in range(4):
            sc0, m0 = _scale_min_k4(scales, 2 * c)
            sc1, m1 = _scale_min_k4(scales, 2 * c + 1)
            d0 = d * np.float32(sc0)
            d1 = d * np.float32(sc1)
            min0 = dmin * np.float32(m0)
            min1 = dmin * np.float32(m1)
            bit0 = np.int32(2 * c)
            bit1 = np.int32(2 * c + 1)
            q = raw[o + 48 + 32 * c:o + 80 + 32 * c]
            w = out[out_off + 256 * b + 64 * c:out_off + 256 * b + 64 * c + 64]
            for l in range(32):
                qi = np.int32(q[l])
                hi = np.int32(qh[l])
                q0 = (qi & I32_15) | (((hi >> bit0) & np.int32(1)) << I32_4)
                q1 = (qi >> I32_4) | (((hi >> bit1) & np.int32(1)) << I32_4)
                w[l] = d0 * np.float32(q0) - min0
                w[32 + l] = d1 * np.float32(q1) - min1


@njit(cache=True, fastmath=True)
def dot_q5_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q5_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 176 * b
        scales = raw[o + 4:o + 16]
        qh = raw[o + 16:o + 48]
        sum_qx = np.float32(0.0)
        sum_mx = np.float32(0.0)
        for c in range(4):
            bit0 = np.int32(2 * c)
            bit1 = np.int32(2 * c + 1)
            q = raw[o + 48 + 32 * c:o + 80 + 32 * c]
            xa = x[x_off + 256 * b + 64 * c:x_off + 256 * b + 64 * c + 32]
            xb = x[x_off + 256 * b + 64 * c + 32:x_off + 256 * b + 64 * c + 64]
            qx0 = np.float32(0.0)
            qx1 = np.float32(0.0)
            sx0 = np.float32(0.0)
            sx1 = np.float32(0.0)
            for l in range(32):
                qi = np.int32(q[l])
                hi = np.int32(qh[l])
                q0 = (qi & I32_15) | (((hi >> bit0) & np.int32(1)) << I32_4)
                q1 = (qi >> I32_4) | (((hi >> bit1) & np.int32(1)) << I32_4)
                qx0 += np.float32(q0) * xa[l]
                qx1 += np.float32(q1) * xb[l]
                sx0 += xa[l]
                sx1 += xb[l]
            sc0, m0 = _scale_min_k4(scales, 2 * c)
            sc1, m1 = _scale_min_k4(scales, 2 * c + 1)
            sum_qx += np.float32(sc0) * qx0 + np.float32(sc1) * qx1
            sum_mx += np.float32(m0) * sx0 + np.float32(m1) * sx1
        acc += read_f16(raw, o) * sum_qx - read_f16(raw, o + 2) * sum_mx
    return acc


# ---------------------------------------------------------------------------------------- Q6_K

@njit(cache=True, fastmath=True)
def decode_q6_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q6_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        o = off + 210 * b
        scales = raw[o + 192:o + 208].view(np.int8)
        d = read_f16(raw, o + 208)
        for h in range(2):
            qh = raw[o + 128 + 32 * h:o + 160 + 32 * h]
            for j in range(4):
                ql = raw[o + 64 * h + 32 * (j % 2):o + 64 * h + 32 * (j % 2) + 32]
                nib = I32_4 * np.int32(j // 2)
                shift = I32_2 * np.int32(j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    dl = d * np.float32(scales[g])
                    lo = ql[16 * half:16 * half + 16]
                    hi = qh[16 * half:16 * half + 16]
                    w = out[out_off + 256 * b + 16 * g:out_off + 256 * b + 16 * g + 16]
                    for l in range(16):
                        q = ((np.int32(lo[l]) >> nib) & I32_15) | (((np.int32(hi[l]) >> shift) & I32_3) << I32_4)
                        w[l] = dl * np.float32(q - I32_32)


@njit(cache=True, fastmath=True)
def dot_q6_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q6_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 210 * b
        scales = raw[o + 192:o + 208].view(np.int8)
        sum_qx = np.float32(0.0)
        for h in range(2):
            qh = raw[o + 128 + 32 * h:o + 160 + 32 * h]
            for j in range(4):
                ql = raw[o + 64 * h + 32 * (j % 2):o + 64 * h + 32 * (j % 2) + 32]
                nib = I32_4 * np.int32(j // 2)
                shift = I32_2 * np.int32(j)
                for half in range(2):
                    g = 8 * h + 2 * j + half
                    lo = ql[16 * half:16 * half + 16]
                    hi = qh[16 * half:16 * half + 16]
                    xs = x[x_off + 256 * b + 16 * g:x_off + 256 * b + 16 * g + 16]
                    qx = np.float32(0.0)
                    for l in range(16):
                        q = ((np.int32(lo[l]) >> nib) & I32_15) | (((np.int32(hi[l]) >> shift) & I32_3) << I32_4)
                        qx += np.float32(q - I32_32) * xs[l]
                    sum_qx += np.float32(scales[g]) * qx
        acc += read_f16(raw, o + 208) * sum_qx
    return acc
