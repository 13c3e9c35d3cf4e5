"""A sequence's keys and values: the KV cache the attention layers read and write, and the
span of a forward pass that belongs to one sequence.

Apart from the skeleton (runtime.model.base) because what a cache holds and how a row is
stored in it (F32, F16 or ggml's Q8_0 blocks) is one concern; families with other
per-sequence state extend KVCache (runtime.model.recurrent's HybridCache). Not to be
confused with runtime.kernels.cache, which caches compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.ggml_types import ggml_type
from runtime.hparams import DEFAULT_KV_CACHE_TYPE, KV_CACHE_TYPES, HParams, kv_cache_groups, kv_cache_shapes


class KVCache:
    """Keys and values of every layer for positions 0..n_ctx-1, in llama.cpp's cache types.

    Layout [n_layer, n_kv_head, n_ctx, row bytes]: the keys one head attends over are one
    contiguous slab, each head's row stored as F32, F16 (the default) or Q8_0 blocks
    (runtime.hparams.KV_CACHE_TYPES), which the attention kernel reads in place. Memory at
    f16: 2 * n_layer * n_kv_head * n_ctx * head_dim * 2 bytes (Gemma 3 270M at 4096
    positions: 75 MB). Which tokens are stored is the engine's business.
    """

    def __init__(self, hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                 type_v: str = DEFAULT_KV_CACHE_TYPE):
        self.n_ctx, self.type_k, self.type_v = n_ctx, type_k, type_v
        k_shape, v_shape = kv_cache_shapes(hp, n_ctx, type_k, type_v)  # checks the types
        self.k = np.zeros(k_shape, np.uint8)
        self.v = np.zeros(v_shape, np.uint8)
        self.k_ggml = ggml_type(KV_CACHE_TYPES[type_k])
        self.v_ggml = ggml_type(KV_CACHE_TYPES[type_v])
        self.k_blocks = hp.head_dim // self.k_ggml.block_elems  # blocks per head's row
        self.v_blocks = hp.head_dim_v // self.v_ggml.block_elems

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, il: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write the rows k[n, n_kv_head*head_dim] and v (float32) at positions start.."""
        store_rows(self.k[il], self.type_k, start, k)
        store_rows(self.v[il], self.type_v, start, v)

    # What the engine asks of a sequence's cache beyond the forward pass; a cache that also
    # holds a recurrent state overrides both.

    def keep(self, n: int, held: int) -> int:
        """The cache holds `held` positions and the engine wants to keep the first n of them:
        how many it can keep (the rest is recomputed). Keys and values of the first n
        positions stay valid whatever follows them, so all n."""
        return n

    def copy_from(self, other: "KVCache", n: int) -> None:
        """Positions 0..n-1 of `other` (a cache of the same shape and types) into this one:
        one prompt's prefill shared by several sequences (n > 1 choices)."""
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]


class GroupedKVCache(KVCache):
    """A KVCache whose layers differ in KV heads or head size (Gemma 4's sliding and global
    layers): one K and one V array per shape (runtime.hparams.kv_cache_groups), each laid out
    as KVCache's. Layers that attend over another layer's keys and values have none here."""

    def __init__(self, hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                 type_v: str = DEFAULT_KV_CACHE_TYPE):
        self.n_ctx, self.type_k, self.type_v = n_ctx, type_k, type_v
        self.k_ggml = ggml_type(KV_CACHE_TYPES[type_k])
        self.v_ggml = ggml_type(KV_CACHE_TYPES[type_v])
        groups = kv_cache_groups(hp, n_ctx, type_k, type_v)  # checks the types
        self.ks = [np.zeros(g.k_shape, np.uint8) for g in groups]
        self.vs = [np.zeros(g.v_shape, np.uint8) for g in groups]
        self.slot = {il: (g, i) for g, group in enumerate(groups) for i, il in enumerate(group.layers)}
        self.blocks = {il: (hp.head_dim_at(il) // self.k_ggml.block_elems,
                            hp.head_dim_v_at(il) // self.v_ggml.block_elems) for il in self.slot}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.ks, *self.vs))

    def layer(self, il: int) -> tuple[np.ndarray, int, np.ndarray, int]:
        """Layer il's (keys, blocks per key row, values, blocks per value row)."""
        g, i = self.slot[il]
        k_blocks, v_blocks = self.blocks[il]
        return self.ks[g][i], k_blocks, self.vs[g][i], v_blocks

    def store(self, il: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        keys, _, values, _ = self.layer(il)
        store_rows(keys, self.type_k, start, k)
        store_rows(values, self.type_v, start, v)

    def copy_from(self, other: "GroupedKVCache", n: int) -> None:
        for mine, theirs in zip((*self.ks, *self.vs), (*other.ks, *other.vs)):
            mine[:, :, :n] = theirs[:, :, :n]


@dataclass
class Span:
    """One sequence's rows begin..end-1 of a forward pass, at positions start.. of its cache."""

    cache: KVCache
    start: int
    begin: int
    end: int

    @property
    def n(self) -> int:
        return self.end - self.begin


def store_rows(layer: np.ndarray, cache_type: str, start: int, x: np.ndarray) -> None:
    """x[n, n_heads*head_dim] into layer[n_heads, n_ctx, row bytes] at positions start.."""
    n_heads = layer.shape[0]
    n = x.shape[0]
    heads = x.reshape(n, n_heads, -1).transpose(1, 0, 2)  # [n_heads, n, head_dim]
    dest = layer[:, start:start + n]
    if cache_type == "q8_0":
        dest[...] = q8_0_rows(heads)
    else:
        dest.view(np.float32 if cache_type == "f32" else np.float16)[...] = heads


def q8_0_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows x[..., head_dim] as Q8_0 bytes [..., head_dim/32*34], as ggml's reference
    quantizer computes them: per 32 values d = max|x| / 127, q = round(x / d) with halves
    away from zero (C's roundf), d stored as f16."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    scaled = np.abs(blocks * inv)
    q = np.floor(scaled)
    q += scaled - q >= 0.5
    out = np.empty((*blocks.shape[:-1], 34), np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = np.copysign(q, blocks).astype(np.int8).view(np.uint8)
    return out.reshape(*x.shape[:-1], -1)
