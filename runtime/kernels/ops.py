"""Numba kernels for the transformer's non-matmul ops: norms, RoPE, attention, activations.

Activations are float32 rows: a batch of n tokens is an [n, width] array, and a row that
holds several heads stores them one after another (head h at columns h*head_dim..).
These ops are cheap next to the matmuls (they touch activations, not weights), so they are
written for clarity first, and run on one thread: waking the other threads for a parallel
loop costs more than the whole op on a decoded token's row (bench/launches.py measures
both). Attention alone runs in parallel, since its work grows with the context.

The KV cache attention reads is bytes, laid out [n_kv_head, n_ctx, row bytes] per layer
(the keys one head attends over are one contiguous slab); each head's row at a position is
stored in a GGML type, read in place by the format kernels of runtime.kernels.dispatch:
- F32: head_dim little-endian float32 (4 bytes each);
- F16: head_dim IEEE binary16 (2 bytes each), llama.cpp's default;
- Q8_0: head_dim/32 blocks of 34 bytes: an f16 scale d, then 32 int8 q; value = d * q.
"""

import math

import numpy as np
from numba import njit, prange

from .dispatch import decode_blocks, dot_blocks


@njit(cache=True, fastmath=True)
def rms_norm(x, weight, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight, for each row i of x[n, d]."""
    n, d = x.shape
    for i in range(n):
        ss = 0.0  # float64 sum, as llama.cpp does
        for j in range(d):
            ss += np.float64(x[i, j]) * x[i, j]
        scale = np.float32(1.0 / math.sqrt(ss / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * weight[j]


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


@njit(cache=True, fastmath=True)
def rope(x, positions, n_heads, head_dim, n_rot, inv_freq, neox):
    """In place rotary embedding of x[n, n_heads*head_dim], row i at positions[i].

    The first n_rot dimensions of each head rotate in pairs: (2k, 2k+1) in the original
    (GPT-J, llama) style, (k, k + n_rot/2) in the NEOX style (Qwen, Gemma).
    """
    n = x.shape[0]
    half = n_rot // 2
    for t in range(n * n_heads):
        i = t // n_heads
        base = (t % n_heads) * head_dim
        pos = positions[i]
        for k in range(half):
            angle = pos * inv_freq[k]
            c = np.float32(math.cos(angle))
            s = np.float32(math.sin(angle))
            if neox:
                a = base + k
                b = base + k + half
            else:
                a = base + 2 * k
                b = a + 1
            x0 = x[i, a]
            x1 = x[i, b]
            x[i, a] = x0 * c - x1 * s
            x[i, b] = x0 * s + x1 * c


@njit(inline="always", fastmath=True)
def _exp_normalize(x, n, m, total):
    """x[:n] = exp(x - m) / (total + their sum), in float32."""
    for j in range(n):
        e = np.float32(math.exp(x[j] - m))
        x[j] = e
        total += e
    inv = np.float32(1.0) / total
    for j in range(n):
        x[j] *= inv


@njit(cache=True, fastmath=True)
def softmax_inplace(x, n):
    """Softmax of x[:n] in place, in float32 with the max subtracted first."""
    m = x[0]
    for j in range(1, n):
        if x[j] > m:
            m = x[j]
    _exp_normalize(x, n, m, np.float32(0.0))


@njit(cache=True, fastmath=True)
def softmax_with_sink(x, n, sink):
    """Softmax of x[:n] in place with one more logit, `sink`, in the denominator only (an
    attention sink: gpt-oss's learned per-head logit that lets a head attend to nothing)."""
    m = sink
    for j in range(n):
        if x[j] > m:
            m = x[j]
    _exp_normalize(x, n, m, np.float32(math.exp(sink - m)))


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
    for t in prange(n * n_heads):
        i = t // n_heads
        h = t % n_heads
        kvh = h // group
        pos = start_pos + i
        first = 0
        if window > 0 and pos - window + 1 > 0:
            first = pos - window + 1
        n_keys = pos + 1 - first
        qh = q[i, h * head_dim:(h + 1) * head_dim].copy()  # contiguous: the dots vectorize
        keys = k_cache[kvh]
        values = v_cache[kvh]
        scores = np.empty(n_keys, np.float32)
        for j in range(n_keys):
            scores[j] = dot_blocks(k_type, keys[first + j], 0, k_blocks, qh, 0) * scale
        if softcap > 0:
            for j in range(n_keys):
                scores[j] = np.float32(softcap * math.tanh(scores[j] / softcap))
        if sinks is None:
            softmax_inplace(scores, n_keys)
        else:
            softmax_with_sink(scores, n_keys, sinks[h])
        acc = np.zeros(head_dim_v, np.float32)
        value = np.empty(head_dim_v, np.float32)
        for j in range(n_keys):
            decode_blocks(v_type, values[first + j], 0, v_blocks, value, 0)
            w = scores[j]
            for d in range(head_dim_v):
                acc[d] += w * value[d]
        out[i, h * head_dim_v:(h + 1) * head_dim_v] = acc


@njit(cache=True, fastmath=True)
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place (the SwiGLU feed-forward of llama and Qwen)."""
    n, d = gate.shape
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            gate[i, j] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * up[i, j]


@njit(cache=True, fastmath=True)
def gelu_tanh_mul(gate, up):
    """gate = gelu_tanh(gate) * up, in place (the GeGLU feed-forward of Gemma)."""
    n, d = gate.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            inner = c * (g + np.float32(0.044715) * g * g * g)
            gate[i, j] = np.float32(0.5) * g * (np.float32(1.0) + np.float32(math.tanh(inner))) * up[i, j]
