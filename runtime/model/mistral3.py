"""Mistral 3 (Ministral 3 and Mistral Small 3.x text): facts from llama.cpp's mistral3 graph
and loader.

- llama's layer (RoPE in the original style, SwiGLU, output tied when output.weight is
  absent), with YaRN RoPE scaling as the skeleton applies it (rope.scaling.type yarn, the
  yarn_beta_fast/slow and yarn_log_multiplier keys).
- Llama 4's attention temperature when attention.temperature_scale is set: the queries at
  position p are multiplied by 1 + t * ln(floor(p / n) + 1), n the original context
  (rope.scaling.original_context_length).
- Biases on attn_output or the FFN, and the MoE variant, are refused rather than ignored.
"""

import numpy as np

from .base import Transformer, UnsupportedModelError


class Mistral3(Transformer):
    architecture = "mistral3"
    unsupported_tensors = ("attn_output.bias", "ffn_up.bias", "ffn_gate.bias", "ffn_down.bias",
                           "ffn_gate_inp.weight")

    def __init__(self, gguf_file):
        self.attn_temperature = float(gguf_file.metadata.get(f"{self.architecture}.attention.temperature_scale", 0.0))
        super().__init__(gguf_file)
        if self.attn_temperature and self.hp.n_ctx_orig <= 0:
            raise UnsupportedModelError("attention temperature scaling needs "
                                        "rope.scaling.original_context_length > 0")

    def scale_queries(self, q: np.ndarray, positions: np.ndarray) -> None:
        if self.attn_temperature:
            floor = np.floor(positions.astype(np.float64) / self.hp.n_ctx_orig)
            q *= (np.log(floor + 1.0) * self.attn_temperature + 1.0).astype(np.float32)[:, None]
