"""The row-wise ops of runtime/kernels/ops.py (RMSNorm, RoPE, the gated activations) against
float64 NumPy, on a few rows (one thread) and on a batch of ops.PARALLEL_ROWS or more (rows
split over the threads). Each row is computed alone by the same code either way, so a batch's
rows must equal, bit for bit, the same rows run one at a time; against float64 each result
is a handful of float32 roundings of values of magnitude <= the row's (a float64 sum for the
norm; cosine and sine rounded to float32 for RoPE; exp/tanh within an ulp or two), so
|error| <= 1e-5 relative to the largest magnitude in play holds with room."""

import math

import numpy as np
import pytest

from runtime.kernels import ops

BATCHES = [3, ops.PARALLEL_ROWS + 5]


def rows_alone(op, *arrays):
    """op run on each row by itself (the one-thread path); the arrays' first is changed."""
    out = arrays[0].copy()
    for i in range(out.shape[0]):
        op(out[i:i + 1], *[a[i:i + 1] for a in arrays[1:]])
    return out


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("n", BATCHES)
def test_rms_norm(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    ops.rms_norm(x, w, 1e-5, out)
    x64 = x.astype(np.float64)
    close(out, x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w)
    alone = np.empty_like(x)
    for i in range(n):
        ops.rms_norm(x[i:i + 1], w, 1e-5, alone[i:i + 1])
    assert np.array_equal(out, alone)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n", BATCHES)
def test_rope(n, neox):
    rng = np.random.default_rng(n + 10 * neox)
    heads, head_dim, n_rot = 3, 16, 12  # the last 4 dimensions of each head do not rotate
    x = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    positions = rng.integers(0, 5000, n).astype(np.int64)
    inv = ops.rope_inv_freq(n_rot, 10000.0, 1.0, np.zeros(0, np.float32))
    got = x.copy()
    ops.rope(got, positions, heads, head_dim, n_rot, inv, neox)
    want = x.astype(np.float64).reshape(n, heads, head_dim).copy()
    half = n_rot // 2
    for k in range(half):
        angle = positions * inv[k]
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = (k, k + half) if neox else (2 * k, 2 * k + 1)
        x0, x1 = want[:, :, a].copy(), want[:, :, b].copy()
        want[:, :, a], want[:, :, b] = x0 * c - x1 * s, x0 * s + x1 * c
    close(got, want.reshape(n, -1))
    alone = rows_alone(lambda xi, p: ops.rope(xi, p, heads, head_dim, n_rot, inv, neox), x, positions)
    assert np.array_equal(got, alone)


@pytest.mark.parametrize("name", ["silu_mul", "gelu_tanh_mul"])
@pytest.mark.parametrize("n", BATCHES)
def test_gated_activations(name, n):
    rng = np.random.default_rng(n)
    gate = (3 * rng.standard_normal((n, 80))).astype(np.float32)
    up = rng.standard_normal((n, 80)).astype(np.float32)
    got = gate.copy()
    getattr(ops, name)(got, up)
    g = gate.astype(np.float64)
    if name == "silu_mul":
        want = g / (1 + np.exp(-g)) * up
    else:
        want = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * up
    close(got, want)
    assert np.array_equal(got, rows_alone(getattr(ops, name), gate, up))
