"""Kernels for the non-linear 4-bit formats IQ4_NL and IQ4_XS.

Both map a 4-bit index through one fixed codebook of 16 int8 levels (denser near zero,
where weights are), then scale it:
- IQ4_NL (18 bytes per 32 weights): d:f16, qs[16]. Weight i is d * K[q_i], q_i the low
  nibble of qs[i] for i < 16, the high nibble of qs[i - 16] otherwise (as in Q4_0).
- IQ4_XS (136 bytes per 256 weights): d:f16, scales_h:u16, scales_l[4], qs[128]. Eight
  groups of 32; group g has a 6-bit scale ls_g = (4 bits of scales_l[g // 2], low nibble
  for even g) | (bits 2g..2g+1 of scales_h) << 4, and weights (d * (ls_g - 32)) * K[q],
  its 16 bytes of qs laid out as in IQ4_NL.
"""

import numpy as np
from numba import njit

from .common import read_f16

# The IQ4 codebook (ggml's kvalues_iq4nl).
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)


@njit(inline="always")
def decode_codebook_group(levels, raw, qs_off, scale, out, out_off):
    """out[out_off:+32] = scale * levels[q] for the 16 bytes of 4-bit indices at qs_off
    (also MXFP4's, mxfp4.py)."""
    qs = raw[qs_off:qs_off + 16]
    lo = out[out_off:out_off + 16]
    hi = out[out_off + 16:out_off + 32]
    for i in range(16):
        q = np.int32(qs[i])
        lo[i] = scale * levels[q & np.int32(15)]
        hi[i] = scale * levels[q >> np.int32(4)]


@njit(inline="always", fastmath=True)
def dot_codebook_group(levels, raw, qs_off, x, x_off):
    """sum(levels[q] * x) over one group of 32 4-bit indices at qs_off (also MXFP4's)."""
    qs = raw[qs_off:qs_off + 16]
    xl = x[x_off:x_off + 16]
    xu = x[x_off + 16:x_off + 32]
    s = np.float32(0.0)
    for i in range(16):
        q = np.int32(qs[i])
        s += levels[q & np.int32(15)] * xl[i] + levels[q >> np.int32(4)] * xu[i]
    return s


@njit(inline="always")
def _iq4_xs_scale(raw, o, g):
    """d * (ls_g - 32) for group g of the IQ4_XS block at o."""
    low = (np.int32(raw[o + 4 + g // 2]) >> np.int32(4 * (g % 2))) & np.int32(15)
    high = ((np.int32(raw[o + 2]) | (np.int32(raw[o + 3]) << np.int32(8))) >> np.int32(2 * g)) & np.int32(3)
    return read_f16(raw, o) * np.float32((low | (high << np.int32(4))) - 32)


@njit(cache=True)
def decode_iq4_nl(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 18 * b
        decode_codebook_group(IQ4_LEVELS, raw, o + 2, read_f16(raw, o), out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_iq4_nl(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 18 * b
        acc += read_f16(raw, o) * dot_codebook_group(IQ4_LEVELS, raw, o + 2, x, x_off + 32 * b)
    return acc


@njit(cache=True)
def decode_iq4_xs(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + 136 * b
        for g in range(8):
            decode_codebook_group(IQ4_LEVELS, raw, o + 8 + 16 * g, _iq4_xs_scale(raw, o, g),
                                  out, out_off + 256 * b + 32 * g)


@njit(fastmath=True, cache=True)
def dot_iq4_xs(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + 136 * b
        for g in range(8):
            acc += _iq4_xs_scale(raw, o, g) * dot_codebook_group(IQ4_LEVELS, raw, o + 8 + 16 * g,
                                                                  x, x_off + 256 * b + 32 * g)
    return acc
