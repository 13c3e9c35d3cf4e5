"""Kernels for ggml's k-quant formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Every super-block holds 256 weights in sub-blocks that each carry a small integer scale
(and for some formats a min) relative to the super-block's f16 factor(s). All fields are
little-endian. "Element e" is a weight's index inside its super-block.

- Q2_K (84 bytes): scales[16], qs[64], d:f16, dmin:f16. Sixteen sub-blocks of 16; byte
  scales[g] holds sub-block g's scale (low nibble) and min (high nibble). The 2-bit q of
  element e = 128h + 32j + l (h < 2, j < 4, l < 32) is bits 2j..2j+1 of qs[32h + l].
  Weight = d * scale * q - dmin * min.
- Q3_K (110 bytes): hmask[32], qs[64], scales[12], d:f16. Sixteen sub-blocks of 16. Element
  e = 128h + 32j + l has its low 2 bits as in Q2_K and a high bit, bit 4h + j of hmask[l];
  q = low - 4 when that bit is 0, else low (q in -4..3). Sub-block g's 6-bit scale has its
  low 4 bits in the low (g < 8) or high (g >= 8) nibble of scales[g % 8] and its high 2 bits
  at bit 2(g // 4) of scales[8 + g % 4]; it is stored + 32. Weight = d * (scale - 32) * q.
- Q4_K (144 bytes): d:f16, dmin:f16, scales[12], qs[128]. Eight sub-blocks of 32, each with
  a 6-bit scale and a 6-bit min packed in the 12 bytes: for j < 4, scale j is
  scales[j] & 63 and min j is scales[j + 4] & 63; for j >= 4, scale j is
  (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4 and min j is
  (scales[j + 4] >> 4) | (scales[j] >> 6) << 4. Element 64c + l (c < 4, l < 32) is the low
  nibble of qs[32c + l] (sub-block 2c), element 64c + 32 + l its high nibble (sub-block 2c+1).
  Weight = d * scale * q - dmin * min.
- Q5_K (176 bytes): d:f16, dmin:f16, scales[12], qh[32], qs[128]. As Q4_K, plus a fifth
  bit for element 32k + l (k < 8): bit k of qh[l], so q is in 0..31.
- Q6_K (210 bytes): ql[128], qh[64], scales[16] as int8, d:f16. Sixteen sub-blocks of 16.
  Element 128h + 32j + l (h < 2, j < 4, l < 32) has its low 4 bits in the low (j < 2) or
  high (j >= 2) nibble of ql[64h + 32(j % 2) + l] and its high 2 bits at bit 2j of
  qh[32h + l]; q = that 6-bit value - 32. Weight = d * scales[e // 16] * q.

How the loops are written, and why (each point measured on AVX2 with numba 0.68):
- Numba types every integer operation as int64, and LLVM then vectorizes shifts in 64-bit
  lanes (4 per register). So inner loops never shift an unpacked value: a field is isolated
  with a mask in place (q & 0xF0 is 16 * the high nibble) and the power of two is folded
  into the sub-block's float scale. Where bits from two bytes must be joined (Q3_K, Q5_K,
  Q6_K), the joined value is truncated with np.uint8 before conversion: that tells LLVM only
  8 bits matter, and it does the joining in byte lanes (16 or 32 per register).
- One slice per super-block (raw and x); other indexing is relative to it, so offsets are
  provably non-negative and LLVM drops Numba's negative-index wraparound code.
- A dot never materializes weights: each sub-block contributes sum((scale*q - min) * x),
  one float32 accumulator per inner loop, fastmath so LLVM vectorizes and reassociates.
- Decoders compute each weight with one rounding from exact products, so they are
  bit-exact with gguf's reference.
"""

import numpy as np
from numba import njit

from .common import read_f16

M2_0 = np.int32(0x03)
M2_1 = np.int32(0x0C)
M2_2 = np.int32(0x30)
M2_3 = np.int32(0xC0)
M4_LO = np.int32(0x0F)
M4_HI = np.int32(0xF0)
QUARTER = np.float32(1.0 / 4.0)
SIXTEENTH = np.float32(1.0 / 16.0)
SIXTY_FOURTH = np.float32(1.0 / 64.0)


@njit(inline="always")
def _read_u32(blk, off):
    """The little-endian uint32 at blk[off:off+4], as int64 (LLVM fuses the byte loads)."""
    return (np.int64(blk[off]) | (np.int64(blk[off + 1]) << 8)
            | (np.int64(blk[off + 2]) << 16) | (np.int64(blk[off + 3]) << 24))


@njit(inline="always")
def _byte(word, j):
    """Byte j of an int64 that packs eight small values."""
    return (word >> (8 * j)) & 255


@njit(inline="always")
def _k4_scales_mins(blk, off):
    """Q4_K/Q5_K: the 12 bytes at blk[off] unpacked to (scales, mins), int64s whose byte j is
    sub-block j's 6-bit scale / min (branch-free: whole 32-bit words at a time)."""
    lo = _read_u32(blk, off)
    mid = _read_u32(blk, off + 4)
    hi = _read_u32(blk, off + 8)
    scales = (lo & 0x3F3F3F3F) | (((hi & 0x0F0F0F0F) | (((lo >> 6) & 0x03030303) << 4)) << 32)
    mins = (mid & 0x3F3F3F3F) | ((((hi >> 4) & 0x0F0F0F0F) | (((mid >> 6) & 0x03030303) << 4)) << 32)
    return scales, mins


@njit(inline="always")
def _k4_chunk_factors(d, dmin, scales, mins, c):
    """Q4_K/Q5_K: (d * scale, d * scale, dmin * min, dmin * min) of sub-blocks 2c and 2c + 1."""
    return (d * np.float32(_byte(scales, 2 * c)), d * np.float32(_byte(scales, 2 * c + 1)),
            dmin * np.float32(_byte(mins, 2 * c)), dmin * np.float32(_byte(mins, 2 * c + 1)))


@njit(inline="always")
def _q3_k_scales(blk, off):
    """Q3_K: the 12 bytes at blk[off] unpacked to two int64s whose byte j is the stored
    (+32) 6-bit scale of sub-block j, resp. 8 + j."""
    a = _read_u32(blk, off)
    b = _read_u32(blk, off + 4)
    c = _read_u32(blk, off + 8)
    s0 = (a & 0x0F0F0F0F) | ((c & 0x03030303) << 4)
    s1 = (b & 0x0F0F0F0F) | (((c >> 2) & 0x03030303) << 4)
    s2 = ((a >> 4) & 0x0F0F0F0F) | (((c >> 4) & 0x03030303) << 4)
    s3 = ((b >> 4) & 0x0F0F0F0F) | (((c >> 6) & 0x03030303) << 4)
    return s0 | (s1 << 32), s2 | (s3 << 32)


# ---------------------------------------------------------------------------------------- Q2_K

@njit(inline="always")
def _q2_k_scale4(d, dmin, blk, g):
    """Factors of the four sub-blocks g + 2j (j < 4), whose q sit at bit 2j: the scales
    d * scale / 4^j (so they apply to the masked byte, q * 4^j) and the mins dmin * min."""
    return (d * np.float32(np.int32(blk[g]) & M4_LO),
            d * np.float32(np.int32(blk[g + 2]) & M4_LO) * QUARTER,
            d * np.float32(np.int32(blk[g + 4]) & M4_LO) * SIXTEENTH,
            d * np.float32(np.int32(blk[g + 6]) & M4_LO) * SIXTY_FOURTH,
            dmin * np.float32(blk[g] >> 4), dmin * np.float32(blk[g + 2] >> 4),
            dmin * np.float32(blk[g + 4] >> 4), dmin * np.float32(blk[g + 6] >> 4))


@njit(cache=True, fastmath=True)
def decode_q2_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q2_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        blk = raw[off + 84 * b:off + 84 * b + 84]
        w = out[out_off + 256 * b:out_off + 256 * b + 256]
        d = read_f16(blk, 80)
        dmin = read_f16(blk, 82)
        for h in range(2):
            for half in range(2):
                a0, a1, a2, a3, n0, n1, n2, n3 = _q2_k_scale4(d, dmin, blk, 8 * h + half)
                q = blk[16 + 32 * h + 16 * half:32 + 32 * h + 16 * half]
                wo = 128 * h + 16 * half
                for l in range(16):
                    p = np.int32(q[l])
                    w[wo + l] = a0 * np.float32(p & M2_0) - n0
                    w[wo + 32 + l] = a1 * np.float32(p & M2_1) - n1
                    w[wo + 64 + l] = a2 * np.float32(p & M2_2) - n2
                    w[wo + 96 + l] = a3 * np.float32(p & M2_3) - n3


@njit(cache=True, fastmath=True)
def dot_q2_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q2_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        blk = raw[off + 84 * b:off + 84 * b + 84]
        xs = x[x_off + 256 * b:x_off + 256 * b + 256]
        d = read_f16(blk, 80)
        dmin = read_f16(blk, 82)
        for h in range(2):
            for half in range(2):
                a0, a1, a2, a3, n0, n1, n2, n3 = _q2_k_scale4(d, dmin, blk, 8 * h + half)
                q = blk[16 + 32 * h + 16 * half:32 + 32 * h + 16 * half]
                xo = 128 * h + 16 * half
                s = np.float32(0.0)
                for l in range(16):
                    p = np.int32(q[l])
                    s += ((a0 * np.float32(p & M2_0) - n0) * xs[xo + l]
                          + (a1 * np.float32(p & M2_1) - n1) * xs[xo + 32 + l]
                          + (a2 * np.float32(p & M2_2) - n2) * xs[xo + 64 + l]
                          + (a3 * np.float32(p & M2_3) - n3) * xs[xo + 96 + l])
                acc += s
    return acc


# ---------------------------------------------------------------------------------------- Q3_K

@njit(inline="always")
def _q3_k_values(p, t, hshift):
    """The four q + 4 (0..7) of elements 32j + l, j < 4, from qs byte p and hmask byte t;
    hshift (a literal 0 or 4) selects the half of the hmask bits."""
    t = t >> hshift
    return (np.uint8((p & 3) | ((t & 1) << 2)), np.uint8(((p >> 2) & 3) | ((t & 2) << 1)),
            np.uint8(((p >> 4) & 3) | (t & 4)), np.uint8(((p >> 6) & 3) | ((t & 8) >> 1)))


@njit(inline="always")
def _q3_k_scale4(d, word, half):
    """d * (scale - 32) of the four sub-blocks 2j + half (j < 4) packed in `word`."""
    return (d * np.float32(_byte(word, half) - 32), d * np.float32(_byte(word, half + 2) - 32),
            d * np.float32(_byte(word, half + 4) - 32), d * np.float32(_byte(word, half + 6) - 32))


@njit(inline="always", fastmath=True)
def _q3_k_dot16(blk, qo, ho, hshift, xs, xo, a0, a1, a2, a3):
    """sum over l < 16 and j < 4 of a_j * q(32j + l) * xs[xo + 32j + l]."""
    s = np.float32(0.0)
    four = np.float32(4.0)
    for l in range(16):
        q0, q1, q2, q3 = _q3_k_values(blk[qo + l], blk[ho + l], hshift)
        s += (a0 * (np.float32(q0) - four) * xs[xo + l] + a1 * (np.float32(q1) - four) * xs[xo + 32 + l]
              + a2 * (np.float32(q2) - four) * xs[xo + 64 + l] + a3 * (np.float32(q3) - four) * xs[xo + 96 + l])
    return s


@njit(inline="always", fastmath=True)
def _q3_k_decode16(blk, qo, ho, hshift, w, wo, a0, a1, a2, a3):
    """w[wo + 32j + l] = a_j * q(32j + l) for l < 16, j < 4."""
    four = np.float32(4.0)
    for l in range(16):
        q0, q1, q2, q3 = _q3_k_values(blk[qo + l], blk[ho + l], hshift)
        w[wo + l] = a0 * (np.float32(q0) - four)
        w[wo + 32 + l] = a1 * (np.float32(q1) - four)
        w[wo + 64 + l] = a2 * (np.float32(q2) - four)
        w[wo + 96 + l] = a3 * (np.float32(q3) - four)


@njit(cache=True, fastmath=True)
def decode_q3_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q3_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        blk = raw[off + 110 * b:off + 110 * b + 110]
        w = out[out_off + 256 * b:out_off + 256 * b + 256]
        d = read_f16(blk, 108)
        low8, high8 = _q3_k_scales(blk, 96)
        for half in range(2):
            a0, a1, a2, a3 = _q3_k_scale4(d, low8, half)
            _q3_k_decode16(blk, 32 + 16 * half, 16 * half, 0, w, 16 * half, a0, a1, a2, a3)
            a0, a1, a2, a3 = _q3_k_scale4(d, high8, half)
            _q3_k_decode16(blk, 64 + 16 * half, 16 * half, 4, w, 128 + 16 * half, a0, a1, a2, a3)


@njit(cache=True, fastmath=True)
def dot_q3_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q3_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        blk = raw[off + 110 * b:off + 110 * b + 110]
        xs = x[x_off + 256 * b:x_off + 256 * b + 256]
        d = read_f16(blk, 108)
        low8, high8 = _q3_k_scales(blk, 96)
        for half in range(2):
            a0, a1, a2, a3 = _q3_k_scale4(d, low8, half)
            acc += _q3_k_dot16(blk, 32 + 16 * half, 16 * half, 0, xs, 16 * half, a0, a1, a2, a3)
            a0, a1, a2, a3 = _q3_k_scale4(d, high8, half)
            acc += _q3_k_dot16(blk, 64 + 16 * half, 16 * half, 4, xs, 128 + 16 * half, a0, a1, a2, a3)
    return acc


# ---------------------------------------------------------------------------------------- Q4_K

@njit(cache=True, fastmath=True)
def decode_q4_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q4_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        blk = raw[off + 144 * b:off + 144 * b + 144]
        w = out[out_off + 256 * b:out_off + 256 * b + 256]
        d = read_f16(blk, 0)
        dmin = read_f16(blk, 2)
        scales, mins = _k4_scales_mins(blk, 4)
        for c in range(4):
            a_lo, a_hi, n_lo, n_hi = _k4_chunk_factors(d, dmin, scales, mins, c)
            a_hi *= SIXTEENTH  # applied to q & 0xF0, i.e. 16 * the high nibble
            q = blk[16 + 32 * c:48 + 32 * c]
            for l in range(32):
                p = np.int32(q[l])
                w[64 * c + l] = a_lo * np.float32(p & M4_LO) - n_lo
                w[64 * c + 32 + l] = a_hi * np.float32(p & M4_HI) - n_hi


@njit(cache=True, fastmath=True)
def dot_q4_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q4_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        blk = raw[off + 144 * b:off + 144 * b + 144]
        xs = x[x_off + 256 * b:x_off + 256 * b + 256]
        d = read_f16(blk, 0)
        dmin = read_f16(blk, 2)
        scales, mins = _k4_scales_mins(blk, 4)
        for c in range(4):
            a_lo, a_hi, n_lo, n_hi = _k4_chunk_factors(d, dmin, scales, mins, c)
            a_hi *= SIXTEENTH  # applied to q & 0xF0, i.e. 16 * the high nibble
            q = blk[16 + 32 * c:48 + 32 * c]
            x_lo = xs[64 * c:64 * c + 32]
            x_hi = xs[64 * c + 32:64 * c + 64]
            s = np.float32(0.0)
            for l in range(32):
                p = np.int32(q[l])
                s += (a_lo * np.float32(p & M4_LO) - n_lo) * x_lo[l] + (a_hi * np.float32(p & M4_HI) - n_hi) * x_hi[l]
            acc += s
    return acc


# ---------------------------------------------------------------------------------------- Q5_K

@njit(inline="always")
def _q5_k_values(p, t, bit):
    """The 5-bit q of elements 64c + l and 64c + 32 + l from qs byte p and qh byte t (bit = 2c)."""
    t = t >> bit
    return np.uint8((p & 15) | ((t & 1) << 4)), np.uint8((p >> 4) | ((t & 2) << 3))


@njit(cache=True, fastmath=True)
def decode_q5_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q5_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    for b in range(nblocks):
        blk = raw[off + 176 * b:off + 176 * b + 176]
        w = out[out_off + 256 * b:out_off + 256 * b + 256]
        d = read_f16(blk, 0)
        dmin = read_f16(blk, 2)
        scales, mins = _k4_scales_mins(blk, 4)
        for c in range(4):
            a_lo, a_hi, n_lo, n_hi = _k4_chunk_factors(d, dmin, scales, mins, c)
            for l in range(32):
                q_lo, q_hi = _q5_k_values(blk[48 + 32 * c + l], blk[16 + l], 2 * c)
                w[64 * c + l] = a_lo * np.float32(q_lo) - n_lo
                w[64 * c + 32 + l] = a_hi * np.float32(q_hi) - n_hi


@njit(cache=True, fastmath=True)
def dot_q5_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q5_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    acc = np.float32(0.0)
    for b in range(nblocks):
        blk = raw[off + 176 * b:off + 176 * b + 176]
        xs = x[x_off + 256 * b:x_off + 256 * b + 256]
        d = read_f16(blk, 0)
        dmin = read_f16(blk, 2)
        scales, mins = _k4_scales_mins(blk, 4)
        for c in range(4):
            a_lo, a_hi, n_lo, n_hi = _k4_chunk_factors(d, dmin, scales, mins, c)
            s = np.float32(0.0)
            for l in range(32):
                q_lo, q_hi = _q5_k_values(blk[48 + 32 * c + l], blk[16 + l], 2 * c)
                s += (a_lo * np.float32(q_lo) - n_lo) * xs[64 * c + l] + (a_hi * np.float32(q_hi) - n_hi) * xs[64 * c + 32 + l]
            acc += s
    return acc


# ---------------------------------------------------------------------------------------- Q6_K

@njit(inline="always")
def _q6_k_values(p, r, t):
    """The four 6-bit q (0..63, before the -32) of elements 32j + l, j < 4, from ql bytes
    p = ql[l], r = ql[32 + l] and qh byte t."""
    return (np.uint8((p & 15) | ((t & 3) << 4)), np.uint8((r & 15) | ((t & 12) << 2)),
            np.uint8((p >> 4) | (t & 48)), np.uint8((r >> 4) | ((t & 192) >> 2)))


@njit(inline="always")
def _q6_k_scale4(d, blk, g):
    """d * scale of the four sub-blocks g + 2j (j < 4); scales are int8 at blk[192:208]."""
    return (d * np.float32(np.int8(blk[192 + g])), d * np.float32(np.int8(blk[194 + g])),
            d * np.float32(np.int8(blk[196 + g])), d * np.float32(np.int8(blk[198 + g])))


@njit(cache=True, fastmath=True)
def decode_q6_k(raw, off, nblocks, out, out_off):
    """Decode `nblocks` Q6_K super-blocks at raw[off] into out[out_off : out_off + 256*nblocks]."""
    bias = np.float32(32.0)
    for b in range(nblocks):
        blk = raw[off + 210 * b:off + 210 * b + 210]
        w = out[out_off + 256 * b:out_off + 256 * b + 256]
        d = read_f16(blk, 208)
        for h in range(2):
            for half in range(2):
                a0, a1, a2, a3 = _q6_k_scale4(d, blk, 8 * h + half)
                lo = 64 * h + 16 * half
                hi = 128 + 32 * h + 16 * half
                wo = 128 * h + 16 * half
                for l in range(16):
                    q0, q1, q2, q3 = _q6_k_values(blk[lo + l], blk[lo + 32 + l], blk[hi + l])
                    w[wo + l] = a0 * (np.float32(q0) - bias)
                    w[wo + 32 + l] = a1 * (np.float32(q1) - bias)
                    w[wo + 64 + l] = a2 * (np.float32(q2) - bias)
                    w[wo + 96 + l] = a3 * (np.float32(q3) - bias)


@njit(cache=True, fastmath=True)
def dot_q6_k(raw, off, nblocks, x, x_off):
    """float32 dot of `nblocks` Q6_K super-blocks at raw[off] with x[x_off : x_off + 256*nblocks], fused."""
    bias = np.float32(32.0)
    acc = np.float32(0.0)
    for b in range(nblocks):
        blk = raw[off + 210 * b:off + 210 * b + 210]
        xs = x[x_off + 256 * b:x_off + 256 * b + 256]
        d = read_f16(blk, 208)
        for h in range(2):
            for half in range(2):
                a0, a1, a2, a3 = _q6_k_scale4(d, blk, 8 * h + half)
                lo = 64 * h + 16 * half
                hi = 128 + 32 * h + 16 * half
                xo = 128 * h + 16 * half
                s = np.float32(0.0)
                for l in range(16):
                    q0, q1, q2, q3 = _q6_k_values(blk[lo + l], blk[lo + 32 + l], blk[hi + l])
                    s += (a0 * (np.float32(q0) - bias) * xs[xo + l] + a1 * (np.float32(q1) - bias) * xs[xo + 32 + l]
                          + a2 * (np.float32(q2) - bias) * xs[xo + 64 + l] + a3 * (np.float32(q3) - bias) * xs[xo + 96 + l])
                acc += s
    return acc
