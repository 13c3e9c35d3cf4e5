"""Tiny synthetic models of every architecture we run, for the parity check against llama.cpp.

Each model has a few layers, its family's head layout scaled down, the tokenizer metadata of
the matching llama.cpp test vocabulary (models/ggml-vocab-*.gguf of the llama-cpp-python
sdist), and random F32 weights from a counter-based generator written here (splitmix64 of a
counter, uniforms summed in float64): the same bytes on every machine and NumPy version, so a
file's sha256 can be committed with llama.cpp's logits on it. tests/make_parity_reference.py
writes those logits (where llama.cpp is available); tests/test_parity.py runs our engine on
the same file and compares.

The file is written with bundler.quantize's GGUF writer (header_bytes), not with the `gguf`
package, so its bytes do not change when that package does.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np

from bundler.gguf_writer import header_bytes
from runtime.ggml_types import ggml_type
from runtime.gguf import GGUFFile, ValueType

ALIGNMENT = 32
N_TOKENS = 64  # the fixed sequence whose logits are compared
TOP_K = 32  # logits kept per position in the reference

U32, F32, STR, BOOL, ARRAY = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING, ValueType.BOOL, ValueType.ARRAY

# Per architecture: the test vocabulary whose tokenizer metadata the model carries, its shapes,
# and the metadata keys (after "{arch}.") beyond the common ones. Where no test vocabulary is
# the family's own, the note says which is nearest. n_embd 256 where the vocabulary is small
# enough, so Q4_K_M's K-quants fill whole 256-element rows; 64 for the 128k-152k
# vocabularies, to keep the files small (their attention/embedding rows then take llama.cpp's
# Q5_0/Q8_0 fallback; the FFN's down rows of 512 stay K-quants).
SPECS: dict[str, dict] = {
    "llama": dict(vocab="llama-spm", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64,
                  n_ff=512, untied=True),
    "qwen2": dict(vocab="qwen2", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                  n_ff=512, bias=True, keys={"rope.freq_base": (F32, 1e6)}),
    # Qwen 3 uses Qwen 2's tokenizer
    "qwen3": dict(vocab="qwen2", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=64,
                  n_ff=512, qk_norm=True, keys={"rope.freq_base": (F32, 1e6)}),
    # Gemma 1-3 use SentencePiece vocabularies of 256k; none is among the test vocabularies
    # (gemma-4's is another tokenizer model), so llama-spm, the SentencePiece one.
    # Six layers: five slide over 16 positions, the sixth is global.
    "gemma3": dict(vocab="llama-spm", n_embd=256, n_layer=6, n_head=4, n_head_kv=1, head_dim=64,
                   n_ff=512, qk_norm=True, post_norms=True, scale_embedding=True,
                   keys={"rope.freq_base": (F32, 1e6), "attention.sliding_window": (U32, 16)}),
    # two layers without post-norms add little to the scaled embedding, so it is smaller
    # still (rms 0.16 once scaled) and the output norm larger
    "gemma": dict(vocab="llama-spm", n_embd=256, n_layer=2, n_head=4, n_head_kv=1, head_dim=64,
                  n_ff=512, scale_embedding=True, embd_std=0.01, output_norm=12.0),
    # Four layers: 0 and 2 slide over 16 positions, 1 and 3 are global. Attention scores
    # capped at 2 (Gemma 2's 50 would not bite on these scores), final logits at 30.
    "gemma2": dict(vocab="llama-spm", n_embd=256, n_layer=4, n_head=4, n_head_kv=2, head_dim=64,
                   n_ff=512, post_norms=True, scale_embedding=True, embd_std=0.025, output_norm=7.5,
                   keys={"attention.sliding_window": (U32, 16), "attn_logit_softcapping": (F32, 2.0),
                         "final_logit_softcapping": (F32, 30.0)}),
    # Granite 3 uses the refact pre-tokenizer's vocabulary; its multipliers scaled to the
    # size: logits divided by 8 (hence the larger output norm), residual branches by ~0.22.
    # Untied: tied, the embedding (x12) would outweigh the scaled-down residual branches.
    "granite": dict(vocab="refact", n_embd=128, n_layer=2, n_head=4, n_head_kv=2, head_dim=32,
                    n_ff=512, output_norm=10.0, untied=True,
                    keys={"logit_scale": (F32, 8.0), "residual_scale": (F32, 0.22),
                          "embedding_scale": (F32, 12.0), "attention.scale": (F32, 0.0625),
                          "rope.freq_base": (F32, 1e7)}),
    # OLMo 2 uses a cl100k-style vocabulary (pre-tokenizer dbrx), not among the test
    # vocabularies; gpt-2's is the nearest byte-level BPE one. With a sliding window, as
    # OLMo 3's files have: layers 0-2 slide over 16 positions, layer 3 is global.
    "olmo2": dict(vocab="gpt-2", n_embd=128, n_layer=4, n_head=4, n_head_kv=4, head_dim=32,
                  n_ff=512, untied=True, pre_norms=False, qk_norm="whole", post_norms=True,
                  keys={"rope.freq_base": (F32, 5e5), "attention.sliding_window": (U32, 16)}),
    # Qwen3-30B-A3B's layout scaled down: 8 experts, 2 used per token, experts of 256 (so
    # their down rows are K-quants in Q4_K_M); three layers, so Q4_K_M gives the last one's
    # ffn_down_exps Q6_K and the others Q4_K. feed_forward_length is present, as in the real
    # files, but no tensor has it.
    "qwen3moe": dict(vocab="qwen2", n_embd=64, n_layer=3, n_head=4, n_head_kv=2, head_dim=64,
                     n_ff=512, qk_norm=True, n_expert=8, n_expert_used=2, n_ff_exp=256,
                     keys={"rope.freq_base": (F32, 1e6), "expert_count": (U32, 8),
                           "expert_used_count": (U32, 2), "expert_feed_forward_length": (U32, 256)}),
    # Ministral 3 uses the tekken vocabulary, not among the test vocabularies; llama-bpe's
    # is the nearest. YaRN (factor 4 over an original context of 16, a log multiplier that
    # makes its magnitude factor non-trivial) and Llama 4's attention temperature, so both
    # change the logits within 64 positions.
    "mistral3": dict(vocab="llama-bpe", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=32,
                     n_ff=512, keys={"rope.freq_base": (F32, 1e6), "rope.scaling.type": (STR, "yarn"),
                                     "rope.scaling.factor": (F32, 4.0),
                                     "rope.scaling.original_context_length": (U32, 16),
                                     "rope.scaling.yarn_log_multiplier": (F32, 0.5),
                                     "attention.temperature_scale": (F32, 0.1)}),
    # Phi-4-mini's layout scaled down: fused QKV and gate/up, GQA, RoPE over 3/4 of each
    # head, LongRoPE factors with an original context of 32, so the 64-token run (llama.cpp
    # pads its context to 256) takes the long factors, and Phi-3.5's attn_factor
    "phi3": dict(vocab="phi-3", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64,
                 n_ff=512, fused=True, rope_factors=("long", "short"),
                 keys={"rope.dimension_count": (U32, 48), "rope.freq_base": (F32, 1e4),
                       "rope.scaling.attn_factor": (F32, 1.19),
                       "rope.scaling.original_context_length": (U32, 32)}),
    # gpt-oss-20b's layout scaled down: biases on q/k/v/o, attention sinks, layers 0 and 2
    # slide over 16 positions, 1 and 3 are global; YaRN as the released files have it
    # (factor 32 over 4096: its magnitude factor 1.35 bites at once); 8 experts, 4 used per
    # token, with biases and gpt-oss's clamped SwiGLU (gate and up weights 3x larger, so some
    # activations reach the clamp at 7). Its o200k_harmony vocabulary is not among the test
    # vocabularies: llama-bpe's (tiktoken-style byte-level BPE, 128k) with gpt-oss's
    # pre-tokenizer (gpt-4o), its special tokens renamed to harmony's, and the harmony chat
    # template (tests/data/chat_templates/gpt-oss.jinja).
    "gpt-oss": dict(vocab="llama-bpe", n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=64,
                    n_ff=256, untied=True, bias=True, gpt_oss=True, n_expert=8, n_expert_used=4,
                    n_ff_exp=256, harmony=True,
                    keys={"rope.freq_base": (F32, 150000.0), "rope.scaling.type": (STR, "yarn"),
                          "rope.scaling.factor": (F32, 32.0),
                          "rope.scaling.original_context_length": (U32, 4096),
                          "attention.sliding_window": (U32, 16), "expert_count": (U32, 8),
                          "expert_used_count": (U32, 4), "expert_feed_forward_length": (U32, 256)}),
    # Qwen3.5's layout scaled down, with its own vocabulary (pre-tokenizer qwen35): four
    # layers, Gated DeltaNet ones (0, 2) and gated full-attention ones (1, 3); 2 key heads and
    # 4 value heads of 32 in the DeltaNet layers (their channels 256), RoPE over 16 of 64 head
    # dimensions in Qwen3.5's three interleaved sections
    "qwen35": dict(vocab="qwen35", n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=64,
                   n_ff=512, qk_norm=True, hybrid=dict(interval=2, d_conv=4, n_k_heads=2, n_v_heads=4, head=32),
                   keys={"rope.freq_base": (F32, 1e7), "rope.dimension_count": (U32, 16),
                         "rope.dimension_sections": (ARRAY, np.array([3, 3, 2, 0], np.int32)), "full_attention_interval": (U32, 2),
                         "ssm.conv_kernel": (U32, 4), "ssm.state_size": (U32, 32), "ssm.group_count": (U32, 2),
                         "ssm.time_step_rank": (U32, 4), "ssm.inner_size": (U32, 128)}),
    # Qwen3.5-35B-A3B's layout on the qwen35 model above: 8 experts of 256, 2 used per token,
    # and a shared expert of 256 behind its sigmoid gate
    "qwen35moe": dict(vocab="qwen35", n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=64,
                      n_ff=512, qk_norm=True, hybrid=dict(interval=2, d_conv=4, n_k_heads=2, n_v_heads=4, head=32),
                      n_expert=8, n_expert_used=2, n_ff_exp=256, n_ff_shexp=256,
                      keys={"rope.freq_base": (F32, 1e7), "rope.dimension_count": (U32, 16),
                            "rope.dimension_sections": (ARRAY, np.array([3, 3, 2, 0], np.int32)), "full_attention_interval": (U32, 2),
                            "ssm.conv_kernel": (U32, 4), "ssm.state_size": (U32, 32), "ssm.group_count": (U32, 2),
                            "ssm.time_step_rank": (U32, 4), "ssm.inner_size": (U32, 128),
                            "expert_count": (U32, 8), "expert_used_count": (U32, 2),
                            "expert_feed_forward_length": (U32, 256),
                            "expert_shared_feed_forward_length": (U32, 256)}),
    # Gemma 4's layout scaled down, with its own vocabulary (262k: hence n_embd 64 and 8
    # per-layer dimensions, so the file stays ~120 MB). Six layers alternating sliding
    # (heads of 32, RoPE base 1e4 over all 32, window 16, 2 KV heads) and global (heads of 64,
    # 1 KV head, proportional RoPE: 8 of 32 pairs rotate, base 1e6); the last two share
    # the K/V of layers 2 and 3; layer 1 has no attn_v (V = K: so Q4_K_M gives the third attn_v,
    # layer 3's, more bits, as llama.cpp counts them); the sharing layers' FFNs are
    # twice as wide (Gemma 4's double-wide MLP); per-layer embeddings of 8; each layer's
    # output scale; final logits capped at 15.
    "gemma4": dict(vocab="gemma-4", n_embd=64, n_layer=6, n_head=4, n_head_kv=1, head_dim=64,
                   n_ff=128, scale_embedding=True,
                   gemma4=dict(head_dim_swa=32, n_ff=(128, 128, 128, 128, 256, 256), n_per_layer=8,
                               n_head_kv=(2, 1, 2, 1, 2, 1), swa=(1, 0, 1, 0, 1, 0), shared=2, no_v=(1,),
                               rotated_pairs=8),
                   keys={"rope.freq_base": (F32, 1e6), "rope.freq_base_swa": (F32, 1e4),
                         "attention.sliding_window": (U32, 16),
                         "attention.sliding_window_pattern": (ARRAY, np.array([1, 0, 1, 0, 1, 0], np.bool_)),
                         "attention.key_length_swa": (U32, 32), "attention.value_length_swa": (U32, 32),
                         "rope.dimension_count": (U32, 64), "rope.dimension_count_swa": (U32, 32),
                         "attention.head_count_kv": (ARRAY, np.array([2, 1, 2, 1, 2, 1], np.int32)),
                         "feed_forward_length": (ARRAY, np.array([128, 128, 128, 128, 256, 256], np.int32)),
                         "attention.shared_kv_layers": (U32, 2), "embedding_length_per_layer_input": (U32, 8),
                         "final_logit_softcapping": (F32, 15.0)}),
    # Gemma 4 26B-A4B's layout on the model above (no per-layer inputs, no shared K/V, as
    # that model has): four layers, each with the dense FFN beside 4 experts of 64, 2 used per
    # token, gate and up fused in ffn_gate_up_exps, per-expert output scales
    "gemma4-moe": dict(arch="gemma4", vocab="gemma-4", n_embd=64, n_layer=4, n_head=4, n_head_kv=1,
                       head_dim=64, n_ff=128, scale_embedding=True,
                       gemma4=dict(head_dim_swa=32, n_ff=(128,) * 4, n_per_layer=0, n_head_kv=(2, 1, 2, 1),
                                   swa=(1, 0, 1, 0), shared=0, no_v=(), rotated_pairs=8, n_expert=4,
                                   n_ff_exp=64),
                       keys={"rope.freq_base": (F32, 1e6), "rope.freq_base_swa": (F32, 1e4),
                             "attention.sliding_window": (U32, 16),
                             "attention.sliding_window_pattern": (ARRAY, np.array([1, 0, 1, 0], np.bool_)),
                             "attention.key_length_swa": (U32, 32), "attention.value_length_swa": (U32, 32),
                             "rope.dimension_count": (U32, 64), "rope.dimension_count_swa": (U32, 32),
                             "attention.head_count_kv": (ARRAY, np.array([2, 1, 2, 1], np.int32)),
                             "expert_count": (U32, 4), "expert_used_count": (U32, 2),
                             "expert_feed_forward_length": (U32, 64), "final_logit_softcapping": (F32, 15.0),
                             "embedding_length_per_layer_input": (U32, 0)}),
    # SmolLM3 uses Llama 3's vocabulary; four layers, so the last one runs without RoPE
    "smollm3": dict(vocab="llama-bpe", n_embd=64, n_layer=4, n_head=4, n_head_kv=1, head_dim=16,
                    n_ff=512, keys={"rope.freq_base": (F32, 5e6)}),
}


# --- the counter-based generator -------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    z = counter * _GOLDEN  # uint64 arithmetic wraps modulo 2**64, as splitmix64 wants
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def counter_normal(stream: str, n: int, seed: int = 0) -> np.ndarray:
    """n values with mean 0 and variance 1 (a sum of four uniforms, nearly normal), float64.

    Value i depends only on (seed, stream, i): splitmix64 of a counter gives four 16-bit
    uniforms, summed with plain float64 arithmetic (no log/cos, whose last bits vary across
    NumPy builds).
    """
    key = zlib.crc32(f"{seed}:{stream}".encode()) << 32  # 2**32 counters per stream
    out = np.empty(n, np.float64)
    chunk = 1 << 18
    mask = np.uint64(0xFFFF)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = _splitmix64(np.uint64(key) + np.arange(start, start + m, dtype=np.uint64))
        total = np.zeros(m, np.float64)
        for shift in (0, 16, 32, 48):
            total += ((z >> np.uint64(shift)) & mask).astype(np.float64)
        # each 16-bit uniform has mean 32767.5 and variance (65536**2 - 1) / 12
        out[start:start + m] = (total - 4 * 32767.5) / (4 * (65536.0 ** 2 - 1) / 12) ** 0.5
    return out


def tokens(arch: str, n_vocab: int) -> list[int]:
    """The fixed sequence: N_TOKENS ids from the generator, spread over the vocabulary."""
    u = counter_normal(f"{arch}:tokens", N_TOKENS)
    frac = np.abs(u) / 3.5 % 1.0
    return [int(f * (n_vocab - 10)) + 5 for f in frac]


# --- the models -------------------------------------------------------------------------------

def _tensors(arch: str, spec: dict, n_vocab: int) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(name, shape with rows first, scale, centre) of every tensor, in file order."""
    if "gemma4" in spec:
        return _gemma4_tensors(spec, n_vocab)
    d, hd, n_ff = spec["n_embd"], spec["head_dim"], spec["n_ff"]
    q_dim, kv_dim = spec["n_head"] * hd, spec["n_head_kv"] * hd
    # Families that scale the embedding by sqrt(n_embd) and tie the output to it get a
    # smaller embedding (rms 1 once scaled) and a larger output norm (logits of std ~3):
    # otherwise the input token's own row dominates every prediction.
    scaled = spec.get("scale_embedding", False)
    out = [("token_embd.weight", (n_vocab, d), spec.get("embd_std", d ** -0.5 if scaled else 0.2), 0.0),
           ("output_norm.weight", (d,), 0.1, spec.get("output_norm", 3.0 if scaled else 1.0))]
    if spec.get("untied"):
        out.append(("output.weight", (n_vocab, d), 0.2, 0.0))

    def matrix(name, rows, cols):
        out.append((name, (rows, cols), cols ** -0.5, 0.0))

    def norm(name, n):
        out.append((name, (n,), 0.1, 1.0))

    for which in spec.get("rope_factors", ()):  # LongRoPE: per-pair factors near 1..4
        n_rot = spec["keys"]["rope.dimension_count"][1]
        out.append((f"rope_factors_{which}.weight", (n_rot // 2,), 0.2, 2.0 if which == "long" else 1.2))

    pre_norms = spec.get("pre_norms", True)
    hybrid = spec.get("hybrid")
    for il in range(spec["n_layer"]):
        p = f"blk.{il}."
        if pre_norms:
            norm(p + "attn_norm.weight", d)
        if hybrid and (il + 1) % hybrid["interval"]:  # a Gated DeltaNet layer
            key_dim, value_dim = hybrid["n_k_heads"] * hybrid["head"], hybrid["n_v_heads"] * hybrid["head"]
            channels = 2 * key_dim + value_dim
            matrix(p + "attn_qkv.weight", channels, d)
            matrix(p + "attn_gate.weight", value_dim, d)
            out.append((p + "ssm_conv1d.weight", (channels, hybrid["d_conv"]), 0.5, 0.0))
            out.append((p + "ssm_dt.bias", (hybrid["n_v_heads"],), 0.5, 0.0))
            out.append((p + "ssm_a", (hybrid["n_v_heads"],), 0.2, -1.0))  # -exp(A_log): negative
            matrix(p + "ssm_beta.weight", hybrid["n_v_heads"], d)
            matrix(p + "ssm_alpha.weight", hybrid["n_v_heads"], d)
            norm(p + "ssm_norm.weight", hybrid["head"])
            matrix(p + "ssm_out.weight", d, value_dim)
        elif hybrid:  # a full-attention layer: each head's query and output gate side by side
            matrix(p + "attn_q.weight", 2 * q_dim, d)
            matrix(p + "attn_k.weight", kv_dim, d)
            matrix(p + "attn_v.weight", kv_dim, d)
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
            matrix(p + "attn_output.weight", d, q_dim)
        if hybrid:
            norm(p + "post_attention_norm.weight", d)
        elif spec.get("fused"):
            matrix(p + "attn_qkv.weight", q_dim + 2 * kv_dim, d)
        else:
            matrix(p + "attn_q.weight", q_dim, d)
            matrix(p + "attn_k.weight", kv_dim, d)
            matrix(p + "attn_v.weight", kv_dim, d)
        if spec.get("bias"):
            for c, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                out.append((f"{p}attn_{c}.bias", (n,), 0.5, 0.0))
        if spec.get("qk_norm") and not hybrid:  # per head, or "whole": over the whole projection
            whole = spec["qk_norm"] == "whole"
            norm(p + "attn_q_norm.weight", q_dim if whole else hd)
            norm(p + "attn_k_norm.weight", kv_dim if whole else hd)
        if not hybrid:
            matrix(p + "attn_output.weight", d, q_dim)
        gpt_oss = spec.get("gpt_oss", False)
        if gpt_oss:  # output bias, sink logits; post_attention_norm is the FFN's input norm
            out.append((p + "attn_output.bias", (d,), 0.5, 0.0))
            out.append((p + "attn_sinks.weight", (spec["n_head"],), 1.0, 0.0))
        if spec.get("post_norms") or gpt_oss:
            norm(p + "post_attention_norm.weight", d)
        if pre_norms and not gpt_oss and not hybrid:
            norm(p + "ffn_norm.weight", d)
        if spec.get("n_expert"):  # a router and 3-D expert tensors [expert, rows, cols]
            n_exp, n_ff_exp = spec["n_expert"], spec["n_ff_exp"]
            gain = 3.0 if gpt_oss else 1.0
            matrix(p + "ffn_gate_inp.weight", n_exp, d)
            out.append((p + "ffn_gate_exps.weight", (n_exp, n_ff_exp, d), gain * d ** -0.5, 0.0))
            out.append((p + "ffn_up_exps.weight", (n_exp, n_ff_exp, d), gain * d ** -0.5, 0.0))
            out.append((p + "ffn_down_exps.weight", (n_exp, d, n_ff_exp), n_ff_exp ** -0.5 / gain, 0.0))
            if gpt_oss:  # router and expert biases, one row per expert
                out.append((p + "ffn_gate_inp.bias", (n_exp,), 0.5, 0.0))
                out.append((p + "ffn_gate_exps.bias", (n_exp, n_ff_exp), 0.5, 0.0))
                out.append((p + "ffn_up_exps.bias", (n_exp, n_ff_exp), 0.5, 0.0))
                out.append((p + "ffn_down_exps.bias", (n_exp, d), 0.1, 0.0))
            if spec.get("n_ff_shexp"):  # a shared expert behind a sigmoid gate
                n_sh = spec["n_ff_shexp"]
                out.append((p + "ffn_gate_inp_shexp.weight", (d,), d ** -0.5, 0.0))
                matrix(p + "ffn_gate_shexp.weight", n_sh, d)
                matrix(p + "ffn_up_shexp.weight", n_sh, d)
                matrix(p + "ffn_down_shexp.weight", d, n_sh)
        elif spec.get("fused"):
            matrix(p + "ffn_up.weight", 2 * n_ff, d)  # gate rows, then up rows
            matrix(p + "ffn_down.weight", d, n_ff)
        else:
            matrix(p + "ffn_gate.weight", n_ff, d)
            matrix(p + "ffn_up.weight", n_ff, d)
            matrix(p + "ffn_down.weight", d, n_ff)
        if spec.get("post_norms"):
            norm(p + "post_ffw_norm.weight", d)
    return out


def _gemma4_tensors(spec: dict, n_vocab: int) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Gemma 4's tensors (runtime/model/gemma4.py says what each does)."""
    g, d, n_layer = spec["gemma4"], spec["n_embd"], spec["n_layer"]
    n_pl, n_kv_layers = g["n_per_layer"], n_layer - g["shared"]
    out = [("rope_freqs.weight", (spec["head_dim"] // 2,), 0.0, 0.0),  # proportional_rope_factors
           ("token_embd.weight", (n_vocab, d), d ** -0.5, 0.0), ("output_norm.weight", (d,), 0.1, 3.0)]
    if n_pl:  # per-layer rows of rms ~1 once scaled by sqrt(n_per_layer), as the projection's
        out += [("per_layer_token_embd.weight", (n_vocab, n_layer * n_pl), n_pl ** -0.5, 0.0),
                ("per_layer_model_proj.weight", (n_layer * n_pl, d), d ** -0.5, 0.0),
                ("per_layer_proj_norm.weight", (n_pl,), 0.1, 1.0)]

    def matrix(name, rows, cols):
        out.append((name, (rows, cols), cols ** -0.5, 0.0))

    def norm(name, n):
        out.append((name, (n,), 0.1, 1.0))

    for il in range(n_layer):
        p = f"blk.{il}."
        hd = g["head_dim_swa"] if g["swa"][il] else spec["head_dim"]
        q_dim, kv_dim = spec["n_head"] * hd, g["n_head_kv"][il] * hd
        norm(p + "attn_norm.weight", d)
        matrix(p + "attn_q.weight", q_dim, d)
        # q and k norms of hd**-0.25: scores of std ~1 under Gemma 4's attention scale of 1
        # (at norms ~1 the softmax is so sharp that float32 rounding moves the logits by 1e-3)
        out.append((p + "attn_q_norm.weight", (hd,), 0.02, hd ** -0.25))
        if il < n_kv_layers:
            matrix(p + "attn_k.weight", kv_dim, d)
            if il not in g["no_v"]:
                matrix(p + "attn_v.weight", kv_dim, d)
            out.append((p + "attn_k_norm.weight", (hd,), 0.02, hd ** -0.25))
        matrix(p + "attn_output.weight", d, q_dim)
        norm(p + "post_attention_norm.weight", d)
        norm(p + "ffn_norm.weight", d)
        matrix(p + "ffn_gate.weight", g["n_ff"][il], d)
        matrix(p + "ffn_up.weight", g["n_ff"][il], d)
        matrix(p + "ffn_down.weight", d, g["n_ff"][il])
        norm(p + "post_ffw_norm.weight", d)
        if g.get("n_expert"):  # the router, its input scale, the experts and their output scales
            n_exp, n_ff_exp = g["n_expert"], g["n_ff_exp"]
            matrix(p + "ffn_gate_inp.weight", n_exp, d)
            out.append((p + "ffn_gate_inp.scale", (d,), 0.1, 1.0))
            out.append((p + "ffn_gate_up_exps.weight", (n_exp, 2 * n_ff_exp, d), d ** -0.5, 0.0))
            out.append((p + "ffn_down_exps.weight", (n_exp, d, n_ff_exp), n_ff_exp ** -0.5, 0.0))
            out.append((p + "ffn_down_exps.scale", (n_exp,), 0.2, 1.0))
            for name in ("pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2"):
                norm(f"{p}{name}.weight", d)
        if n_pl:
            matrix(p + "inp_gate.weight", n_pl, d)
            matrix(p + "proj.weight", d, n_pl)
            norm(p + "post_norm.weight", d)
        out.append((p + "layer_output_scale.weight", (1,), 0.1, 0.8))
    return out


def proportional_rope_factors(spec: dict) -> np.ndarray:
    """Gemma 4's rope_freqs: 1 for the global layers' pairs that rotate, 1e30 (no rotation)
    for the others, as llama.cpp's converter writes them (not random: a fact of the layout)."""
    half = spec["head_dim"] // 2
    rotated = spec["gemma4"]["rotated_pairs"]
    return np.array([1.0] * rotated + [1e30] * (half - rotated), np.float32)


def _metadata(name: str, spec: dict, vocab: GGUFFile | None) -> list[tuple[str, ValueType, object]]:
    arch = architecture(name)
    a = arch + "."
    md = [("general.architecture", STR, arch),
          ("general.name", STR, f"modelrun parity {arch}"),
          (a + "context_length", U32, 4096),
          (a + "embedding_length", U32, spec["n_embd"]),
          (a + "block_count", U32, spec["n_layer"]),
          (a + "feed_forward_length", U32, spec["n_ff"]),
          (a + "attention.head_count", U32, spec["n_head"]),
          (a + "attention.head_count_kv", U32, spec["n_head_kv"]),
          (a + "attention.key_length", U32, spec["head_dim"]),
          (a + "attention.value_length", U32, spec["head_dim"]),
          (a + "attention.layer_norm_rms_epsilon", F32, 1e-6),
          ("general.file_type", U32, 0)]  # all F32
    keys = {a + key: (vtype, value) for key, (vtype, value) in spec.get("keys", {}).items()}
    md = [(key, *keys.pop(key)) if key in keys else (key, vtype, value) for key, vtype, value in md]
    md += [(key, vtype, value) for key, (vtype, value) in keys.items()]
    if vocab is None:  # a model without a tokenizer
        return md
    tokenizer = {key: (vocab.metadata_types[key], value) for key, value in vocab.metadata.items()
                 if key.startswith("tokenizer.")}
    if spec.get("harmony"):
        tokenizer.update(_harmony_tokenizer(vocab))
    md += [(key, vtype, value) for key, (vtype, value) in tokenizer.items()]
    return md


# Special tokens of llama-bpe's vocabulary renamed to o200k_harmony's (gpt-oss), all control
# tokens already: the ids of <|begin_of_text|>, <|end_of_text|> and reserved ones.
HARMONY_TOKENS = {128000: "<|startoftext|>", 128001: "<|endoftext|>", 128002: "<|return|>",
                  128003: "<|constrain|>", 128004: "<|channel|>", 128005: "<|start|>",
                  128008: "<|end|>", 128010: "<|message|>", 128011: "<|call|>"}
HARMONY_TEMPLATE = Path(__file__).resolve().parent / "data" / "chat_templates" / "gpt-oss.jinja"


def _harmony_tokenizer(vocab: GGUFFile) -> dict:
    """The tokenizer keys that make llama-bpe's vocabulary a stand-in for o200k_harmony."""
    from runtime.gguf import StringArray

    tokens = list(vocab.metadata["tokenizer.ggml.tokens"].bytes_list())
    for tid, text in HARMONY_TOKENS.items():
        tokens[tid] = text.encode()
    packed = b"".join(len(t).to_bytes(8, "little") + t for t in tokens)
    eos = next(tid for tid, text in HARMONY_TOKENS.items() if text == "<|return|>")
    return {"tokenizer.ggml.pre": (STR, "gpt-4o"),
            "tokenizer.ggml.tokens": (ValueType.ARRAY, StringArray(memoryview(packed), packed, 0, len(tokens))),
            "tokenizer.ggml.bos_token_id": (U32, 128000), "tokenizer.ggml.eos_token_id": (U32, eos),
            "tokenizer.ggml.add_bos_token": (BOOL, False),
            "tokenizer.chat_template": (STR, HARMONY_TEMPLATE.read_text())}


def write_model(path: str | Path, arch: str, vocab_path: str | Path | None, n_vocab: int = 0) -> str:
    """Write the F32 parity model of `arch` to path; return its sha256 (hex). Without a
    vocabulary: the same layout with n_vocab tokens and no tokenizer (tests/conftest.py's
    SYNTHETIC_SPECS, the payload's warm-up models)."""
    spec = SPECS[arch]
    vocab = GGUFFile(vocab_path) if vocab_path is not None else None
    if vocab is not None:
        n_vocab = len(vocab.metadata["tokenizer.ggml.tokens"])
    tensors = _tensors(arch, spec, n_vocab)
    f32 = ggml_type("F32")
    infos, offset = [], 0
    for name, shape, _, _ in tensors:
        infos.append((name, tuple(reversed(shape)), f32, offset))
        offset += -(-4 * int(np.prod(shape)) // ALIGNMENT) * ALIGNMENT
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        head = header_bytes(_metadata(arch, spec, vocab), infos, ALIGNMENT)
        f.write(head)
        digest.update(head)
        for name, shape, scale, centre in tensors:
            n = int(np.prod(shape))
            if name == "rope_freqs.weight" and "gemma4" in spec:
                values = proportional_rope_factors(spec)
            else:
                values = centre + scale * counter_normal(f"{arch}:{name}", n)
            data = values.astype("<f4").tobytes()
            data += bytes(-len(data) % ALIGNMENT)
            f.write(data)
            digest.update(data)
    if vocab is not None:
        vocab.close()
    return digest.hexdigest()


def architecture(name: str) -> str:
    """The general.architecture of parity model `name` (a variant of a family has its own name)."""
    return SPECS[name].get("arch", name)


def reference_path(arch: str) -> Path:
    return Path(__file__).resolve().parent / "data" / "parity" / f"{arch}.json"
