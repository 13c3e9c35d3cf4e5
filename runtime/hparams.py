"""The numbers that size a model's run: its shapes from the GGUF metadata, the engine's
default context and prefill batch, and the KV cache they imply.

Apart from runtime.model so that what needs only these numbers (--info's memory estimate,
runtime.memory) does not import the kernels and Numba.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.ggml_types import ggml_type

# The KV cache's element types by llama.cpp's -ctk/-ctv names, and the GGML type each
# stores a head's row in (q8_0: ggml's Q8_0 blocks, an f16 scale and 32 int8 values).
KV_CACHE_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
DEFAULT_KV_CACHE_TYPE = "f16"  # llama.cpp's default: half the memory of f32
DEFAULT_N_CTX = 4096  # the engine's context when none is asked for (at most the model's own)
PREFILL_CHUNK = 256  # tokens per prefill matmul batch: big enough to reuse each decoded weight row
DEFAULT_CTX_CHECKPOINTS = 32  # llama.cpp's --ctx-checkpoints: a hybrid model's recurrent-state copies per slot


def default_n_ctx(n_ctx_train: int) -> int:
    """The context the engine gets when none is asked for."""
    return min(n_ctx_train, DEFAULT_N_CTX)


# general.architecture values runtime.model runs (its ARCHITECTURES, which imports the
# kernels); here so --info can name them without loading Numba
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma4", "gpt-oss", "granite", "llama", "mistral3", "olmo2",
                           "phi3", "qwen2", "qwen3", "qwen35", "qwen35moe", "qwen3moe", "smollm3")


def unsupported_architecture_message(arch: str) -> str:
    return f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"


class UnsupportedModelError(ValueError):
    """A GGUF file this build cannot run: unknown architecture, missing tensor, bad shape."""


class CacheTypeError(ValueError):
    """A KV cache type (-ctk/-ctv) that does not exist or does not fit the model's heads."""


@dataclass(frozen=True)
class RecurrentShape:
    """The Gated DeltaNet layers of a hybrid model (qwen35, qwen35moe) and the state each
    carries from token to token, from the `{arch}.ssm.*` keys as llama.cpp reads them:
    a convolution window of the last conv_kernel - 1 projected rows (q, k and v of every
    head: 2 * group_count * state_size + inner_size channels) and a state_size x head_v
    matrix per value head (time_step_rank heads of inner_size / time_step_rank), float32."""

    layers: tuple[int, ...]  # the recurrent layers; the others are full attention
    d_conv: int  # ssm.conv_kernel
    n_k_heads: int  # ssm.group_count
    n_v_heads: int  # ssm.time_step_rank
    head_k: int  # ssm.state_size
    head_v: int  # ssm.inner_size / ssm.time_step_rank

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.head_k + self.n_v_heads * self.head_v

    @property
    def layer_bytes(self) -> int:
        """One layer's state for one sequence: the convolution window and the delta-rule matrices."""
        return 4 * ((self.d_conv - 1) * self.conv_channels + self.n_v_heads * self.head_v * self.head_k)

    @property
    def nbytes(self) -> int:
        return len(self.layers) * self.layer_bytes

    @classmethod
    def from_metadata(cls, md: dict, arch: str, n_layer: int) -> "RecurrentShape | None":
        a = arch + "."
        if a + "ssm.conv_kernel" not in md:
            return None
        marks = md.get(a + "attention.recurrent_layers")
        if marks is not None:
            layers = tuple(i for i, m in enumerate(np.asarray(marks).reshape(-1)[:n_layer].tolist()) if m)
        else:
            interval = int(md.get(a + "full_attention_interval", 4))
            if interval < 1:
                raise UnsupportedModelError(f"the model's {a}full_attention_interval is {interval}, but it "
                                            "must be at least 1: the file's metadata is wrong")
            layers = tuple(i for i in range(n_layer) if (i + 1) % interval)
        try:
            shape = cls(layers=layers, d_conv=int(md[a + "ssm.conv_kernel"]), n_k_heads=int(md[a + "ssm.group_count"]),
                        n_v_heads=int(md[a + "ssm.time_step_rank"]), head_k=int(md[a + "ssm.state_size"]),
                        head_v=int(md[a + "ssm.inner_size"]) // max(1, int(md[a + "ssm.time_step_rank"])))
        except KeyError as e:
            raise UnsupportedModelError(f"{arch} model has no metadata key {e.args[0]!r}") from None
        for what, value in (("ssm.conv_kernel", shape.d_conv), ("ssm.group_count", shape.n_k_heads),
                            ("ssm.time_step_rank", shape.n_v_heads), ("ssm.state_size", shape.head_k)):
            if value < 1:
                raise UnsupportedModelError(f"the model's {a}{what} is {value}, but it must be at least 1: "
                                            "the file's metadata is wrong")
        if shape.n_v_heads % shape.n_k_heads or shape.head_v != shape.head_k:
            raise UnsupportedModelError(
                f"{arch}: {shape.n_v_heads} value heads of {shape.head_v} over {shape.n_k_heads} key heads of "
                f"{shape.head_k} is not a Gated DeltaNet layout llama.cpp runs (the value heads must be a "
                "multiple of the key heads, of the same size): the file's metadata is wrong")
        return shape


@dataclass(frozen=True)
class HParams:
    """The numbers that shape the network, from the GGUF metadata `{arch}.*` keys."""

    arch: str
    n_vocab: int
    n_ctx_train: int  # context_length the model was trained for
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # of queries and keys (attention.key_length)
    head_dim_v: int  # of values (attention.value_length)
    n_rot: int  # leading dimensions of each head that RoPE rotates
    rms_eps: float
    rope_base: float
    rope_scale: float  # multiplies every rotation speed: 1 / rope.scaling.factor when linear
    sliding_window: int  # 0: none
    final_logit_softcap: float  # 0: none
    rope_scaling: str = "none"  # rope.scaling.type: none, linear or yarn
    n_ctx_orig: int = 0  # rope.scaling.original_context_length (YaRN, LongRoPE), else n_ctx_train
    recurrent: RecurrentShape | None = None  # hybrid models: the layers with a recurrent state
    # Per-layer values where the metadata gives an array that is not uniform (Gemma 4: KV
    # heads and FFN sizes per layer); empty: every layer has the scalar above, which for a
    # non-uniform array holds its largest value (a bound, for memory estimates). Only a
    # family that reads them (Transformer.per_layer_shapes) runs such a model.
    n_head_layers: tuple[int, ...] = ()
    n_head_kv_layers: tuple[int, ...] = ()
    n_ff_layers: tuple[int, ...] = ()
    # Sliding-window layers with a head size, RoPE dimensions and base of their own (Gemma 4's
    # *_swa keys); 0: as the other layers. sliding_layers: attention.sliding_window_pattern
    # when the file gives it as one flag per layer, else empty.
    sliding_layers: tuple[bool, ...] = ()
    head_dim_swa: int = 0
    n_rot_swa: int = 0
    rope_base_swa: float = 0.0
    n_kv_shared_layers: int = 0  # the last layers attend over earlier layers' K/V (Gemma 4)
    n_embd_per_layer: int = 0  # per-layer embedding inputs (Gemma 4's embedding_length_per_layer_input)

    @property
    def n_kv_layers(self) -> int:
        """Layers with a KV cache of their own: all but the recurrent and the KV-sharing ones."""
        return len(self.kv_layers)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        recurrent = set(self.recurrent.layers) if self.recurrent else set()
        return tuple(il for il in range(self.n_layer - self.n_kv_shared_layers) if il not in recurrent)

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has the same heads, head sizes and FFN size."""
        return not (self.n_head_layers or self.n_head_kv_layers or self.n_ff_layers
                    or (self.head_dim_swa and self.head_dim_swa != self.head_dim))

    def is_swa(self, il: int) -> bool:
        """Layer il slides, as the per-layer pattern says (False without one)."""
        return bool(self.sliding_layers[il]) if self.sliding_layers else False

    def n_head_at(self, il: int) -> int:
        return self.n_head_layers[il] if self.n_head_layers else self.n_head

    def n_head_kv_at(self, il: int) -> int:
        return self.n_head_kv_layers[il] if self.n_head_kv_layers else self.n_head_kv

    def n_ff_at(self, il: int) -> int:
        return self.n_ff_layers[il] if self.n_ff_layers else self.n_ff

    def head_dim_at(self, il: int) -> int:
        """Layer il's key (and, where they differ only by layer kind, value) head size."""
        return self.head_dim_swa if self.head_dim_swa and self.is_swa(il) else self.head_dim

    def head_dim_v_at(self, il: int) -> int:
        return self.head_dim_swa if self.head_dim_swa and self.is_swa(il) else self.head_dim_v

    def n_rot_at(self, il: int) -> int:
        return self.n_rot_swa if self.n_rot_swa and self.is_swa(il) else self.n_rot

    @classmethod
    def from_metadata(cls, md: dict, n_vocab: int) -> "HParams":
        arch = str(md["general.architecture"])

        def get(key, default=None):
            full = f"{arch}.{key}"
            if full in md:
                return md[full]
            if default is None:
                raise UnsupportedModelError(f"{arch} model has no metadata key {full!r}")
            return default

        n_embd = int(get("embedding_length"))
        n_layer_all = int(get("block_count"))
        n_head, n_head_layers = _per_layer(get("attention.head_count"), n_layer_all, "attention.head_count")
        n_head_kv, n_head_kv_layers = _per_layer(get("attention.head_count_kv", n_head), n_layer_all,
                                                 "attention.head_count_kv")
        n_ff, n_ff_layers = _per_layer(get("feed_forward_length"), n_layer_all, "feed_forward_length")
        pattern = md.get(f"{arch}.attention.sliding_window_pattern")
        sliding = (tuple(bool(v) for v in np.asarray(pattern).reshape(-1)[:n_layer_all].tolist())
                   if pattern is not None and np.ndim(pattern) == 1 else ())
        if sliding and len(sliding) < n_layer_all:
            raise UnsupportedModelError(f"{arch}.attention.sliding_window_pattern has {len(sliding)} flags for "
                                        f"{n_layer_all} layers: the file's metadata is wrong")
        head_dim = int(get("attention.key_length", n_embd // n_head if n_head else 0))
        scaling = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 1.0))
        # llama3-style scaling needs no type: it comes as the rope_freqs tensor
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedModelError(f"RoPE scaling type {scaling!r} is not supported")
        rope_scale = 1.0 / factor if scaling in ("linear", "yarn") and factor > 0 else 1.0
        n_ctx_train = int(get("context_length"))
        # multi-token-prediction blocks (nextn) follow the trunk's; the forward pass skips them
        n_layer = n_layer_all - int(get("nextn_predict_layers", 0))
        return check_hparams(cls(
            arch=arch,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx_train,
            n_embd=n_embd,
            n_layer=n_layer,
            n_ff=n_ff,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=int(get("attention.value_length", head_dim)),
            n_rot=int(get("rope.dimension_count", head_dim)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scale=rope_scale,
            sliding_window=int(get("attention.sliding_window", 0)),
            final_logit_softcap=float(get("final_logit_softcapping", 0.0)),
            rope_scaling=scaling,
            n_ctx_orig=int(get("rope.scaling.original_context_length", n_ctx_train)),
            recurrent=RecurrentShape.from_metadata(md, arch, n_layer),
            n_head_layers=n_head_layers,
            n_head_kv_layers=n_head_kv_layers,
            n_ff_layers=n_ff_layers,
            sliding_layers=sliding,
            head_dim_swa=int(get("attention.key_length_swa", 0)),
            n_rot_swa=int(get("rope.dimension_count_swa", 0)),
            rope_base_swa=float(get("rope.freq_base_swa", 0.0)),
            n_kv_shared_layers=int(get("attention.shared_kv_layers", 0)),
            n_embd_per_layer=int(get("embedding_length_per_layer_input", 0)),
        ))


# field -> its metadata key (after "{arch}."), for the messages of check_hparams
_KEYS = {"n_vocab": "vocabulary size (rows of token_embd.weight)", "n_ctx_train": "context_length",
         "n_embd": "embedding_length", "n_layer": "block_count", "n_ff": "feed_forward_length",
         "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv",
         "head_dim": "attention.key_length", "head_dim_v": "attention.value_length",
         "n_rot": "rope.dimension_count", "rms_eps": "attention.layer_norm_rms_epsilon",
         "rope_base": "rope.freq_base", "rope_scale": "rope.scaling.factor",
         "sliding_window": "attention.sliding_window",
         "final_logit_softcap": "final_logit_softcapping", "head_dim_swa": "attention.key_length_swa",
         "n_rot_swa": "rope.dimension_count_swa", "n_kv_shared_layers": "attention.shared_kv_layers",
         "n_embd_per_layer": "embedding_length_per_layer_input"}


def check_hparams(hp: HParams) -> HParams:
    """hp, or an UnsupportedModelError naming the first value no model can have (a broken
    or hostile file), before anything divides by it or hands it to a kernel."""
    def bad(field: str, value, need: str) -> UnsupportedModelError:
        key = _KEYS[field]
        where = key if " " in key else f"{hp.arch}.{key}"
        value = f"{value:.6g}" if isinstance(value, float) else value
        return UnsupportedModelError(f"the model's {where} is {value}, but it must be {need}: "
                                     "the file's metadata is wrong")

    for field in ("n_vocab", "n_ctx_train", "n_embd", "n_layer", "n_ff", "n_head", "n_head_kv",
                  "head_dim", "head_dim_v"):
        if getattr(hp, field) < 1:
            raise bad(field, getattr(hp, field), "at least 1")
    if hp.n_head % hp.n_head_kv:
        raise bad("n_head_kv", hp.n_head_kv, f"a divisor of the {hp.n_head} attention heads")
    if not 0 <= hp.n_rot <= hp.head_dim or hp.n_rot % 2:
        raise bad("n_rot", hp.n_rot, f"an even number from 0 to the head size {hp.head_dim}")
    if not (math.isfinite(hp.rms_eps) and 0 < hp.rms_eps < 1):
        raise bad("rms_eps", hp.rms_eps, "a small positive number (such as 1e-6)")
    if not (math.isfinite(hp.rope_base) and hp.rope_base > 0):
        raise bad("rope_base", hp.rope_base, "a positive number (such as 10000)")
    if not (math.isfinite(hp.rope_scale) and hp.rope_scale > 0):
        raise bad("rope_scale", 1 / hp.rope_scale if hp.rope_scale else float("inf"),
                  "a positive, finite number")
    if hp.sliding_window < 0:
        raise bad("sliding_window", hp.sliding_window, "0 (none) or more")
    if not (math.isfinite(hp.final_logit_softcap) and hp.final_logit_softcap >= 0):
        raise bad("final_logit_softcap", hp.final_logit_softcap, "0 (none) or a positive number")
    for il in range(hp.n_layer):
        for field, value in (("n_head", hp.n_head_at(il)), ("n_head_kv", hp.n_head_kv_at(il)),
                             ("n_ff", hp.n_ff_at(il))):
            if value < 1:
                raise bad(field, value, f"at least 1 in every layer (layer {il})")
        if hp.n_head_at(il) % hp.n_head_kv_at(il):
            raise bad("n_head_kv", hp.n_head_kv_at(il), f"a divisor of layer {il}'s {hp.n_head_at(il)} attention heads")
    if hp.head_dim_swa < 0:
        raise bad("head_dim_swa", hp.head_dim_swa, "0 (as the other layers) or more")
    if hp.head_dim_swa and not 0 <= hp.n_rot_swa <= hp.head_dim_swa or hp.n_rot_swa % 2:
        raise bad("n_rot_swa", hp.n_rot_swa, f"an even number from 0 to the sliding head size {hp.head_dim_swa}")
    if not 0 <= hp.n_kv_shared_layers < hp.n_layer:
        raise bad("n_kv_shared_layers", hp.n_kv_shared_layers, f"fewer than the {hp.n_layer} layers")
    if hp.n_embd_per_layer < 0:
        raise bad("n_embd_per_layer", hp.n_embd_per_layer, "0 (none) or more")
    return hp


def _scalar(value):
    """A value that must be uniform across layers (expert counts and sizes); take the one value."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    if arr.size and np.all(arr == arr.flat[0]):
        return arr.flat[0].item()
    raise UnsupportedModelError(f"per-layer hyperparameters {arr.tolist()} are not supported")


def _per_layer(value, n_layer: int, key: str) -> tuple[int, tuple[int, ...]]:
    """A metadata value that may be one number or one per layer (head counts, FFN sizes):
    (the value, ()) when it is uniform, else (its largest value, the per-layer values)."""
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0:
        raise UnsupportedModelError(f"the model's {key} is an empty array: the file's metadata is wrong")
    if np.all(arr == arr[0]):
        return int(arr[0]), ()
    if arr.size < n_layer:
        raise UnsupportedModelError(f"the model's {key} has {arr.size} values for {n_layer} layers: "
                                    "the file's metadata is wrong")
    values = tuple(int(v) for v in arr[:n_layer].tolist())
    return max(values), values


def kv_row_bytes(cache_type: str, head_dim: int, flag: str = "--cache-type-k") -> int:
    """Bytes one head's key (or value) at one position takes in a cache of `cache_type`;
    a CacheTypeError naming `flag` when the type is unknown or does not divide the head."""
    if cache_type not in KV_CACHE_TYPES:
        raise CacheTypeError(f"{flag} {cache_type!r} is not a KV cache type "
                             f"(choose one of {', '.join(KV_CACHE_TYPES)})")
    t = ggml_type(KV_CACHE_TYPES[cache_type])
    if head_dim % t.block_elems:
        raise CacheTypeError(f"{flag} {cache_type} stores blocks of {t.block_elems} values, but this "
                             f"model's heads have {head_dim}; use {flag} f16")
    return t.row_bytes(head_dim)


def kv_cache_shapes(hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                    type_v: str = DEFAULT_KV_CACHE_TYPE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Byte shapes of the K and V arrays of a cache of n_ctx positions (runtime.model.KVCache):
    [layers with a KV cache, n_kv_head, n_ctx, bytes of one head's row]. Layers of several
    shapes (Gemma 4) take one pair per shape instead: kv_cache_groups."""
    if not hp.uniform_layers:
        raise ValueError("the layers' K/V shapes differ: one cache array per shape (kv_cache_groups)")
    return ((hp.n_kv_layers, hp.n_head_kv, n_ctx, kv_row_bytes(type_k, hp.head_dim, "--cache-type-k")),
            (hp.n_kv_layers, hp.n_head_kv, n_ctx, kv_row_bytes(type_v, hp.head_dim_v, "--cache-type-v")))


@dataclass(frozen=True)
class KVGroup:
    """The layers whose keys and values have one shape, and the byte shapes of their K and V
    arrays: [len(layers), n_kv_head, n_ctx, bytes of one head's row]."""

    layers: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]


def kv_cache_groups(hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                    type_v: str = DEFAULT_KV_CACHE_TYPE) -> list[KVGroup]:
    """The layers with a KV cache of their own, grouped by the shape of their keys and
    values (one group unless the layers differ, as Gemma 4's sliding and global ones do)."""
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for il in hp.kv_layers:
        by_shape.setdefault((hp.n_head_kv_at(il), hp.head_dim_at(il), hp.head_dim_v_at(il)), []).append(il)
    return [KVGroup(tuple(layers),
                    (len(layers), n_kv, n_ctx, kv_row_bytes(type_k, head_k, "--cache-type-k")),
                    (len(layers), n_kv, n_ctx, kv_row_bytes(type_v, head_v, "--cache-type-v")))
            for (n_kv, head_k, head_v), layers in by_shape.items()]


def kv_cache_bytes(hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                   type_v: str = DEFAULT_KV_CACHE_TYPE) -> int:
    """What a KV cache of n_ctx positions takes, without allocating one."""
    return sum(int(np.prod(g.k_shape)) + int(np.prod(g.v_shape)) for g in kv_cache_groups(hp, n_ctx, type_k, type_v))
