"""Llama 2/3, Mistral, TinyLlama, SmolLM: the skeleton as it is.

RMSNorm before attention and FFN, SwiGLU, RoPE in the original style (pairs (2i, 2i+1);
llama.cpp's converter permutes q/k so this matches the HF weights), optional linear or
llama3 (rope_freqs tensor) RoPE scaling, output projection tied when `output.weight` is absent.
"""

from .base import Transformer


class Llama(Transformer):
    architecture = "llama"
