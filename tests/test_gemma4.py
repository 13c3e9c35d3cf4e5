"""Gemma 4 beyond the parity check (tests/test_parity.py): its own features are seen by that
check, its cache is what the engine and the memory estimate expect, and the per-layer
hyperparameters it needs stay refused by the families that do not read them.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.gguf import GGUFFile
from runtime.hparams import HParams, kv_cache_bytes
from runtime.model import UnsupportedModelError, load_model
from test_parity import F32_RTOL_ARCH, F32_RTOL_GELU, llamacpp_gelu, our_logits


@pytest.fixture(scope="module")
def gemma4_f32(parity_file):
    return parity_file("gemma4", "F32")


@pytest.fixture(scope="module")
def parity_file(tmp_path_factory):
    """test_parity's fixture, for this module (pytest fixtures do not cross modules)."""
    import test_parity

    folder = test_parity.vocab_folder.__wrapped__()
    return test_parity.parity_file.__wrapped__(tmp_path_factory, folder)


def _worst(ours: np.ndarray, ref: dict) -> float:
    ids, values = np.array(ref["top_ids"]), np.array(ref["top_values"])
    err = np.abs(np.take_along_axis(ours, ids, axis=1) - values).max(axis=1)
    return float((err / np.abs(values).max(axis=1)).max())


def _without_per_layer_inputs(model):
    model.per_layer_token_embd = None


def _without_output_scale(model):
    for layer in model.layers:
        layer.out_scale = 1.0


def _without_kv_sharing(model):  # the sharing layers read the first layer of their kind instead
    for il, layer in enumerate(model.layers):
        if layer.kv_source != il:
            layer.kv_source -= 2


def _rotating_every_pair(model):  # RoPE without the proportional factors on the global layers
    from runtime.kernels import ops

    for layer in model.layers:
        if not layer.sliding:
            layer.rope_inv_freq = ops.rope_inv_freq(layer.n_rot, model.hp.rope_base, 1.0, np.zeros(0, np.float32))


def _scaled_attention(model):  # Gemma 3's 1/sqrt(head_dim) instead of 1
    model.attention_scale = 1.0 / np.sqrt(64)


def _sliding_base_as_global(model):
    from runtime.kernels import ops

    for layer in model.layers:
        if layer.sliding:
            layer.rope_inv_freq = ops.rope_inv_freq(layer.n_rot, model.hp.rope_base, 1.0, np.zeros(0, np.float32))


@pytest.mark.parametrize("mutate", [_without_per_layer_inputs, _without_output_scale, _without_kv_sharing,
                                    _rotating_every_pair, _scaled_attention, _sliding_base_as_global])
def test_f32_check_sees_each_gemma4_feature(gemma4_f32, mutate, monkeypatch):
    """Left out, each feature moves the F32 logits by over 10x the family's tolerance, so
    the parity check's looser bound for Gemma 4 still pins every one of them down."""
    from runtime.kernels import ops

    path, reference = gemma4_f32
    monkeypatch.setattr(ops, "gelu_tanh_mul", llamacpp_gelu)
    worst = _worst(our_logits(path, reference["tokens"], mutate=mutate), reference["files"]["F32"])
    assert worst > 10 * F32_RTOL_ARCH["gemma4"], f"{mutate.__name__}: logits moved by only {worst:.3g}"


def _routing_on_the_experts_input(model):  # Qwen 3 MoE's router input instead of Gemma 4's
    for layer in model.layers:
        mixture = layer.experts
        mixture.experts = (lambda h, router_input=None, experts=mixture.experts: experts(h))


def _without_expert_scales(model):
    for layer in model.layers:
        layer.experts.experts.down_scale = None


@pytest.mark.parametrize("mutate", [_routing_on_the_experts_input, _without_expert_scales])
def test_f32_check_sees_each_mixture_feature(parity_file, mutate, monkeypatch):
    """The MoE variant (held to F32_RTOL_GELU): its router input and its per-expert scales,
    left out, move the logits by over 10x that."""
    from runtime.kernels import ops

    path, reference = parity_file("gemma4-moe", "F32")
    monkeypatch.setattr(ops, "gelu_tanh_mul", llamacpp_gelu)
    worst = _worst(our_logits(path, reference["tokens"], mutate=mutate), reference["files"]["F32"])
    assert worst > 10 * F32_RTOL_GELU, f"{mutate.__name__}: logits moved by only {worst:.3g}"


def test_cache_holds_only_the_layers_that_compute_kv(gemma4_f32):
    """Sliding and global layers keep K/V of their own head size and KV heads; the sharing
    layers keep none; the memory estimate counts the same bytes the engine allocates."""
    path, _ = gemma4_f32
    model = load_model(GGUFFile(path))
    hp = model.hp
    cache = model.new_cache(64, "f16", "q8_0")
    assert sorted(cache.slot) == [0, 1, 2, 3]  # layers 4 and 5 read layers 2 and 3's
    assert [layer.kv_source for layer in model.layers] == [0, 1, 2, 3, 2, 3]
    keys, _, values, _ = cache.layer(0)
    assert keys.shape == (2, 64, 32 * 2) and values.shape == (2, 64, 34)  # sliding: 2 heads of 32
    keys, _, values, _ = cache.layer(1)
    assert keys.shape == (1, 64, 64 * 2) and values.shape == (1, 64, 2 * 34)  # global: 1 head of 64
    assert cache.nbytes == kv_cache_bytes(hp, 64, "f16", "q8_0")


def test_a_copied_cache_continues_as_the_original(gemma4_f32):
    """A cache copied from another (n > 1 choices share one prefill) continues as the
    original would (float32, same order of operations: to 1e-5 of the largest logit)."""
    path, reference = gemma4_f32
    tokens = reference["tokens"]
    model = load_model(GGUFFile(path))
    want = model.forward(tokens[:20], 0, model.new_cache(32, "f32", "f32"))
    original, copy = model.new_cache(32, "f32", "f32"), model.new_cache(32, "f32", "f32")
    model.forward(tokens[:19], 0, original)
    copy.copy_from(original, 19)
    got = model.forward(tokens[19:20], 19, copy)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _metadata(arch: str, **arrays) -> dict:
    md = {"general.architecture": arch, f"{arch}.context_length": 64, f"{arch}.embedding_length": 64,
          f"{arch}.block_count": 4, f"{arch}.feed_forward_length": 128, f"{arch}.attention.head_count": 4,
          f"{arch}.attention.head_count_kv": 2, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    md.update({f"{arch}.{key}": value for key, value in arrays.items()})
    return md


def test_per_layer_hyperparameters_are_read_per_layer():
    hp = HParams.from_metadata(_metadata("gemma4", **{
        "attention.head_count_kv": np.array([2, 1, 2, 1], np.int32),
        "feed_forward_length": np.array([128, 128, 256, 256], np.int32),
        "attention.sliding_window_pattern": np.array([1, 0, 1, 0], np.bool_),
        "attention.key_length": 64, "attention.key_length_swa": 32, "attention.shared_kv_layers": 1}), n_vocab=100)
    assert [hp.n_head_kv_at(il) for il in range(4)] == [2, 1, 2, 1]
    assert [hp.n_ff_at(il) for il in range(4)] == [128, 128, 256, 256]
    assert [hp.head_dim_at(il) for il in range(4)] == [32, 64, 32, 64]
    assert (hp.n_head_kv, hp.n_ff) == (2, 256)  # the largest: a bound for the memory estimate
    assert hp.kv_layers == (0, 1, 2)
    # uniform arrays are plain values, as before
    hp = HParams.from_metadata(_metadata("llama", **{"feed_forward_length": np.array([128] * 4, np.int32)}), 100)
    assert hp.n_ff == 128 and hp.uniform_layers


def test_other_families_refuse_per_layer_shapes_by_name(tmp_path):
    """A llama file with per-layer KV heads says what it is, not a wrong answer or a traceback."""
    from bundler.gguf_writer import header_bytes
    from runtime.ggml_types import ggml_type
    from runtime.gguf import ValueType

    md = _metadata("llama", **{"attention.head_count_kv": np.array([2, 1, 2, 1], np.int32)})
    kinds = {str: ValueType.STRING, int: ValueType.UINT32, float: ValueType.FLOAT32}
    entries = [(k, ValueType.ARRAY if isinstance(v, np.ndarray) else kinds[type(v)], v) for k, v in md.items()]
    shape = (64, 100)  # token_embd: n_embd x n_vocab (GGUF order)
    path = tmp_path / "llama-per-layer.gguf"
    path.write_bytes(header_bytes(entries, [("token_embd.weight", shape, ggml_type("F32"), 0)], 32)
                     + bytes(4 * 64 * 100))
    with pytest.raises(UnsupportedModelError, match="per-layer head counts"):
        load_model(GGUFFile(path))
