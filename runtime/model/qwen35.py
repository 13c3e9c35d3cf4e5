"""Qwen 3.5 / 3.6 (dense): Gated DeltaNet layers interleaved with gated full-attention
layers, as llama.cpp's qwen35 graph computes them (src/models/qwen35.cpp, delta-net-base.cpp).

Every layer: x += mixer(rms_norm(x)); x += ffn(rms_norm(x)) (the second norm is the file's
post_attention_norm), SwiGLU FFN. The mixer is
- a full-attention layer (every full_attention_interval-th, or as attention.recurrent_layers
  marks): attn_q gives each head's query and an output gate side by side ([q_h, gate_h] per
  head); QK-norm per head; RoPE on the first rope.dimension_count dimensions, NEOX pairs
  (ggml's interleaved multi-section RoPE, IMROPE: for text every section reads the same
  position, except pairs past the sections, which read position 0 and so do not turn);
  causal attention; the output times sigmoid(gate), then attn_output.
- a Gated DeltaNet layer: attn_qkv projects to q, k (ssm.group_count heads of
  ssm.state_size) and v (ssm.time_step_rank heads); a causal convolution of ssm.conv_kernel
  taps (ssm_conv1d) and SiLU over those channels; q and k L2-normalised per head; per value
  head a decay g = softplus(ssm_alpha x + ssm_dt.bias) * ssm_a (ssm_a = -exp(A_log), stored
  negated) and a write strength beta = sigmoid(ssm_beta x); the delta rule
  (runtime.kernels.deltanet); each head's output RMS-normalised (ssm_norm) and multiplied by
  silu(attn_gate x); then ssm_out.
The recurrent layers' state lives in runtime.model.recurrent.HybridCache beside the KV cache
of the attention layers. Multi-token-prediction blocks (nextn) are not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.hparams import DEFAULT_KV_CACHE_TYPE
from runtime.kernels import deltanet, ops

from .base import Layer, Matrix, Projections, Transformer, UnsupportedModelError
from .kv_cache import Span
from .recurrent import HybridCache


@dataclass
class DeltaNetWeights:
    """A Gated DeltaNet layer's own weights (its norm and FFN are the Layer's)."""

    in_proj: Projections  # attn_qkv, attn_gate (z), ssm_beta, ssm_alpha
    conv_w: np.ndarray  # [channels, d_conv]
    dt_bias: np.ndarray  # [n_v_heads]
    a: np.ndarray  # [n_v_heads], negative
    norm: np.ndarray  # [head_v]
    out: Matrix  # ssm_out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    """ggml's softplus: x above 20, else log(1 + e^x)."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(np.float32)


class Qwen35(Transformer):
    architecture = "qwen35"
    qk_norm = True
    rope_neox = True
    ffn_norm_tensor = "post_attention_norm.weight"

    def __init__(self, gguf_file):
        md = gguf_file.metadata
        if f"{self.architecture}.ssm.conv_kernel" not in md:
            raise UnsupportedModelError(f"{self.architecture} model has no metadata key "
                                        f"'{self.architecture}.ssm.conv_kernel'")
        super().__init__(gguf_file)

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                  type_v: str = DEFAULT_KV_CACHE_TYPE) -> HybridCache:
        return HybridCache(self.hp, n_ctx, type_k, type_v)

    # --- loading ------------------------------------------------------------------------

    def attention_matrices(self, p, q_dim, kv_dim, v_dim):
        return super().attention_matrices(p, 2 * q_dim, kv_dim, v_dim)  # each head's query and gate

    def load_layer(self, il: int) -> Layer:
        hp = self.hp
        p = f"blk.{il}."
        if il not in hp.recurrent.layers:
            layer = super().load_layer(il)
            layer.rope_inv_freq = self.imrope_inv_freq(layer.rope_inv_freq)
            layer.linear = None
            return layer
        r = hp.recurrent
        key_dim, value_dim = r.n_k_heads * r.head_k, r.n_v_heads * r.head_v
        qkv = self._matrix(p + "attn_qkv.weight", 2 * key_dim + value_dim, hp.n_embd)
        z = self._matrix(p + "attn_gate.weight", value_dim, hp.n_embd)
        beta = self._matrix(p + "ssm_beta.weight", r.n_v_heads, hp.n_embd)
        alpha = self._matrix(p + "ssm_alpha.weight", r.n_v_heads, hp.n_embd)
        conv = self._tensor(p + "ssm_conv1d.weight")
        if tuple(int(s) for s in conv.shape) != (r.d_conv, r.conv_channels):
            raise UnsupportedModelError(f"tensor {p}ssm_conv1d.weight has shape {list(conv.shape)}, expected "
                                        f"[{r.d_conv}, {r.conv_channels}] (GGUF order)")
        layer = Layer(
            attn_norm=self._vector(p + "attn_norm.weight", hp.n_embd),
            wq=None, wk=None, wv=None, qkv=None, wo=None, bq=None, bk=None, bv=None,
            q_norm=None, k_norm=None, post_attn_norm=None,
            ffn_norm=self._vector(p + self.ffn_norm_tensor, hp.n_embd),
            **self.feed_forward_weights(p),
            post_ffn_norm=None, sliding=False, rope_inv_freq=np.zeros(0, np.float64), rope_mscale=1.0)
        layer.linear = DeltaNetWeights(
            in_proj=Projections(qkv, z, beta, alpha),
            conv_w=self._vector(p + "ssm_conv1d.weight", r.d_conv * r.conv_channels).reshape(r.conv_channels, r.d_conv),
            dt_bias=self._vector(p + "ssm_dt.bias", r.n_v_heads),
            a=self._vector(p + "ssm_a", r.n_v_heads),
            norm=self._vector(p + "ssm_norm.weight", r.head_v),
            out=self._matrix(p + "ssm_out.weight", hp.n_embd, value_dim))
        return layer

    def imrope_inv_freq(self, inv_freq: np.ndarray) -> np.ndarray:
        """The speeds of ggml's IMROPE for text: pair k takes section k % sum(sections)'s
        position; the pairs the first three sections do not cover take the fourth position,
        which is 0 for text, so their speed is 0 (no rotation)."""
        sections = self.gguf.metadata.get(f"{self.architecture}.rope.dimension_sections")
        if sections is None or inv_freq.size == 0:
            return inv_freq
        s = [int(v) for v in np.asarray(sections).reshape(-1)[:4]] + [0] * 4
        total = sum(s[:4])
        if total <= 0:
            return inv_freq
        out = inv_freq.copy()
        for k in range(out.size):
            sector = k % total
            covered = ((sector % 3 == 0 and sector < 3 * s[0]) or (sector % 3 == 1 and sector < 3 * s[1])
                       or (sector % 3 == 2 and sector < 3 * s[2]))
            if not covered:
                out[k] = 0.0
        return out

    # --- the forward pass ---------------------------------------------------------------

    def _forward(self, tokens, spans: list[Span], all_logits: bool, hidden: bool = False) -> np.ndarray:
        for s in spans:
            s.cache.begin(s.start)  # each state is marked invalid until the pass completes
        out = super()._forward(tokens, spans, all_logits, hidden)
        for s in spans:
            s.cache.end(s.n, s.start)
        return out

    def attention(self, il: int, layer: Layer, h, positions, spans: list[Span]):
        if layer.linear is not None:
            out = np.empty_like(h)
            for s in spans:  # each sequence through its own recurrent state
                cache = s.cache
                out[s.begin:s.end] = self.delta_net(layer.linear, h[s.begin:s.end], cache,
                                                    cache.recurrent_slot[il])
            return out
        hp = self.hp
        n, hd = h.shape[0], hp.head_dim
        qg, k, v = layer.qkv(h)
        qg = qg.reshape(n, hp.n_head, 2, hd)
        q = np.ascontiguousarray(qg[:, :, 0]).reshape(n, hp.n_head * hd)
        gate = np.ascontiguousarray(qg[:, :, 1]).reshape(n, hp.n_head * hd)
        k = np.ascontiguousarray(k)
        ops.rms_norm_heads(q, hp.n_head, hd, layer.q_norm, hp.rms_eps)
        ops.rms_norm_heads(k, hp.n_head_kv, hd, layer.k_norm, hp.rms_eps)
        ops.rope(q, positions, hp.n_head, hd, hp.n_rot, layer.rope_inv_freq, True)
        ops.rope(k, positions, hp.n_head_kv, hd, hp.n_rot, layer.rope_inv_freq, True)
        out = np.empty((n, hp.n_head * hp.head_dim_v), np.float32)
        for s in spans:  # each sequence over its own cache
            cache, a, b = s.cache, s.begin, s.end
            slot = cache.kv_slot[il]
            cache.store(slot, s.start, k[a:b], v[a:b])
            ops.attention(q[a:b], cache.k[slot], cache.k_ggml.id, cache.k_blocks, cache.v[slot], cache.v_ggml.id,
                          cache.v_blocks, s.start, hp.n_head, np.float32(self.attention_scale), 0, out[a:b],
                          np.float32(0.0))
        out *= sigmoid(gate)
        return layer.wo(out)

    def delta_net(self, w: DeltaNetWeights, h, cache: HybridCache, slot: int):
        hp, r = self.hp, self.hp.recurrent
        n = h.shape[0]
        key_dim = r.n_k_heads * r.head_k
        qkv, z, b, a = w.in_proj(h)
        mixed = np.empty((n, r.conv_channels), np.float32)
        deltanet.conv_silu(np.ascontiguousarray(qkv), cache.state.conv[slot], w.conv_w, mixed)
        q = np.ascontiguousarray(mixed[:, :key_dim])
        k = np.ascontiguousarray(mixed[:, key_dim:2 * key_dim])
        v = np.ascontiguousarray(mixed[:, 2 * key_dim:]).reshape(n, r.n_v_heads, r.head_v)
        deltanet.l2_norm_heads(q, r.n_k_heads, r.head_k, hp.rms_eps)
        deltanet.l2_norm_heads(k, r.n_k_heads, r.head_k, hp.rms_eps)
        g = np.ascontiguousarray(softplus(a + w.dt_bias) * w.a)
        beta = np.ascontiguousarray(sigmoid(b))
        out = np.empty((n, r.n_v_heads, r.head_v), np.float32)
        deltanet.gated_delta_rule(q.reshape(n, r.n_k_heads, r.head_k), k.reshape(n, r.n_k_heads, r.head_k), v,
                                  g, beta, cache.state.delta[slot], out)
        out = out.reshape(n, r.n_v_heads * r.head_v)
        ops.rms_norm_heads(out, r.n_v_heads, r.head_v, w.norm, hp.rms_eps)
        ops.silu_mul(z, out)  # z = silu(z) * normed output
        return w.out(z)
