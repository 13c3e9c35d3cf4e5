"""Gemma 2: facts from llama.cpp's gemma2 graph and loader.

- Token embeddings scaled by sqrt(n_embd); output tied to them (never an output.weight).
- Post-norms on the attention and FFN outputs before each residual add; no QK-norm.
- GeGLU (GELU, tanh approximation); NEOX-style RoPE; layers that slide use
  rope.freq_base_swa when the file gives one.
- Alternating attention: even layers slide over attention.sliding_window (4096 when the
  file does not say), odd layers are global (llama.cpp's pattern 2, or the file's
  attention.sliding_window_pattern).
- Attention scores soft-capped: 50 * tanh(s / 50) (attn_logit_softcapping), final logits
  30 * tanh(l / 30) (final_logit_softcapping), those defaults when the file has no key.
- Attention scale 1/sqrt(head_dim), except the 27B (46 layers): 1/sqrt(n_embd / n_head).
"""

import dataclasses

from .base import HParams, Transformer
from .gemma3 import gemma_attention_scale

SLIDING_PATTERN = 2
DEFAULT_WINDOW = 4096
DEFAULT_ATTN_SOFTCAP = 50.0
DEFAULT_FINAL_SOFTCAP = 30.0


class Gemma2(Transformer):
    architecture = "gemma2"
    scale_embedding = True
    post_norms = True
    ffn_activation = "gelu_tanh"
    rope_neox = True

    def __init__(self, gguf_file):
        md, a = gguf_file.metadata, self.architecture + "."
        self.attn_softcap = float(md.get(a + "attn_logit_softcapping", DEFAULT_ATTN_SOFTCAP))
        self.rope_base_swa = md.get(a + "rope.freq_base_swa")
        super().__init__(gguf_file)
        self.output = self.token_embd

    def adjust_hparams(self, hp: HParams) -> HParams:
        md, a = self.gguf.metadata, self.architecture + "."
        return dataclasses.replace(
            hp, sliding_window=int(md.get(a + "attention.sliding_window", DEFAULT_WINDOW)),
            final_logit_softcap=float(md.get(a + "final_logit_softcapping", DEFAULT_FINAL_SOFTCAP)))

    def is_sliding(self, il: int) -> bool:
        return self.sliding_by_pattern(il, SLIDING_PATTERN)

    def rope_for_layer(self, il: int) -> tuple[float, float]:
        if self.is_sliding(il) and self.rope_base_swa is not None:
            return float(self.rope_base_swa), self.hp.rope_scale
        return self.hp.rope_base, self.hp.rope_scale

    @staticmethod
    def attention_scale_for(hp: HParams) -> float:
        return gemma_attention_scale(hp, n_layer_27b=46)
