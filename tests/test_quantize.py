"""Quantizers (bundler/quantizers.py) against gguf's NumPy reference and our decoders.

- F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4: bit-exact with gguf.quants.quantize on Gaussian
  rows and on edge rows (zeros, constants, one huge outlier, denormals, mixed signs, ties).
- Every type: a round trip through runtime.kernels.dequantize stays within a derived bound.
- K types: RMSE below a naive max-abs quantizer's (no search), on Gaussian rows and on real
  Gemma weights. Measured (numba 0.68, this machine), ours vs naive:
      Gaussian (64 x 1024, sigma 1)            Gemma blk.0.attn_v (128 x 512, stored Q8_0)
      Q2_K 0.2970 vs 0.3289  (-10%)            Q2_K 0.01202  vs 0.01320   (-9%)
      Q3_K 0.1507 vs 0.1992  (-24%)            Q3_K 0.006117 vs 0.008090 (-24%)
      Q4_K 0.07157 vs 0.07823 (-9%)            Q4_K 0.002900 vs 0.003179  (-9%)
      Q5_K 0.03612 vs 0.03805 (-5%)            Q5_K 0.001475 vs 0.001550  (-5%)
      Q6_K 0.01775 vs 0.01925 (-8%)            Q6_K 0.0007301 vs 0.0007901 (-8%)
- Q3_K: a block at a float32 near-tie gives llama.cpp's exact bytes (golden, from libggml).
- MXFP4: also checked once against libggml's ggml_quantize_chunk (512 x 1024 rows at scales
  1e-6..300, zeros, 2^-130, a constant row, -1e30): byte-identical.
- IQ4_NL, IQ4_XS: decoded as the layout says, each weight on the nearest codebook level of
  its group, RMSE below a naive max-abs quantizer's (ours vs naive, measured):
      Gaussian (64 x 1024)   IQ4_NL 0.07600 vs 0.07980 (-5%)   IQ4_XS 0.07659 vs 0.07980 (-4%)
      Gemma blk.0.attn_v     IQ4_NL 0.003086 vs 0.003233 (-5%) IQ4_XS 0.003111 vs 0.003233 (-4%)
- quantize then matvec equals matvec of the dequantized rows.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.quants import quantize as reference_quantize

from bundler.quantizers import QUANTIZE_TYPES, quantize, quantize_kernel
from runtime import kernels
from runtime.ggml_types import TYPES, UnsupportedTypeError, ggml_type

EXACT_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IQ4_TYPES = ["IQ4_NL", "IQ4_XS"]


def reference(x: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(reference_quantize(x, GGMLQuantizationType[name])).view(np.uint8).reshape(-1)


def edge_rows(cols: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    g = rng.standard_normal(cols).astype(np.float32)
    outlier = g * 0.01
    outlier[cols // 3] = 1e4
    neg_outlier = g.copy()
    neg_outlier[5] = -3e4
    ties = (np.arange(cols) % 17 - 8).astype(np.float32) * np.float32(0.5)  # halves: rounding ties
    rows = [
        np.zeros(cols), np.full(cols, 0.75), np.full(cols, -2.5), outlier, neg_outlier,
        g * 1e-39,  # denormal (f32 subnormal): 1/d overflows
        g * 1e-30, g * 1e-6,  # d is an f16 subnormal / underflows
        np.where(np.arange(cols) % 2, 1.0, -1.0) * np.abs(g),  # alternating signs
        ties, np.abs(g) + 3.0, -np.abs(g) - 3.0,  # all positive / all negative
        g * 7e4,  # near f16 overflow
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", EXACT_TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 512)])
def test_bit_exact_with_gguf_on_gaussian_rows(name, shape):
    rng = np.random.default_rng(shape[0])
    x = (rng.standard_normal(shape) * rng.uniform(1e-3, 10, (shape[0], 1))).astype(np.float32)
    np.testing.assert_array_equal(quantize(x, name), reference(x, name))


@pytest.mark.parametrize("name", EXACT_TYPES)
def test_bit_exact_with_gguf_on_edge_rows(name):
    x = edge_rows(256)
    with np.errstate(all="ignore"):
        want = reference(x, name)
    got = quantize(x, name)
    row_bytes = ggml_type(name).row_bytes(256)
    for r in range(x.shape[0]):  # row by row, to name the failing one
        np.testing.assert_array_equal(got[r * row_bytes:(r + 1) * row_bytes],
                                      want[r * row_bytes:(r + 1) * row_bytes], err_msg=f"row {r}")


def test_bf16_and_f16_special_values():
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 65520.0, 65519.0,
                   1e-45, -1e-45, 2.0 ** -25, 2.0 ** -24 * 1.5, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                   0.0, -0.0]], np.float32)
    bits = x.view(np.uint32).copy()
    bits[0, 0] = 0x7F800001  # signalling NaN: BF16 makes it quiet
    x = bits.view(np.float32)
    np.testing.assert_array_equal(quantize(x, "BF16"), reference(x, "BF16"))
    # F16 of NaN: payload details are the CPU's; check the non-NaN values exactly
    got = quantize(x, "F16").view(np.float16)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).reshape(-1)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint16)[finite], want.view(np.uint16)[finite])
    assert np.all(np.isnan(got[~finite]))


def test_f16_conversion_on_many_bit_patterns():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, size=1 << 18, dtype=np.uint64).astype(np.uint32)
    # dense around f16's subnormal, normal and overflow boundaries
    near = (rng.integers(0x32800000, 0x47900000, size=1 << 18, dtype=np.uint64)).astype(np.uint32)
    x = np.concatenate([bits, near]).view(np.float32)
    x = x[~np.isnan(x)].reshape(1, -1)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(quantize(x, "F16"), want)


# ------------------------------------------------------------------------- round trips

def _f16(raw: np.ndarray, off: int) -> np.ndarray:
    """The f16 field at byte `off` of every block (raw: [n_blocks, block_bytes])."""
    return np.ascontiguousarray(raw[:, off:off + 2]).view(np.float16).astype(np.float64).reshape(-1)


# qmax = largest |level| a scale multiplies; c = worst error in steps (0.5, or 1 where the
# positive extreme is clipped: Q4_0's -max maps to 8.5 -> clip 15 i.e. 7 steps).
LEGACY_BOUND = {"Q8_0": (127, 0.5, False), "Q4_0": (8, 1.0, False), "Q5_0": (16, 1.0, False),
                "Q4_1": (15, 0.5, True), "Q5_1": (31, 0.5, True)}


@pytest.mark.parametrize("name", list(LEGACY_BOUND))
def test_legacy_round_trip_within_half_step(name):
    """|x - x'| <= c*|d| + qmax*|d - f16(d)| + |m - f16(m)|: rounding to the grid of the
    unrounded d, plus the f16 rounding of d (times the level) and of m."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((9, 256)) * 0.3 + rng.uniform(-1, 1, (9, 1))).astype(np.float32)
    raw = quantize(x, name)
    y = kernels.dequantize(raw, name, x.size).astype(np.float64)
    t = ggml_type(name)
    blocks = raw.reshape(-1, t.block_bytes)
    qmax, c, has_min = LEGACY_BOUND[name]
    d16 = np.abs(_f16(blocks, 0))
    m16 = np.abs(_f16(blocks, 2)) if has_min else 0.0
    bound = c * d16 * (1 + 2.0 ** -10) + qmax * d16 * 2.0 ** -10 + m16 * 2.0 ** -10 + 1e-7
    err = np.abs(x.astype(np.float64).reshape(-1) - y).reshape(-1, 32).max(axis=1)
    assert np.all(err <= bound), f"worst {np.max(err / bound):.3f} x the bound"
    assert np.max(err / bound) > 0.3  # the bound is not vacuous


@pytest.mark.parametrize("name,rel", [("F16", 2.0 ** -11), ("BF16", 2.0 ** -8), ("F32", 0.0)])
def test_float_round_trip(name, rel):
    x = np.random.default_rng(2).standard_normal((3, 100)).astype(np.float32)
    y = kernels.dequantize(quantize(x, name), name, x.size).reshape(x.shape)
    assert np.all(np.abs(y - x) <= rel * np.abs(x))


def k_grid(raw: np.ndarray, name: str):
    """Per sub-block (step, lo, hi) of the values its block can decode to: value = step*q - m
    for the format's q range, from the documented layouts (kquants.py)."""
    t = ggml_type(name)
    b = raw.reshape(-1, t.block_bytes).astype(np.int64)
    if name == "Q2_K":
        d, dmin = _f16(raw.reshape(b.shape), 80), _f16(raw.reshape(b.shape), 82)
        sc, mn = b[:, :16] & 15, b[:, :16] >> 4
        step, m = d[:, None] * sc, dmin[:, None] * mn
        return step, -m, 3 * step - m
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw.reshape(b.shape), 0), _f16(raw.reshape(b.shape), 2)
        s = b[:, 4:16]
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        step, m = d[:, None] * sc, dmin[:, None] * mn
        nmax = 15 if name == "Q4_K" else 31
        return step, -m, nmax * step - m
    if name == "Q3_K":
        d = _f16(raw.reshape(b.shape), 108)
        s = b[:, 96:108]
        j = np.arange(16)
        low = np.where(j < 8, s[:, j % 8] & 15, s[:, j % 8] >> 4)
        high = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        step = d[:, None] * ((low | (high << 4)) - 32)
        return step, np.minimum(-4 * step, 3 * step), np.maximum(-4 * step, 3 * step)
    d = _f16(raw.reshape(b.shape), 208)  # Q6_K
    step = d[:, None] * raw.reshape(b.shape)[:, 192:208].view(np.int8)
    return step, np.minimum(-32 * step, 31 * step), np.maximum(-32 * step, 31 * step)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_round_trip_is_nearest_grid_point(name):
    """Every weight decodes to the nearest value its sub-block can represent: within half a
    step inside the sub-block's range, clamped to the range's end outside it."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1)),
                        rng.standard_normal((2, 512)) + 2.0,  # all-positive sub-blocks
                        rng.standard_t(2, (2, 512))]).astype(np.float32)  # heavy tails
    raw = quantize(x, name)
    y = kernels.dequantize(raw, name, x.size).astype(np.float64)
    step, lo, hi = k_grid(raw, name)
    sub = 256 // step.shape[1]
    xs = x.astype(np.float64).reshape(step.shape[0], step.shape[1], sub)
    ys = y.reshape(xs.shape)
    step, lo, hi = (np.abs(step)[..., None], lo[..., None], hi[..., None])
    outside = np.maximum(lo - xs, 0) + np.maximum(xs - hi, 0)
    tol = 1e-6 * np.abs(xs).max(axis=2, keepdims=True) + 1e-12
    bound = np.where(outside > 0, outside, step / 2) + tol
    err = np.abs(xs - ys)
    assert np.all(err <= bound), f"worst {np.max(err / bound):.3f} x the bound"
    # the least-squares search may clip extremes on purpose (measured: 11% of weights for
    # Q2_K, 6% Q3_K, 4% Q4_K/Q5_K), but not most of them
    assert np.mean(outside > 0) < 0.15


@pytest.mark.parametrize("name", K_TYPES)
def test_k_zero_and_constant_rows(name):
    x = np.stack([np.zeros(256), np.full(256, 0.5), np.full(256, -0.5)]).astype(np.float32)
    y = kernels.dequantize(quantize(x, name), name, x.size).reshape(x.shape)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1:], x[1:], rtol=0.02, atol=0)


# A block of 256 weights on which Q3_K's level moves meet a float32 near-tie, and the bytes
# llama.cpp's own quantizer (libggml's ggml_quantize_chunk, i.e. quantize_row_q3_K_ref) makes of
# it. Summing w * l * l in another order than ggml's moved one level and one sub-block scale.
Q3_K_NEAR_TIE = np.frombuffer(bytes.fromhex(
    "404d753da7d3653c7534b53cafa186bd2b1c9a3c8481d83d934d043d1cb364bc7c7fe2bd8db20cbd06336fbc"
    "7611063df12b603ba19a1cbda8c6303d483ae83a7b1603bd8ed4513dd793133d4809303bf97d4cbd6b96643c"
    "5f56223d6551eebd6e1dc33b98f7c73c73fc51bd24b1bebcd854efbce0f5b4bda16b813db8c70c3dda42e7bc"
    "74f7e6bccd42b63c42280bbdce3ebd3cf2bd183c0a318b3ded9f32bd3b1412bde085b13cc13e95bc497abc3c"
    "ca07163d611c963cf9e0ebbdbfc4b13d7da378bc04560ebdec5bf4bc6f653bbd8ea1a53c261778bcd07c02bd"
    "1c76fa3c56e0fbbc528e513d8c0c05bc342172bde80cafbd230310bd390b5ebb901834bdcfda2b3da82135bc"
    "cc0f9bbc9d6f2a3d88c2cfba412415bd876f013d792b1e3a2cd366bd47e0033d1a044cbc0e12163d1adb0abd"
    "51b58b3d74a486bbcd1ab0bcccba0ebdac549d3d945311bd64b570bcda8fbe3c492e64bda3bbb1bdd5efea3d"
    "4fe6db3c58d04b3d7690923d3f50923caa69943b4d1b183d1acc89bdc841be3a6383a2ba41a0c9bcd3b5993d"
    "471c1a3a00843dbd5f45193d6dbaf6bc1512023dc03554bc8ab35f3ce22205bd2920b0bd171fecbcaa8c8fbd"
    "1e58ddbd835341bd99582a3aa1b3b3bd4eac7b3d7a17ce3bdfd59f3d9c0fa9bca35a243cd61af0bb3d7f9bbb"
    "9661153da0f86739aec8a23cfc1b10bcdb51493df113e63c28ae1abc9039453d7af8ddbb2d3bb73d970405bd"
    "0514debcd2ab34bd4fd6fcbcc11284bd3548b0bc5284f43b850644bd4983443b7524cd3c616b81ba449a4a3d"
    "3bab143d651d1d3c3568b13c1cfa93bd1c215b394bdd80bd293e98bd3870bebdca8c813abd2a463b17268c3c"
    "fbac69bbffeef23a4f33e8bc35c3d93c3981913cf15a283cb7fdd63d5563893d2d3e02bd857c733c39bf19bd"
    "5bd315bdb239a0bd3b1eb4ba804b6e3c86b4583c3783f9bd61a75dbd7fb4b9bb8bb1e73c99a84c3d89bcc8bc"
    "5a1729bdb0ee143b2556f33a56e85ebc79f4763dab50f0bc18f5b43c0d7959bd3160b5bbc675ac3d6b49f9bc"
    "7ef697bc6612803c56f42c3d30b8713df91e443d0bc870bc3ec2403d434492bc2939be3ce12662bc80ed403c"
    "3f5701bc040d32bce29c1f3c09bfa4bd5fbe853c6196b9bc54bfd6bc8126043d5c5bf23b849334bdb64eecbc"
    "3414eb3b17a9b43c74cee8bc1c39cf3ca59ee53cfc536dbce3af18bd8165c1bb2a0cc83c3ee528bc166f5b3c"
    "f39b9abdc557e63c5f3406bd2e7f43bddd6e5a3d5ae9fc3c10130c3d285f92bd1237173dc6f8043db3b3483d"
    "1338a13da7dcaa3d1b427fbd4076aebc053ad2bb971c11bd907185bcebbeb6bd4cac473cff29463dfa76b4bd"
    "1aae013d0c0fedbc73a804bdc7fdbabc2dd72fbd92a5373ddc61c13d47a636bb5d6cff3c90ec21bc921e9bbc"
    "21a28abdcee029bd3a6836bd"), np.float32)
Q3_K_NEAR_TIE_LLAMACPP = bytes.fromhex(
    "a9f58f7897dfd3bdfc3a5593277265873cf16dbdcae58d3a79db3af88cd89f9d2edcd52e8563e9483d67dc65"
    "e447019c1f1add18f6ec39043ca9227703b96209be687c51bd5e89f3c140d238f3e40a2ea8c1d1645565bcac"
    "0011f8144fe9a59840b6362de00aa86b3c4c00f08b94")


def test_q3_k_matches_llamacpp_at_a_near_tie():
    assert quantize(Q3_K_NEAR_TIE.reshape(1, 256), "Q3_K").tobytes() == Q3_K_NEAR_TIE_LLAMACPP


# --------------------------------------------------------------------- RMSE vs naive

# (sub-block size, q range, bits of the sub-block scale (and min), has a min)
K_SPEC = {"Q2_K": (16, (0, 3), 4, True), "Q3_K": (16, (-4, 3), 6, False),
          "Q4_K": (32, (0, 15), 6, True), "Q5_K": (32, (0, 31), 6, True),
          "Q6_K": (16, (-32, 31), 8, False)}


def naive(x: np.ndarray, name: str) -> np.ndarray:
    """Max-abs scaling, no search: sub-block scale max|x|/qmax (or (max-min)/nmax with min =
    min(x, 0)), sub-block scales and mins rounded to the format's bits against their
    super-block maximum; returns the decoded values."""
    sub, (qlo, qhi), bits, has_min = K_SPEC[name]
    xs = x.astype(np.float64).reshape(-1, 256 // sub, sub)
    levels = (2 ** bits - 1) if has_min else (2 ** (bits - 1) - 1)

    def quant_scales(s):
        top = s.max(axis=1, keepdims=True)
        d = np.where(top > 0, top / levels, 0.0)
        return np.where(d > 0, np.round(s / np.where(d > 0, d, 1)), 0) * d

    if has_min:
        m = quant_scales(-np.minimum(xs.min(axis=2), 0))[..., None]
        s = quant_scales((xs.max(axis=2) + m[..., 0]) / qhi)[..., None]
        q = np.clip(np.round((xs + m) / np.where(s > 0, s, 1)), qlo, qhi)
        return (s * q - m).reshape(x.shape)
    s = quant_scales(np.abs(xs).max(axis=2) / qhi)[..., None]
    q = np.clip(np.round(xs / np.where(s > 0, s, 1)), qlo, qhi)
    return (s * q).reshape(x.shape)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


# required improvement over naive (measured ones in the module docstring)
K_MARGIN = {"Q2_K": 0.06, "Q3_K": 0.18, "Q4_K": 0.06, "Q5_K": 0.03, "Q6_K": 0.05}


@pytest.fixture(scope="module")
def gemma_rows(gemma_path):
    """Real weights: 128 rows of blk.0.attn_v (stored Q8_0, 640 columns), first 512 columns."""
    from runtime.gguf import GGUFFile

    t = GGUFFile(gemma_path).tensors["blk.0.attn_v.weight"]
    cols = t.shape[0]
    w = kernels.dequantize(t.data, t.type.name, 128 * cols).reshape(128, cols)
    return np.ascontiguousarray(w[:, :512])


def check_rmse_beats_naive(name, source, request, naive_decoded, margin):
    """Our quantizer's round-trip error on Gaussian or real (Gemma) weights is below the
    naive one's by at least `margin`."""
    if source == "gaussian":
        x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    else:
        x = request.getfixturevalue("gemma_rows")
    ours = rmse(x, kernels.dequantize(quantize(x, name), name, x.size).reshape(x.shape))
    base = rmse(x, naive_decoded(x))
    print(f"{source} {name}: {ours:.4g} vs naive {base:.4g} ({ours / base - 1:+.0%})")
    assert ours < (1 - margin) * base


@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("source", ["gaussian", "gemma"])
def test_k_rmse_beats_naive(name, source, request):
    check_rmse_beats_naive(name, source, request, lambda x: naive(x, name), K_MARGIN[name])


# ---------------------------------------------------------------------------- IQ4 types

IQ4_CODEBOOK = np.array(gguf_quants.IQ4_NL.kvalues, np.float64)  # gguf's copy of ggml's table


def iq4_groups(raw: np.ndarray, name: str):
    """Per group of 32: the scale the decoder multiplies and the 32 codebook indices, read
    from the documented layouts (iquants.py)."""
    if name == "IQ4_NL":
        b = raw.reshape(-1, 18)
        scale, qs = _f16(b, 0), b[:, 2:18]
    else:
        b = raw.reshape(-1, 136)
        high_bits = b[:, 2].astype(np.int64) | (b[:, 3].astype(np.int64) << 8)
        g = np.arange(8)
        low = (b[:, 4 + g // 2].astype(np.int64) >> (4 * (g % 2))) & 15
        high = (high_bits[:, None] >> (2 * g)) & 3
        scale = (_f16(b, 0)[:, None] * ((low | (high << 4)) - 32)).reshape(-1)
        qs = b[:, 8:].reshape(-1, 16)
    return scale, np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int64)


def iq4_rows():
    rng = np.random.default_rng(8)
    return np.concatenate([rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1)),
                           rng.standard_normal((2, 512)) + 2.0,  # all positive
                           rng.standard_t(2, (2, 512))]).astype(np.float32)  # heavy tails


@pytest.mark.parametrize("name", IQ4_TYPES)
def test_iq4_decodes_as_the_layout_says_and_picks_the_nearest_level(name):
    """Decoding equals scale * codebook[index] (gguf's codebook), and each index is the
    nearest level for its group's scale, up to the f16 rounding of that scale (levels are
    picked against the unrounded scale, as ggml does)."""
    x = iq4_rows()
    raw = quantize(x, name)
    scale, idx = iq4_groups(raw, name)
    xs = x.astype(np.float64).reshape(-1, 32)
    decoded = scale[:, None] * IQ4_CODEBOOK[idx]
    np.testing.assert_allclose(kernels.dequantize(raw, name, x.size).reshape(-1, 32), decoded,
                               rtol=1e-6, atol=0)
    err = np.abs(xs - decoded)
    best = np.abs(xs[..., None] - scale[:, None, None] * IQ4_CODEBOOK).min(axis=2)
    tol = 2 * 127 * np.abs(scale)[:, None] * 2.0 ** -10 + 1e-9
    assert np.all(err <= best + tol), f"worst {np.max(err - best - tol):.3g}"


IQ4_MARGIN = {"IQ4_NL": 0.03, "IQ4_XS": 0.025}  # required improvement over naive


def naive_iq4(x: np.ndarray) -> np.ndarray:
    """Per group of 32: scale = the extreme weight / -127 (it maps to the codebook's -127),
    no search, float32 scale, nearest level; returns the decoded values."""
    xs = x.astype(np.float64).reshape(-1, 32)
    extreme = xs[np.arange(len(xs)), np.abs(xs).argmax(axis=1)]
    s = (extreme / -127.0)[:, None]
    ratio = np.divide(xs, s, out=np.zeros_like(xs), where=s != 0)
    q = np.abs(ratio[..., None] - IQ4_CODEBOOK).argmin(axis=2)
    return (s * IQ4_CODEBOOK[q]).reshape(x.shape)


@pytest.mark.parametrize("name", IQ4_TYPES)
@pytest.mark.parametrize("source", ["gaussian", "gemma"])
def test_iq4_rmse_beats_naive(name, source, request):
    check_rmse_beats_naive(name, source, request, naive_iq4, IQ4_MARGIN[name])


@pytest.mark.parametrize("name", IQ4_TYPES)
def test_iq4_zero_and_constant_rows(name):
    x = np.stack([np.zeros(256), np.full(256, 0.5), np.full(256, -0.5)]).astype(np.float32)
    y = kernels.dequantize(quantize(x, name), name, x.size).reshape(x.shape)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1:], x[1:], rtol=0.02, atol=0)


# --------------------------------------------------------------------- consistency, API

@pytest.mark.parametrize("name", EXACT_TYPES + K_TYPES + IQ4_TYPES + ["F32"])
def test_matvec_on_quantized_equals_matvec_on_dequantized(name, monkeypatch):
    """The quantizer's blocks, read by the float kernels, are the matrix they dequantize to
    (the integer path rounds v to 8 bits first: tests/test_q8.py bounds that)."""
    monkeypatch.setattr(kernels, "INTEGER_PATH", False)
    rng = np.random.default_rng(4)
    rows, cols = 13, 512
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    v = rng.standard_normal(cols).astype(np.float32)
    raw = quantize(x, name)
    w = kernels.dequantize(raw, name, rows * cols).reshape(rows, cols)
    got = kernels.matvec(raw, name, rows, cols, v)
    want = kernels.matvec(w.reshape(-1).view(np.uint8), "F32", rows, cols, v)
    exact = w.astype(np.float64) @ v.astype(np.float64)
    bound = cols * 2.0 ** -24 * (np.abs(w).astype(np.float64) @ np.abs(v).astype(np.float64))
    assert np.all(np.abs(got - exact) <= bound)
    assert np.all(np.abs(want - exact) <= bound)


def test_argument_errors():
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="multiple"):
        quantize(x, "Q4_K")
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        quantize(np.zeros((1, 256), np.float32), "IQ2_XXS")
    with pytest.raises(ValueError, match="shape"):
        quantize(np.zeros((2, 2, 32), np.float32), "Q8_0")
    with pytest.raises(TypeError):
        quantize(np.zeros((2, 32), np.int32), "Q8_0")
    assert quantize(np.zeros((0, 32), np.float32), "Q8_0").size == 0
    # a 1-D row and float64 input are accepted
    r = np.random.default_rng(0).standard_normal(64)
    np.testing.assert_array_equal(quantize(r, "Q8_0"), quantize(r.astype(np.float32)[None], "Q8_0"))


def test_every_quantizer_of_the_table_is_tested_here():
    assert set(EXACT_TYPES + K_TYPES + IQ4_TYPES + ["F32"]) == QUANTIZE_TYPES


@pytest.mark.parametrize("type_id", [t.id for t in TYPES if not t.quantizer] + [77])
def test_id_without_quantizer_fails_loudly(type_id):
    """The switch raises for an id it has no branch for (past quantize()'s checks), rather
    than leave the output unwritten."""
    x = np.zeros((3, 256), np.float32)
    out = np.zeros((3, 1024), np.uint8)
    with pytest.raises(ValueError, match="no quantizer for this tensor type id"):
        quantize_kernel(type_id, x, out)
