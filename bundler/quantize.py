"""`modelrun quantize`: a GGUF rewritten with one of llama.cpp's mixes, on our own kernels.

The quantizer streams: the input is memory-mapped and read one slab of rows at a time
(decoded to float32, quantized by the parallel Numba kernels, written, and its pages
dropped), so memory stays a few slabs however large the model. Which type each tensor gets
is bundler/mixes.py's; the header is written by bundler/gguf_writer.py.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import click
import numpy as np

from bundler.gguf_writer import aligned, header_bytes
from bundler.mixes import FLOAT_TYPES, MIXES, Mix, TensorPlan, mix_by_name, plan
from runtime.gguf import GGUFError, GGUFFile, ValueType
from runtime.session import UsageError, UserError, set_threads
from runtime.units import format_bytes

QUANTIZATION_VERSION = 2  # general.quantization_version: the k-quant block layouts of today
SLAB_ELEMENTS = 1 << 22  # weights decoded to float32 at a time (16 MB)
COPY_CHUNK = 1 << 24  # bytes copied at a time for tensors kept as they are


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


class MappedInput:
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


def _write_tensor(out: BinaryIO, p: TensorPlan, source: MappedInput,
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
            raise UsageError(f"the output {dst} is the input; choose another output file")
        if dst.is_dir():
            raise UsageError(f"{dst} is a directory; pass the output file's path")
        if not dst.parent.is_dir():
            raise UsageError(f"cannot write {dst}: the folder {dst.parent} does not exist")
        self.source = MappedInput(src)
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
            offset = aligned(offset + p.n_bytes, gguf.alignment)
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
            set_threads(threads)
            with open(partial, "wb") as out:
                out.write(self._header())
                for p in self.plans:
                    _write_tensor(out, p, self.source, advance)
                    out.write(bytes(aligned(p.n_bytes, alignment) - p.n_bytes))
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


def say(line: str) -> None:
    click.echo(line, err=True)


def quantize_with_bar(src: Path, dst: Path, mix: Mix, threads: int | None, allow_requantize: bool,
                       label: str) -> QuantizeResult:
    """quantize_gguf with a progress bar (input bytes) on stderr, once the input checks out."""
    set_threads(threads)
    job = Quantization(src, dst, mix, allow_requantize)
    try:
        with click.progressbar(length=max(job.total_bytes, 1), label=label, file=sys.stderr,
                               show_eta=True, show_percent=True) as bar:
            return job.run(progress=lambda done, total: bar.update(done - bar.pos))
    finally:
        job.close()


def _warn_requantized(result: QuantizeResult) -> None:
    if result.requantized:
        say(f"warning: {len(result.requantized)} tensors were already quantized and are "
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
    result = quantize_with_bar(src, dst, mix, threads, allow_requantize, f"quantizing to {mix.name}")
    _warn_requantized(result)
    if result.n_fallback:
        say(f"note: {result.n_fallback} tensors have rows that do not fill 256-element blocks "
             f"and use a legacy type instead (as llama.cpp does)")
    click.echo(f"wrote {dst}: {mix.name}, {format_bytes(result.file_bytes)}, "
               f"{result.bits_per_weight:.2f} bits per weight (input {format_bytes(result.bytes_in)}) "
               f"in {result.seconds:.1f} s "
               f"({format_bytes(result.bytes_in / max(result.seconds, 1e-9))}/s)")
    return result
