"""Gemma 4: how it differs from Gemma 3 (facts checked against llama.cpp's gemma4 graph,
src/models/gemma4.cpp, and its loader).

- Layers come in two kinds, one flag each in attention.sliding_window_pattern: sliding
  ones (attention.sliding_window) with their own head size (attention.key_length_swa),
  RoPE dimensions (rope.dimension_count_swa) and base (rope.freq_base_swa, 10000 when
  absent, no scaling), and global ones with the plain keys. KV heads and FFN sizes may
  differ per layer (arrays in head_count_kv and feed_forward_length).
- Global layers rotate with "proportional" RoPE: rope_freqs.weight holds 1 for the pairs
  that rotate and 1e30 (no rotation) for the others.
- Q and K get per-head RMSNorm with weights; V gets RMSNorm without a weight. A layer
  without attn_v uses its K projection (before K's norm) as V. Attention scale 1.
- The last attention.shared_kv_layers layers compute no K/V: they attend over the cache of
  the last earlier layer of their kind (n_kv - 2 when sliding, n_kv - 1 when global, n_kv
  being the first sharing layer, as llama.cpp's cache maps them).
- Per-layer embeddings (embedding_length_per_layer_input = P > 0): each token also reads
  a row of per_layer_token_embd (P per layer, scaled by sqrt(P)), added to the RMS-normed
  projection per_layer_model_proj(scaled embedding) / sqrt(n_embd), times 1/sqrt(2). After
  each layer's FFN residual: x += post_norm(proj(gelu(inp_gate(x)) * that layer's input)).
- Each layer's output is then multiplied by its layer_output_scale when the file has it.
- Final logit soft-capping (final_logit_softcapping). Tied output, embedding scaled by
  sqrt(n_embd), post-norms, GeGLU, NEOX RoPE: as Gemma 3.
- Mixture-of-experts layers (26B-A4B: ffn_gate_inp present) run the dense FFN and the
  experts side by side on the attention's residual x: post_ffw_norm_1(FFN(ffn_norm(x))) +
  post_ffw_norm_2(experts(pre_ffw_norm_2(x))), then post_ffw_norm as usual. The router reads
  rms_norm(x) / sqrt(n_embd) * ffn_gate_inp.scale: softmax over all experts, the
  expert_used_count largest, their weights divided by their sum; each expert is GeGLU, its
  output times its ffn_down_exps.scale. Gate and up come as two 3-D tensors or one fused
  ffn_gate_up_exps (gate rows first).
The fused attn_qkv layout is refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.hparams import DEFAULT_KV_CACHE_TYPE, HParams
from runtime.kernels import ops

from .base import Layer, Matrix, Projections, Transformer, UnsupportedModelError
from .kv_cache import GroupedKVCache, Span
from .qwen3moe import Experts, expert_counts, expert_matrices

SWA_ROPE_BASE = 10000.0  # llama.cpp's default when rope.freq_base_swa is absent


class Gemma4Experts(Experts):
    """Qwen 3 MoE's routing and expert loop with Gemma 4's GeGLU and per-expert output scale."""

    def __init__(self, router: Matrix, gate, up, down, n_used: int, down_scale: np.ndarray | None):
        super().__init__(router, gate, up, down, n_used)
        self.down_scale = down_scale

    def activate(self, e: int, gate: np.ndarray, up: np.ndarray) -> None:
        ops.gelu_tanh_mul(gate, up)  # looked up here so a test may swap it

    def add_down_bias(self, e: int, y: np.ndarray) -> None:
        if self.down_scale is not None:
            y *= self.down_scale[e]


@dataclass
class Gemma4Mixture:
    """A mixture-of-experts layer's parts beside its dense FFN (whose input norm is here:
    the skeleton's ffn_norm is None for these layers, so the FFN receives the residual x)."""

    experts: Gemma4Experts
    router_scale: np.ndarray  # ffn_gate_inp.scale
    ffn_norm: np.ndarray
    pre_norm_experts: np.ndarray  # pre_ffw_norm_2
    post_norm_dense: np.ndarray  # post_ffw_norm_1
    post_norm_experts: np.ndarray  # post_ffw_norm_2


@dataclass
class Gemma4Layer(Layer):
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_rot: int = 0
    kv_source: int = 0  # the layer whose keys and values this one attends over (itself, or shared)
    v_norm: np.ndarray | None = None  # ones: V's RMSNorm has no weight
    out_scale: float = 1.0
    per_layer_gate: Matrix | None = None  # n_embd -> P
    per_layer_proj: Matrix | None = None  # P -> n_embd
    per_layer_norm: np.ndarray | None = None


class Gemma4(Transformer):
    architecture = "gemma4"
    scale_embedding = True
    qk_norm = True
    post_norms = True
    ffn_activation = "gelu_tanh"
    rope_neox = True
    per_layer_shapes = True

    def __init__(self, gguf_file):
        super().__init__(gguf_file)
        hp = self.hp
        self.per_layer_token_embd = None
        if hp.n_embd_per_layer:
            width = hp.n_embd_per_layer * hp.n_layer
            self.per_layer_token_embd = self._matrix("per_layer_token_embd.weight", hp.n_vocab, width)
            self.per_layer_model_proj = self._matrix("per_layer_model_proj.weight", width, hp.n_embd)
            self.per_layer_proj_norm = self._vector("per_layer_proj_norm.weight", hp.n_embd_per_layer)

    def check_hparams(self) -> None:
        hp = self.hp  # per-layer head counts are checked by runtime.hparams.check_hparams
        for il in range(hp.n_layer):
            if hp.n_rot_at(il) > hp.head_dim_at(il):
                raise UnsupportedModelError(f"layer {il}: RoPE over {hp.n_rot_at(il)} dimensions of heads of "
                                            f"{hp.head_dim_at(il)}")
            if hp.head_dim_at(il) != hp.head_dim_v_at(il):
                raise UnsupportedModelError(f"gemma4 needs keys and values of one head size (layer {il}: "
                                            f"{hp.head_dim_at(il)} and {hp.head_dim_v_at(il)})")
        if hp.sliding_window and len(hp.sliding_layers) < hp.n_layer:
            raise UnsupportedModelError("gemma4 model has no attention.sliding_window_pattern flags per layer")

    @staticmethod
    def attention_scale_for(hp: HParams) -> float:
        return 1.0

    def is_sliding(self, il: int) -> bool:
        return self.hp.sliding_window > 0 and self.hp.is_swa(il)

    def kv_source(self, il: int) -> int:
        """The layer whose cache layer il reads: itself, or for the last shared_kv_layers
        layers the last layer of their kind before them (llama.cpp's reuse rule)."""
        hp = self.hp
        first_shared = hp.n_layer - hp.n_kv_shared_layers
        if il < first_shared:
            return il
        source = first_shared - (2 if hp.is_swa(il) else 1)
        if source < 0 or hp.is_swa(source) != hp.is_swa(il) or hp.head_dim_at(source) != hp.head_dim_at(il) \
                or hp.n_head_kv_at(source) != hp.n_head_kv_at(il):
            raise UnsupportedModelError(
                f"gemma4 layer {il} shares the K/V of layer {source}, which is not a layer of its kind and shape")
        return source

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                  type_v: str = DEFAULT_KV_CACHE_TYPE) -> GroupedKVCache:
        return GroupedKVCache(self.hp, n_ctx, type_k, type_v)

    # --- loading ------------------------------------------------------------------------

    def load_layer(self, il: int) -> Gemma4Layer:
        hp, p = self.hp, f"blk.{il}."
        if p + "attn_qkv.weight" in self._tensors:
            raise UnsupportedModelError("gemma4 models with a fused attn_qkv are not supported yet")
        n_embd, n_head, n_kv = hp.n_embd, hp.n_head_at(il), hp.n_head_kv_at(il)
        hd, n_ff, sliding = hp.head_dim_at(il), hp.n_ff_at(il), self.is_sliding(il)
        source = self.kv_source(il)
        wq = self._matrix(p + "attn_q.weight", n_head * hd, n_embd)
        wk = wv = k_norm = None
        if source == il:
            wk = self._matrix(p + "attn_k.weight", n_kv * hd, n_embd)
            if p + "attn_v.weight" in self._tensors:
                wv = self._matrix(p + "attn_v.weight", n_kv * hd, n_embd)
            k_norm = self._vector(p + "attn_k_norm.weight", hd)
        n_rot = hp.n_rot_at(il)
        if sliding:
            inv_freq = ops.rope_inv_freq(n_rot, hp.rope_base_swa or SWA_ROPE_BASE, 1.0, np.zeros(0, np.float32))
        else:  # proportional RoPE: rope_freqs stops the pairs that do not rotate
            factors = self.rope_factors if self.rope_factors.size == n_rot // 2 else np.zeros(0, np.float32)
            inv_freq = ops.rope_inv_freq(n_rot, hp.rope_base, hp.rope_scale, factors)
        w_gate = self._matrix(p + "ffn_gate.weight", n_ff, n_embd)
        w_up = self._matrix(p + "ffn_up.weight", n_ff, n_embd)
        out_scale = (float(self._vector(p + "layer_output_scale.weight", 1)[0])
                     if p + "layer_output_scale.weight" in self._tensors else 1.0)
        per_layer = {}
        if hp.n_embd_per_layer:
            per_layer = dict(per_layer_gate=self._matrix(p + "inp_gate.weight", hp.n_embd_per_layer, n_embd),
                             per_layer_proj=self._matrix(p + "proj.weight", n_embd, hp.n_embd_per_layer),
                             per_layer_norm=self._vector(p + "post_norm.weight", n_embd))
        mixture = self.load_mixture(p) if p + "ffn_gate_inp.weight" in self._tensors else None
        return Gemma4Layer(
            attn_norm=self._vector(p + "attn_norm.weight", n_embd),
            wq=wq, wk=wk, wv=wv, qkv=Projections(*(m for m in (wq, wk, wv) if m is not None)),
            wo=self._matrix(p + "attn_output.weight", n_embd, n_head * hd),
            bq=None, bk=None, bv=None,
            q_norm=self._vector(p + "attn_q_norm.weight", hd), k_norm=k_norm,
            post_attn_norm=self._vector(p + "post_attention_norm.weight", n_embd),
            ffn_norm=self._vector(p + "ffn_norm.weight", n_embd) if mixture is None else None,
            experts=mixture, w_gate=w_gate, w_up=w_up, gate_up=Projections(w_gate, w_up),
            w_down=self._matrix(p + "ffn_down.weight", n_embd, n_ff),
            post_ffn_norm=self._vector(p + "post_ffw_norm.weight", n_embd),
            sliding=sliding, rope_inv_freq=inv_freq, rope_mscale=1.0,
            n_head=n_head, n_head_kv=n_kv, head_dim=hd, n_rot=n_rot, kv_source=source,
            v_norm=np.ones(hd, np.float32), out_scale=out_scale, **per_layer)

    def load_mixture(self, p: str) -> Gemma4Mixture:
        n_embd = self.hp.n_embd
        n_expert, n_used, n_ff = expert_counts(self.gguf.metadata, self.architecture)
        if not n_ff:
            raise UnsupportedModelError("gemma4 model has no metadata key 'gemma4.expert_feed_forward_length'")
        if p + "ffn_gate_up_exps.weight" in self._tensors:  # each expert's gate rows, then its up rows
            both = expert_matrices(self, p + "ffn_gate_up_exps.weight", 2 * n_ff, n_embd, n_expert)
            half = n_ff * both[0].row_bytes
            gate = [Matrix(m.name + ".gate", m.raw[:half], m.type, n_ff, n_embd) for m in both]
            up = [Matrix(m.name + ".up", m.raw[half:], m.type, n_ff, n_embd) for m in both]
        else:
            gate = expert_matrices(self, p + "ffn_gate_exps.weight", n_ff, n_embd, n_expert)
            up = expert_matrices(self, p + "ffn_up_exps.weight", n_ff, n_embd, n_expert)
        down_scale = (self._vector(p + "ffn_down_exps.scale", n_expert)
                      if p + "ffn_down_exps.scale" in self._tensors else None)
        experts = Gemma4Experts(self._matrix(p + "ffn_gate_inp.weight", n_expert, n_embd), gate, up,
                                expert_matrices(self, p + "ffn_down_exps.weight", n_embd, n_ff, n_expert),
                                n_used, down_scale)
        return Gemma4Mixture(experts=experts, router_scale=self._vector(p + "ffn_gate_inp.scale", n_embd),
                             ffn_norm=self._vector(p + "ffn_norm.weight", n_embd),
                             pre_norm_experts=self._vector(p + "pre_ffw_norm_2.weight", n_embd),
                             post_norm_dense=self._vector(p + "post_ffw_norm_1.weight", n_embd),
                             post_norm_experts=self._vector(p + "post_ffw_norm_2.weight", n_embd))

    # --- the forward pass ---------------------------------------------------------------

    def layer_inputs(self, tokens: np.ndarray, x: np.ndarray):
        """Every layer's per-layer input, float32[n, n_layer, P] (None without them): the
        token's own rows plus the normed projection of its scaled embedding x."""
        if self.per_layer_token_embd is None:
            return None
        hp = self.hp
        n, size = len(tokens), hp.n_embd_per_layer
        own = self.per_layer_token_embd.rows_f32(tokens).reshape(n, hp.n_layer, size)
        own *= np.float32(math.sqrt(size))
        proj = np.ascontiguousarray(self.per_layer_model_proj(x)).reshape(n * hp.n_layer, size)
        proj *= np.float32(1.0 / math.sqrt(hp.n_embd))
        ops.rms_norm(proj, self.per_layer_proj_norm, hp.rms_eps, proj)
        own += proj.reshape(n, hp.n_layer, size)
        own *= np.float32(1.0 / math.sqrt(2.0))
        return own

    def end_of_layer(self, il: int, layer: Gemma4Layer, x: np.ndarray, inputs) -> None:
        if inputs is not None:
            gate = np.ascontiguousarray(layer.per_layer_gate(x))
            ops.gelu_tanh_mul(gate, np.ascontiguousarray(inputs[:, il]))  # gelu(gate) * this layer's input
            y = np.ascontiguousarray(layer.per_layer_proj(gate))
            ops.rms_norm(y, layer.per_layer_norm, self.hp.rms_eps, y)
            x += y
        if layer.out_scale != 1.0:
            x *= np.float32(layer.out_scale)

    def feed_forward(self, layer: Gemma4Layer, h):
        mixture = layer.experts
        if mixture is None:
            return super().feed_forward(layer, h)
        eps, x = self.hp.rms_eps, h  # a mixture layer's FFN gets the residual x itself
        normed = np.empty_like(x)
        ops.rms_norm(x, mixture.ffn_norm, eps, normed)
        dense = super().feed_forward(layer, normed)
        ops.rms_norm(dense, mixture.post_norm_dense, eps, dense)
        router_input = np.empty_like(x)
        ops.rms_norm(x, np.ones(x.shape[1], np.float32), eps, router_input)
        router_input *= np.float32(1.0 / math.sqrt(self.hp.n_embd))
        router_input *= mixture.router_scale
        ops.rms_norm(x, mixture.pre_norm_experts, eps, normed)
        experts = mixture.experts(normed, router_input=router_input)
        ops.rms_norm(experts, mixture.post_norm_experts, eps, experts)
        dense += experts
        return dense

    def attention(self, il: int, layer: Gemma4Layer, h, positions, spans: list[Span]):
        hp = self.hp
        n, n_head, n_kv, hd = h.shape[0], layer.n_head, layer.n_head_kv, layer.head_dim
        projected = layer.qkv(h)
        q = np.ascontiguousarray(projected[0])
        ops.rms_norm_heads(q, n_head, hd, layer.q_norm, hp.rms_eps)
        ops.rope(q, positions, n_head, hd, layer.n_rot, layer.rope_inv_freq, True)
        if layer.wk is not None:
            k = np.ascontiguousarray(projected[1])
            v = np.array(projected[2] if layer.wv is not None else k, np.float32)  # V: K's projection
            ops.rms_norm_heads(k, n_kv, hd, layer.k_norm, hp.rms_eps)
            ops.rms_norm_heads(v, n_kv, hd, layer.v_norm, hp.rms_eps)
            ops.rope(k, positions, n_kv, hd, layer.n_rot, layer.rope_inv_freq, True)
        out = np.empty((n, n_head * hd), np.float32)
        window = hp.sliding_window if layer.sliding else 0
        for span in spans:  # each sequence over its own cache
            cache, a, b = span.cache, span.begin, span.end
            if layer.wk is not None:
                cache.store(il, span.start, k[a:b], v[a:b])
            keys, k_blocks, values, v_blocks = cache.layer(layer.kv_source)
            ops.attention(q[a:b], keys, cache.k_ggml.id, k_blocks, values, cache.v_ggml.id, v_blocks, span.start,
                          n_head, np.float32(self.attention_scale), window, out[a:b], np.float32(0.0))
        return layer.wo(out)
