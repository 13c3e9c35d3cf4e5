"""The transformer against an independent float64 NumPy forward pass, per architecture.

The reference below rebuilds every weight with gguf.quants.dequantize from the bytes the
fixture wrote and shares no code with runtime/model, so an error in the skeleton, a family
file, an op kernel or the GGUF reader shows up as a logit mismatch.

Tolerance: both sides see the same dequantized weights, and both round the input of every
product with a quantized weight to 8-bit blocks as llama.cpp does (`project`: the model's
integer kernels do that; a rounding tie that falls differently moves a result by one step of
one element, ~1e-3 of it, rarely and never near the tolerance in these runs); the model computes in float32
(dot products of a few hundred terms, ~10 layers), the reference in float64, so the
expected difference is float32 rounding: measured 1e-7..6e-7 of the largest logit. A
semantic slip (a wrong RoPE pairing, a missing norm, a window off by one, a wrong scale)
moves the logits by 1e-2..1 relative (the two "mutation" tests below show it for the RoPE
pairing and the sliding window). 1e-4 relative to the largest logit sits between the two.
"""

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from runtime import kernels
from runtime.ggml_types import UnsupportedTypeError
from runtime.gguf import GGUFFile
from runtime.model import KVCache, UnsupportedModelError, load_model

RTOL = 1e-4
# Quantized weight types whose products take 8-bit activations, and the activation block.
ROUNDED_INPUTS = {GGMLQuantizationType[name]: 256 if name.endswith(("_K", "_XS")) else 32
                  for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                               "IQ4_NL", "IQ4_XS")}
PROMPT = [5, 17, 3, 99, 42, 7, 150, 1, 64, 23, 11, 88]  # longer than gemma's window of 4


# --- the independent reference ---------------------------------------------------------------

def reference_logits(md: dict, tensors: dict, tokens, kv_round=None, rounded_inputs=True) -> np.ndarray:
    """Logits of every token of `tokens` at positions 0..n-1, float64[n, n_vocab];
    kv_round(x) rounds the keys and values [n, heads, head_dim] as a KV cache stores them."""
    arch = md["general.architecture"]

    def hp(key, default=None):
        return md.get(f"{arch}.{key}", default)

    def weight(name):
        if name not in tensors:
            return None
        raw, qtype = tensors[name]
        return dequantize(raw, qtype).astype(np.float64)

    def project(h, name):
        """h @ W.T, with h first rounded to 8-bit blocks when W is a quantized format: the
        model computes those products on activations rounded as llama.cpp rounds them
        (blocks of 32, or 256 for the k-quants; d = max|h| / 127, q = round(h / d), d kept as
        f16 for blocks of 32)."""
        qtype = tensors[name][1]
        if rounded_inputs and qtype in ROUNDED_INPUTS:
            block = ROUNDED_INPUTS[qtype]
            blocks = h.reshape(-1, block)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            q = np.rint(blocks / np.where(d == 0, 1, d))
            if block == 32:  # ggml stores a Q8_0 block's d as f16
                d = d.astype(np.float16).astype(np.float64)
            h = (q * d).reshape(h.shape)
        return h @ weight(name).T

    n_embd, n_layer = int(hp("embedding_length")), int(hp("block_count"))
    n_head, n_kv = int(hp("attention.head_count")), int(hp("attention.head_count_kv"))
    hd = int(hp("attention.key_length", n_embd // n_head))
    eps = float(hp("attention.layer_norm_rms_epsilon"))
    base = float(hp("rope.freq_base", 10000.0))
    freq_scale = 1.0 / float(hp("rope.scaling.factor")) if hp("rope.scaling.type") == "linear" else 1.0
    window = int(hp("attention.sliding_window", 0))
    gemma = arch == "gemma3"
    neox = arch in ("qwen2", "qwen3", "gemma3")  # llama.cpp's LLAMA_ROPE_TYPE_NEOX families

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x, theta_base, scale):  # x[n, heads, hd]
        freqs = scale * theta_base ** (-np.arange(0, hd, 2) / hd)
        if "rope_freqs.weight" in tensors:  # llama3-style: each pair's speed divided by its factor
            freqs = freqs / weight("rope_freqs.weight")
        angle = np.arange(len(x))[:, None, None] * freqs
        cos, sin = np.cos(angle), np.sin(angle)
        a, b = (x[..., : hd // 2], x[..., hd // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
        y = np.empty_like(x)
        ra, rb = a * cos - b * sin, a * sin + b * cos
        if neox:
            y[..., : hd // 2], y[..., hd // 2:] = ra, rb
        else:
            y[..., 0::2], y[..., 1::2] = ra, rb
        return y

    n = len(tokens)
    embedding = weight("token_embd.weight")
    x = embedding[tokens]
    if gemma:
        x = x * math.sqrt(n_embd)
    for il in range(n_layer):
        w = lambda name: weight(f"blk.{il}.{name}")  # noqa: E731
        h = rms(x, w("attn_norm.weight"))
        q, k, v = (project(h, f"blk.{il}.attn_{c}.weight") for c in "qkv")
        if w("attn_q.bias") is not None:
            q, k, v = q + w("attn_q.bias"), k + w("attn_k.bias"), v + w("attn_v.bias")
        q, k, v = q.reshape(n, n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if arch in ("qwen3", "gemma3"):
            q, k = rms(q, w("attn_q_norm.weight")), rms(k, w("attn_k_norm.weight"))
        sliding = gemma and (il + 1) % 6 != 0
        theta_base, scale = (10000.0, 1.0) if sliding else (base, freq_scale)
        q, k = rope(q, theta_base, scale), rope(k, theta_base, scale)
        if kv_round is not None:
            k, v = kv_round(k), kv_round(v)
        attn = np.zeros((n, n_head, hd))
        for i in range(n):
            first = max(0, i - window + 1) if sliding else 0
            for head in range(n_head):
                kv = head // (n_head // n_kv)
                scores = k[first:i + 1, kv] @ q[i, head] / math.sqrt(hd)
                p = np.exp(scores - scores.max())
                attn[i, head] = (p / p.sum()) @ v[first:i + 1, kv]
        out = project(attn.reshape(n, -1), f"blk.{il}.attn_output.weight")
        if gemma:
            out = rms(out, w("post_attention_norm.weight"))
        x = x + out
        h = rms(x, w("ffn_norm.weight"))
        gate, up = project(h, f"blk.{il}.ffn_gate.weight"), project(h, f"blk.{il}.ffn_up.weight")
        if gemma:
            act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
        else:
            act = gate / (1 + np.exp(-gate))
        out = project(act * up, f"blk.{il}.ffn_down.weight")
        if gemma:
            out = rms(out, w("post_ffw_norm.weight"))
        x = x + out
    x = rms(x, weight("output_norm.weight"))
    return project(x, "output.weight" if "output.weight" in tensors else "token_embd.weight")


def assert_logits_close(actual, expected):
    err = np.abs(np.asarray(actual, np.float64) - expected).max()
    assert err <= RTOL * np.abs(expected).max(), f"max |diff| {err:.3g} vs max |logit| {np.abs(expected).max():.3g}"


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_logits_match_float64_reference(synthetic_models, arch):
    path, tensors = synthetic_models[arch]
    gguf_file = GGUFFile(path)
    model = load_model(gguf_file)
    assert model.architecture == arch
    expected = reference_logits(gguf_file.metadata, tensors, PROMPT)
    cache = KVCache(model.hp, 32, "f32", "f32")
    all_logits = model.forward(PROMPT, 0, cache, all_logits=True)
    assert all_logits.shape == (len(PROMPT), model.hp.n_vocab)
    assert_logits_close(all_logits, expected)
    # last-token-only logits are the last row
    last = model.forward(PROMPT, 0, KVCache(model.hp, 32, "f32", "f32"))
    assert_logits_close(last, expected[-1])


def f16_round(x):
    return x.astype(np.float16).astype(np.float64)


def q8_0_round(x):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    return dequantize(quantize(x.astype(np.float32), Q.Q8_0), Q.Q8_0).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("type_k, type_v", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f32")])
def test_logits_with_f16_and_q8_0_caches(synthetic_models, arch, type_k, type_v, monkeypatch):
    """A cache in f16 or Q8_0: the reference rounds its keys and values the same way
    (NumPy's float16, gguf's Q8_0 quantizer), so what is left is the float32 rounding of
    the test above, plus the rare element whose float32 and float64 values round to
    neighbouring f16 / 8-bit steps: measured at most 1.7e-5 of the largest logit, under
    RTOL. Against the unrounded reference the same logits are off by 6e-5..8e-4 (f16) and
    1.5e-3..2.5e-2 (Q8_0): the rounded reference must be the closer one.

    The products run on the float kernels here (kernels.INTEGER_PATH off, and the reference
    without 8-bit activations): behind an f16 or Q8_0 cache, the 8-bit rounding of the next
    products' inputs turns each neighbouring-step element into whole 8-bit steps (measured
    up to 4.5e-3 of the largest logit), which would hide the cache's own rounding."""
    monkeypatch.setattr(kernels, "INTEGER_PATH", False)
    rounding = {"f16": f16_round, "q8_0": q8_0_round, "f32": lambda x: x}
    path, tensors = synthetic_models[arch]
    gguf_file = GGUFFile(path)
    model = load_model(gguf_file)
    k_round, v_round = rounding[type_k], rounding[type_v]
    calls = []

    def kv_round(x):  # the reference rounds k, then v, in each layer
        calls.append(1)
        return (k_round if len(calls) % 2 else v_round)(x)

    expected = reference_logits(gguf_file.metadata, tensors, PROMPT, kv_round, rounded_inputs=False)
    logits = model.forward(PROMPT, 0, KVCache(model.hp, 32, type_k, type_v), all_logits=True)
    assert_logits_close(logits, expected)
    unrounded = reference_logits(gguf_file.metadata, tensors, PROMPT, rounded_inputs=False)
    assert np.abs(logits - unrounded).max() > 3 * np.abs(logits - expected).max()  # the rounding is real


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_wrong_rope_pairing_is_caught(synthetic_models, arch):
    """The tolerance is tight enough to see a model that rotates the wrong pairs."""
    path, tensors = synthetic_models[arch]
    gguf_file = GGUFFile(path)
    model = load_model(gguf_file)
    model.rope_neox = not model.rope_neox
    expected = reference_logits(gguf_file.metadata, tensors, PROMPT)
    wrong = model.forward(PROMPT, 0, KVCache(model.hp, 32), all_logits=True)
    assert np.abs(wrong - expected).max() > 100 * RTOL * np.abs(expected).max()


def test_gemma_sliding_window_changes_only_what_it_should(synthetic_models):
    """Window 4 < 12 tokens: the reference (which applies the window) matches, and a model
    forced to attend globally everywhere does not, so the window is really in effect."""
    path, tensors = synthetic_models["gemma3"]
    gguf_file = GGUFFile(path)
    model = load_model(gguf_file)
    assert [layer.sliding for layer in model.layers] == [True] * 5 + [False]
    expected = reference_logits(gguf_file.metadata, tensors, PROMPT)
    for layer in model.layers:
        layer.sliding = False
    unwindowed = model.forward(PROMPT, 0, KVCache(model.hp, 32, "f32", "f32"), all_logits=True)
    assert_logits_close(unwindowed[:4], expected[:4])  # inside the window: no difference
    assert np.abs(unwindowed[4:] - expected[4:]).max() > 100 * RTOL * np.abs(expected).max()


def _cache_bytes(x, cache_type):
    """x[n_kv, n_ctx, head_dim] as the cache stores it: (bytes, GGML type id, blocks per row)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if cache_type == "q8_0":
        return quantize(x, Q.Q8_0), int(Q.Q8_0), x.shape[-1] // 32
    dtype, t = (np.float32, Q.F32) if cache_type == "f32" else (np.float16, Q.F16)
    return np.ascontiguousarray(x.astype(dtype)).view(np.uint8), int(t), x.shape[-1]


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
def test_attention_kernel_gqa_window_against_numpy(cache_type):
    """The kernel reads K/V in their stored type. Against float64 attention over the same
    stored values (decoded by NumPy / gguf) it differs by float32 rounding only (1e-4,
    1e-5); against float64 attention over the unrounded values, by at most the bound that
    the storage's rounding implies, derived here per query head: a key element moves by
    e_k (f16: 2^-11 relative; Q8_0: half a step, d/2 = max|block| / 254), so a score moves
    by |ds| <= scale * sum_d |q_d| e_k,d; each softmax weight then changes by a factor
    within exp(+-2 max_j |ds_j|), so sum_j |dp_j| <= exp(2 max_j |ds_j|) - 1, and the
    output moves by at most max|v| * that + max_j e_v,j (+ 1e-5 for float32 rounding)."""
    from gguf import GGMLQuantizationType as Q
    from runtime.kernels import ops

    rng = np.random.default_rng(1)
    n_heads, n_kv, hd, n_ctx, start, n = 6, 2, 64, 40, 25, 7
    k_cache = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    v_cache = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    q = rng.standard_normal((n, n_heads * hd)).astype(np.float32)
    scale = 0.125
    k_raw, k_type, k_blocks = _cache_bytes(k_cache, cache_type)
    v_raw, v_type, v_blocks = _cache_bytes(v_cache, cache_type)
    if cache_type == "q8_0":
        k_stored = dequantize(k_raw, Q.Q8_0).reshape(k_cache.shape).astype(np.float64)
        v_stored = dequantize(v_raw, Q.Q8_0).reshape(v_cache.shape).astype(np.float64)
        step = lambda x: np.repeat(np.abs(x.reshape(*x.shape[:-1], -1, 32)).max(-1) / 254, 32, -1)  # noqa: E731
        k_err, v_err = step(k_cache), step(v_cache)
    else:
        dtype = np.float32 if cache_type == "f32" else np.float16
        k_stored = k_cache.astype(dtype).astype(np.float64)
        v_stored = v_cache.astype(dtype).astype(np.float64)
        u = 0.0 if cache_type == "f32" else 2.0 ** -11
        k_err, v_err = u * np.abs(k_cache), u * np.abs(v_cache)
    for window in (0, 3):
        out = np.empty_like(q)
        ops.attention(q, k_raw, k_type, k_blocks, v_raw, v_type, v_blocks, start, n_heads,
                      np.float32(scale), window, out)
        for i in range(n):
            pos = start + i
            first = max(0, pos - window + 1) if window else 0
            for h in range(n_heads):
                kv, qh = h // 3, q[i, h * hd:(h + 1) * hd].astype(np.float64)

                def attend(keys, values):
                    s = keys[kv, first:pos + 1] @ qh * scale
                    p = np.exp(s - s.max())
                    return (p / p.sum()) @ values[kv, first:pos + 1]

                got = out[i, h * hd:(h + 1) * hd]
                np.testing.assert_allclose(got, attend(k_stored, v_stored), rtol=1e-4, atol=1e-5)
                ds = scale * (k_err[kv, first:pos + 1] @ np.abs(qh)).max()
                bound = np.expm1(2 * ds) * np.abs(v_cache[kv]).max() + v_err[kv, first:pos + 1].max() + 1e-5
                assert np.abs(got - attend(k_cache.astype(np.float64), v_cache)).max() <= bound


@pytest.mark.parametrize("name", ["gelu_tanh_mul", "silu_mul"])
def test_gated_activations_against_float64(name):
    """The activations are g / (1 + exp(-z)) * u (z = g for SiLU; z = 2 sqrt(2/pi) (g +
    0.044715 g^3) for GELU's tanh form, since 0.5 (1 + tanh(z/2)) = 1 / (1 + exp(-z))), exp
    by ops' vectorized polynomial (~1 ulp). Against that formula in float64: z computed in
    float32 is off by ~4 roundings, 4 |z| 2^-24 absolute, which moves the result by that
    relative (times e / (1 + e) < 1); exp, the division and the products add ~8 ulps; so
    2^-24 (8 + 4 |z|) relative, plus 1e-36 absolute where the true value is below float32's
    normal range (exp is clamped at 88: g / (1 + e^88) stays a tiny nonzero)."""
    from runtime.kernels import ops

    rng = np.random.default_rng(7)
    g = np.concatenate([rng.standard_normal(3000) * 4, [-100, -90, -20, -1e-3, 0, 1e-3, 20, 90, 100]])
    gate = g.astype(np.float32)[None, :]
    up = rng.standard_normal(gate.shape).astype(np.float32)
    g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    z = g64 if name == "silu_mul" else 2 * math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64 ** 3)
    with np.errstate(over="ignore"):
        want = g64 / (1 + np.exp(-z)) * u64
    got = gate.copy()
    getattr(ops, name)(got, up)
    assert np.all(np.abs(got - want) <= 2.0 ** -24 * (8 + 4 * np.abs(z)) * np.abs(want) + 1e-36)


_F16_TIER_CHECK = """
import numpy as np
from runtime.kernels import ops
from numba import njit, types
@njit
def convert(raw, out):
    ops.f16_to_f32(raw, out)
every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
for n in (65536, 65535, 17, 3):
    out = np.empty(n, np.float32)
    convert(every[:n].view(np.uint8), out)
    want = every[:n].view(np.float16).astype(np.float32)
    assert np.all((out.view(np.uint32) == want.view(np.uint32)) | (np.isnan(out) & np.isnan(want))), n
print(ops._F16C)
print(convert.inspect_asm(convert.signatures[0]))
"""


@pytest.mark.parametrize("tier", ["x86-64-v4", "x86-64-v3", "x86-64-v2"])
def test_f16_cache_conversion_is_exact_on_every_tier(tier, tmp_path):
    """Attention reads an f16 cache through ops.f16_to_f32: F16C's vcvtph2ps from x86-64-v3
    up (no AVX-512 at v3), the bit-moving conversion below (no VEX, no F16C at v2). Every
    one of the 65,536 f16 values converts to the float32 NumPy gives (NaNs stay NaNs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MODELRUN_"))}
    env.update(MODELRUN_CPU_TIER=tier, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _F16_TIER_CHECK], cwd=Path(__file__).resolve().parent.parent,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    f16c, asm = out.stdout.split("\n", 1)
    assert f16c == str(tier != "x86-64-v2")
    if tier == "x86-64-v2":
        assert "vcvtph2ps" not in asm and not re.search(r"^\s+v[a-z0-9]+\s", asm, re.M)
    else:
        assert "vcvtph2ps" in asm
        if tier == "x86-64-v3":
            assert "zmm" not in asm


@pytest.mark.parametrize("start,n,window,softcap,with_sinks",
                         [(0, 40, 0, 0.0, False), (299, 1, 0, 0.0, False), (299, 1, 200, 0.0, False),
                          (150, 37, 100, 30.0, False), (0, 40, 0, 0.0, True), (299, 1, 0, 0.0, True)])
def test_attention_kernel_tiles_and_key_spans(start, n, window, softcap, with_sinks):
    """The kernel's tiling: queries in tiles of ops._QUERY_TILE (a prompt of 40: three
    tiles, the last partial), keys by blocks of ops._KEY_BLOCK with a running softmax, and a
    decoded token's keys split in spans of ops._KEY_SPAN merged at the end (300 keys: two
    spans), with a window that starts inside a block, and soft-capping. Against float64
    attention over the same f16 values, the result differs by float32 rounding only: each
    output is a convex combination of values |v| < 5, computed with float32 sums of at most
    300 terms; 2e-5 absolute is ~40 ulps of the largest value. With sinks (gpt-oss: one
    more logit per head in the denominator, from -2 to 6 so that some heads give most of
    their weight to it), tiled and split alike: a split token's sink counts once."""
    from runtime.kernels import ops

    rng = np.random.default_rng(3)
    n_heads, n_kv, hd, n_ctx = 8, 2, 64, 300
    assert 40 > 2 * ops._QUERY_TILE and n_ctx > ops._KEY_SPAN  # the cases still cross tiles and spans
    k = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float16)
    v = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float16)
    q = rng.standard_normal((n, n_heads * hd)).astype(np.float32)
    out = np.empty_like(q)
    scale = np.float32(hd ** -0.5)
    sinks = np.linspace(-2.0, 6.0, n_heads).astype(np.float32) if with_sinks else None
    ops.attention(q, k.view(np.uint8), int(GGMLQuantizationType.F16), hd, v.view(np.uint8),
                  int(GGMLQuantizationType.F16), hd, start, n_heads, scale, window, out, np.float32(softcap),
                  sinks)
    group = n_heads // n_kv
    for i in range(n):
        pos = start + i
        first = max(0, pos - window + 1) if window else 0
        for h in range(n_heads):
            s = k[h // group, first:pos + 1].astype(np.float64) @ q[i, h * hd:(h + 1) * hd].astype(np.float64)
            s *= float(scale)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            top = max(s.max(), float(sinks[h])) if with_sinks else s.max()
            p = np.exp(s - top)
            denominator = p.sum() + (np.exp(float(sinks[h]) - top) if with_sinks else 0.0)
            want = (p / denominator) @ v[h // group, first:pos + 1].astype(np.float64)
            np.testing.assert_allclose(out[i, h * hd:(h + 1) * hd], want, rtol=0, atol=2e-5)


def test_kv_cache_stores_q8_0_as_ggml_does(synthetic_models):
    """KVCache.store's Q8_0 blocks are byte-identical to gguf's quantizer (ggml's reference)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    model = load_model(GGUFFile(synthetic_models["llama"][0]))
    hp = model.hp
    cache = KVCache(hp, 8, "q8_0", "f16")
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, hp.n_head_kv * hp.head_dim)).astype(np.float32)
    k[0, :32] = 0  # an all-zero block: d = 0
    v = rng.standard_normal((3, hp.n_head_kv * hp.head_dim)).astype(np.float32)
    cache.store(1, 4, k, v)
    heads = k.reshape(3, hp.n_head_kv, hp.head_dim).transpose(1, 0, 2)
    assert np.array_equal(cache.k[1, :, 4:7], quantize(np.ascontiguousarray(heads), Q.Q8_0))
    assert np.array_equal(cache.v[1, :, 4:7].view(np.float16),
                          v.reshape(3, hp.n_head_kv, hp.head_dim).transpose(1, 0, 2).astype(np.float16))
    assert cache.nbytes == hp.n_layer * hp.n_head_kv * 8 * (hp.head_dim // 32 * 34 + hp.head_dim * 2)


def test_q8_0_cache_needs_heads_of_whole_blocks(synthetic_models):
    from runtime.hparams import CacheTypeError

    model = load_model(GGUFFile(synthetic_models["llama"][0]))
    hp = dataclasses.replace(model.hp, head_dim=80, head_dim_v=80)
    with pytest.raises(CacheTypeError, match=r"--cache-type-k q8_0 .* 80; use --cache-type-k f16"):
        KVCache(hp, 8, "q8_0", "f16")
    with pytest.raises(CacheTypeError, match=r"--cache-type-v q8_0 .* 80"):
        KVCache(hp, 8, "f16", "q8_0")
    with pytest.raises(CacheTypeError, match=r"--cache-type-k 'q4_0' is not a KV cache type"):
        KVCache(model.hp, 8, "q4_0", "f16")


def test_fused_projections_equal_each_matrix(synthetic_models):
    """q, k, v (Q4_K, Q6_K, Q8_0 in the llama fixture) and gate, up (F16, Q4_K) together give
    each matrix's own matvec bit for bit (the same rounding of x, the same dot per row), and
    a batch each matrix's matmul."""
    model = load_model(GGUFFile(synthetic_models["llama"][0]))
    layer = model.layers[1]
    assert len({m.type.name for m in layer.qkv.matrices}) == 3
    x = np.random.default_rng(3).standard_normal((1, model.hp.n_embd)).astype(np.float32)
    for group in (layer.qkv, layer.gate_up):
        for fused, matrix in zip(group(x), group.matrices):
            assert np.array_equal(fused, matrix(x))
        X = np.repeat(x, 3, axis=0)
        for batch, matrix in zip(group(X), group.matrices):
            assert np.array_equal(batch, matrix(X))


def test_unknown_architecture_is_refused_by_name(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_model(GGUFFile(tmp_path / "m.gguf"))


def test_unsupported_tensor_type_is_refused_by_name(tmp_path):
    from conftest import SYNTHETIC_SPECS, write_synthetic_model

    path = tmp_path / "iq2.gguf"
    types = {**SYNTHETIC_SPECS["llama"]["types"], "ffn_up": "IQ2_XXS"}  # no kernel for IQ2_XXS
    write_synthetic_model(path, "llama", types=types)
    with pytest.raises(UnsupportedTypeError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS"):
        load_model(GGUFFile(path))
