"""The Gated DeltaNet kernels (runtime/kernels/deltanet.py) against a float64 NumPy reference
written here from the delta rule's definition, and the decode step against the batch form.

Tolerances: float32 sums of 32-64 products of values of order 1, over 12 tokens of state
updates whose decay keeps the state bounded: relative errors ~1e-6 are expected; 1e-4 of the
largest value leaves room for fastmath's reordering and still fails any slip in an index, a
head mapping or a sign (those move results by O(1))."""

import numpy as np

from runtime.kernels import deltanet

RTOL = 1e-4


def reference(x, conv_w, conv_state, n_k, n_v, size, g, beta):
    """(outputs [n, n_v, size], final delta state, final conv window), float64."""
    d_conv = conv_w.shape[1]
    window = np.concatenate([conv_state, x]).astype(np.float64)
    n = x.shape[0]
    conv = np.stack([(window[t:t + d_conv] * conv_w.T).sum(axis=0) for t in range(n)])
    mixed = conv / (1 + np.exp(-conv))
    kd = n_k * size
    q = mixed[:, :kd].reshape(n, n_k, size)
    k = mixed[:, kd:2 * kd].reshape(n, n_k, size)
    v = mixed[:, 2 * kd:].reshape(n, n_v, size)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    S = np.zeros((n_v, size, size))  # S[h][j, i]: value j, key i
    out = np.zeros((n, n_v, size))
    for t in range(n):
        for h in range(n_v):
            kh, qh = k[t, h % n_k], q[t, h % n_k]  # value head h reads key head h % n_k
            S[h] *= np.exp(g[t, h])
            S[h] += np.outer(beta[t, h] * (v[t, h] - S[h] @ kh), kh)
            out[t, h] = S[h] @ qh / np.sqrt(size)
    return out, S, window[-(d_conv - 1):]


def ours(x, conv_w, conv_state, n_k, n_v, size, g, beta, state=None):
    n = x.shape[0]
    mixed = np.empty_like(x)
    deltanet.conv_silu(x, conv_state, conv_w, mixed)
    kd = n_k * size
    q, k = np.ascontiguousarray(mixed[:, :kd]), np.ascontiguousarray(mixed[:, kd:2 * kd])
    deltanet.l2_norm_heads(q, n_k, size, 1e-6)
    deltanet.l2_norm_heads(k, n_k, size, 1e-6)
    v = np.ascontiguousarray(mixed[:, 2 * kd:]).reshape(n, n_v, size)
    state = np.zeros((n_v, size, size), np.float32) if state is None else state
    out = np.empty((n, n_v, size), np.float32)
    deltanet.gated_delta_rule(q.reshape(n, n_k, size), k.reshape(n, n_k, size), v, g, beta, state, out)
    return out, state


def inputs(n=12, n_k=2, n_v=4, size=32, d_conv=4, seed=0):
    rng = np.random.default_rng(seed)
    channels = (2 * n_k + n_v) * size
    x = rng.standard_normal((n, channels)).astype(np.float32)
    conv_w = (0.5 * rng.standard_normal((channels, d_conv))).astype(np.float32)
    g = -rng.uniform(0.05, 1.0, (n, n_v)).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (n, n_v)).astype(np.float32)
    return x, conv_w, g, beta


def test_batch_matches_the_float64_reference():
    x, conv_w, g, beta = inputs()
    conv_state = np.zeros((3, x.shape[1]), np.float32)
    want, want_state, want_window = reference(x, conv_w, conv_state, 2, 4, 32, g, beta)
    got, state = ours(x, conv_w, conv_state, 2, 4, 32, g, beta)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    assert np.abs(state - want_state).max() <= RTOL * np.abs(want_state).max()
    np.testing.assert_array_equal(conv_state, want_window.astype(np.float32))


def test_decode_steps_continue_the_batch():
    """Prefill of 8 tokens then 4 single-token steps equals one batch of 12."""
    x, conv_w, g, beta = inputs()
    whole, _ = ours(x, conv_w, np.zeros((3, x.shape[1]), np.float32), 2, 4, 32, g, beta)
    conv_state = np.zeros((3, x.shape[1]), np.float32)
    state = np.zeros((4, 32, 32), np.float32)
    parts = [ours(x[:8], conv_w, conv_state, 2, 4, 32, g[:8], beta[:8], state)[0]]
    for t in range(8, 12):
        parts.append(ours(x[t:t + 1], conv_w, conv_state, 2, 4, 32, g[t:t + 1], beta[t:t + 1], state)[0])
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-6 * np.abs(whole).max())
