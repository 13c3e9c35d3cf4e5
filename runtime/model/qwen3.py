"""Qwen 3: llama plus QK-norm (RMSNorm over each head of q and k, before RoPE), NEOX-style
RoPE, no biases; its head size (attention.key_length) need not be n_embd / n_head."""

from .base import Transformer


class Qwen3(Transformer):
    architecture = "qwen3"
    qk_norm = True
    rope_neox = True
