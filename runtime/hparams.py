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
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gpt-oss", "granite", "llama", "mistral3", "olmo2",
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

    @property
    def n_kv_layers(self) -> int:
        """Layers with a KV cache: all but the recurrent ones."""
        return self.n_layer - (len(self.recurrent.layers) if self.recurrent else 0)

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
        n_head = int(_scalar(get("attention.head_count")))
        n_head_kv = int(_scalar(get("attention.head_count_kv", n_head)))
        head_dim = int(get("attention.key_length", n_embd // n_head if n_head else 0))
        scaling = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 1.0))
        # llama3-style scaling needs no type: it comes as the rope_freqs tensor
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedModelError(f"RoPE scaling type {scaling!r} is not supported")
        rope_scale = 1.0 / factor if scaling in ("linear", "yarn") and factor > 0 else 1.0
        n_ctx_train = int(get("context_length"))
        # multi-token-prediction blocks (nextn) follow the trunk's; the forward pass skips them
        n_layer = int(get("block_count")) - int(get("nextn_predict_layers", 0))
        return check_hparams(cls(
            arch=arch,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx_train,
            n_embd=n_embd,
            n_layer=n_layer,
            n_ff=int(_scalar(get("feed_forward_length"))),
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
        ))


# field -> its metadata key (after "{arch}."), for the messages of check_hparams
_KEYS = {"n_vocab": "vocabulary size (rows of token_embd.weight)", "n_ctx_train": "context_length",
         "n_embd": "embedding_length", "n_layer": "block_count", "n_ff": "feed_forward_length",
         "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv",
         "head_dim": "attention.key_length", "head_dim_v": "attention.value_length",
         "n_rot": "rope.dimension_count", "rms_eps": "attention.layer_norm_rms_epsilon",
         "rope_base": "rope.freq_base", "rope_scale": "rope.scaling.factor",
         "sliding_window": "attention.sliding_window",
         "final_logit_softcap": "final_logit_softcapping"}


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
    return hp


def _scalar(value):
    """Per-layer arrays (head counts, ff lengths) must be uniform here; take the one value."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    if arr.size and np.all(arr == arr.flat[0]):
        return arr.flat[0].item()
    raise UnsupportedModelError(f"per-layer hyperparameters {arr.tolist()} are not supported")


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
    [layers with a KV cache, n_kv_head, n_ctx, bytes of one head's row]."""
    return ((hp.n_kv_layers, hp.n_head_kv, n_ctx, kv_row_bytes(type_k, hp.head_dim, "--cache-type-k")),
            (hp.n_kv_layers, hp.n_head_kv, n_ctx, kv_row_bytes(type_v, hp.head_dim_v, "--cache-type-v")))


def kv_cache_bytes(hp: HParams, n_ctx: int, type_k: str = DEFAULT_KV_CACHE_TYPE,
                   type_v: str = DEFAULT_KV_CACHE_TYPE) -> int:
    """What a KV cache of n_ctx positions takes, without allocating one."""
    return sum(int(np.prod(shape)) for shape in kv_cache_shapes(hp, n_ctx, type_k, type_v))
