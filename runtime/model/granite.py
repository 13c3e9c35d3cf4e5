"""Granite (3.x dense): llama with four multipliers from the metadata (llama.cpp's granite graph).

- granite.embedding_scale multiplies the token embeddings;
- granite.residual_scale multiplies the attention and FFN outputs before each residual add;
- granite.attention.scale replaces 1/sqrt(head_dim) as the attention scale;
- granite.logit_scale divides the logits (required).
RoPE in the original style on every layer, unless rope.scaling.finetuned is false (then on
none). Granite's MoE and hybrid variants are other architectures (granitemoe, granitehybrid).
"""

from .base import HParams, Transformer, UnsupportedModelError


class Granite(Transformer):
    architecture = "granite"
    unsupported_tensors = ("attn_output.bias", "ffn_up.bias", "ffn_gate.bias", "ffn_down.bias",
                           "ffn_gate_inp.weight")

    def __init__(self, gguf_file):
        md, a = gguf_file.metadata, self.architecture + "."
        if a + "logit_scale" not in md:
            raise UnsupportedModelError(f"granite model has no metadata key {a + 'logit_scale'!r}")
        # 0 (the converter's "absent") means no scaling, as in llama.cpp
        self.embedding_scale = float(md.get(a + "embedding_scale", 0.0)) or 1.0
        self.residual_scale = float(md.get(a + "residual_scale", 0.0)) or 1.0
        self.logit_scale = 1.0 / float(md[a + "logit_scale"])
        self._attention_scale = float(md.get(a + "attention.scale", 0.0))
        self._rope = bool(md.get(a + "rope.scaling.finetuned", True))
        super().__init__(gguf_file)

    def has_rope(self, il: int) -> bool:
        return self._rope

    def attention_scale_for(self, hp: HParams) -> float:
        return self._attention_scale or super().attention_scale_for(hp)
