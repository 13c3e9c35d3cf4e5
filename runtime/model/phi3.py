"""Phi-3 / Phi-3.5 / Phi-4-mini: facts from llama.cpp's phi3 graph and loader.

- q, k and v come from one fused matrix (blk.N.attn_qkv: q rows, then k, then v), and the
  FFN's gate and up from one (blk.N.ffn_up of 2 * n_ff rows: gate first, then up, SwiGLU);
  both are split here into row views of the same bytes, nothing copied. Files with
  separate attn_q/k/v tensors load as they are.
- NEOX-style RoPE over the first rope.dimension_count dimensions of each head (partial
  rotary: 3/4 of them on Phi-4-mini).
- LongRoPE: per-pair frequency factors rope_factors_short / rope_factors_long; llama.cpp
  takes the long ones when the context it runs with exceeds
  rope.scaling.original_context_length (rope.scaling.attn_factor, which multiplies the
  rotated dimensions whatever the context, is the skeleton's, as in llama.cpp).
- llama.cpp ignores Phi's sliding window (attention.sliding_window): so do we.
"""

import numpy as np

from runtime.kernels import ops

from .base import Layer, Matrix, Transformer
from .kv_cache import KVCache


def _row_views(m: Matrix, sizes: tuple[int, ...]) -> list[Matrix]:
    """Consecutive row blocks of m as matrices of their own (views of its bytes)."""
    views, row = [], 0
    for n in sizes:
        views.append(Matrix(m.name, m.raw[row * m.row_bytes:(row + n) * m.row_bytes], m.type, n, m.cols))
        row += n
    return views


class Phi3(Transformer):
    architecture = "phi3"
    rope_neox = True

    def __init__(self, gguf_file):
        super().__init__(gguf_file)
        hp = self.hp
        self.long_rope_inv_freq = None
        if "rope_freqs.weight" in self._tensors:  # llama.cpp prefers these when present
            return
        factors = {which: self._vector(f"rope_factors_{which}.weight", hp.n_rot // 2)
                   for which in ("short", "long") if f"rope_factors_{which}.weight" in self._tensors}
        if "short" in factors:
            short = ops.rope_inv_freq(hp.n_rot, hp.rope_base, hp.rope_scale, factors["short"])
            for layer in self.layers:
                layer.rope_inv_freq = short
        if "long" in factors:
            self.long_rope_inv_freq = ops.rope_inv_freq(hp.n_rot, hp.rope_base, hp.rope_scale, factors["long"])

    def rope_frequencies(self, layer: Layer, cache: KVCache) -> np.ndarray:
        if self.long_rope_inv_freq is not None and cache.n_ctx > self.hp.n_ctx_orig:
            return self.long_rope_inv_freq
        return layer.rope_inv_freq

    def attention_matrices(self, p, q_dim, kv_dim, v_dim):
        if p + "attn_qkv.weight" not in self._tensors:
            return super().attention_matrices(p, q_dim, kv_dim, v_dim)
        qkv = self._matrix(p + "attn_qkv.weight", q_dim + kv_dim + v_dim, self.hp.n_embd)
        return tuple(_row_views(qkv, (q_dim, kv_dim, v_dim)))

    def gate_up_matrices(self, p):
        n_ff = self.hp.n_ff
        if p + "ffn_gate.weight" in self._tensors:
            return super().gate_up_matrices(p)
        gate_up = self._matrix(p + "ffn_up.weight", 2 * n_ff, self.hp.n_embd)
        return tuple(_row_views(gate_up, (n_ff, n_ff)))
