"""OLMo 2 (and OLMo 3's dense files, which keep this architecture name): facts from llama.cpp's
olmo2 graph and loader.

- No norm before attention or the FFN: the norms come after them (post_attention_norm,
  post_ffw_norm), before each residual add.
- QK-norm over the whole q and k projections (weights of n_embd and n_head_kv * head_dim),
  before RoPE; NEOX-style RoPE; untied output.
- With attention.sliding_window set (OLMo 3), three of every four layers slide (pattern
  4), and those use RoPE without frequency scaling.
"""

from .base import Transformer

SLIDING_PATTERN = 4


class Olmo2(Transformer):
    architecture = "olmo2"
    pre_norms = False
    post_norms = True
    qk_norm = True
    qk_norm_whole = True
    rope_neox = True

    def is_sliding(self, il: int) -> bool:
        return self.sliding_by_pattern(il, SLIDING_PATTERN)

    def rope_for_layer(self, il: int) -> tuple[float, float]:
        if self.is_sliding(il):
            base = float(self.gguf.metadata.get(f"{self.architecture}.rope.freq_base_swa", self.hp.rope_base))
            return base, 1.0
        return self.hp.rope_base, self.hp.rope_scale
