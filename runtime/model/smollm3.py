"""SmolLM3: llama with no RoPE on every fourth layer (layers il with (il + 1) % 4 == 0 attend
without positions; llama.cpp's n_no_rope_layer_step). Original-style RoPE pairs, output tied
to the embedding when output.weight is absent."""

from .base import Transformer

NO_ROPE_LAYER_STEP = 4


class SmolLM3(Transformer):
    architecture = "smollm3"

    def has_rope(self, il: int) -> bool:
        return (il + 1) % NO_ROPE_LAYER_STEP != 0
