"""The integer path (runtime/kernels/q8.py, q8dot.py) against a float64 reference.

The kernels round x to 8-bit blocks (x ~ d * q, d = max|x| / 127 per block of 32 or 256)
and compute sum(w * d * q) with integer products. Two bounds, both derived:
- against the quantized activations xq = d * q: only float32 arithmetic differs from the
  float64 product of the `gguf` package's dequantization with xq. Per row the kernel adds at
  most cols/16 + 16 float32 terms (exact integer sub-block sums times d_w * d_x, then the
  vector lanes), each within a few ulps, so |err| <= (cols + 8) * 2^-24 * S, S the sum of
  the magnitudes of the parts: sum(|w| * |xq|), except that formats with a minimum (Q4_1,
  Q5_1, Q2_K, Q4_K, Q5_K) add their scale part and minimum part apart, whose magnitudes are
  at most |w| + 2 |minimum| each (`part_magnitude`).
- against x itself: rounding moves each x_i by at most d_b/2 (d_b its block's scale), so
  the result moves by at most sum_i |w_i| * d_b(i) / 2 more. Blocks of 32 store d as f16,
  as ggml does (q is rounded with the exact d): |d - d16| <= 2^-11 d16, so there
  |x - d16 q| <= d/2 + 127 |d - d16| <= (0.5 + 128 * 2^-11) d16 (`step_fraction`).
A wrong weight, scale or activation byte moves a result by ~|w * x|, far beyond either.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import kernels
from runtime.ggml_types import TYPES, ggml_type
from test_kernels import random_blocks, reference

ROOT = Path(__file__).resolve().parent.parent
# The formats of the integer path, as the ggml_types table lists them (test_integer_path_listings
# checks the kernels' listings against it); K_QUANTS read activations in blocks of 256.
INTEGER_TYPES = [t.name for t in TYPES if t.activations]
K_QUANTS = {t.name for t in TYPES if t.activations == 256}


def test_integer_path_listings_follow_the_table():
    """Every listing of the integer path's formats is the ggml_types table's: the row dot
    bodies, q8's type sets and activation blocks, the wide and GEMM subsets (k-quants), and
    each format has the float kernels too (the fallback and the reference path)."""
    from runtime.kernels import q8, q8dot, q8gemm

    table = {t.id: t.activations for t in TYPES if t.activations}
    assert set(table) == {ggml_type(n).id for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4",
                                                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")}
    assert set(q8dot.ROW_DOT_BODIES) == set(table) == q8.INTEGER_TYPES
    assert {t: q8.activation_block(t) for t in table} == table
    assert set(q8.Q8_K_TYPES) == {t for t, block in table.items() if block == 256}
    assert set(q8.Q8_0_TYPES) == {t for t, block in table.items() if block == 32}
    assert set(q8dot.WIDE_TYPES) <= set(q8.Q8_K_TYPES)
    assert set(q8gemm.GEMM_TYPES) - set(q8gemm.LEGACY_GEMM_TYPES) <= set(q8.Q8_K_TYPES)
    assert set(q8gemm.LEGACY_GEMM_TYPES) <= set(q8.Q8_0_TYPES)
    assert set(table) <= {ggml_type(n).id for n in kernels.SUPPORTED_TYPES}


def test_row_dots_of_a_type_without_an_integer_path_are_nan():
    """The generated switches (q8dot.type_switch) fall through to NaN for any other id."""
    from runtime.kernels import q8

    raw = np.zeros(144, np.uint8)
    raw.flags.writeable = False
    q, d, s = np.zeros(256, np.int8), np.ones(1, np.float32), np.zeros(16, np.int16)
    assert np.isnan(q8.dot_row(ggml_type("F32").id, raw, 0, 1, q, d, s, 0))
    assert q8.dot_row(ggml_type("Q4_K").id, raw, 0, 1, q, d, s, 0) == 0.0
    assert all(np.isnan(q8.dot_row_blocked(ggml_type("F16").id, raw, 0, 1, q, d, s, 0, 0)))
    assert all(np.isnan(q8.dot_row_wide(ggml_type("Q4_K").id, raw, 0, 1, q, d, s, 0, 0)))  # not wide


def step_fraction(block):
    """|x - d q| <= step_fraction * d (see the module docstring)."""
    return 0.5 + 128 * 2.0 ** -11 if block == 32 else 0.5


def activation_block(name):
    return 256 if name in K_QUANTS else 32


def quantized(x, name):
    """(x rounded as the kernels round it, the most that rounding moves each element)."""
    block = activation_block(name)
    q, d, _ = kernels.quantize_activations(x, block)
    scale = np.repeat(d.astype(np.float64), block)
    return scale * q, scale * step_fraction(block)


# Formats with a minimum: (offset of its f16 factor in the block, largest sub-block
# multiplier, elements per block).
MINIMA = {"Q4_1": (2, 1, 32), "Q5_1": (2, 1, 32), "Q2_K": (82, 15, 256), "Q4_K": (2, 63, 256),
          "Q5_K": (2, 63, 256)}


def part_magnitude(raw, name, rows, cols):
    """Per weight, the magnitude of what it adds to the float32 partial sums: |w|, plus twice
    the largest minimum of its block for the formats that sum scale and minimum parts apart."""
    w = np.abs(reference(raw, name, rows * cols).astype(np.float64))
    if name in MINIMA:
        off, top, per = MINIMA[name]
        blocks = raw.reshape(-1, kernels.supported_type(name).block_bytes)
        factor = np.abs(blocks[:, off:off + 2].copy().view(np.float16).astype(np.float64)).reshape(-1)
        w = w + 2 * np.repeat(factor * top, per)[:rows * cols]
    return w.reshape(rows, cols)


def check(got, raw, name, rows, cols, X):
    """got[t, r] against row r of the reference times X[t], within both bounds."""
    w64 = reference(raw, name, rows * cols).astype(np.float64).reshape(rows, cols)
    mag = part_magnitude(raw, name, rows, cols)
    for t, x in enumerate(X):
        xq, scale = quantized(x, name)
        float32_bound = (cols + 8) * 2.0 ** -24 * (mag @ np.abs(xq)) + 1e-30
        err_q = np.abs(got[t].astype(np.float64) - w64 @ xq)
        assert np.all(err_q <= float32_bound), f"{name}: {np.max(err_q / float32_bound):.3g} x the float32 bound"
        rounding_bound = np.abs(w64) @ scale + float32_bound
        err = np.abs(got[t].astype(np.float64) - w64 @ x.astype(np.float64))
        assert np.all(err <= rounding_bound), f"{name}: {np.max(err / rounding_bound):.3g} x the rounding bound"


@pytest.mark.parametrize("block", [32, 256])
def test_activation_rounding_is_within_half_a_step(block):
    rng = np.random.default_rng(block)
    x = (rng.standard_normal(4 * block) * rng.choice([1e-3, 1.0, 50.0], 4 * block)).astype(np.float32)
    x[:block] = 0.0  # an all-zero block
    q, d, sums = kernels.quantize_activations(x, block)
    assert q.dtype == np.int8 and np.all(np.abs(q.astype(np.int32)) <= 127)
    step = np.repeat(d.astype(np.float64), block)
    # |x - d q| <= d/2 (or the f16 bound), plus the float32 rounding of x / d (ulps of 127)
    assert np.all(np.abs(x - step * q) <= step * (step_fraction(block) + 2.0 ** -16))
    assert np.all(q[:block] == 0) and d[0] == 0
    np.testing.assert_array_equal(sums, q.astype(np.int32).reshape(-1, 16).sum(1))
    exact = (np.abs(x).reshape(-1, block).max(1) / np.float32(127)).astype(np.float32)
    if block == 32:
        np.testing.assert_array_equal(d, exact.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_allclose(d, exact, rtol=2.0 ** -22)


@pytest.mark.parametrize("name", INTEGER_TYPES)
@pytest.mark.parametrize("rows, cols", [(1, 256), (7, 512), (37, 768)])
def test_matvec(name, rows, cols):
    rng = np.random.default_rng(rows + cols)
    raw = random_blocks(name, rows * cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    got = kernels.matvec(raw, name, rows, cols, x)
    assert got.shape == (rows,) and got.dtype == np.float32
    check(got[None, :], raw, name, rows, cols, x[None, :])


@pytest.mark.parametrize("name", INTEGER_TYPES)
@pytest.mark.parametrize("n", [1, 3, 10])
def test_matmul(name, n):
    rng = np.random.default_rng(100 + n)
    rows, cols = 37, 512
    raw = random_blocks(name, rows * cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = kernels.matmul(raw, name, rows, cols, X)
    assert got.shape == (n, rows) and got.dtype == np.float32
    check(got, raw, name, rows, cols, X)


GEMM_TYPES = ["Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q5_0", "Q8_0"]  # runtime/kernels/q8gemm.py (IQ4_XS, Q8_0: VNNI tiers)


@pytest.mark.parametrize("name", GEMM_TYPES)
@pytest.mark.parametrize("rows, cols, n", [(37, 512, 16), (8, 768, 37), (3, 256, 70), (5, 640, 20)])
def test_gemm(name, rows, cols, n):
    """Batches from q8.GEMM_MIN_TOKENS on run the GEMM: rows past a whole tile of 8, a last
    token group with fewer tokens than lanes, a tile of fewer rows than the tile holds. The
    same bounds as the row dots: the integer sums are exact, the float32 ones as theirs."""
    from runtime.kernels import q8

    if cols % kernels.supported_type(name).block_elems:
        pytest.skip(f"{name} rows hold whole blocks")
    assert n >= q8.GEMM_MIN_TOKENS
    rng = np.random.default_rng(rows * n)
    raw = random_blocks(name, rows * cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[n // 2] = 0.0  # a token of zeros: its activation scale is 0
    got = kernels.matmul(raw, name, rows, cols, X)
    check(got, raw, name, rows, cols, X)


# Bytes (offset, length, value) that put a format's integers at their largest magnitude.
EXTREMES = {"Q4_K": [(4, 12, 0xFF), (16, 128, 0xFF)],  # scales and minimums 63, indices 15
            "Q5_K": [(4, 12, 0xFF), (16, 160, 0xFF)],  # scales and minimums 63, indices 31
            "IQ4_XS": [(2, 6, 0x00), (8, 128, 0x00)],  # scales 0 - 32, levels -127
            "Q6_K": [(0, 192, 0x00), (192, 16, 0x80)],  # indices 0 - 32, scales -128
            "Q4_0": [(2, 16, 0x00)], "Q5_0": [(2, 20, 0x00)],  # 0 - 8, 0 - 16
            "Q8_0": [(2, 32, 0x80)]}  # -128


@pytest.mark.parametrize("name", GEMM_TYPES)
def test_gemm_weights_at_the_extremes(name):
    """Integers at their largest magnitude against activations of +-127 (x = +-1 in every
    block): the integer sums come closest to their int16/int32 limits there."""
    rng = np.random.default_rng(7)
    rows, cols, n = 9, 1024, 20
    block = kernels.supported_type(name).block_bytes
    raw = random_blocks(name, rows * cols, rng).reshape(-1, block)
    for off, length, value in EXTREMES[name]:
        raw[:, off:off + length] = value
    raw = raw.reshape(-1)
    X = np.where(rng.random((n, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    check(kernels.matmul(raw, name, rows, cols, X), raw, name, rows, cols, X)


@pytest.mark.parametrize("name", [t for t in INTEGER_TYPES if t not in K_QUANTS])
def test_blocks_left_after_the_last_step(name):
    """Rows of 27 blocks of 32: the row dots take 8 blocks a step, then 3 one by one."""
    rng = np.random.default_rng(27)
    rows, cols = 5, 27 * 32
    raw = random_blocks(name, rows * cols, rng)
    X = rng.standard_normal((6, cols)).astype(np.float32)
    check(kernels.matmul(raw, name, rows, cols, X), raw, name, rows, cols, X)
    check(kernels.matvec(raw, name, rows, cols, X[0])[None, :], raw, name, rows, cols, X[:1])


# Q/K/V of a Q4_K_M model (Q4_K, Q4_K, Q6_K), a mix of both activation kinds, and gate/up
# with a float matrix among them (computed apart).
GROUPS = [[("Q4_K", 9), ("Q4_K", 3), ("Q6_K", 3)], [("Q8_0", 5), ("Q4_K", 1), ("Q5_0", 11)],
          [("Q4_0", 13), ("F16", 4)]]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n", [None, 1, 4])
def test_many_matrices_in_one_launch(group, n):
    rng = np.random.default_rng(len(group) * 10 + (n or 0))
    cols = 512
    mats = [(random_blocks(name, rows * cols, rng), name, rows) for name, rows in group]
    if n is None:
        x = rng.standard_normal(cols).astype(np.float32)
        outs = [np.full(rows, np.nan, np.float32) for _, _, rows in mats]
        assert kernels.matvec_many(mats, cols, x, outs) == outs
        results = [o[None, :] for o in outs]
        X = x[None, :]
    else:
        X = rng.standard_normal((n, cols)).astype(np.float32)
        results = kernels.matmul_many(mats, cols, X)
    for (raw, name, rows), got in zip(mats, results):
        if name == "F16":
            w64 = reference(raw, name, rows * cols).astype(np.float64).reshape(rows, cols)
            np.testing.assert_allclose(got, X.astype(np.float64) @ w64.T, rtol=1e-4, atol=1e-4)
        else:
            check(got, raw, name, rows, cols, X)


def test_many_refuses_wrong_outputs():
    raw = np.zeros(18 * 4, np.uint8)
    with pytest.raises(ValueError, match="out"):
        kernels.matvec_many([(raw, "Q4_0", 2)], 64, np.zeros(64, np.float32), [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="out"):
        kernels.matmul_many([(raw, "Q4_0", 2)], 64, np.zeros((2, 64), np.float32), [np.zeros((2, 3), np.float32)])


_TIER_CHECK = """
import sys, numpy as np
sys.path.insert(0, 'tests')
from test_q8 import INTEGER_TYPES, check
from test_kernels import random_blocks
from runtime import kernels
from runtime.kernels import q8, simd
from numba import types
rng = np.random.default_rng(5)
for name in INTEGER_TYPES:
    raw = random_blocks(name, 3 * 512, rng)
    X = rng.standard_normal((2, 512)).astype(np.float32)
    check(kernels.matvec(raw, name, 3, 512, X[0])[None, :], raw, name, 3, 512, X[:1])
for name in ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q5_0", "Q8_0"):  # the GEMM (q8gemm.py)
    raw = random_blocks(name, 9 * 512, rng)
    X = rng.standard_normal((17, 512)).astype(np.float32)
    check(kernels.matmul(raw, name, 9, 512, X), raw, name, 9, 512, X)
ro = types.Array(types.uint8, 1, 'C', readonly=True)
sig = (types.int64, ro, types.int64, types.int64, types.int8[::1], types.float32[::1], types.int16[::1], types.int64)
q8.dot_row.compile(sig)
print(simd.integer_isa())
print(q8.dot_row.inspect_asm(sig))
from numba import njit
from runtime.kernels import q8gemm
@njit
def gemm(ty, raw, cols, xi, ysi, ydi, out):
    q8gemm.gemm_rows(ty, raw, 144 * cols // 256, 8, 0, cols, xi, ysi, ydi, 16, out)
gsig = (types.int64, ro, types.int64, types.int32[::1], types.int32[::1], types.float32[::1], types.float32[:, ::1])
gemm.compile(gsig)
print(gemm.inspect_asm(gsig))
"""


@pytest.mark.parametrize("tier, isa", [("x86-64-v4-vnni", "vnni512"), ("x86-64-v3-vnni", "vnni256"),
                                       ("x86-64-v3", "avx2"), ("x86-64-v2", "ssse3"), ("x86-64", "generic")])
def test_every_tier_is_right_and_uses_only_its_instructions(tier, isa, tmp_path):
    """Each tier computes the same results within the bounds, and its code holds no
    instruction of a tier above it (the SIGILL guard): no AVX-512 (zmm) or VNNI at v3, no
    VEX encoding at all at v2 and below."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MODELRUN_"))}
    env.update(MODELRUN_CPU_TIER=tier, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _TIER_CHECK], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen, asm = out.stdout.split("\n", 1)
    assert chosen == isa
    vnni = re.search(r"\bvpdpbusd", asm)
    zmm = "zmm" in asm
    vex = re.search(r"^\s+v[a-z0-9]+\s", asm, re.M)
    if tier == "x86-64-v4-vnni":
        assert vnni and zmm
    elif tier == "x86-64-v3-vnni":
        assert vnni and "{vex}" in asm and not zmm
    elif tier == "x86-64-v3":
        assert not vnni and not zmm and "vpmaddubsw" in asm
    else:
        assert not vex and not vnni
        if tier == "x86-64-v2":
            assert "pmaddubsw" in asm
