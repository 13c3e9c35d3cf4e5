"""Qwen 2 / 2.5: llama plus biases on the q/k/v projections, and NEOX-style RoPE."""

from .base import Transformer


class Qwen2(Transformer):
    architecture = "qwen2"
    attention_bias = True
    rope_neox = True
