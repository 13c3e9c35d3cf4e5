"""Quantizers: float32 rows -> GGUF blocks, the inverse of each format's decoder.

Block layouts are those described in runtime/kernels/legacy.py, kquants.py, iquants.py and
floats.py; the types with a quantizer are the `quantizer` rows of runtime.ggml_types' table.
Each row is quantized on its own (rows in parallel, `prange`); all arithmetic is float32 as
in the references, so the results are reproducible bit for bit:

- F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: bit-exact with `gguf.quants.quantize`
  (the NumPy reference): the same max (first largest |x| for the symmetric types), the same
  divisors (-8, -16, 15, 31, 127), truncation after adding 0.5 + offset (rounding half
  away from zero for Q8_0), f32 -> f16 rounding to nearest even, and NumPy's float -> uint8
  conversion (through int32: NaN, inf and out-of-range values give 0). BF16 rounds to
  nearest even and turns NaN into a quiet NaN, as ggml does.
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: llama.cpp's reference quantizers without an importance
  matrix (quantize_row_*_K_ref). Sub-block scales come from a weighted least-squares
  search rather than max-abs scaling:
  * Q2_K, Q4_K, Q5_K (scale and min): for each sub-block, try nstep+1 candidate scales
    (nmax + rmin + rdelta*i) / (max - min); for each, round, then solve the weighted 2x2
    least-squares problem for (scale, min) with those levels, and keep the pair with the
    smallest weighted error (squared, or absolute for Q2_K). Weights: |x| (Q2_K), or
    rms(sub-block) + |x| (Q4_K, Q5_K).
  * Q3_K: start from the max-abs scale, then up to 5 passes that move single levels when
    that raises the weighted correlation sumlx^2 / suml2 (weights x^2).
  * Q6_K: the max-abs scale and 18 perturbed ones, (nmax +- 0.1 i) / max, keeping the one
    with the best weighted least-squares fit (weights x^2).
  Then the sub-block scales (and mins) are quantized to 4, 6 or 8 bits against the
  super-block's f16 factor(s), and every weight is re-rounded against the scale it will
  actually be decoded with (f16 factor * integer sub-block scale).
  Sums are formed in ggml's order ((w * l) * l, not w * (l * l)): float32 rounding differs
  otherwise, and Q3_K's level moves then part from llama.cpp's at near-ties (~1 block in 50k).
- IQ4_NL, IQ4_XS: llama.cpp's quantize_row_iq4_nl_impl without an importance matrix. Each
  group of 32 takes the max-abs scale on the 16-level codebook and 15 perturbed ones,
  (i - 127) / max for i in -7..7, keeping the best weighted (x^2) least-squares fit; levels
  are the nearest codebook entries (bisection, ties up). IQ4_XS then quantizes the 8 group
  scales to 6 bits against d = -max_scale / 32 and re-picks the levels against them.
- MXFP4: llama.cpp's quantize_row_mxfp4_ref (gguf's MXFP4.quantize_blocks does the same).
  The block's power-of-two scale is e = floor(log2(max|x|)) - 2 + 127 (so max|x| lands
  between levels 4 and 8 of the doubled E2M1 codebook, below its top 12), 0 for an all-zero
  block, cast to uint8 through int32; each weight takes the first codebook level with the
  smallest |K[c] * 2^(e - 128) - x| (so 0 and -0 take code 0).

All of these are bit-exact with ggml's own quantizers (checked against llama.cpp's
libggml, ggml_quantize_chunk, on Gaussian rows and on model weights).

Entry point: `quantize(x, qtype)`.

Only the bundler quantizes, so this module lives here, outside the sources that
runtime.kernels.build_id() hashes: editing a quantizer recompiles no runtime kernel. Numba
caches these functions with its own locator (in __pycache__ beside this file, keyed on this
file): they read nothing from runtime.kernels but two constant tables fixed by the formats
(F16_TO_F32, IQ4_LEVELS) and the type ids.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from runtime.ggml_types import (
    BF16, F16, F32, IQ4_NL, IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, TYPES,
)
from runtime.kernels import supported_type
from runtime.kernels.common import F16_TO_F32
from runtime.kernels.iquants import IQ4_LEVELS
from runtime.kernels.mxfp4 import E8M0_HALF, MXFP4_LEVELS

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
GROUP_MAX_EPS = np.float32(1e-15)

# The types with a quantizer here (_quantize_row has a branch for each).
QUANTIZE_TYPES = frozenset(t.name for t in TYPES if t.quantizer)


# ------------------------------------------------------------------------------- shared pieces

@njit(inline="always")
def _f32_bits_to_f16(f):
    """binary32 bits (int64) -> binary16 bits, rounding to nearest even (as NumPy's astype)."""
    sign = (f >> 16) & 0x8000
    fe = f & 0x7F800000
    fm = f & 0x7FFFFF
    if fe >= 0x47800000:  # overflow, inf or NaN
        if fe == 0x7F800000 and fm != 0:
            return sign | 0x7E00 | (fm >> 13)  # quiet NaN, payload kept
        return sign | 0x7C00
    if fe <= 0x38000000:  # f16 subnormal (or zero)
        if fe < 0x33000000:
            return sign
        e = fe >> 23
        m = fm | 0x800000
        shift = 126 - e  # 14..24: value = m * 2^-shift units of 2^-24
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return sign | h
    h = ((fe - 0x38000000) >> 13) | (fm >> 13)
    rem = fm & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1  # a carry into the exponent is right, up to inf
    return sign | h


@njit(inline="always")
def _put_f16(out, off, v, tmp, tmp_bits):
    """Store float32 v as a little-endian f16 at out[off]; return the stored value as float32."""
    tmp[0] = v
    h = _f32_bits_to_f16(np.int64(tmp_bits[0]))
    out[off] = h & 255
    out[off + 1] = h >> 8
    return F16_TO_F32[h]


@njit(inline="always")
def _to_u8(v):
    """NumPy's float32 -> uint8 cast on x86: through int32 (NaN/inf/out of range -> 0), low byte."""
    if v >= np.float32(-2147483648.0) and v < np.float32(2147483648.0):
        return np.int64(v) & 255
    return 0


@njit(inline="always")
def _roundf(v):
    """gguf's np_roundf: round half away from zero (float32)."""
    a = abs(v)
    fl = np.floor(a)
    b = fl + np.floor(np.float32(2.0) * (a - fl))
    return np.sign(v) * b


@njit(inline="always")
def _nearest_int(v):
    """ggml's nearest_int (round half to even) for |v| < 2^22; NaN -> 0, clamped beyond."""
    if v != v:
        return 0
    if v > np.float32(4194303.0):
        return 4194303
    if v < np.float32(-4194303.0):
        return -4194303
    return np.int64(np.rint(v))


# ------------------------------------------------------------------------- float types

@njit(cache=True)
def _row_f16(x, out):
    bits = x.view(np.uint32)
    for i in range(x.size):
        h = _f32_bits_to_f16(np.int64(bits[i]))
        out[2 * i] = h & 255
        out[2 * i + 1] = h >> 8


@njit(cache=True)
def _row_bf16(x, out):
    bits = x.view(np.uint32)
    for i in range(x.size):
        n = np.int64(bits[i])
        if (n & 0x7FFFFFFF) > 0x7F800000:
            n = (n & 0xFFFF0000) | 0x400000  # quiet NaN
        n = (n + 0x7FFF + ((n >> 16) & 1)) >> 16
        out[2 * i] = n & 255
        out[2 * i + 1] = (n >> 8) & 255


# ------------------------------------------------------------------------ legacy types

@njit(inline="always")
def _signed_absmax(xb):
    """The first element of largest magnitude (np.argmax of |x|)."""
    amax = abs(xb[0])
    m = xb[0]
    for i in range(1, xb.size):
        a = abs(xb[i])
        if a > amax:
            amax = a
            m = xb[i]
    return m


@njit(cache=True)
def _row_q8_0(x, out, tmp, tmp_bits):
    for b in range(x.size // 32):
        xb = x[32 * b:32 * b + 32]
        o = 34 * b
        amax = _F0
        for i in range(32):
            amax = max(amax, abs(xb[i]))
        d = amax / np.float32(127.0)
        inv = _F1 / d if d != _F0 else _F0
        _put_f16(out, o, d, tmp, tmp_bits)
        for i in range(32):
            out[o + 2 + i] = _to_u8(_roundf(xb[i] * inv))


@njit(cache=True)
def _row_sym4_5(x, out, tmp, tmp_bits, five):
    """Q4_0 (five=False) and Q5_0: d = (signed max) / -8 or -16, q = trunc(x/d + 8.5 | 16.5)."""
    bsize = 22 if five else 18
    half_range = np.float32(-16.0) if five else np.float32(-8.0)
    offset = np.float32(16.5) if five else np.float32(8.5)
    qmax = 31 if five else 15
    q = np.empty(32, np.int64)
    for b in range(x.size // 32):
        xb = x[32 * b:32 * b + 32]
        o = bsize * b
        d = _signed_absmax(xb) / half_range
        inv = _F1 / d if d != _F0 else _F0
        _put_f16(out, o, d, tmp, tmp_bits)
        for i in range(32):
            q[i] = min(_to_u8(np.trunc(xb[i] * inv + offset)), qmax)
        qo = o + 2
        if five:
            qh = 0
            for i in range(32):
                qh |= (q[i] >> 4) << i
            for k in range(4):
                out[o + 2 + k] = (qh >> (8 * k)) & 255
            qo = o + 6
        for i in range(16):
            out[qo + i] = (q[i] & 15) | ((q[i + 16] & 15) << 4)


@njit(cache=True)
def _row_asym4_5(x, out, tmp, tmp_bits, five):
    """Q4_1 (five=False) and Q5_1: d = (max - min) / 15 | 31, m = min, q = trunc((x-m)/d + 0.5)."""
    bsize = 24 if five else 20
    levels = np.float32(31.0) if five else np.float32(15.0)
    qmax = 31 if five else 15
    q = np.empty(32, np.int64)
    for b in range(x.size // 32):
        xb = x[32 * b:32 * b + 32]
        o = bsize * b
        mx = xb[0]
        mn = xb[0]
        for i in range(1, 32):
            mx = max(mx, xb[i])
            mn = min(mn, xb[i])
        d = (mx - mn) / levels
        inv = _F1 / d if d != _F0 else _F0
        _put_f16(out, o, d, tmp, tmp_bits)
        _put_f16(out, o + 2, mn, tmp, tmp_bits)
        for i in range(32):
            q[i] = min(_to_u8(np.trunc((xb[i] - mn) * inv + _HALF)), qmax)
        qo = o + 4
        if five:
            qh = 0
            for i in range(32):
                qh |= (q[i] >> 4) << i
            for k in range(4):
                out[o + 4 + k] = (qh >> (8 * k)) & 255
            qo = o + 8
        for i in range(16):
            out[qo + i] = (q[i] & 15) | ((q[i + 16] & 15) << 4)


# ----------------------------------------------------------------- k-quant scale searches

@njit(inline="always")
def _make_qkx2(xs, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """Scale and min for one sub-block xs (levels 0..nmax into L), minimizing the weighted
    squared (or absolute, use_mad) error; returns (scale, the_min) with x ~ scale*L - the_min."""
    n = xs.size
    mn = xs[0]
    mx = xs[0]
    sum_w = w[0]
    sum_x = sum_w * xs[0]
    for i in range(1, n):
        mn = min(mn, xs[i])
        mx = max(mx, xs[i])
        sum_w += w[i]
        sum_x += w[i] * xs[i]
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    fmax = np.float32(nmax)
    iscale = fmax / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = min(max(_nearest_int(iscale * (xs[i] - mn)), 0), nmax)
        L[i] = l
        diff = scale * np.float32(l) + mn - xs[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = min(max(_nearest_int(iscale * (xs[i] - mn)), 0), nmax)
            Laux[i] = l
            fl = np.float32(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * xs[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - xs[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(inline="always")
def _make_qx(xs, L, nmax):
    """Q6_K's symmetric scale (levels -nmax..nmax-1 stored + nmax in L), weights x^2: the
    max-abs scale and 18 perturbations, keeping the best weighted least-squares fit."""
    n = xs.size
    mx = _F0
    amax = _F0
    for i in range(n):
        a = abs(xs[i])
        if a > amax:
            amax = a
            mx = xs[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fmax = np.float32(nmax)
    iscale = -fmax / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1)
        L[i] = l + nmax
        w = xs[i] * xs[i]
        fl = np.float32(l)
        sumlx += w * xs[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + np.float32(0.1) * np.float32(step)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1)
            w = xs[i] * xs[i]
            fl = np.float32(l)
            sumlx += w * xs[i] * fl
            suml2 += w * fl * fl
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(inline="always")
def _make_q3(xs, L, nmax):
    """Q3_K's symmetric scale (levels -nmax..nmax-1 stored + nmax in L), weights x^2: the
    max-abs scale, then up to 5 passes of single-level moves that raise sumlx^2 / suml2."""
    n = xs.size
    mx = _F0
    amax = _F0
    for i in range(n):
        a = abs(xs[i])
        if a > amax:
            amax = a
            mx = xs[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = -np.float32(nmax) / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1)
        L[i] = l
        w = xs[i] * xs[i]
        sumlx += w * xs[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = xs[i] * xs[i]
            slx = sumlx - w * xs[i] * np.float32(L[i])
            if slx > _F0:
                sl2 = suml2 - w * np.float32(L[i]) * np.float32(L[i])
                new_l = min(max(_nearest_int(xs[i] * sl2 / slx), -nmax), nmax - 1)
                if new_l != L[i]:
                    slx += w * xs[i] * np.float32(new_l)
                    sl2 += w * np.float32(new_l) * np.float32(new_l)
                    if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2


# ------------------------------------------------------------------------------ k-quants

@njit(inline="always")
def _pack_2bit(L, out, qo):
    """Levels 0..3 of a super-block: element 128h + 32j + l at bits 2j of out[qo + 32h + l]."""
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[qo + 32 * h + l] = L[e] | (L[e + 32] << 2) | (L[e + 64] << 4) | (L[e + 96] << 6)


@njit(cache=True)
def _row_q2_k(x, out, tmp, tmp_bits):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(16, np.int64)
    w = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    q4scale = np.float32(15.0)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 84 * b
        max_scale = _F0
        max_min = _F0
        for j in range(16):
            xs = xb[16 * j:16 * j + 16]
            for l in range(16):
                w[l] = abs(xs[l])
            s, m = _make_qkx2(xs, w, L[16 * j:16 * j + 16], Laux, 3,
                              np.float32(-0.5), np.float32(0.1), 15, True)
            scales[j] = s
            mins[j] = m
            max_scale = max(max_scale, s)
            max_min = max(max_min, m)
        if max_scale > _F0:
            iscale = q4scale / max_scale
            for j in range(16):
                out[o + j] = min(max(_nearest_int(iscale * scales[j]), 0), 15)
            d = _put_f16(out, o + 80, max_scale / q4scale, tmp, tmp_bits)
        else:
            for j in range(16):
                out[o + j] = 0
            d = _put_f16(out, o + 80, _F0, tmp, tmp_bits)
        if max_min > _F0:
            iscale = q4scale / max_min
            for j in range(16):
                out[o + j] |= min(max(_nearest_int(iscale * mins[j]), 0), 15) << 4
            dmin = _put_f16(out, o + 82, max_min / q4scale, tmp, tmp_bits)
        else:
            dmin = _put_f16(out, o + 82, _F0, tmp, tmp_bits)
        for j in range(16):
            sd = d * np.float32(np.int64(out[o + j]) & 15)
            if sd == _F0:
                continue
            dm = dmin * np.float32(np.int64(out[o + j]) >> 4)
            for i in range(16):
                L[16 * j + i] = min(max(_nearest_int((xb[16 * j + i] + dm) / sd), 0), 3)
        _pack_2bit(L, out, o + 16)


@njit(cache=True)
def _row_q3_k(x, out, tmp, tmp_bits):
    L = np.zeros(256, np.int64)
    scales = np.empty(16, np.float32)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 110 * b
        so = o + 96
        max_scale = _F0
        amax = _F0
        for j in range(16):
            s = _make_q3(xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 4)
            scales[j] = s
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        for k in range(12):
            out[so + k] = 0
        if max_scale != _F0:
            iscale = np.float32(-32.0) / max_scale
            for j in range(16):
                l = min(max(_nearest_int(iscale * scales[j]), -32), 31) + 32
                if j < 8:
                    out[so + j] = l & 15
                else:
                    out[so + j - 8] |= (l & 15) << 4
                out[so + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
            d = _put_f16(out, o + 108, _F1 / iscale, tmp, tmp_bits)
        else:
            d = _put_f16(out, o + 108, _F0, tmp, tmp_bits)
        for j in range(16):
            lo = np.int64(out[so + j]) & 15 if j < 8 else np.int64(out[so + j - 8]) >> 4
            hi = (np.int64(out[so + 8 + j % 4]) >> (2 * (j // 4))) & 3
            sc = (lo | (hi << 4)) - 32
            sd = d * np.float32(sc)
            if sd == _F0:
                continue
            for i in range(16):
                L[16 * j + i] = min(max(_nearest_int(xb[16 * j + i] / sd), -4), 3) + 4
        # high bit of element e at bit e // 32 of hmask[e % 32]; low 2 bits as in Q2_K
        for l in range(32):
            hm = 0
            for k in range(8):
                e = 32 * k + l
                if L[e] > 3:
                    hm |= 1 << k
                    L[e] -= 4
            out[o + l] = hm
        _pack_2bit(L, out, o + 32)


@njit(inline="always")
def _k4_levels(xb, out, so, L, Laux, w, scales, mins, nmax, rmin, nstep, tmp, tmp_bits, dof):
    """Q4_K/Q5_K: search each sub-block of 32, quantize scales/mins to 6 bits into the 12
    bytes at out[so], write d, dmin at out[dof], and leave the final levels 0..nmax in L."""
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        xs = xb[32 * j:32 * j + 32]
        sum_x2 = _F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            w[l] = av_x + abs(xs[l])
        s, m = _make_qkx2(xs, w, L[32 * j:32 * j + 32], Laux, nmax,
                          rmin, np.float32(0.1), nstep, False)
        scales[j] = s
        mins[j] = m
        max_scale = max(max_scale, s)
        max_min = max(max_min, m)
    inv_scale = np.float32(63.0) / max_scale if max_scale > _F0 else _F0
    inv_min = np.float32(63.0) / max_min if max_min > _F0 else _F0
    for j in range(8):
        ls = min(_nearest_int(inv_scale * scales[j]) & 255, 63)
        lm = min(_nearest_int(inv_min * mins[j]) & 255, 63)
        if j < 4:
            out[so + j] = ls
            out[so + j + 4] = lm
        else:
            out[so + j + 4] = (ls & 15) | ((lm & 15) << 4)
            out[so + j - 4] |= (ls >> 4) << 6
            out[so + j] |= (lm >> 4) << 6
    d = _put_f16(out, dof, max_scale / np.float32(63.0), tmp, tmp_bits)
    dmin = _put_f16(out, dof + 2, max_min / np.float32(63.0), tmp, tmp_bits)
    for j in range(8):
        b0 = np.int64(out[so + j])
        b4 = np.int64(out[so + j + 4])
        if j < 4:
            sc = b0 & 63
            m = b4 & 63
        else:
            bm = np.int64(out[so + j - 4])
            sc = (b4 & 15) | ((bm >> 6) << 4)
            m = (b4 >> 4) | ((b0 >> 6) << 4)
        sd = d * np.float32(sc)
        if sd == _F0:
            continue
        dm = dmin * np.float32(m)
        for i in range(32):
            L[32 * j + i] = min(max(_nearest_int((xb[32 * j + i] + dm) / sd), 0), nmax)


@njit(cache=True)
def _row_q4_k(x, out, tmp, tmp_bits):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 144 * b
        _k4_levels(xb, out, o + 4, L, Laux, w, scales, mins, 15, np.float32(-1.0), 20,
                   tmp, tmp_bits, o)
        for c in range(4):
            for l in range(32):
                out[o + 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(cache=True)
def _row_q5_k(x, out, tmp, tmp_bits):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 176 * b
        _k4_levels(xb, out, o + 4, L, Laux, w, scales, mins, 31, np.float32(-0.5), 15,
                   tmp, tmp_bits, o)
        # fifth bit of element 32k + l at bit k of qh[l]; low nibbles as in Q4_K
        for l in range(32):
            hb = 0
            for k in range(8):
                hb |= (L[32 * k + l] >> 4) << k
            out[o + 16 + l] = hb
        for c in range(4):
            for l in range(32):
                out[o + 48 + 32 * c + l] = (L[64 * c + l] & 15) | ((L[64 * c + 32 + l] & 15) << 4)


@njit(cache=True)
def _row_q6_k(x, out, tmp, tmp_bits):
    L = np.zeros(256, np.int64)
    scales = np.empty(16, np.float32)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 210 * b
        max_scale = _F0
        max_abs = _F0
        for j in range(16):
            s = _make_qx(xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 32)
            scales[j] = s
            if abs(s) > max_abs:
                max_abs = abs(s)
                max_scale = s
        if max_abs < GROUP_MAX_EPS:
            for k in range(210):
                out[o + k] = 0
            continue
        iscale = np.float32(-128.0) / max_scale
        d = _put_f16(out, o + 208, _F1 / iscale, tmp, tmp_bits)
        for j in range(16):
            out[o + 192 + j] = min(_nearest_int(iscale * scales[j]), 127) & 255
        for j in range(16):
            sc = np.int64(out[o + 192 + j])
            sd = d * np.float32(sc - 256 if sc > 127 else sc)
            if sd == _F0:
                continue
            for i in range(16):
                L[16 * j + i] = min(max(_nearest_int(xb[16 * j + i] / sd), -32), 31) + 32
        # element 128h + 32j + l: low nibble in ql[64h + 32(j % 2) + l] (high nibble if j >= 2),
        # high 2 bits at bit 2j of qh[32h + l]
        for h in range(2):
            for l in range(32):
                e = 128 * h + l
                out[o + 64 * h + l] = (L[e] & 15) | ((L[e + 64] & 15) << 4)
                out[o + 64 * h + 32 + l] = (L[e + 32] & 15) | ((L[e + 96] & 15) << 4)
                out[o + 128 + 32 * h + l] = ((L[e] >> 4) | ((L[e + 32] >> 4) << 2)
                                             | ((L[e + 64] >> 4) << 4) | ((L[e + 96] >> 4) << 6))


# ------------------------------------------------------------------------------ IQ4 types

_IQ4_VALUES = IQ4_LEVELS  # ggml's kvalues_iq4nl, ascending
_IQ4_NTRY = 7


@njit(inline="always")
def _iq4_index(v):
    """The index of the level nearest v (ties to the upper one), by bisection as ggml does."""
    if v <= _IQ4_VALUES[0]:
        return 0
    if v >= _IQ4_VALUES[15]:
        return 15
    lo = 0
    hi = 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < _IQ4_VALUES[mid]:
            hi = mid
        else:
            lo = mid
    return lo if v - _IQ4_VALUES[lo] < _IQ4_VALUES[hi] - v else hi


@njit(inline="always")
def _iq4_group_scale(xb, L):
    """Scale of a group of 32 on the IQ4 codebook (levels into L), weights x^2: the max-abs
    scale and 2*7+1 perturbed ones, (i - 127) / max, keeping the best weighted fit."""
    amax = _F0
    mx = _F0
    for j in range(32):
        a = abs(xb[j])
        if a > amax:
            amax = a
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return _F0
    d = -mx / _IQ4_VALUES[0]
    inv = _F1 / d
    sumqx = _F0
    sumq2 = _F0
    for j in range(32):
        l = _iq4_index(inv * xb[j])
        L[j] = l
        q = _IQ4_VALUES[l]
        w = xb[j] * xb[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-_IQ4_NTRY, _IQ4_NTRY + 1):
        inv = (np.float32(itry) + _IQ4_VALUES[0]) / mx
        sumqx = _F0
        sumq2 = _F0
        for j in range(32):
            q = _IQ4_VALUES[_iq4_index(inv * xb[j])]
            w = xb[j] * xb[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(inline="always")
def _pack_iq4(L, out, qo):
    """16 bytes per 32 levels: element j in the low nibble, element j + 16 in the high one."""
    for j in range(16):
        out[qo + j] = L[j] | (L[j + 16] << 4)


@njit(cache=True)
def _row_iq4_nl(x, out, tmp, tmp_bits):
    L = np.zeros(32, np.int64)
    for b in range(x.size // 32):
        xb = x[32 * b:32 * b + 32]
        o = 18 * b
        d = _iq4_group_scale(xb, L)
        _put_f16(out, o, d, tmp, tmp_bits)
        inv = _F1 / d if d != _F0 else _F0
        for j in range(32):  # against the unrounded scale, as ggml does
            L[j] = _iq4_index(inv * xb[j])
        _pack_iq4(L, out, o + 2)


@njit(cache=True)
def _row_iq4_xs(x, out, tmp, tmp_bits):
    L = np.zeros(32, np.int64)
    scales = np.empty(8, np.float32)
    for b in range(x.size // 256):
        xb = x[256 * b:256 * b + 256]
        o = 136 * b
        max_scale = _F0
        amax_scale = _F0
        for g in range(8):
            s = _iq4_group_scale(xb[32 * g:32 * g + 32], L)
            scales[g] = s
            if abs(s) > amax_scale:
                amax_scale = abs(s)
                max_scale = s
        d = -max_scale / np.float32(32.0)
        _put_f16(out, o, d, tmp, tmp_bits)
        inv = _F1 / d if d != _F0 else _F0
        scales_h = 0
        for g in range(4):
            out[o + 4 + g] = 0
        for g in range(8):
            l = min(max(_nearest_int(inv * scales[g]), -32), 31)
            dl = d * np.float32(l)
            idl = _F1 / dl if dl != _F0 else _F0
            for j in range(32):
                L[j] = _iq4_index(idl * xb[32 * g + j])
            _pack_iq4(L, out, o + 8 + 16 * g)
            l += 32
            out[o + 4 + g // 2] |= (l & 15) << (4 * (g % 2))
            scales_h |= (l >> 4) << (2 * g)
        out[o + 2] = scales_h & 255
        out[o + 3] = scales_h >> 8


# ------------------------------------------------------------------------------- MXFP4

@njit(inline="always")
def _mxfp4_index(v, d):
    """ggml's best_index_mxfp4: the first code whose level K[c] * d is nearest to v."""
    best = 0
    best_err = abs(MXFP4_LEVELS[0] * d - v)
    for c in range(1, 16):
        err = abs(MXFP4_LEVELS[c] * d - v)
        if err < best_err:
            best = c
            best_err = err
    return best


@njit(cache=True)
def _row_mxfp4(x, out):
    for b in range(x.size // 32):
        xb = x[32 * b:32 * b + 32]
        o = 17 * b
        amax = _F0
        for j in range(32):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
        e = _to_u8(np.floor(np.log2(amax)) - np.float32(2.0) + np.float32(127.0)) if amax > _F0 else 0
        out[o] = e
        d = E8M0_HALF[e]
        for j in range(16):
            out[o + 1 + j] = _mxfp4_index(xb[j], d) | (_mxfp4_index(xb[j + 16], d) << 4)


# ------------------------------------------------------------------------------ dispatch

@njit(cache=True)
def _quantize_row(type_id, x, out, tmp, tmp_bits):
    if type_id == F32:
        out[:] = x.view(np.uint8)
    elif type_id == F16:
        _row_f16(x, out)
    elif type_id == BF16:
        _row_bf16(x, out)
    elif type_id == Q8_0:
        _row_q8_0(x, out, tmp, tmp_bits)
    elif type_id == Q4_0:
        _row_sym4_5(x, out, tmp, tmp_bits, False)
    elif type_id == Q5_0:
        _row_sym4_5(x, out, tmp, tmp_bits, True)
    elif type_id == Q4_1:
        _row_asym4_5(x, out, tmp, tmp_bits, False)
    elif type_id == Q5_1:
        _row_asym4_5(x, out, tmp, tmp_bits, True)
    elif type_id == Q2_K:
        _row_q2_k(x, out, tmp, tmp_bits)
    elif type_id == Q3_K:
        _row_q3_k(x, out, tmp, tmp_bits)
    elif type_id == Q4_K:
        _row_q4_k(x, out, tmp, tmp_bits)
    elif type_id == Q5_K:
        _row_q5_k(x, out, tmp, tmp_bits)
    elif type_id == Q6_K:
        _row_q6_k(x, out, tmp, tmp_bits)
    elif type_id == IQ4_NL:
        _row_iq4_nl(x, out, tmp, tmp_bits)
    elif type_id == IQ4_XS:
        _row_iq4_xs(x, out, tmp, tmp_bits)
    elif type_id == MXFP4:
        _row_mxfp4(x, out)
    else:
        raise ValueError("_quantize_row: no quantizer for this tensor type id")


@njit(parallel=True, cache=True)
def quantize_kernel(type_id, x, out):
    """Quantize each row of x (float32[rows, cols]) into out (uint8[rows, row_bytes])."""
    # an empty row first, outside the parallel loop: an id with no branch raises ValueError
    # here (raised inside a parallel loop, it reaches Python as a SystemError)
    probe = np.empty(1, np.float32)
    _quantize_row(type_id, x[0][:0], out[0][:0], probe, probe.view(np.uint32))
    for r in prange(x.shape[0]):
        tmp = np.empty(1, np.float32)
        _quantize_row(type_id, x[r], out[r], tmp, tmp.view(np.uint32))


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """The GGUF blocks of float32 rows x[rows, cols] (a 1-D x is one row) in type `qtype`:
    uint8[rows * row_bytes], row after row, as a GGUF tensor stores them."""
    t = supported_type(qtype)
    if t.name not in QUANTIZE_TYPES:
        raise NotImplementedError(
            f"quantizing to {t.name} is not implemented "
            f"(quantizers: {', '.join(sorted(QUANTIZE_TYPES))})"
        )
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must hold floating-point values, got {x.dtype}")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"x must be rows of values [rows, cols], got shape {x.shape}")
    rows, cols = x.shape
    row_bytes = t.row_bytes(cols)  # a clear error unless cols fills whole blocks
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((rows, row_bytes), np.uint8)
    if rows and cols:
        quantize_kernel(t.id, x, out)
    return out.reshape(-1)
