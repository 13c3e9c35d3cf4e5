"""gpt-oss (OpenAI's gpt-oss-20b and -120b), as llama.cpp's `gpt-oss` graph (openai-moe.cpp)
computes it:

- Attention: q/k/v projections with biases, NEOX RoPE (YaRN-scaled as rope.scaling says),
  scores scaled by 1/sqrt(head_dim), and per head a learned sink logit attn_sinks[h] that
  joins the softmax's denominator only (a head may attend to nothing); the output
  projection has a bias. Layers alternate a sliding window (even layers, over
  attention.sliding_window positions) and full attention, unless
  attention.sliding_window_pattern says otherwise.
- Norms: RMSNorm before attention (attn_norm) and before the FFN (post_attention_norm,
  despite its name the FFN's input norm); no post-norms.
- Mixture of experts: the router ffn_gate_inp with its bias gives each expert a logit; the
  expert_used_count largest are chosen and their weights are the softmax over those logits
  only (llama.cpp's SOFTMAX_WEIGHT gating; no normalisation after). Each expert's gate, up
  and down matrices have biases ([n_ff_exp] or [n_embd] per expert), and its activation is
  the clamped SwiGLU of gpt-oss (llama.cpp's swiglu_oai, alpha 1.702, limit 7):
      x = min(gate, 7), y = clip(up, -7, 7), out = x * sigmoid(1.702 x) * (y + 1).
  The experts are stored in MXFP4 in the released files (runtime/kernels/mxfp4.py).
"""

from __future__ import annotations

import numpy as np

from .base import Transformer
from .qwen3moe import Experts, expert_counts, expert_matrices

SWIGLU_ALPHA = np.float32(1.702)  # llama.cpp's constants for LLM_FFN_SWIGLU_OAI_MOE
SWIGLU_LIMIT = np.float32(7.0)


def swiglu_oai(gate: np.ndarray, up: np.ndarray) -> None:
    """gate = x * sigmoid(alpha x) * (y + 1), x = min(gate, limit), y = clip(up, ±limit), in place."""
    x = np.minimum(gate, SWIGLU_LIMIT)
    y = np.clip(up, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    gate[...] = x / (np.float32(1.0) + np.exp(-SWIGLU_ALPHA * x)) * (y + np.float32(1.0))


class GptOssExperts(Experts):
    """gpt-oss's router (biased logits, softmax over the chosen ones) and biased experts."""

    def __init__(self, router, router_bias, gate, gate_bias, up, up_bias, down, down_bias, n_used):
        super().__init__(router, gate, up, down, n_used)
        self.router_bias, self.gate_bias, self.up_bias, self.down_bias = router_bias, gate_bias, up_bias, down_bias

    def route(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self.router(h) + self.router_bias
        chosen = np.argsort(-logits, axis=1, kind="stable")[:, :self.n_used]
        top = np.take_along_axis(logits, chosen, axis=1)
        weights = np.exp(top - top[:, :1])  # the first is the largest
        weights /= weights.sum(axis=1, keepdims=True)
        return chosen, weights

    def activate(self, e: int, gate: np.ndarray, up: np.ndarray) -> None:
        gate += self.gate_bias[e]
        up += self.up_bias[e]
        swiglu_oai(gate, up)

    def add_down_bias(self, e: int, y: np.ndarray) -> None:
        y += self.down_bias[e]


class GptOss(Transformer):
    architecture = "gpt-oss"
    rope_neox = True
    attention_bias = True
    ffn_norm_tensor = "post_attention_norm.weight"

    def __init__(self, gguf_file):
        self.n_expert, self.n_expert_used, self.n_ff_expert = expert_counts(gguf_file.metadata, self.architecture)
        super().__init__(gguf_file)
        hp = self.hp
        self.attn_output_bias = []
        for il, layer in enumerate(self.layers):
            layer.attn_sinks = self._vector(f"blk.{il}.attn_sinks.weight", hp.n_head)
            self.attn_output_bias.append(self._vector(f"blk.{il}.attn_output.bias", hp.n_embd))

    def is_sliding(self, il: int) -> bool:
        return self.sliding_by_pattern(il, 2)

    def rope_for_layer(self, il: int) -> tuple[float, float]:
        """Sliding layers may have their own base (rope.freq_base_swa; the same by default)."""
        base = self.hp.rope_base
        if self.is_sliding(il):
            base = float(self.gguf.metadata.get(self.architecture + ".rope.freq_base_swa", base))
        return base, self.hp.rope_scale

    def feed_forward_weights(self, p: str) -> dict:
        hp = self.hp
        n_ff = self.n_ff_expert or hp.n_ff
        self.n_ff_expert = n_ff
        n_exp = self.n_expert

        def biases(name, n):
            return self._vector(p + name, n_exp * n).reshape(n_exp, n)

        return dict(w_gate=None, w_up=None, gate_up=None, w_down=None, experts=GptOssExperts(
            router=self._matrix(p + "ffn_gate_inp.weight", n_exp, hp.n_embd),
            router_bias=self._vector(p + "ffn_gate_inp.bias", n_exp),
            gate=expert_matrices(self, p + "ffn_gate_exps.weight", n_ff, hp.n_embd, n_exp),
            gate_bias=biases("ffn_gate_exps.bias", n_ff),
            up=expert_matrices(self, p + "ffn_up_exps.weight", n_ff, hp.n_embd, n_exp),
            up_bias=biases("ffn_up_exps.bias", n_ff),
            down=expert_matrices(self, p + "ffn_down_exps.weight", hp.n_embd, n_ff, n_exp),
            down_bias=biases("ffn_down_exps.bias", hp.n_embd),
            n_used=self.n_expert_used))

    def attention(self, il, layer, *args):
        out = super().attention(il, layer, *args)
        out += self.attn_output_bias[il]
        return out

    def feed_forward(self, layer, h):
        return layer.experts(h)
