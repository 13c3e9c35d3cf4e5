"""Qwen 3 MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): Qwen 3's attention (QK-norm, NEOX RoPE)
with a mixture of experts in place of the dense feed-forward, as llama.cpp's qwen3moe graph
and its build_moe_ffn compute it:

- The router ffn_gate_inp [n_embd -> expert_count] gives each token a logit per expert; a
  softmax over all experts, then the expert_used_count most probable are chosen and their
  probabilities divided by their sum (llama.cpp always normalises for qwen3moe, whatever
  expert_weights_norm says; the sum clamped below at 2**-14), with no further scale.
- Each expert is a SwiGLU FFN of expert_feed_forward_length (feed_forward_length /
  expert_used_count when absent). Its gate, up and down matrices are the e-th slices of the
  3-D tensors ffn_gate_exps, ffn_up_exps [n_embd, n_ff_exp, n_expert] and ffn_down_exps
  [n_ff_exp, n_embd, n_expert]: views of the memory map, never copied.
- A token's FFN output is the weighted sum of its chosen experts' outputs; no shared expert.

A token reads only its chosen experts' blocks (Qwen3-30B-A3B: 8 of 128, about 3.3B of its
30.5B parameters). A batch is grouped by expert, so each used expert's blocks are read once
per batch, by one matmul over the tokens routed to it.
"""

from __future__ import annotations

import numpy as np

from runtime import kernels
from runtime.hparams import _scalar
from runtime.kernels import ops

from .base import Matrix, UnsupportedModelError
from .qwen3 import Qwen3

WEIGHT_SUM_FLOOR = np.float32(6.103515625e-5)  # llama.cpp's clamp of the chosen weights' sum


class Experts:
    """One layer's router and experts: a SwiGLU FFN per expert, each matrix a BlockMatrix
    over its expert's slice of the layer's 3-D tensor. A family whose router or experts
    differ (gpt-oss) overrides route, activate and add_down_bias."""

    def __init__(self, router: Matrix, gate: list[Matrix], up: list[Matrix], down: list[Matrix],
                 n_used: int):
        self.router, self.gate, self.up, self.down, self.n_used = router, gate, up, down, n_used
        self.n_embd = router.cols

    def route(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(experts [n, n_used], weights [n, n_used]) of each token, most probable first."""
        logits = self.router(h)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :self.n_used]
        weights = np.take_along_axis(probs, chosen, axis=1)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), WEIGHT_SUM_FLOOR)
        return chosen, weights

    def activate(self, e: int, gate: np.ndarray, up: np.ndarray) -> None:
        """gate = act(gate) * up for expert e's rows gate, up [n, n_ff_exp], in place."""
        ops.silu_mul(gate, up)

    def add_down_bias(self, e: int, y: np.ndarray) -> None:
        """Expert e's down-projection bias, added to its outputs y [n, n_embd] (none here)."""

    def __call__(self, h: np.ndarray, router_input: np.ndarray | None = None) -> np.ndarray:
        """The mixture's output for the tokens h [n, n_embd], routed on h or, where the family
        routes on something else (Gemma 4), on router_input [n, n_embd]."""
        chosen, weights = self.route(h if router_input is None else router_input)
        n = h.shape[0]
        # each token's weighted expert outputs, summed in its experts' order as llama.cpp does
        parts = np.empty((n, self.n_used, self.n_embd), np.float32)
        if n == 1:
            experts = chosen[0].tolist()
            gate_up = kernels.matvec_many([m for e in experts for m in (self.gate[e], self.up[e])],
                                          self.n_embd, h[0])
            for slot, e in enumerate(experts):
                act = gate_up[2 * slot].reshape(1, -1)
                self.activate(e, act, gate_up[2 * slot + 1].reshape(1, -1))
                self.down[e].matvec(act[0], out=parts[0, slot])
                self.add_down_bias(e, parts[0, slot:slot + 1])
        else:
            for e in np.unique(chosen).tolist():
                rows, slots = np.nonzero(chosen == e)
                x = np.ascontiguousarray(h[rows])
                if len(rows) == 1:
                    gate, up = (v.reshape(1, -1) for v in
                                kernels.matvec_many([self.gate[e], self.up[e]], self.n_embd, x[0]))
                else:
                    gate, up = kernels.matmul_many([self.gate[e], self.up[e]], self.n_embd, x)
                self.activate(e, gate, up)
                y = self.down[e](gate)
                self.add_down_bias(e, y)
                parts[rows, slots] = y
        parts *= weights[:, :, None]
        out = parts[:, 0].copy()
        for slot in range(1, self.n_used):
            out += parts[:, slot]
        return out


def expert_counts(md: dict, arch: str) -> tuple[int, int, int]:
    """(expert_count, expert_used_count, expert_feed_forward_length or 0) from the metadata,
    checked."""
    a = arch + "."
    for key in ("expert_count", "expert_used_count"):
        if a + key not in md:
            raise UnsupportedModelError(f"{arch} model has no metadata key {a + key!r}")
    n_expert = int(md[a + "expert_count"])
    n_used = int(_scalar(md[a + "expert_used_count"]))
    if not 1 <= n_used <= n_expert:
        raise UnsupportedModelError(
            f"the model's {a}expert_used_count is {n_used} for {n_expert} experts, "
            f"but it must be from 1 to {a}expert_count: the file's metadata is wrong")
    return n_expert, n_used, int(_scalar(md.get(a + "expert_feed_forward_length", 0)))


def expert_matrices(model, name: str, rows: int, cols: int, n_expert: int) -> list[Matrix]:
    """Each expert's rows x cols matrix: a view of its slice of the model's 3-D tensor `name`."""
    t = model._tensor(name)
    if tuple(int(s) for s in t.shape) != (cols, rows, n_expert):
        raise UnsupportedModelError(f"tensor {name} has shape {list(t.shape)}, expected "
                                    f"[{cols}, {rows}, {n_expert}] (GGUF order)")
    size = rows * t.type.row_bytes(cols)
    return [Matrix(f"{name}[{e}]", t.data[e * size:(e + 1) * size], t.type, rows, cols)
            for e in range(n_expert)]


class Qwen3Moe(Qwen3):
    architecture = "qwen3moe"

    def __init__(self, gguf_file):
        self.n_expert, self.n_expert_used, self.n_ff_expert = expert_counts(gguf_file.metadata, self.architecture)
        super().__init__(gguf_file)

    def feed_forward_weights(self, p: str) -> dict:
        hp = self.hp
        n_ff = self.n_ff_expert or hp.n_ff // self.n_expert_used
        self.n_ff_expert = n_ff
        return dict(w_gate=None, w_up=None, gate_up=None, w_down=None, experts=Experts(
            router=self._matrix(p + "ffn_gate_inp.weight", self.n_expert, hp.n_embd),
            gate=self._expert_matrices(p + "ffn_gate_exps.weight", n_ff, hp.n_embd),
            up=self._expert_matrices(p + "ffn_up_exps.weight", n_ff, hp.n_embd),
            down=self._expert_matrices(p + "ffn_down_exps.weight", hp.n_embd, n_ff),
            n_used=self.n_expert_used))

    def _expert_matrices(self, name: str, rows: int, cols: int) -> list[Matrix]:
        return expert_matrices(self, name, rows, cols, self.n_expert)

    def feed_forward(self, layer, h):
        return layer.experts(h)
