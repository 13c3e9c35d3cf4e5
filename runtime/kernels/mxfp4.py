"""Kernels for MXFP4, the OCP microscaling 4-bit float format (gpt-oss ships its experts in it).

Block (17 bytes per 32 weights, ggml's block_mxfp4):
- e:u8 at byte 0, an E8M0 scale: the power of two 2^(e - 127), no sign, no mantissa.
- qs[16] at bytes 1..16: 32 E2M1 codes of 4 bits, element j < 16 the low nibble of qs[j],
  element j + 16 its high nibble (ggml's usual packing, as in Q4_0).
A code c is sign bit 3 and magnitude bits 0..2 of E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6. ggml keeps
them doubled as int8 levels K = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
and halves the scale instead, so weight j = K[c_j] * 2^(e - 128). That half-scale is the
float32 with bits (e - 1) << 23 for e >= 2, and the subnormals 2^-128, 2^-127 for e = 0, 1.

The integer path (q8.py) reads K as signed bytes against 8-bit activations, as ggml's
vec_dot_mxfp4_q8_0: per block, d_x * 2^(e - 128) * sum(K[c] * y) (`row_dot_body`).
"""

import numpy as np
from llvmlite import ir
from numba import njit

from .iquants import decode_codebook_group, dot_codebook_group
from .simd import byte_lookup, signed_dot4

BLOCK_BYTES = 17

# ggml's kvalues_mxfp4: the E2M1 values doubled, by code.
MXFP4_LEVELS_INT = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
MXFP4_LEVELS = np.array(MXFP4_LEVELS_INT, dtype=np.float32)


def _e8m0_half_bits(e: int) -> int:
    return 0x00200000 << e if e < 2 else (e - 1) << 23


# 2^(e - 128) for every scale byte e, as float32 (ggml's GGML_E8M0_TO_FP32_HALF).
E8M0_HALF = np.array([_e8m0_half_bits(e) for e in range(256)], dtype=np.uint32).view(np.float32)


@njit(cache=True)
def decode_mxfp4(raw, off, nblocks, out, out_off):
    for b in range(nblocks):
        o = off + BLOCK_BYTES * b
        decode_codebook_group(MXFP4_LEVELS, raw, o + 1, E8M0_HALF[raw[o]], out, out_off + 32 * b)


@njit(fastmath=True, cache=True)
def dot_mxfp4(raw, off, nblocks, x, x_off):
    acc = np.float32(0.0)
    for b in range(nblocks):
        o = off + BLOCK_BYTES * b
        acc += E8M0_HALF[raw[o]] * dot_codebook_group(MXFP4_LEVELS, raw, o + 1, x, x_off + 32 * b)
    return acc


# ------------------------------------------------------------------ integer path (LLVM IR)

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _e8m0_half(e, blk, off):
    """IR: the float 2^(e - 128) of the scale byte at blk + off (see the module docstring)."""
    b = e.b
    byte = b.zext(e.load(blk, off, _I8), _I32)
    small = b.icmp_unsigned("<", byte, ir.Constant(_I32, 2))
    subnormal = b.shl(ir.Constant(_I32, 0x00200000), byte)
    normal = b.shl(b.sub(byte, ir.Constant(_I32, 1)), ir.Constant(_I32, 23))
    return b.bitcast(b.select(small, subnormal, normal), _F32)


def row_dot_body(e, k, blk, y, ys, dy):
    """q8dot's block body for MXFP4 against Q8_0 activations: k blocks at blk (see
    runtime.kernels.q8dot._row_dot for the contract)."""
    b = e.b
    codes = []
    for i in range(k):
        q = e.load(blk, BLOCK_BYTES * i + 1, ir.VectorType(_I8, 16))
        codes.append(e.cat(e.mask(q, 15), e.shr(q, 4)))
    w = byte_lookup(b, MXFP4_LEVELS_INT, e.cat(*codes))
    sums = signed_dot4(b, w, e.load(y, 0, ir.VectorType(_I8, 32 * k)))
    scales = [b.fmul(_e8m0_half(e, blk, BLOCK_BYTES * i), dy[i]) for i in range(k)]
    return [(sums, e.per_block(scales, 8) if k > 1 else scales[0])]
