"""Gemma 3: how it differs from llama (facts checked against llama.cpp's gemma3 graph).

- Token embeddings are scaled by sqrt(n_embd); the output projection is tied to them.
- RMSNorm weights: Gemma computes x * (1 + w), and llama.cpp's converter stores 1 + w in
  the GGUF, so the plain skeleton's x * w is right (checked on the 270M file: its norm
  weights are ~1-centred or larger, and our first attn_norm output equals llama.cpp's to 1e-7).
- QK-norm, and post-norms on the attention and FFN outputs before each residual add.
- GeGLU feed-forward with the tanh approximation of GELU; NEOX-style RoPE.
- Interleaved attention: five sliding-window layers, then one global layer (layers il with
  (il + 1) % 6 == 0). Local layers use RoPE base 10000 with no scaling; global layers use
  rope.freq_base (1e6) and rope.scaling (linear 8 on the 4B+ models).
- Attention scale 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim), except the 27B
  (62 layers), which uses 1/sqrt(n_embd / n_head).
- Final logit soft-capping only when the metadata asks for it (Gemma 3 files do not).
"""

import math

from .base import HParams, Transformer

SLIDING_PATTERN = 6  # every 6th layer is global
LOCAL_ROPE_BASE = 10000.0


class Gemma3(Transformer):
    architecture = "gemma3"
    scale_embedding = True
    qk_norm = True
    post_norms = True
    ffn_activation = "gelu_tanh"
    rope_neox = True

    def is_sliding(self, il: int) -> bool:
        return self.hp.sliding_window > 0 and (il + 1) % SLIDING_PATTERN != 0

    def rope_for_layer(self, il: int) -> tuple[float, float]:
        if self.is_sliding(il):
            return LOCAL_ROPE_BASE, 1.0
        return self.hp.rope_base, self.hp.rope_scale

    @staticmethod
    def attention_scale_for(hp: HParams) -> float:
        return gemma_attention_scale(hp, n_layer_27b=62)


def gemma_attention_scale(hp: HParams, n_layer_27b: int) -> float:
    """1/sqrt(head_dim), except on the 27B models (told apart by their layer count), whose
    query_pre_attn_scalar is n_embd / n_head (Gemma 2 and 3 alike)."""
    if hp.n_layer == n_layer_27b:
        return 1.0 / math.sqrt(hp.n_embd / hp.n_head)
    return 1.0 / math.sqrt(hp.head_dim)
