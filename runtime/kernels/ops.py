"""Numba kernels for the transformer's non-matmul ops: norms, RoPE, attention, activations.

Activations are float32 rows: a batch of n tokens is an [n, width] array, and a row that
holds several heads stores them one after another (head h at columns h*head_dim..).
These ops are cheap next to the matmuls (they touch activations, not weights), so they are
written for clarity first, and run on one thread for a few rows: waking the other threads
for a parallel loop costs more than the whole op on a decoded token's row (bench/launches.py
measures both). A batch of PARALLEL_ROWS rows or more (a prefill chunk) has the norms, RoPE
and the gated activations split by rows over the threads: one thread left them at ~6% of
a 1B model's prefill on one thread, the other idle. Attention always runs in parallel,
since its work grows with the context.

The KV cache attention reads is bytes, laid out [n_kv_head, n_ctx, row bytes] per layer
(the keys one head attends over are one contiguous slab); each head's row at a position is
stored in a GGML type and converted to float32 a block of keys at a time, in place:
- F32: head_dim little-endian float32 (4 bytes each);
- F16: head_dim IEEE binary16 (2 bytes each), llama.cpp's default (f16_to_f32 here);
- Q8_0: head_dim/32 blocks of 34 bytes: an f16 scale d, then 32 int8 q; value = d * q
  (the format kernels of runtime.kernels.dispatch).
"""

import math

import numpy as np
from numba import njit, prange

from runtime.ggml_types import F16, F32

from .dispatch import decode_blocks
from .simd import f16_to_f32_f16c, has_f16c

_F16C = has_f16c()  # a constant of the compiled kernels (their cache is kept per CPU tier)


# Rows from which the row-wise ops below run their rows in parallel.
PARALLEL_ROWS = 8


@njit(inline="always")
def _rms_norm_row(x, weight, eps, out, i):
    d = x.shape[1]
    ss = 0.0  # float64 sum, as llama.cpp does
    for j in range(d):
        ss += np.float64(x[i, j]) * x[i, j]
    scale = np.float32(1.0 / math.sqrt(ss / d + eps))
    for j in range(d):
        out[i, j] = x[i, j] * scale * weight[j]


@njit(cache=True, fastmath=True, parallel=True)
def _rms_norm_parallel(x, weight, eps, out):
    for i in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(cache=True, fastmath=True)
def rms_norm(x, weight, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight, for each row i of x[n, d]."""
    if x.shape[0] >= PARALLEL_ROWS:
        _rms_norm_parallel(x, weight, eps, out)
        return
    for i in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(cache=True, fastmath=True)
def rms_norm_heads(x, n_heads, head_dim, weight, eps):
    """In place RMSNorm of every head of every row of x[n, n_heads*head_dim] (QK-norm)."""
    n = x.shape[0]
    for t in range(n * n_heads):
        i = t // n_heads
        base = (t % n_heads) * head_dim
        ss = 0.0
        for j in range(head_dim):
            v = np.float64(x[i, base + j])
            ss += v * v
        scale = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
        for j in range(head_dim):
            x[i, base + j] = x[i, base + j] * scale * weight[j]


@njit(cache=True, fastmath=True)
def rope_inv_freq(n_rot, freq_base, freq_scale, freq_factors):
    """The rotation speed of each of the n_rot/2 dimension pairs (radians per position).

    theta_i = freq_scale * base^(-2i/n_rot) / factor_i: linear scaling divides every speed
    by the scaling factor, llama3-style scaling divides each by its own factor.
    """
    half = n_rot // 2
    inv = np.empty(half, np.float64)
    for i in range(half):
        inv[i] = freq_scale * freq_base ** (-2.0 * i / n_rot)
        if freq_factors.size:
            inv[i] /= freq_factors[i]
    return inv


@njit(inline="always")
def _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, i):
    """Row i: each pair's angle (its cosine and sine) once, applied to every head."""
    half = n_rot // 2
    pos = positions[i]
    for k in range(half):
        angle = pos * inv_freq[k]
        c = np.float32(math.cos(angle))
        s = np.float32(math.sin(angle))
        for h in range(n_heads):
            if neox:
                a = h * head_dim + k
                b = a + half
            else:
                a = h * head_dim + 2 * k
                b = a + 1
            x0 = x[i, a]
            x1 = x[i, b]
            x[i, a] = x0 * c - x1 * s
            x[i, b] = x0 * s + x1 * c


@njit(cache=True, fastmath=True, parallel=True)
def _rope_parallel(x, positions, n_heads, head_dim, n_rot, inv_freq, neox):
    for i in prange(x.shape[0]):
        _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, i)


@njit(cache=True, fastmath=True)
def rope(x, positions, n_heads, head_dim, n_rot, inv_freq, neox):
    """In place rotary embedding of x[n, n_heads*head_dim], row i at positions[i].

    The first n_rot dimensions of each head rotate in pairs: (2k, 2k+1) in the original
    (GPT-J, llama) style, (k, k + n_rot/2) in the NEOX style (Qwen, Gemma).
    """
    if x.shape[0] >= PARALLEL_ROWS:
        _rope_parallel(x, positions, n_heads, head_dim, n_rot, inv_freq, neox)
        return
    for i in range(x.shape[0]):
        _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, i)


# exp(z) for float32 z, vectorizable (libm's expf is a call per element, which no loop
# vectorizes): z = n ln2 + r with |r| <= ln2/2, exp(r) by the minimax polynomial of Cephes'
# expf (relative error ~1 ulp), 2^n put into a float's exponent bits. z is clamped to
# [-87, 88], where 2^n stays a normal float: exp beyond it is below 1.7e-38 or above
# 1.6e38, as good as 0 or infinity for the activations below, which take 1 / (1 + exp).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.0)
_EXP_HI = np.float32(88.0)


@njit(inline="always", fastmath=True)
def _exp_parts(z):
    """(m, b) with exp(z) = m * (the float32 whose bits are the int32 b)."""
    z = min(max(z, _EXP_LO), _EXP_HI)
    n = np.floor(z * _LOG2E + np.float32(0.5))
    r = z - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0), np.int32((n + np.float32(127.0)) * np.float32(8388608.0))


# Attention works on tiles: a work item is one KV head, a tile of up to _QUERY_TILE
# consecutive queries (with all the query heads that share that KV head: their rows are
# scored together, so each cached key is read and converted once per tile) and a span of
# keys. Keys go by blocks of _KEY_BLOCK, converted to float32 once and scored against every
# row of the tile; then the softmax over the span, normalised; then the values, by blocks
# again. A decoded token at a long context has one tile per KV head: when there are fewer
# than _SPLIT_BELOW tiles, the keys are split in spans of _KEY_SPAN for the threads to
# share, and the spans' results merged at the end, each weighted by its share of the whole
# softmax.
#
# Numerics, against llama.cpp's CPU attention (ggml-cpu/ops.cpp of ggml 0.25.3). Its default
# is flash attention ("auto" resolves to on for the CPU; llama-perplexity, llama-cli and
# llama-server use it, so do the Gemma references in tests/data). For 64 queries or more on
# an F16/F32 cache it works in float32 throughout (ggml_compute_forward_flash_attn_ext_tiled:
# keys and values converted to float32, scores scaled after the dot, an online softmax per 64
# keys whose sums are taken in double, values accumulated in float32), which this kernel
# computes up to the order of the float32 sums. For a decoded token and smaller batches it
# rounds the query to f16 before K.Q and accumulates the values in f16 (..._one_chunk); we
# do not emulate that: on Gemma 3 270M any two implementations that are not bit-identical
# part by ~0.14 per token in log-probability (8-bit activation roundings likely amplify
# the smallest difference), llama.cpp with and without flash attention as much as this kernel
# against either (tests/test_perplexity.py). Without flash attention (the parity references,
# F32 cache) ggml rounds Q and the softmax weights to the cache type, exact in F32.
_QUERY_TILE = 16
_KEY_BLOCK = 64
_KEY_SPAN = 256
_SPLIT_BELOW = 8
# below every score (finite: fastmath assumes no infinities); exp(_NO_SCORE - s) is 0
_NO_SCORE = np.float32(-3.0e38)


@njit(inline="always")
def f16_to_f32(raw, out):
    """out = the IEEE binary16 values of the bytes raw (little-endian, 2 per value), exactly.
    With F16C (x86-64-v3 and up) in hardware, 16 values an instruction; otherwise the bits
    are moved into float32 position and rebiased by one multiply by 2^112, which also
    normalises the subnormals; infinities and NaNs get their float32 exponent back:
    branch-free, so it compiles to vector code on every CPU tier."""
    if _F16C:
        f16_to_f32_f16c(raw, out)
        return
    bits = raw.view(np.uint16)
    ob = out.view(np.uint32)
    n = out.size
    for i in range(n):
        ob[i] = (np.uint32(bits[i]) & np.uint32(0x7FFF)) << np.uint32(13)
    for i in range(n):
        out[i] *= np.float32(2.0 ** 112)
    for i in range(n):
        h = np.uint32(bits[i])
        v = ob[i]
        if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):
            v = ((h & np.uint32(0x3FF)) << np.uint32(13)) | np.uint32(0x7F800000)
        ob[i] = v | ((h & np.uint32(0x8000)) << np.uint32(16))


@njit(inline="always")
def _cache_rows_f32(cache_type, rows, first, count, blocks, out):
    """Rows first..first+count of one head's cache slab rows[n_ctx, row bytes] (GGML type
    cache_type) as float32 into out[:count, :]."""
    if cache_type == F16 and _F16C:  # the rows are one run of f16 values: one call
        f16_to_f32_f16c(rows[first:first + count].reshape(count * rows.shape[1]),
                        out[:count].reshape(count * out.shape[1]))
        return
    for j in range(count):
        row = rows[first + j]
        if cache_type == F16:
            f16_to_f32(row, out[j])
        elif cache_type == F32:
            out[j, :] = row.view(np.float32)
        else:
            decode_blocks(cache_type, row, 0, blocks, out[j], 0)


@njit(inline="always")
def _tile(tile_kv, n_kv_heads, n_tiles):
    """(KV head, first query) of tile pair tile_kv. Tiles alternate ends (0, last, 1,
    last-1, ...) so that threads taking contiguous ranges of items get even causal work."""
    tile = tile_kv // n_kv_heads
    half = tile // 2
    tile = half if tile % 2 == 0 else n_tiles - 1 - half
    return tile_kv % n_kv_heads, tile * _QUERY_TILE


@njit(cache=True, fastmath=True)
def _merge_spans(tile_kv, n_kv_heads, n_tiles, n, group, n_spans, head_dim_v, run_max, run_sum, acc, sinks, out):
    """Tile tile_kv's rows of out from its spans' partial results, each weighted by its
    share of the whole softmax (and the sink's logit in the denominator)."""
    kvh, i0 = _tile(tile_kv, n_kv_heads, n_tiles)
    rows = (min(n, i0 + _QUERY_TILE) - i0) * group
    base = tile_kv * n_spans
    for r in range(rows):
        i = i0 + r // group
        h = kvh * group + r % group
        dst = out[i, h * head_dim_v:(h + 1) * head_dim_v]
        if n_spans == 1:
            dst[:] = acc[base, r]
            continue
        top = _NO_SCORE
        for sp in range(n_spans):
            top = max(top, run_max[base + sp, r])
        whole = np.float32(0.0)
        if sinks is not None:  # the sink: one more logit in the whole softmax's denominator
            top = max(top, sinks[h])
            whole = np.float32(math.exp(sinks[h] - top))
        share = np.empty(n_spans, np.float32)
        for sp in range(n_spans):
            share[sp] = run_sum[base + sp, r] * np.float32(math.exp(run_max[base + sp, r] - top))
            whole += share[sp]
        dst[:] = 0.0
        for sp in range(n_spans):
            f = share[sp] / whole
            for d in range(head_dim_v):
                dst[d] += f * acc[base + sp, r, d]


@njit(cache=True, fastmath=True, parallel=True)
def attention(q, k_cache, k_type, k_blocks, v_cache, v_type, v_blocks, start_pos, n_heads,
              scale, window, out, softcap=0.0, sinks=None):
    """Causal multi-head attention of n new queries over the cache.

    q[n, n_heads*head_dim] holds the queries of the tokens at positions start_pos+i, whose
    keys and values are already in k_cache/v_cache[n_kv_heads, n_ctx, row bytes]: rows of
    k_blocks blocks of GGML type k_type (v_blocks of v_type), read in their stored type.
    Query head h reads KV head h // (n_heads // n_kv_heads) (grouped-query attention). With
    window > 0 the query at position p sees only keys at positions > p - window (sliding
    window). With softcap > 0 each scaled score s becomes softcap * tanh(s / softcap) before
    the softmax (Gemma 2's attention soft-capping). With sinks (float32[n_heads]), head h's
    softmax has sinks[h] as one more logit in its denominator (gpt-oss). Writes
    out[n, n_heads*head_dim_v].
    """
    n = q.shape[0]
    n_kv_heads = k_cache.shape[0]
    head_dim = q.shape[1] // n_heads
    head_dim_v = out.shape[1] // n_heads
    group = n_heads // n_kv_heads
    n_tiles = (n + _QUERY_TILE - 1) // _QUERY_TILE
    tile_rows = min(n, _QUERY_TILE) * group
    # keys any query sees: from the first query's window start to the last query's position
    lo = 0
    if window > 0:
        lo = max(0, start_pos - window + 1)
    hi = start_pos + n
    n_spans = 1
    if n_tiles * n_kv_heads < _SPLIT_BELOW:
        n_spans = max(1, (hi - lo + _KEY_SPAN - 1) // _KEY_SPAN)
    n_items = n_kv_heads * n_tiles * n_spans
    run_max = np.empty((n_items, tile_rows), np.float32)
    run_sum = np.empty((n_items, tile_rows), np.float32)
    acc = np.empty((n_items, tile_rows, head_dim_v), np.float32)
    for item in prange(n_items):
        span = item % n_spans
        tile_kv = item // n_spans
        kvh, i0 = _tile(tile_kv, n_kv_heads, n_tiles)
        i1 = min(n, i0 + _QUERY_TILE)
        rows = (i1 - i0) * group
        # the keys this tile sees, cut to this span
        k0 = 0
        if window > 0:
            k0 = max(0, start_pos + i0 - window + 1)
        k1 = start_pos + i1
        if n_spans > 1:
            k0 = max(k0, lo + span * _KEY_SPAN)
            k1 = min(k1, lo + (span + 1) * _KEY_SPAN)
        qt = np.empty((rows, head_dim), np.float32)
        seen_from = np.empty(rows, np.int64)  # row r sees keys seen_from[r]..seen_to[r]-1 of the span
        seen_to = np.empty(rows, np.int64)
        for r in range(rows):
            i = i0 + r // group
            h = kvh * group + r % group
            qt[r, :] = q[i, h * head_dim:(h + 1) * head_dim]
            pos = start_pos + i
            seen_from[r] = max(k0, pos - window + 1) if window > 0 else k0
            seen_to[r] = max(min(pos + 1, k1), seen_from[r])
        m = run_max[item]
        total = run_sum[item]
        a = acc[item]
        m[:rows] = _NO_SCORE
        a[:rows] = 0.0
        keys = np.empty((_KEY_BLOCK, head_dim), np.float32)
        values = np.empty((_KEY_BLOCK, head_dim_v), np.float32)
        p = np.empty((rows, max(k1 - k0, 1)), np.float32)  # scores, then softmax weights
        mantissa = np.empty(max(k1 - k0, 1), np.float32)  # exp of a row's scores (_exp_parts)
        exponent = np.empty(max(k1 - k0, 1), np.int32)
        power = exponent.view(np.float32)
        # pass 1: the scores of the span's keys, a block of keys converted at a time
        for b0 in range(k0, k1, _KEY_BLOCK):
            nb = min(_KEY_BLOCK, k1 - b0)
            _cache_rows_f32(k_type, k_cache[kvh], b0, nb, k_blocks, keys)
            for r in range(rows):
                for j in range(max(seen_from[r], b0), min(seen_to[r], b0 + nb)):
                    s = np.float32(0.0)
                    for d in range(head_dim):  # indexed in place: a view per key costs more
                        s += qt[r, d] * keys[j - b0, d]
                    s *= scale
                    if softcap > 0:
                        s = np.float32(softcap * math.tanh(s / softcap))
                    p[r, j - k0] = s
                    m[r] = max(m[r], s)
        # the softmax over the span, normalised (as a whole softmax when there is one span;
        # a head's sink logit joins the max and the denominator here only then, else once
        # at the merge)
        for r in range(rows):
            t = 0.0  # float64, as ggml's softmax sums
            if sinks is not None and n_spans == 1:
                sink = sinks[kvh * group + r % group]
                m[r] = max(m[r], sink)
                t += np.float32(math.exp(sink - m[r]))
            pr, top = p[r], m[r]
            for j in range(seen_from[r] - k0, seen_to[r] - k0):
                mantissa[j], exponent[j] = _exp_parts(pr[j] - top)
            for j in range(seen_from[r] - k0, seen_to[r] - k0):
                e = mantissa[j] * power[j]
                pr[j] = e
                t += e
            total[r] = t
            if t > 0:
                inv = np.float32(1.0 / t)
                for j in range(seen_from[r] - k0, seen_to[r] - k0):
                    p[r, j] *= inv
        # pass 2: the weighted values, a block converted at a time
        for b0 in range(k0, k1, _KEY_BLOCK):
            _cache_rows_f32(v_type, v_cache[kvh], b0, min(_KEY_BLOCK, k1 - b0), v_blocks, values)
            for r in range(rows):
                for j in range(max(seen_from[r], b0), min(seen_to[r], b0 + _KEY_BLOCK)):
                    w = p[r, j - k0]
                    for d in range(head_dim_v):
                        a[r, d] += w * values[j - b0, d]
    # merge the spans of each tile (weighted by their share of the softmax) into out: on
    # the calling thread when there are few tiles (a decoded token), which spares waking
    # the threads once more for a few hundred multiply-adds
    if n_kv_heads * n_tiles < _SPLIT_BELOW:
        for tile_kv in range(n_kv_heads * n_tiles):
            _merge_spans(tile_kv, n_kv_heads, n_tiles, n, group, n_spans, head_dim_v, run_max, run_sum, acc,
                         sinks, out)
    else:
        for tile_kv in prange(n_kv_heads * n_tiles):
            _merge_spans(tile_kv, n_kv_heads, n_tiles, n, group, n_spans, head_dim_v, run_max, run_sum, acc,
                         sinks, out)


@njit(cache=True, fastmath=True)
def _silu_mul_rows(gate, up):
    """gate = gate / (1 + exp(-gate)) * up, exp vectorized (_exp_parts)."""
    n, d = gate.shape
    mantissa = np.empty(d, np.float32)
    exponent = np.empty(d, np.int32)
    power = exponent.view(np.float32)
    for i in range(n):
        g, u = gate[i], up[i]
        for j in range(d):
            mantissa[j], exponent[j] = _exp_parts(-g[j])
        for j in range(d):
            g[j] = g[j] / (np.float32(1.0) + mantissa[j] * power[j]) * u[j]


@njit(cache=True, fastmath=True)
def _gelu_tanh_mul_rows(gate, up):
    """gate = 0.5 g (1 + tanh(t)) * up with t = sqrt(2/pi) (g + 0.044715 g^3), computed as the
    equal g / (1 + exp(-2t)) * up, exp vectorized (_exp_parts; libm's tanhf is a call per
    element)."""
    n, d = gate.shape
    c = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
    mantissa = np.empty(d, np.float32)
    exponent = np.empty(d, np.int32)
    power = exponent.view(np.float32)
    for i in range(n):
        g, u = gate[i], up[i]
        for j in range(d):
            x = g[j]
            mantissa[j], exponent[j] = _exp_parts(c * (x + np.float32(0.044715) * x * x * x))
        for j in range(d):
            g[j] = g[j] / (np.float32(1.0) + mantissa[j] * power[j]) * u[j]


@njit(inline="always")
def _share(n, p):
    """Rows a..b of share p of _SHARES: each share is one call of the one-thread function (the
    rows' code compiled once), so that a batch computes exactly what one thread did."""
    parts = min(n, _SHARES)
    return p * n // parts, (p + 1) * n // parts


_SHARES = 16

@njit(inline="always")
def _gated_rows(gate, up, gelu):
    if gelu:
        _gelu_tanh_mul_rows(gate, up)
    else:
        _silu_mul_rows(gate, up)


@njit(cache=True, parallel=True)
def _gated_parallel(gate, up, gelu):
    for p in prange(min(gate.shape[0], _SHARES)):
        a, b = _share(gate.shape[0], p)
        _gated_rows(gate[a:b], up[a:b], gelu)


@njit(inline="always")
def _gated(gate, up, gelu):
    if gate.shape[0] >= PARALLEL_ROWS:
        _gated_parallel(gate, up, gelu)
    else:
        _gated_rows(gate, up, gelu)


@njit(cache=True)
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place (the SwiGLU feed-forward of llama and Qwen)."""
    _gated(gate, up, False)


@njit(cache=True)
def gelu_tanh_mul(gate, up):
    """gate = gelu_tanh(gate) * up, in place (the GeGLU feed-forward of Gemma)."""
    _gated(gate, up, True)
