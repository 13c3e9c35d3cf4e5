"""Qwen 3.5 / 3.6 MoE (Qwen3.5-35B-A3B, ...): qwen35's layers (runtime/model/qwen35.py) with
qwen3moe's mixture of experts in place of the dense FFN (the same router and expert tensors,
runtime/model/qwen3moe.py: softmax over the experts, top expert_used_count, their weights
normalised), plus a shared expert when the file has one, as llama.cpp's qwen35moe graph adds
it: a SwiGLU FFN of expert_shared_feed_forward_length (ffn_gate_shexp, ffn_up_shexp,
ffn_down_shexp) scaled per token by sigmoid(ffn_gate_inp_shexp . x), added to the experts'
sum.
"""

from __future__ import annotations

import numpy as np

from runtime.hparams import _scalar
from runtime.kernels import ops

from .base import Projections
from .qwen35 import Qwen35, sigmoid
from .qwen3moe import Qwen3Moe


class Qwen35Moe(Qwen35, Qwen3Moe):
    """Qwen35's loading and mixers; Qwen3Moe's expert metadata, tensors and router."""

    architecture = "qwen35moe"

    def feed_forward_weights(self, p: str) -> dict:
        weights = Qwen3Moe.feed_forward_weights(self, p)
        experts = weights["experts"]
        experts.shared = None
        if p + "ffn_up_shexp.weight" in self._tensors:
            md, n_embd = self.gguf.metadata, self.hp.n_embd
            n_ff = int(_scalar(md.get(self.architecture + ".expert_shared_feed_forward_length", self.hp.n_ff)))
            gate = self._matrix(p + "ffn_gate_shexp.weight", n_ff, n_embd)
            up = self._matrix(p + "ffn_up_shexp.weight", n_ff, n_embd)
            experts.shared = (self._vector(p + "ffn_gate_inp_shexp.weight", n_embd), Projections(gate, up),
                              self._matrix(p + "ffn_down_shexp.weight", n_embd, n_ff))
        return weights

    def feed_forward(self, layer, h):
        out = layer.experts(h)
        if layer.experts.shared is not None:
            gate_inp, gate_up, down = layer.experts.shared
            gate, up = gate_up(h)
            ops.silu_mul(gate, up)
            shared = down(gate)
            shared *= sigmoid(h @ gate_inp)[:, None]
            out += shared
        return out
