"""The transformer skeleton every supported architecture shares.

A decoder-only transformer, read straight from a GGUF file:

    x = embed(tokens) [* sqrt(n_embd)]
    for each layer:
        h = rms_norm(x) -> q, k, v projections [+ bias] -> [QK-norm] -> RoPE
        K, V go into the cache; h = attention(q, cached K, V) @ Wo [-> post-norm]
        x = x + h
        h = rms_norm(x) -> act(gate(h)) * up(h) -> down [-> post-norm]
        x = x + h
    logits = rms_norm(x) @ Wout      (Wout = the token embedding when tied)

Each architecture family is a small subclass (llama.py, qwen2.py, ...) that switches on the
bracketed parts through class attributes and a few hooks (which layers slide, which RoPE a
layer uses, how the weights are laid out, what scales the embedding, the residual branches
and the logits). Weight matrices stay quantized on the memory map and go through
runtime.kernels' matvec (one token) and matmul (a batch); only the small 1-D tensors (norm
weights, biases, RoPE factors) are converted to float32 at load. The keys and values a
sequence attends over live in runtime.model.kv_cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime import kernels
from runtime.ggml_types import GGMLType, UnsupportedTypeError
from runtime.hparams import DEFAULT_KV_CACHE_TYPE, HParams, UnsupportedModelError
from runtime.kernels import ops, q8

from .kv_cache import KVCache, Span


# The feed-forward's gated activations, act(gate) * up: the op in runtime.kernels.ops of each.
GATED_ACTIVATIONS = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}


class Matrix(kernels.BlockMatrix):
    """A rows x cols weight matrix: quantized blocks on the memory map, row after row,
    checked once at load (runtime.kernels.BlockMatrix). The blocks are held read-only, as
    the memory map gives them, so every matrix shares one compiled kernel signature."""

    __slots__ = ("name", "_alone")

    def __init__(self, name: str, raw: np.ndarray, qtype: GGMLType, rows: int, cols: int):
        raw = np.asarray(raw).view()
        raw.flags.writeable = False
        super().__init__(raw, qtype, rows, cols)
        self.name = name
        self._alone = None

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """X[n, cols] @ W.T -> [n, rows]: matvec for one token, matmul for a batch."""
        if X.shape[0] == 1:
            return self.alone(X)[0]
        return self.matmul(X)

    @property
    def alone(self) -> "Projections":
        """This matrix as a group of one (its one-token fast path)."""
        if self._alone is None:
            self._alone = Projections(self)
        return self._alone

    def rows_f32(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32[len(ids), cols], decoding only those rows (embedding lookup)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.rows)]
        if bad.size:
            raise IndexError(f"token id {int(bad[0])} is outside the vocabulary of {self.rows}")
        return super().rows_f32(ids)


class Projections:
    """Matrices that read the same input (q, k and v; gate and up): one parallel launch and
    one 8-bit rounding of the input (runtime.kernels.matvec_many / matmul_many)."""

    def __init__(self, *matrices: Matrix):
        self.matrices = matrices
        self.cols = matrices[0].cols
        self.type_ids = np.array([m.type.id for m in matrices], np.int64)
        self.raws = tuple(m.raw for m in matrices)
        self.row_counts = np.array([m.rows for m in matrices], np.int64)
        self.row_bytes = np.array([m.row_bytes for m in matrices], np.int64)
        self.row_blocks = np.array([m.row_blocks for m in matrices], np.int64)
        self.ends = np.cumsum([m.rows for m in matrices]).astype(np.int64)
        self.bounds = list(zip([0, *self.ends[:-1].tolist()], self.ends.tolist()))
        self.total_rows = int(self.ends[-1])
        # every matrix on the integer path: one token goes straight to the kernel, with the
        # arguments above, checked once here (a decoded token makes ~4 calls per layer)
        self.integer = all(m.type.id in q8.INTEGER_TYPES and m.cols == self.cols for m in matrices)

    def __call__(self, X: np.ndarray) -> list[np.ndarray]:
        """[X @ W.T for each matrix W], each [n, W.rows]."""
        if X.shape[0] != 1:
            return kernels.matmul_many(self.matrices, self.cols, X)
        out = np.empty((1, self.total_rows), np.float32)
        x = X[0]
        if len(self.bounds) == 1:  # one matrix: its rows are the whole of out
            parts = (out[0],)
        else:
            parts = tuple([out[0, a:b] for a, b in self.bounds])
        if self.integer and kernels.INTEGER_PATH and x.shape == (self.cols,):
            if x.dtype != np.float32 or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x, np.float32)
            q8.matvec_kernel(self.type_ids, self.raws, self.row_counts, self.row_bytes, self.cols, x, parts)
        else:
            kernels.matvec_many(self.matrices, self.cols, x, list(parts))
        if len(self.bounds) == 1:
            return [out]
        return [out[:, a:b] for a, b in self.bounds]


@dataclass
class Layer:
    attn_norm: np.ndarray | None  # None: no norm before attention (OLMo 2)
    wq: Matrix
    wk: Matrix
    wv: Matrix
    qkv: Projections  # wq, wk, wv in one launch
    wo: Matrix
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    post_attn_norm: np.ndarray | None
    ffn_norm: np.ndarray | None
    w_gate: Matrix | None  # None: a mixture of experts in place of the dense FFN
    w_up: Matrix | None
    gate_up: Projections | None  # w_gate, w_up in one launch
    w_down: Matrix | None
    post_ffn_norm: np.ndarray | None
    sliding: bool  # attends over the last `sliding_window` positions only
    rope_inv_freq: np.ndarray  # radians per position of each rotated pair; empty: no RoPE
    rope_mscale: float  # multiplies the rotated dimensions of q and k (ggml's mscale)
    experts: object = None  # the family's mixture of experts (its feed_forward runs it)
    attn_sinks: np.ndarray | None = None  # per head, a logit in the softmax's denominator (gpt-oss)


class Transformer:
    """The shared forward pass; subclasses state how their family differs."""

    architecture: str = ""  # general.architecture this class runs
    rope_neox: bool = False  # rotate pairs (i, i + n_rot/2) instead of (2i, 2i+1)
    attention_bias: bool = False  # q/k/v projections have biases (also loaded when present)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    qk_norm_whole: bool = False  # ... over the whole q and k projections instead (OLMo 2)
    pre_norms: bool = True  # RMSNorm on the input of attention and FFN
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before the residual add
    ffn_activation: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    scale_embedding: bool = False  # multiply token embeddings by sqrt(n_embd)
    embedding_scale: float = 1.0  # multiplies token embeddings (Granite)
    residual_scale: float = 1.0  # multiplies the attention and FFN outputs (Granite)
    logit_scale: float = 1.0  # multiplies the logits (Granite: 1 / its logit_scale)
    attn_softcap: float = 0.0  # > 0: attention scores soft-capped at this (Gemma 2)
    ffn_norm_tensor: str = "ffn_norm.weight"  # the FFN's input norm (after "blk.N.")
    per_layer_shapes: bool = False  # runs layers of different head counts, head and FFN sizes (Gemma 4)
    # layer tensors (after "blk.N.") the family's files may have but this build does not run:
    # refused by name rather than ignored
    unsupported_tensors: tuple[str, ...] = ()

    def __init__(self, gguf_file):
        self.gguf = gguf_file
        md = gguf_file.metadata
        arch = str(md.get("general.architecture", "?"))
        if arch != self.architecture:
            raise UnsupportedModelError(f"{type(self).__name__} runs {self.architecture!r}, not {arch!r}")
        self._tensors = gguf_file.tensors
        for name in self.unsupported_tensors:
            if f"blk.0.{name}" in self._tensors:
                raise UnsupportedModelError(f"{arch} models with a {name} tensor are not supported")
        # rope.scaling.attn_factor multiplies the rotated dimensions (llama.cpp, every family)
        self.rope_attn_factor = float(md.get(f"{arch}.rope.scaling.attn_factor", 1.0))
        embd = self._tensor("token_embd.weight")
        self.hp = hp = self.adjust_hparams(HParams.from_metadata(md, n_vocab=int(embd.shape[1])))
        self.check_hparams()
        if self.ffn_activation not in GATED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.ffn_activation!r} (known: {', '.join(GATED_ACTIVATIONS)})")
        self.activation_op = GATED_ACTIVATIONS[self.ffn_activation]

        self.token_embd = self._matrix("token_embd.weight", hp.n_vocab, hp.n_embd)
        self.output_norm = self._vector("output_norm.weight", hp.n_embd)
        if "output.weight" in self._tensors:
            self.output = self._matrix("output.weight", hp.n_vocab, hp.n_embd)
        else:
            self.output = self.token_embd  # tied: the projection runs on the quantized embedding
        self.rope_factors = (self._vector("rope_freqs.weight", hp.n_rot // 2)
                             if "rope_freqs.weight" in self._tensors else np.zeros(0, np.float32))
        self.layers: list[Layer] = [self.load_layer(il) for il in range(hp.n_layer)]
        self.attention_scale = self.attention_scale_for(hp)

    # --- what a family may override -------------------------------------------------------

    def load_layer(self, il: int) -> Layer:
        """Layer il's weights, views on the memory map (a family with other kinds of layer
        overrides this)."""
        hp = self.hp
        q_dim, kv_dim, v_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.head_dim_v
        q_norm_dim, k_norm_dim = (q_dim, kv_dim) if self.qk_norm_whole else (hp.head_dim, hp.head_dim)
        p = f"blk.{il}."
        has_bias = self.attention_bias or p + "attn_q.bias" in self._tensors
        base, scale = self.rope_for_layer(il)
        yarn = hp.rope_scaling == "yarn" and (base, scale) == (hp.rope_base, hp.rope_scale)
        wq, wk, wv = self.attention_matrices(p, q_dim, kv_dim, v_dim)
        return Layer(
            attn_norm=self._vector(p + "attn_norm.weight", hp.n_embd) if self.pre_norms else None,
            wq=wq, wk=wk, wv=wv, qkv=Projections(wq, wk, wv),
            wo=self._matrix(p + "attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v),
            bq=self._vector(p + "attn_q.bias", q_dim) if has_bias else None,
            bk=self._vector(p + "attn_k.bias", kv_dim) if has_bias else None,
            bv=self._vector(p + "attn_v.bias", v_dim) if has_bias else None,
            q_norm=self._vector(p + "attn_q_norm.weight", q_norm_dim) if self.qk_norm else None,
            k_norm=self._vector(p + "attn_k_norm.weight", k_norm_dim) if self.qk_norm else None,
            post_attn_norm=(self._vector(p + "post_attention_norm.weight", hp.n_embd)
                            if self.post_norms else None),
            ffn_norm=self._vector(p + self.ffn_norm_tensor, hp.n_embd) if self.pre_norms else None,
            **self.feed_forward_weights(p),
            post_ffn_norm=self._vector(p + "post_ffw_norm.weight", hp.n_embd) if self.post_norms else None,
            sliding=self.is_sliding(il),
            rope_inv_freq=(np.zeros(0, np.float64) if not self.has_rope(il)
                           else self.yarn_inv_freq(self.rope_factors) if yarn
                           else ops.rope_inv_freq(hp.n_rot, base, scale, self.rope_factors)),
            rope_mscale=self.rope_attn_factor * (self.yarn_mscale() if yarn else 1.0),
        )

    def adjust_hparams(self, hp: HParams) -> HParams:
        """The family's defaults for what its files may leave out (llama.cpp's loader's)."""
        return hp

    def check_hparams(self) -> None:
        hp = self.hp
        if not self.per_layer_shapes and not hp.uniform_layers:
            raise UnsupportedModelError(f"{hp.arch} models with per-layer head counts, head sizes or FFN sizes "
                                        "are not supported")
        if hp.n_head % hp.n_head_kv:
            raise UnsupportedModelError(f"{hp.n_head} query heads do not group over {hp.n_head_kv} KV heads")
        if hp.n_rot > hp.head_dim or hp.n_rot % 2:
            raise UnsupportedModelError(f"RoPE over {hp.n_rot} dimensions of heads of {hp.head_dim}")

    def is_sliding(self, il: int) -> bool:
        """Whether layer il attends over a sliding window (none do by default)."""
        return False

    def sliding_by_pattern(self, il: int, n_pattern: int) -> bool:
        """llama.cpp's sliding-window layer pattern: attention.sliding_window_pattern as one
        flag per layer, or as a period n (layers il % n < n - 1 slide, 0: all), else n_pattern."""
        if self.hp.sliding_window <= 0:
            return False
        value = self.gguf.metadata.get(f"{self.architecture}.attention.sliding_window_pattern")
        if value is not None and np.ndim(value) == 1:
            if len(value) < self.hp.n_layer:
                raise UnsupportedModelError(
                    f"attention.sliding_window_pattern has {len(value)} flags for {self.hp.n_layer} layers")
            return bool(value[il])
        n = n_pattern if value is None else int(value)
        return n == 0 or il % n < n - 1

    def rope_for_layer(self, il: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of layer il's RoPE."""
        return self.hp.rope_base, self.hp.rope_scale

    def has_rope(self, il: int) -> bool:
        """Whether layer il rotates q and k at all."""
        return True

    def rope_frequencies(self, layer: Layer, cache: KVCache) -> np.ndarray:
        """The rotation speeds layer uses with this cache (LongRoPE picks by context size)."""
        return layer.rope_inv_freq

    def scale_queries(self, q: np.ndarray, positions: np.ndarray) -> None:
        """Scale the queries q[n, n_head*head_dim] in place by position (none by default)."""

    def yarn_inv_freq(self, factors: np.ndarray) -> np.ndarray:
        """YaRN's rotation speeds (ggml's rope_yarn with ext_factor 1): each pair's speed is
        blended between the scaled one and the original by a ramp over the pairs, from the
        correction dimensions of yarn_beta_fast (32) and yarn_beta_slow (1) rotations over
        the original context."""
        hp, md, a = self.hp, self.gguf.metadata, self.architecture + "."
        beta_fast = float(md.get(a + "rope.scaling.yarn_beta_fast", 32.0))
        beta_slow = float(md.get(a + "rope.scaling.yarn_beta_slow", 1.0))

        def corr_dim(n_rotations):
            return hp.n_rot * math.log(hp.n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(hp.rope_base))

        low = max(0.0, math.floor(corr_dim(beta_fast)))
        high = min(hp.n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
        extrap = ops.rope_inv_freq(hp.n_rot, hp.rope_base, 1.0, factors)
        k = np.arange(hp.n_rot // 2)
        ramp = 1.0 - np.clip((k - low) / max(0.001, high - low), 0.0, 1.0)
        return extrap * (hp.rope_scale * (1.0 - ramp) + ramp)

    def yarn_mscale(self) -> float:
        """YaRN's magnitude factor as llama.cpp ends up applying it: (1 + 0.1 ln s) /
        (1 + 0.1 m ln s) for scaling factor s and rope.scaling.yarn_log_multiplier m."""
        log_mul = float(self.gguf.metadata.get(f"{self.architecture}.rope.scaling.yarn_log_multiplier", 0.0))
        ln_s = math.log(1.0 / self.hp.rope_scale)
        return (1.0 + 0.1 * ln_s) / (1.0 + 0.1 * log_mul * ln_s)

    def attention_matrices(self, p: str, q_dim: int, kv_dim: int, v_dim: int) -> tuple[Matrix, Matrix, Matrix]:
        """The q, k, v projections of the layer whose tensor names start with p."""
        n_embd = self.hp.n_embd
        return (self._matrix(p + "attn_q.weight", q_dim, n_embd), self._matrix(p + "attn_k.weight", kv_dim, n_embd),
                self._matrix(p + "attn_v.weight", v_dim, n_embd))

    def gate_up_matrices(self, p: str) -> tuple[Matrix, Matrix]:
        """The FFN's gate and up projections of the layer whose tensor names start with p."""
        hp = self.hp
        return (self._matrix(p + "ffn_gate.weight", hp.n_ff, hp.n_embd),
                self._matrix(p + "ffn_up.weight", hp.n_ff, hp.n_embd))

    def feed_forward_weights(self, p: str) -> dict:
        """The Layer fields of the FFN of the layer whose tensor names start with p: the dense
        gate, up and down matrices (a mixture of experts sets `experts` instead)."""
        w_gate, w_up = self.gate_up_matrices(p)
        return dict(w_gate=w_gate, w_up=w_up, gate_up=Projections(w_gate, w_up),
                    w_down=self._matrix(p + "ffn_down.weight", self.hp.n_embd, self.hp.n_ff))

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                  type_v: str = DEFAULT_KV_CACHE_TYPE) -> KVCache:
        """A sequence's cache of n_ctx positions (a family with other per-sequence state
        returns a KVCache subclass that holds it)."""
        return KVCache(self.hp, n_ctx, type_k, type_v)

    @staticmethod
    def attention_scale_for(hp: HParams) -> float:
        return 1.0 / math.sqrt(hp.head_dim)

    # --- loading ------------------------------------------------------------------------

    def _tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"{self.architecture} model has no tensor {name!r}")
        try:
            kernels.supported_type(t.type)
        except UnsupportedTypeError as e:
            raise UnsupportedTypeError(f"tensor {name}: {e}") from None
        return t

    def _matrix(self, name: str, rows: int, cols: int) -> Matrix:
        t = self._tensor(name)
        if tuple(int(s) for s in t.shape) != (cols, rows):
            raise UnsupportedModelError(
                f"tensor {name} has shape {list(t.shape)}, expected [{cols}, {rows}] (GGUF order)")
        return Matrix(name, t.data, t.type, rows, cols)

    def _vector(self, name: str, n: int) -> np.ndarray:
        t = self._tensor(name)
        if t.n_elements != n:
            raise UnsupportedModelError(f"tensor {name} has {t.n_elements} elements, expected {n}")
        return kernels.dequantize(t.data, t.type, n)

    # --- the forward pass ---------------------------------------------------------------

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = self.token_embd.rows_f32(tokens)
        if self.scale_embedding:
            x *= np.float32(math.sqrt(self.hp.n_embd))
        if self.embedding_scale != 1.0:
            x *= np.float32(self.embedding_scale)
        return x

    def forward(self, tokens, start_pos: int, cache: KVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        """Run tokens at positions [start_pos, start_pos + n); their K/V go into the cache.

        Returns the logits of the last token, float32[n_vocab], or of every token,
        float32[n, n_vocab], when all_logits. One token goes through matvec, more through
        matmul; callers choose the batch size (the engine's prefill chunks). hidden: every
        token's final hidden state after the output norm instead, float32[n, n_embd] (what
        llama.cpp pools into embeddings).
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("forward needs at least one token")
        logits = self._forward(tokens, [Span(cache, start_pos, 0, len(tokens))],
                               all_logits or hidden, hidden)
        return logits if all_logits or hidden else logits[0]

    def forward_batch(self, sequences) -> np.ndarray:
        """Several sequences in one pass: sequences is a list of (tokens, start_pos, cache),
        each appending its tokens to its own cache at its own positions (a decode step of
        several users, a prefill chunk beside them). The weight matrices see every token
        of every sequence as one batch (matmul); attention runs per sequence, over its own
        cache. Returns float32[len(sequences), n_vocab]: each sequence's last token's logits.
        """
        spans, parts, row = [], [], 0
        for tokens, start_pos, cache in sequences:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if len(tokens) == 0:
                raise ValueError("every sequence of a batch needs at least one token")
            spans.append(Span(cache, int(start_pos), row, row + len(tokens)))
            parts.append(tokens)
            row += len(tokens)
        if len(set(id(s.cache) for s in spans)) != len(spans):
            raise ValueError("each sequence of a batch needs its own cache")
        if not spans:
            raise ValueError("forward_batch needs at least one sequence")
        return self._forward(np.concatenate(parts), spans, all_logits=False)

    def _forward(self, tokens: np.ndarray, spans: list["Span"], all_logits: bool,
                 hidden: bool = False) -> np.ndarray:
        """The pass over rows `tokens`, grouped into spans (one per sequence); the logits of
        every row (all_logits) or of each span's last row (hidden: the normed states)."""
        hp = self.hp
        for s in spans:
            if s.start < 0 or s.start + s.n > s.cache.n_ctx:
                raise ValueError(f"positions {s.start}..{s.start + s.n - 1} do not fit a cache of {s.cache.n_ctx}")
        positions = np.concatenate([np.arange(s.start, s.start + s.n, dtype=np.int64) for s in spans])
        x = self.embed(tokens)
        inputs = self.layer_inputs(tokens, x)
        h = np.empty_like(x)
        residual_scale = np.float32(self.residual_scale)
        for il, layer in enumerate(self.layers):
            if layer.attn_norm is not None:
                ops.rms_norm(x, layer.attn_norm, hp.rms_eps, h)
            else:
                h[...] = x
            attn = self.attention(il, layer, h, positions, spans)
            if layer.post_attn_norm is not None:
                ops.rms_norm(attn, layer.post_attn_norm, hp.rms_eps, attn)
            if residual_scale != 1:
                attn *= residual_scale
            x += attn
            if layer.ffn_norm is not None:
                ops.rms_norm(x, layer.ffn_norm, hp.rms_eps, h)
            else:
                h[...] = x
            ffn = self.feed_forward(layer, h)
            if layer.post_ffn_norm is not None:
                ops.rms_norm(ffn, layer.post_ffn_norm, hp.rms_eps, ffn)
            if residual_scale != 1:
                ffn *= residual_scale
            x += ffn
            self.end_of_layer(il, layer, x, inputs)
        if not all_logits:
            x = np.ascontiguousarray(x[[s.end - 1 for s in spans]])
        out = np.empty_like(x)
        ops.rms_norm(x, self.output_norm, hp.rms_eps, out)
        if hidden:
            return out
        logits = self.output(out)
        if self.logit_scale != 1.0:
            logits *= np.float32(self.logit_scale)
        if hp.final_logit_softcap:
            cap = np.float32(hp.final_logit_softcap)
            logits = np.tanh(logits / cap) * cap
        return logits

    def layer_inputs(self, tokens: np.ndarray, x: np.ndarray):
        """What end_of_layer needs from a pass's tokens and embeddings x (nothing by default)."""
        return None

    def end_of_layer(self, il: int, layer: Layer, x: np.ndarray, inputs) -> None:
        """Change layer il's output x in place before the next layer (nothing by default)."""

    def attention(self, il: int, layer: Layer, h, positions, spans: list["Span"]):
        hp = self.hp
        n = h.shape[0]
        q, k, v = layer.qkv(h)
        if layer.bq is not None:
            q += layer.bq
            k += layer.bk
            v += layer.bv
        if layer.q_norm is not None and self.qk_norm_whole:
            ops.rms_norm(q, layer.q_norm, hp.rms_eps, q)
            ops.rms_norm(k, layer.k_norm, hp.rms_eps, k)
        elif layer.q_norm is not None:
            ops.rms_norm_heads(q, hp.n_head, hp.head_dim, layer.q_norm, hp.rms_eps)
            ops.rms_norm_heads(k, hp.n_head_kv, hp.head_dim, layer.k_norm, hp.rms_eps)
        inv_freq = self.rope_frequencies(layer, spans[0].cache)
        if inv_freq.size:
            ops.rope(q, positions, hp.n_head, hp.head_dim, hp.n_rot, inv_freq, self.rope_neox)
            ops.rope(k, positions, hp.n_head_kv, hp.head_dim, hp.n_rot, inv_freq, self.rope_neox)
            if layer.rope_mscale != 1.0:  # ggml scales the rotated dimensions only
                m = np.float32(layer.rope_mscale)
                q.reshape(n, hp.n_head, hp.head_dim)[:, :, :hp.n_rot] *= m
                k.reshape(n, hp.n_head_kv, hp.head_dim)[:, :, :hp.n_rot] *= m
        self.scale_queries(q, positions)
        out = np.empty((n, hp.n_head * hp.head_dim_v), np.float32)
        window = hp.sliding_window if layer.sliding else 0
        sinks = {} if layer.attn_sinks is None else {"sinks": layer.attn_sinks}
        for span in spans:  # each sequence over its own cache
            cache, a, b = span.cache, span.begin, span.end
            cache.store(il, span.start, k[a:b], v[a:b])
            ops.attention(q[a:b], cache.k[il], cache.k_ggml.id, cache.k_blocks, cache.v[il], cache.v_ggml.id,
                          cache.v_blocks, span.start, hp.n_head, np.float32(self.attention_scale), window,
                          out[a:b], np.float32(self.attn_softcap), **sinks)
        return layer.wo(out)

    def feed_forward(self, layer: Layer, h):
        gate, up = layer.gate_up(h)
        getattr(ops, self.activation_op)(gate, up)  # looked up here so a test may swap it
        return layer.w_down(gate)
