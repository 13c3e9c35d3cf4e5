"""Numba kernels of the Gated DeltaNet layers (Qwen3.5 / Qwen3.6): the short causal
convolution and the gated delta rule, each carrying its recurrent state in place.

Layouts read and written (float32, C order; one sequence):
- x[n, C]: the n tokens' projected channels (q, k and v of every head, one after another).
- conv_state[d_conv - 1, C]: the last d_conv - 1 rows of x before this call, oldest first
  (zeros at the start of a sequence); conv_w[C, d_conv]: each channel's taps, oldest first
  (ggml's ssm_conv1d, ne = [d_conv, C]).
- q[n, Hk, S], k[n, Hk, S]: queries and keys per key head (already L2-normalised);
  v[n, H, S]: values per value head; value head h reads key head h % Hk (llama.cpp tiles the
  key heads, ggml_repeat_4d, and its fused op reads them the same way).
- g[n, H]: each head's log decay (<= 0), beta[n, H]: its write strength (0..1).
- state[H, S_v, S_k]: per head the matrix M with M[j, i] = S[i][j] of the delta rule, row j
  one value dimension (llama.cpp's ssm state in the same byte order: [S_k, S_v, H] in ggml's
  ne order).

The delta rule per token and head (Yang et al., "Gated Delta Networks"):
    M *= exp(g);  d = beta * (v - M k);  M += d k^T;  o = scale * M q,   scale = 1/sqrt(S).
Both kernels run token after token: the decode step is n = 1, and prefill runs the same
sequential loop over its batch (llama.cpp's chunked form computes the same sums in another
order; at these head sizes the sequential loop is not the bottleneck next to the matmuls).
Heads (and channels) are independent, so they split over threads.
"""

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True, parallel=True)
def conv_silu(x, conv_state, conv_w, out):
    """out[t, c] = silu(sum_j window[t + j, c] * conv_w[c, j]) over window = conv_state then x;
    conv_state becomes the last d_conv - 1 rows of that window."""
    n, C = x.shape
    d_conv = conv_w.shape[1]
    keep = d_conv - 1
    for c in prange(C):
        hist = np.empty(keep + n, np.float32)
        for j in range(keep):
            hist[j] = conv_state[j, c]
        for t in range(n):
            hist[keep + t] = x[t, c]
        for t in range(n):
            s = np.float32(0.0)
            for j in range(d_conv):
                s += hist[t + j] * conv_w[c, j]
            out[t, c] = s / (np.float32(1.0) + np.exp(-s))
        for j in range(keep):
            conv_state[j, c] = hist[n + j]


@njit(cache=True, fastmath=True, parallel=True)
def gated_delta_rule(q, k, v, g, beta, state, out):
    """out[t, h, :] = the delta rule's output for token t of head h; state advances by n tokens."""
    n, H, S = v.shape
    Hk = q.shape[1]
    Sk = q.shape[2]
    scale = np.float32(1.0 / math.sqrt(S))
    for h in prange(H):
        hk = h % Hk
        M = state[h]
        d = np.empty(S, np.float32)
        for t in range(n):
            decay = np.float32(math.exp(g[t, h]))
            b = beta[t, h]
            for j in range(S):
                s = np.float32(0.0)
                for i in range(Sk):
                    M[j, i] *= decay
                    s += M[j, i] * k[t, hk, i]
                d[j] = (v[t, h, j] - s) * b
            for j in range(S):
                dj = d[j]
                s = np.float32(0.0)
                for i in range(Sk):
                    M[j, i] += dj * k[t, hk, i]
                    s += M[j, i] * q[t, hk, i]
                out[t, h, j] = s * scale


@njit(cache=True, fastmath=True)
def l2_norm_heads(x, n_heads, head_dim, eps):
    """In place: every head of every row of x[n, n_heads*head_dim] divided by
    sqrt(sum of its squares + eps) (llama.cpp's Gated DeltaNet L2 norm)."""
    n = x.shape[0]
    for i in range(n):
        for hh in range(n_heads):
            base = hh * head_dim
            ss = 0.0
            for j in range(head_dim):
                v = np.float64(x[i, base + j])
                ss += v * v
            scale = np.float32(1.0 / math.sqrt(ss + eps))
            for j in range(head_dim):
                x[i, base + j] *= scale
