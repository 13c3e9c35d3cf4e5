"""Gemma (v1): how it differs from llama (facts from llama.cpp's gemma graph and loader).

- Token embeddings are scaled by sqrt(n_embd); the output projection is always the token
  embedding (llama.cpp never reads an output.weight for this family).
- GeGLU feed-forward (GELU, tanh approximation); NEOX-style RoPE.
- RMSNorm weights are stored as 1 + w by the converter, so the plain x * w is right.
- Attention scale 1/sqrt(head_dim).
"""

from .base import Transformer


class Gemma(Transformer):
    architecture = "gemma"
    scale_embedding = True
    ffn_activation = "gelu_tanh"
    rope_neox = True

    def __init__(self, gguf_file):
        super().__init__(gguf_file)
        self.output = self.token_embd
