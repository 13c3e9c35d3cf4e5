"""llama.cpp's file-type mixes: which type each tensor of a model gets.

A "mix" (Q4_K_M, Q3_K_S, ...) is llama.cpp's name for a rule that gives each tensor its type:
most weights get the mix's base type, a few sensitive ones (attn_v, ffn_down of some layers,
the output matrix) get more bits, 1-D tensors (norms, biases) stay as they are, and rows
whose length does not fill a 256-element super-block fall back to a legacy 32-element type.
The rules here state the facts of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp)
for these mixes, written as one small function per tensor category. plan() applies them to
a model; bundler/quantize.py writes the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from runtime.ggml_types import GGMLType, ggml_type
from runtime.gguf import GGUFFile, TensorInfo
from runtime.session import UsageError

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class Mix:
    """One of llama.cpp's file types: its name, its general.file_type id, its base type."""

    name: str
    file_type: int  # llama_ftype (LLAMA_FTYPE_MOSTLY_*)
    base: str  # the type of every quantizable tensor no rule singles out


MIXES: dict[str, Mix] = {m.name: m for m in [
    Mix("F32", 0, "F32"), Mix("F16", 1, "F16"), Mix("BF16", 32, "BF16"),
    Mix("Q4_0", 2, "Q4_0"), Mix("Q4_1", 3, "Q4_1"), Mix("Q5_0", 8, "Q5_0"),
    Mix("Q5_1", 9, "Q5_1"), Mix("Q8_0", 7, "Q8_0"),
    Mix("Q2_K", 10, "Q2_K"),
    Mix("Q3_K_S", 11, "Q3_K"), Mix("Q3_K_M", 12, "Q3_K"), Mix("Q3_K_L", 13, "Q3_K"),
    Mix("Q4_K_S", 14, "Q4_K"), Mix("Q4_K_M", 15, "Q4_K"),
    Mix("Q5_K_S", 16, "Q5_K"), Mix("Q5_K_M", 17, "Q5_K"),
    Mix("Q6_K", 18, "Q6_K"),
    Mix("IQ4_NL", 25, "IQ4_NL"), Mix("IQ4_XS", 30, "IQ4_XS"),
    Mix("MXFP4_MOE", 38, "MXFP4"),
]}

# Rows that do not fill the chosen type's blocks get this type instead (llama.cpp's table;
# where it has none, e.g. rows not a multiple of 32, llama.cpp gives up and we use F16).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "IQ4_XS": "IQ4_NL"}
IQ4_MIXES = ("IQ4_NL", "IQ4_XS")

# Substrings of 2-D weights that llama.cpp never quantizes (small, or not matrices in use).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                    "ssm_conv1d", "shortconv.conv.weight", "time_mix_", "attn_rel_b.weight",
                    "position_embd", "token_types.weight", ".rel_pos", ".patch_embd")


def mix_by_name(name: str) -> Mix:
    mix = MIXES.get(name.upper())
    if mix is None:
        raise UsageError(f"unknown quantization type {name!r}; choose one of {', '.join(MIXES)}")
    return mix


@dataclass(frozen=True)
class ModelFacts:
    """What the mix rules need to know about a model beyond a tensor's own name and shape."""

    arch: str
    n_layer: int
    n_gqa: int  # query heads per key/value head
    n_expert: int
    tied_output: bool  # no output.weight: the token embedding doubles as the output matrix
    # the layers with an attn_v-category tensor, in order: llama.cpp counts those tensors, not
    # layers, for attn_v's extra bits (Gemma 4's KV-sharing layers and K-as-V layers have none)
    attn_v_layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, gguf: GGUFFile) -> "ModelFacts":
        md = gguf.metadata
        arch = str(md.get("general.architecture", ""))

        def first(key: str, default: int) -> int:
            value = md.get(f"{arch}.{key}", default)
            arr = np.asarray(value).reshape(-1)
            return int(arr[0]) if arr.size else default

        n_head = first("attention.head_count", 0)
        n_head_kv = first("attention.head_count_kv", n_head)
        return cls(arch=arch,
                   n_layer=first("block_count", 0),
                   n_gqa=n_head // n_head_kv if n_head_kv else 0,
                   n_expert=first("expert_count", 0),
                   tied_output="output.weight" not in gguf.tensors,
                   attn_v_layers=tuple(sorted(_layer_of(name) for name in gguf.tensors
                                              if _category(name) == "attn_v")))

    @property
    def is_llama_70b(self) -> bool:
        """llama.cpp gives the 70B Llama's attn_v (shared by 8 heads) extra bits."""
        return self.arch == "llama" and self.n_layer == 80 and self.n_gqa > 1


def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M/_L mixes: the first and last
    eighth, and every third layer in between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp changes this tensor's type at all: 2-D+ weights, not norms and the like."""
    return (len(shape) >= 2 and name.endswith("weight")
            and not any(s in name for s in _NEVER_QUANTIZED))


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    # fused qkv and MLA's kv_b carry the values: llama.cpp treats them as attn_v
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                           ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                           ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


_LAYER = re.compile(r"blk\.(\d+)\.")


def _layer_of(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else 0


def _output_type(mix: Mix, ncols: int, facts: ModelFacts) -> str:
    """output.weight (and a tied token embedding): Q6_K, or Q8_0 when that does not fit."""
    if facts.arch == "falcon" or ncols % ggml_type(mix.base).block_elems:
        return "Q8_0"
    return "Q8_0" if mix.base == "Q8_0" else "Q6_K"


def _attn_v_type(mix: Mix, layer: int, facts: ModelFacts) -> str:
    # i: this tensor's place among the attn_v tensors, n: how many there are (llama.cpp's
    # i_attention_wv and n_attention_wv); the layer and the layer count when every layer has one
    i, n = ((facts.attn_v_layers.index(layer), len(facts.attn_v_layers)) if layer in facts.attn_v_layers
            else (layer, facts.n_layer))
    name, t = mix.name, mix.base
    if name == "Q2_K":
        t = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
    elif name == "Q3_K_M":
        t = "Q5_K" if i < 2 else "Q4_K"
    elif name == "Q3_K_L":
        t = "Q5_K"
    elif name in IQ4_MIXES and facts.n_gqa >= 4:
        t = "Q5_K"
    elif name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        t = "Q6_K"
    elif name == "Q4_K_S" and i < 4:
        t = "Q5_K"
    if facts.is_llama_70b and t in ("Q3_K", "Q4_K"):
        t = "Q5_K"
    if facts.n_expert == 8:
        t = "Q8_0"
    return t


def _ffn_down_type(mix: Mix, layer: int, facts: ModelFacts) -> str:
    name, n, falcon = mix.name, facts.n_layer, facts.arch == "falcon"
    more = use_more_bits(layer, n)
    if name == "Q2_K":
        return "Q3_K"
    if name == "Q3_K_M":
        return "Q5_K" if layer < n // 16 else "Q4_K" if (not falcon or more) else "Q3_K"
    if name == "Q3_K_L":
        return "Q4_K" if falcon else "Q5_K"
    if name == "Q4_K_M":
        if falcon:
            return "Q6_K" if layer < n // 16 else "Q5_K" if more else "Q4_K"
        return "Q6_K" if more else mix.base
    if name in IQ4_MIXES and layer < n // 8:
        return "Q5_K"
    if name == "Q5_K_M" and more:
        return "Q6_K"
    if name == "Q4_K_S" and not falcon and layer < n // 8:
        return "Q5_K"
    return mix.base


def _attn_output_type(mix: Mix, facts: ModelFacts) -> str:
    name = mix.name
    if facts.arch == "falcon":
        return "Q4_K" if name == "Q3_K_L" else mix.base
    if facts.n_expert == 8:
        return ("Q5_K" if name in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", *IQ4_MIXES)
                else mix.base)
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(name, mix.base)


def mix_type(mix: Mix, name: str, shape: tuple[int, ...], facts: ModelFacts) -> str:
    """The type the mix gives a quantizable tensor, before the fallback for short rows."""
    if mix.base in FLOAT_TYPES:
        return mix.base  # the float "mixes" have no rules
    category = _category(name)
    if mix.name == "MXFP4_MOE":  # the experts (3-D tensors) in MXFP4, everything else Q8_0
        experts = len(shape) >= 3 and shape[2] > 1 and category not in ("output", "token_embd")
        return "MXFP4" if experts else "Q8_0"
    if category == "output" or (category == "token_embd" and facts.tied_output):
        return _output_type(mix, shape[0], facts)
    if category == "attn_v":
        return _attn_v_type(mix, _layer_of(name), facts)
    if category == "attn_k" and facts.n_expert == 8:
        return "Q8_0"
    if category == "ffn_down":
        return _ffn_down_type(mix, _layer_of(name), facts)
    if category == "attn_output":
        return _attn_output_type(mix, facts)
    return mix.base


def fit_rows(type_name: str, ncols: int) -> str:
    """type_name if rows of ncols fill its blocks, else llama.cpp's fallback (F16 at worst)."""
    if ncols % ggml_type(type_name).block_elems == 0 or type_name in FLOAT_TYPES:
        return type_name
    fallback = FALLBACK.get(type_name, "F16")
    return fallback if ncols % ggml_type(fallback).block_elems == 0 else "F16"


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor."""

    info: TensorInfo
    type: GGMLType  # its type in the output
    fell_back: bool  # rows too short for the mix's choice: a legacy type instead

    @property
    def kept(self) -> bool:
        return self.type.id == self.info.type.id

    @property
    def n_bytes(self) -> int:
        return self.info.n_elements // self.type.block_elems * self.type.block_bytes


def llamacpp_order(name: str) -> tuple[int, str]:
    """Sort key of llama.cpp's tensor order: tensors outside the blocks first, then block by
    block, by name within each. Writing in this order makes our files byte-comparable with
    llama.cpp's own quantizer output."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def plan(gguf: GGUFFile, mix: Mix) -> list[TensorPlan]:
    """Each tensor's output type under `mix`, in the order they will be written."""
    facts = ModelFacts.of(gguf)
    plans = []
    for info in sorted(gguf.tensors.values(), key=lambda t: llamacpp_order(t.name)):
        if not is_quantizable(info.name, info.shape):
            plans.append(TensorPlan(info, info.type, False))
            continue
        wanted = mix_type(mix, info.name, info.shape, facts)
        final = fit_rows(wanted, info.shape[0])
        plans.append(TensorPlan(info, ggml_type(final), final != wanted))
    return plans
