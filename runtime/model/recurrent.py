"""The cache of a hybrid model (Qwen3.5: Gated DeltaNet layers among full-attention ones):
a KV cache for the attention layers and a recurrent state for the others.

A recurrent layer keeps no per-position history: its state after token t is all it knows,
so it cannot be rolled back to an earlier position. The cache therefore records how many
tokens its state has absorbed (`pos`), and keeps copies of the state at a few earlier
positions: context checkpoints, as llama.cpp's server keeps them (`--ctx-checkpoints N`).
`keep` keeps a cached prefix whole when the new sequence continues the processed one;
otherwise it restores the newest checkpoint within the shared prefix, the attention layers'
keys and values up to it staying valid (later positions are simply overwritten), and else
starts from position 0. Which positions get a checkpoint, and how many are kept, is the
engine's policy (runtime.engine), taking and restoring them this cache's. A forward pass that
fails or is interrupted midway leaves some layers advanced and others not: the model marks
the state invalid (`pos = -1`), and the next evaluation starts over, its checkpoints dropped
with it.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Checkpoint:
    """The recurrent state after the sequence's first `pos` tokens (llama.cpp's context
    checkpoint): restored, and the tokens from pos on recomputed, it gives what evaluating
    the whole sequence gives. Never written after it is taken, so copies of a slot share it.
    `request` is the engine's number of the prompt that took it (eviction spares the
    current prompt's)."""

    pos: int
    conv: np.ndarray
    delta: np.ndarray
    request: int

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.delta.nbytes


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
        self.checkpoints: list[Checkpoint] = []  # oldest first, at increasing positions

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.state.nbytes

    def keep(self, n: int, held: int) -> int:
        """Of the `held` processed tokens, keep the first n, as far as the state allows: all n
        when the state holds exactly them (n == held); else the newest checkpoint at or
        before n, restored; else none. Checkpoints past what is kept are dropped (the tokens
        they absorbed are no longer the sequence's); after a failed pass, all of them."""
        if self.state.pos < 0:
            self.checkpoints.clear()
            return 0
        kept = n if n == held == self.state.pos else 0
        if not kept:
            usable = [c for c in self.checkpoints if c.pos <= n]
            if usable:  # the newest first, as llama.cpp searches
                kept = self.restore(usable[-1])
        self.checkpoints = [c for c in self.checkpoints if c.pos <= kept]
        return kept

    def restore(self, checkpoint: Checkpoint) -> int:
        """Put the state back to a checkpoint; the position it resumes at."""
        self.state.conv[...] = checkpoint.conv
        self.state.delta[...] = checkpoint.delta
        self.state.pos = checkpoint.pos
        return checkpoint.pos

    def checkpoint(self, limit: int, min_step: int, request: int) -> None:
        """Save the state at its position, keeping at most `limit` checkpoints as llama.cpp's
        server does (create_checkpoint): when the list is full, those within min_step tokens
        after the previous one kept go first (unless taken for the current request), then
        the oldest; one already at this position is replaced."""
        pos = self.state.pos
        if limit <= 0 or pos <= 0:
            return
        kept = self.checkpoints
        if len(kept) + 1 >= limit:
            thinned, last = [], -1
            for c in kept:
                if c.request != request and last >= 0 and c.pos <= last + min_step:
                    continue
                thinned.append(c)
                last = c.pos
            kept = thinned
        kept = kept[len(kept) - limit + 1:] if len(kept) >= limit else kept
        kept = [c for c in kept if c.pos != pos]
        self.checkpoints = kept + [Checkpoint(pos, self.state.conv.copy(), self.state.delta.copy(), request)]

    def copy_from(self, other: "HybridCache", n: int) -> None:
        """Another sequence's first n positions, which for the recurrent state means all of
        it: n must be every token `other` has absorbed (the engine copies a whole prompt)."""
        if n != other.state.pos:
            raise ValueError(f"a recurrent state holds {other.state.pos} tokens and cannot be copied at {n}")
        super().copy_from(other, n)
        self.state.conv[...] = other.state.conv
        self.state.delta[...] = other.state.delta
        self.state.pos = n
        self.checkpoints = list(other.checkpoints)  # of the same tokens now; never written

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
