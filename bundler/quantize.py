"""`modelrun quantize` and `modelrun compare`: llama.cpp's file-type mixes on our own kernels.

A "mix" (Q4_K_M, Q3_K_S, ...) is llama.cpp's name for a rule that gives each tensor its type:
most weights get the mix's base type, a few sensitive ones (attn_v, ffn_down of some layers,
the output matrix) get more bits, 1-D tensors (norms, biases) stay as they are, and rows
whose length does not fill a 256-element super-block fall back to a legacy 32-element type.
The rules here state the facts of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp)
for these mixes, written as one small function per tensor category.

The quantizer streams: the input is memory-mapped and read one slab of rows at a time
(decoded to float32, quantized by the parallel Numba kernels, written, and its pages
dropped), so memory stays a few slabs however large the model. The output is a GGUF v3
file written here with struct (header, metadata, tensor infos, aligned data).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import click
import numpy as np

from runtime.cli import UserError
from runtime.ggml_types import GGMLType, ggml_type
from runtime.gguf import GGUFError, GGUFFile, StringArray, TensorInfo, ValueType

QUANTIZATION_VERSION = 2  # general.quantization_version: the k-quant block layouts of today
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
SLAB_ELEMENTS = 1 << 22  # weights decoded to float32 at a time (16 MB)
COPY_CHUNK = 1 << 24  # bytes copied at a time for tensors kept as they are


# ------------------------------------------------------------------------------------ mixes

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
        raise UserError(f"unknown quantization type {name!r}; choose one of {', '.join(MIXES)}",
                        exit_code=2)
    return mix


@dataclass(frozen=True)
class ModelFacts:
    """What the mix rules need to know about a model beyond a tensor's own name and shape."""

    arch: str
    n_layer: int
    n_gqa: int  # query heads per key/value head
    n_expert: int
    tied_output: bool  # no output.weight: the token embedding doubles as the output matrix

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
                   tied_output="output.weight" not in gguf.tensors)

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
    name, t = mix.name, mix.base
    if name == "Q2_K":
        t = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
    elif name == "Q3_K_M":
        t = "Q5_K" if layer < 2 else "Q4_K"
    elif name == "Q3_K_L":
        t = "Q5_K"
    elif name in IQ4_MIXES and facts.n_gqa >= 4:
        t = "Q5_K"
    elif name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, facts.n_layer):
        t = "Q6_K"
    elif name == "Q4_K_S" and layer < 4:
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


# ------------------------------------------------------------------------------- GGUF writer

_SCALAR_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
# numpy arrays the reader hands out, by dtype, and how to write their elements
_ARRAY_TYPES = {
    "u1": ValueType.UINT8, "i1": ValueType.INT8, "u2": ValueType.UINT16, "i2": ValueType.INT16,
    "u4": ValueType.UINT32, "i4": ValueType.INT32, "f4": ValueType.FLOAT32, "b1": ValueType.BOOL,
    "u8": ValueType.UINT64, "i8": ValueType.INT64, "f8": ValueType.FLOAT64,
}


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _array(value: Any) -> bytes:
    """An array value as GGUF stores it: element type, count, elements."""
    if isinstance(value, StringArray):
        parts = [struct.pack("<IQ", ValueType.STRING, len(value))]
        parts.extend(_string(s) for s in value.bytes_list())
        return b"".join(parts)
    if isinstance(value, np.ndarray):
        etype = _ARRAY_TYPES[value.dtype.kind + str(value.dtype.itemsize)]
        le = value.astype(value.dtype.newbyteorder("<"), copy=False)
        return struct.pack("<IQ", etype, value.size) + le.tobytes()
    if isinstance(value, list):  # an array of arrays (the reader yields [] only for these)
        return struct.pack("<IQ", ValueType.ARRAY, len(value)) + b"".join(_array(v) for v in value)
    raise TypeError(f"cannot write {type(value).__name__} as a GGUF array")


def metadata_bytes(key: str, vtype: ValueType, value: Any) -> bytes:
    """One key/value pair as GGUF stores it."""
    head = _string(key) + struct.pack("<I", vtype)
    if vtype == ValueType.STRING:
        return head + _string(value)
    if vtype == ValueType.ARRAY:
        return head + _array(value)
    return head + struct.pack(_SCALAR_FORMATS[vtype], value)


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def header_bytes(metadata: list[tuple[str, ValueType, Any]],
                 tensors: list[tuple[str, tuple[int, ...], GGMLType, int]], alignment: int) -> bytes:
    """Header, metadata and tensor infos of a GGUF v3 file, padded to where the data starts.

    tensors: (name, shape with ne0 first, type, data offset from the start of the data).
    """
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    parts.extend(metadata_bytes(k, t, v) for k, t, v in metadata)
    for name, shape, qtype, offset in tensors:
        parts.append(_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape,
                                                 qtype.id, offset))
    head = b"".join(parts)
    return head + bytes(_aligned(len(head), alignment) - len(head))


# ----------------------------------------------------------------------------- the quantizer

@dataclass
class QuantizeResult:
    """What quantize_gguf wrote."""

    mix: Mix
    plans: list[TensorPlan]
    bytes_in: int  # tensor data read
    bytes_out: int  # tensor data written
    file_bytes: int
    n_weights: int
    seconds: float
    requantized: list[str] = field(default_factory=list)  # quantized tensors given a new type

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_out / self.n_weights if self.n_weights else 0.0

    @property
    def n_fallback(self) -> int:
        return sum(p.fell_back for p in self.plans)


class _Input:
    """The input GGUF on our own memory map, so read pages can be dropped as we go."""

    def __init__(self, path: Path):
        if not path.exists():
            raise UserError(f"{path}: no such file; pass the path of a .gguf model file")
        if path.is_dir():
            raise UserError(f"{path} is a directory; pass the .gguf model file itself")
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise UserError(f"{path}: the file is empty (0 bytes); pass a .gguf model file")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:  # mmap refuses some special files
            raise UserError(f"cannot read {path}: {e}; pass a regular .gguf file") from None
        try:
            self.gguf = GGUFFile(self.map)
        except GGUFError as e:
            raise UserError(f"{path}: {e.problem}; {e.hint}") from None

    def close(self) -> None:
        """Let go of the file; views still referenced keep the mapping alive until they go."""
        self.gguf.close()
        try:
            self.map.close()
        except BufferError:
            pass

    def release(self, start: int, length: int) -> None:
        """Drop pages of [start, start + length) from this process (the page cache keeps them)."""
        page = mmap.PAGESIZE
        first = start // page * page
        try:
            self.map.madvise(mmap.MADV_DONTNEED, first, start + length - first)
        except (AttributeError, OSError, ValueError):
            pass  # only a memory saving


def _check_plans(plans: list[TensorPlan], allow_requantize: bool) -> list[str]:
    """Refuse conversions the kernels cannot do; return the tensors that are requantized."""
    from bundler.quantizers import QUANTIZE_TYPES
    from runtime.kernels import SUPPORTED_TYPES

    requantized = []
    for p in plans:
        if p.kept:
            continue
        source = p.info.type.name
        if source not in SUPPORTED_TYPES:
            raise UserError(f"tensor {p.info.name} is stored as {source}, which this build cannot "
                            f"decode; quantize from the F16/F32 model instead")
        if p.type.name not in QUANTIZE_TYPES:
            raise UserError(f"tensor {p.info.name} would need a {p.type.name} quantizer, which this "
                            f"build does not have")
        if source not in FLOAT_TYPES:
            requantized.append(p.info.name)
    if requantized and not allow_requantize:
        first = next(p.info for p in plans if p.info.name == requantized[0])
        raise UserError(f"the input is already quantized ({len(requantized)} tensors, e.g. "
                        f"{first.name} is {first.type.name}); quantize from the F16/F32 model, or "
                        f"pass --allow-requantize (quality suffers)")
    return requantized


def _set_threads(threads: int | None) -> None:
    if not threads:
        return
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise UserError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                        f"(this machine's cores), got {threads}", exit_code=2)
    numba.set_num_threads(threads)


def _write_tensor(out: BinaryIO, p: TensorPlan, source: _Input,
                  advance: Callable[[int], None]) -> None:
    """Convert one tensor slab by slab (or copy it) into `out`."""
    from bundler import quantizers
    from runtime import kernels

    info = p.info
    data = info.data
    if p.kept:
        for start in range(0, info.n_bytes, COPY_CHUNK):
            chunk = data[start:start + COPY_CHUNK]
            out.write(chunk)
            source.release(info.offset + start, chunk.size)
            advance(chunk.size)
        return
    ncols = info.shape[0]
    nrows = info.n_elements // ncols
    in_row = info.type.row_bytes(ncols)
    slab_rows = max(1, SLAB_ELEMENTS // ncols)
    for r0 in range(0, nrows, slab_rows):
        n = min(slab_rows, nrows - r0)
        raw = data[r0 * in_row:(r0 + n) * in_row]
        if info.type.name == "F32":
            x = raw.view(np.float32).reshape(n, ncols).copy()  # writable: one kernel signature
        else:
            x = kernels.dequantize(raw, info.type, n * ncols).reshape(n, ncols)
        out.write(quantizers.quantize(x, p.type))
        source.release(info.offset + r0 * in_row, raw.size)
        advance(raw.size)


class Quantization:
    """One planned quantization: the input opened and checked, every tensor's type decided,
    nothing written yet. run() writes the output; a UserError here means nothing started."""

    def __init__(self, src: str | os.PathLike, dst: str | os.PathLike, ftype: str | Mix,
                 allow_requantize: bool = False):
        self.src, self.dst = Path(src), Path(dst)
        self.mix = ftype if isinstance(ftype, Mix) else mix_by_name(ftype)
        src, dst = self.src, self.dst
        if src.resolve() == dst.resolve() or (dst.exists() and src.exists()
                                              and os.path.samefile(src, dst)):
            raise UserError(f"the output {dst} is the input; choose another output file",
                            exit_code=2)
        if dst.is_dir():
            raise UserError(f"{dst} is a directory; pass the output file's path", exit_code=2)
        if not dst.parent.is_dir():
            raise UserError(f"cannot write {dst}: the folder {dst.parent} does not exist",
                            exit_code=2)
        self.source = _Input(src)
        try:
            self.plans = plan(self.source.gguf, self.mix)
            self.requantized = _check_plans(self.plans, allow_requantize)
        except BaseException:
            self.source.close()
            raise
        self.total_bytes = sum(p.info.n_bytes for p in self.plans)

    def _header(self) -> bytes:
        gguf = self.source.gguf
        # llama.cpp's gguf_set_val removes a key and appends it: both go last, in this order
        stamped = {"general.quantization_version": QUANTIZATION_VERSION,
                   "general.file_type": self.mix.file_type}
        metadata = [(k, gguf.metadata_types[k], v) for k, v in gguf.metadata.items()
                    if k not in stamped]
        metadata += [(k, ValueType.UINT32, v) for k, v in stamped.items()]
        infos, offset = [], 0
        for p in self.plans:
            infos.append((p.info.name, p.info.shape, p.type, offset))
            offset = _aligned(offset + p.n_bytes, gguf.alignment)
        return header_bytes(metadata, infos, gguf.alignment)

    def run(self, threads: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
        """Write the output (dst + ".partial", renamed when complete) and let go of the input."""
        t0 = time.perf_counter()
        alignment = self.source.gguf.alignment
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, self.total_bytes)

        partial = self.dst.with_name(self.dst.name + ".partial")
        try:
            _set_threads(threads)
            with open(partial, "wb") as out:
                out.write(self._header())
                for p in self.plans:
                    _write_tensor(out, p, self.source, advance)
                    out.write(bytes(_aligned(p.n_bytes, alignment) - p.n_bytes))
            os.replace(partial, self.dst)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise UserError(f"cannot write {self.dst}: {e.strerror or e}") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            self.close()
        return QuantizeResult(
            mix=self.mix, plans=self.plans, bytes_in=self.total_bytes,
            bytes_out=sum(p.n_bytes for p in self.plans), file_bytes=self.dst.stat().st_size,
            n_weights=sum(p.info.n_elements for p in self.plans),
            seconds=time.perf_counter() - t0, requantized=self.requantized)

    def close(self) -> None:
        self.source.close()


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, ftype: str | Mix,
                  threads: int | None = None, allow_requantize: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Write the model at `src` to `dst` with every tensor typed by the mix `ftype` (e.g. "Q4_K_M").

    Streams tensor by tensor; all metadata is kept except general.file_type and
    general.quantization_version. Writes dst + ".partial" and renames it when complete.
    progress(done, total) is called with input bytes processed. Raises UserError for input
    the user can fix (missing or damaged file, requantizing without allow_requantize, ...).
    """
    return Quantization(src, dst, ftype, allow_requantize).run(threads, progress)


# --------------------------------------------------------------------------------- commands

MIX_NAMES = list(MIXES)


def _say(line: str) -> None:
    click.echo(line, err=True)


def _quantize_with_bar(src: Path, dst: Path, mix: Mix, threads: int | None, allow_requantize: bool,
                       label: str) -> QuantizeResult:
    """quantize_gguf with a progress bar (input bytes) on stderr, once the input checks out."""
    _set_threads(threads)
    job = Quantization(src, dst, mix, allow_requantize)
    try:
        with click.progressbar(length=max(job.total_bytes, 1), label=label, file=sys.stderr,
                               show_eta=True, show_percent=True) as bar:
            return job.run(progress=lambda done, total: bar.update(done - bar.pos))
    finally:
        job.close()


def _warn_requantized(result: QuantizeResult) -> None:
    if result.requantized:
        _say(f"warning: {len(result.requantized)} tensors were already quantized and are "
             f"quantized again: quality suffers; quantize from the F16/F32 model when you can")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="IN.gguf", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT.gguf", type=click.Path(path_type=Path))
@click.option("--type", "type_name", required=True, metavar="TYPE",
              help=f"The llama.cpp file type: {', '.join(MIX_NAMES)}.")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an input whose tensors are already quantized (quality suffers).")
@click.option("-t", "--threads", type=int, default=0, metavar="N",
              help="CPU threads (default: all cores).")
def quantize(src: Path, dst: Path, type_name: str, allow_requantize: bool, threads: int) -> None:
    """Quantize IN.gguf into OUT.gguf with one of llama.cpp's mixes (e.g. --type Q4_K_M)."""
    quantize_with_progress(src, dst, type_name, allow_requantize, threads)


def quantize_with_progress(src: Path, dst: Path, type_name: str, allow_requantize: bool,
                           threads: int | None = None) -> QuantizeResult:
    """`modelrun quantize`, also run by `modelrun build --quantize`: progress bar, warnings
    and a summary line on stderr."""
    mix = mix_by_name(type_name)
    result = _quantize_with_bar(src, dst, mix, threads, allow_requantize, f"quantizing to {mix.name}")
    _warn_requantized(result)
    if result.n_fallback:
        _say(f"note: {result.n_fallback} tensors have rows that do not fill 256-element blocks "
             f"and use a legacy type instead (as llama.cpp does)")
    mb_in = result.bytes_in / 1e6
    click.echo(f"wrote {dst}: {mix.name}, {result.file_bytes / 1e6:.1f} MB, "
               f"{result.bits_per_weight:.2f} bits per weight (input {mb_in:.1f} MB) in "
               f"{result.seconds:.1f} s ({mb_in / max(result.seconds, 1e-9):.0f} MB/s)")
    return result


# ---------------------------------------------------------------------------------- compare

@dataclass
class Measurement:
    """One row of compare's table."""

    label: str
    file_bytes: int
    bits_per_weight: float
    ppl: float
    ppl_stderr: float
    decode_tok_s: float
    n_chunks: int  # perplexity chunks scored


def _bits_per_weight(gguf: GGUFFile) -> float:
    weights = sum(t.n_elements for t in gguf.tensors.values())
    return 8.0 * sum(t.n_bytes for t in gguf.tensors.values()) / max(weights, 1)


def _measure(path: Path, label: str, tokens: list[int], n_ctx: int, n_decode: int) -> Measurement:
    """Perplexity over `tokens` and decode speed of the model at `path`."""
    from runtime.engine import Engine
    from runtime.perplexity import perplexity

    source = _Input(path)
    try:
        gguf = source.gguf
        bpw = _bits_per_weight(gguf)
        try:
            engine = Engine.from_gguf(gguf, n_ctx=n_ctx)
        except ValueError as e:  # also UnsupportedModelError and UnsupportedTypeError
            raise UserError(f"cannot run {label}: {e}") from None
        with click.progressbar(length=1, label=f"perplexity of {label}", file=sys.stderr) as bar:
            def on_progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            result = perplexity(engine, tokens, n_ctx, on_progress=on_progress)
        decode = _decode_speed(engine, tokens[:8], n_decode)
    finally:
        source.close()
    return Measurement(label, path.stat().st_size, bpw, result.ppl, result.ppl_stderr, decode,
                       result.n_chunks)


def _decode_speed(engine, prompt: list[int], n_tokens: int) -> float:
    """Tokens per second of a short greedy generation (after a warm-up token)."""
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    engine.reset()
    list(engine.generate(prompt, greedy, max_tokens=2))  # warm-up: kernels loaded, caches hot
    engine.reset()
    before = dict(engine.stats)
    list(engine.generate(prompt, greedy, max_tokens=n_tokens + 1))
    tokens = engine.stats["decode_tokens"] - before["decode_tokens"]
    seconds = engine.stats["decode_s"] - before["decode_s"]
    return tokens / seconds if seconds > 0 else float("nan")


def format_table(rows: list[Measurement]) -> list[str]:
    """compare's table: the first row is the input model, the others are relative to it."""
    base = rows[0].ppl
    lines = [f"{'type':<14} {'size MB':>9} {'bits/w':>7} {'perplexity':>18} {'vs input':>9} "
             f"{'decode tok/s':>13}"]
    lines.append("-" * len(lines[0]))
    for i, r in enumerate(rows):
        change = "" if i == 0 else f"{100.0 * (r.ppl / base - 1.0):+.2f}%"
        ppl = f"{r.ppl:.4f} ± {r.ppl_stderr:.4f}"
        lines.append(f"{r.label:<14} {r.file_bytes / 1e6:>9.1f} {r.bits_per_weight:>7.2f} "
                     f"{ppl:>18} {change:>9} {r.decode_tok_s:>13.1f}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@click.option("--types", default="Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K", show_default=True, metavar="LIST",
              help="Comma-separated llama.cpp file types to compare with MODEL.")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="A UTF-8 text to measure perplexity on.")
@click.option("-c", "--ctx-size", type=int, default=512, show_default=True, metavar="N",
              help="Tokens per perplexity chunk.")
@click.option("--chunks", type=int, default=0, metavar="N", help="Use only the first N chunks (0: all).")
@click.option("-n", "--n-decode", type=click.IntRange(1, 1024), default=32, show_default=True,
              metavar="N", help="Tokens to generate when measuring decode speed.")
@click.option("-t", "--threads", type=int, default=0, metavar="N", help="CPU threads (default: all cores).")
def compare(model: Path, types: str, text_path: Path, ctx_size: int, chunks: int, n_decode: int,
            threads: int) -> None:
    """Quantize MODEL.gguf to each type and compare size, perplexity and decode speed."""
    from runtime.tokenizer import Tokenizer

    mixes = [mix_by_name(t.strip()) for t in types.split(",") if t.strip()]
    if not mixes:
        raise UserError("--types is empty; name at least one type, e.g. --types Q4_K_M", exit_code=2)
    if ctx_size < 2:
        raise UserError(f"-c must be at least 2 tokens, got {ctx_size}", exit_code=2)
    if chunks < 0:
        raise UserError(f"--chunks must be 0 (all) or more, got {chunks}", exit_code=2)
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{text_path}: no such file; pass a UTF-8 text file with --text") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {text_path}: {getattr(e, 'strerror', None) or e}") from None
    _set_threads(threads)
    source = _Input(model)
    try:
        gguf = source.gguf
        try:
            tokenizer = Tokenizer.from_metadata(gguf.metadata)
        except ValueError as e:
            raise UserError(f"{model}: cannot read its tokenizer: {e}") from None
        quantized = [t.name for t in gguf.tensors.values() if t.type.name not in FLOAT_TYPES
                     and is_quantizable(t.name, t.shape)]
        input_label = _input_label(gguf)
    finally:
        source.close()
    tokens = tokenizer.encode(text, add_special=True, parse_special=False)  # as llama.cpp does
    text_tokens = len(tokens)
    if chunks:
        tokens = tokens[:chunks * ctx_size]
    if len(tokens) < ctx_size:
        raise UserError(f"the text has {len(tokens)} tokens, too few for one chunk of {ctx_size}; "
                        f"use a longer text or a smaller -c", exit_code=2)
    if quantized:
        _say(f"note: {model} is already quantized ({len(quantized)} tensors); the types below are "
             f"requantized from it, which costs quality beyond what they cost from F16")
    rows = [_measure(model, input_label, tokens, ctx_size, n_decode)]
    with tempfile.TemporaryDirectory(prefix="modelrun-compare-") as folder:
        for mix in mixes:
            path = Path(folder) / f"{mix.name}.gguf"
            _quantize_with_bar(model, path, mix, threads, True, f"quantizing to {mix.name}")
            rows.append(_measure(path, mix.name, tokens, ctx_size, n_decode))
            path.unlink()
    n_chunks = rows[0].n_chunks
    click.echo(f"{model.name}: perplexity over {n_chunks} chunks of {ctx_size} tokens "
               f"({n_chunks * ctx_size} of the text's {text_tokens}); decode: {n_decode} tokens, "
               f"{threads or 'all'} threads")
    for line in format_table(rows):
        click.echo(line)


def _input_label(gguf: GGUFFile) -> str:
    """The input's row label: its file type's name when it names one of ours."""
    file_type = gguf.get("general.file_type")
    names = {m.file_type: m.name for m in MIXES.values()}
    return f"{names.get(file_type, 'input')} (input)"
