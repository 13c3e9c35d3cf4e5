"""The cache of a hybrid model (Qwen3.5: Gated DeltaNet layers among full-attention ones):
a KV cache for the attention layers and a recurrent state for the others.

A recurrent layer keeps no per-position history: its state after token t is all it knows,
so it cannot be rolled back to an earlier position. The cache therefore records how many
tokens its state has absorbed (`pos`), and `keep` keeps a cached prefix only when
the new sequence continues the exact processed sequence; anything else is recomputed from
position 0. That is llama.cpp's behaviour without context checkpoints (its recurrent memory
refuses a partial removal, and the server then reprocesses the prompt). A forward pass that
fails or is interrupted midway leaves some layers advanced and others not: the model marks
the state invalid (`pos = -1`) and the next evaluation starts over.
"""

from __future__ import annotations

import numpy as np

from runtime.hparams import DEFAULT_KV_CACHE_TYPE, HParams

from .kv_cache import KVCache


class RecurrentState:
    """Per recurrent layer: the convolution window conv[d_conv - 1, channels] and the delta-rule
    matrices delta[n_v_heads, head_v, head_k] (layouts in runtime.kernels.deltanet), float32."""

    def __init__(self, hp: HParams):
        shape = hp.recurrent
        n = len(shape.layers)
        self.conv = np.zeros((n, shape.d_conv - 1, shape.conv_channels), np.float32)
        self.delta = np.zeros((n, shape.n_v_heads, shape.head_v, shape.head_k), np.float32)
        self.pos = 0  # tokens absorbed since the sequence began; -1: invalid (start over)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.delta.nbytes

    def clear(self) -> None:
        self.conv[...] = 0
        self.delta[...] = 0
        self.pos = 0


class HybridCache(KVCache):
    """A KVCache over the attention layers only (slot = `kv_slot[layer]`) plus the recurrent
    state of the others (slot = `recurrent_slot[layer]`)."""

    def __init__(self, hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                 type_v: str = DEFAULT_KV_CACHE_TYPE):
        super().__init__(hp, n_ctx, type_k, type_v)
        recurrent = hp.recurrent.layers
        self.recurrent_slot = {il: i for i, il in enumerate(recurrent)}
        self.kv_slot = {il: i for i, il in enumerate(il for il in range(hp.n_layer) if il not in self.recurrent_slot)}
        self.state = RecurrentState(hp)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.state.nbytes

    def keep(self, n: int, held: int) -> int:
        """The state holds exactly the `held` processed tokens: kept only in full."""
        return n if n == held == self.state.pos else 0

    def copy_from(self, other: "HybridCache", n: int) -> None:
        """Another sequence's first n positions, which for the recurrent state means all of
        it: n must be every token `other` has absorbed (the engine copies a whole prompt)."""
        if n != other.state.pos:
            raise ValueError(f"a recurrent state holds {other.state.pos} tokens and cannot be copied at {n}")
        super().copy_from(other, n)
        self.state.conv[...] = other.state.conv
        self.state.delta[...] = other.state.delta
        self.state.pos = n

    def begin(self, start_pos: int) -> None:
        """Before a forward pass at start_pos: a new sequence clears the state; otherwise the
        state must hold exactly the start_pos tokens before it."""
        if start_pos == 0:
            self.state.clear()
        elif start_pos != self.state.pos:
            raise ValueError(f"the recurrent state holds {self.state.pos} tokens, not {start_pos}: it "
                             "cannot be rolled back; evaluate the sequence from position 0")
        self.state.pos = -1  # until the pass completes

    def end(self, n: int, start_pos: int) -> None:
        self.state.pos = start_pos + n
