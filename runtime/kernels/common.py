"""Pieces every kernel family shares: reading f16 scales out of raw blocks, and a float dot.

All kernels take `raw`, a 1-D uint8 view of the GGUF tensor bytes, and byte offsets into
it; multi-byte fields are little-endian. Numba types integer arithmetic as int64, which
blocks SIMD in the inner loops: cast bytes to int32 before masking or shifting, and keep
accumulators float32 (fastmath lets LLVM vectorize the float reductions).
"""

import numpy as np
from numba import njit

# Every f16 bit pattern mapped to its float32 value (256 KiB, built once, baked into the kernels).
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def read_f16(raw, off):
    """The little-endian f16 at raw[off:off+2], as float32."""
    return F16_TO_F32[np.int32(raw[off]) | (np.int32(raw[off + 1]) << 8)]


@njit(fastmath=True, cache=True)
def dot_f32(a, a_off, b, b_off, n):
    """sum(a[a_off:a_off+n] * b[b_off:b_off+n]) in float32, vectorized."""
    av = a[a_off:a_off + n]
    bv = b[b_off:b_off + n]
    s = np.float32(0.0)
    for i in range(n):
        s += av[i] * bv[i]
    return s
