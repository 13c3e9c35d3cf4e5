"""`modelrun compare`: a model quantized to several mixes, side by side: size, bits per
weight, perplexity (as llama-perplexity) and decode speed, measured on this machine.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from bundler.mixes import FLOAT_TYPES, MIXES, is_quantizable, mix_by_name
from bundler.quantize import MappedInput, quantize_with_bar, say
from runtime.gguf import GGUFFile
from runtime.session import UsageError, UserError, set_threads


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

    source = MappedInput(path)
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
    from runtime.tokenizer import Tokenizer, TokenizerError

    mixes = [mix_by_name(t.strip()) for t in types.split(",") if t.strip()]
    if not mixes:
        raise UsageError("--types is empty; name at least one type, e.g. --types Q4_K_M")
    if ctx_size < 2:
        raise UsageError(f"-c must be at least 2 tokens, got {ctx_size}")
    if chunks < 0:
        raise UsageError(f"--chunks must be 0 (all) or more, got {chunks}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{text_path}: no such file; pass a UTF-8 text file with --text") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {text_path}: {getattr(e, 'strerror', None) or e}") from None
    set_threads(threads)
    source = MappedInput(model)
    try:
        gguf = source.gguf
        try:
            tokenizer = Tokenizer.from_metadata(gguf.metadata)
        except TokenizerError as e:
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
        raise UsageError(f"the text has {len(tokens)} tokens, too few for one chunk of {ctx_size}; "
                         f"use a longer text or a smaller -c")
    if quantized:
        say(f"note: {model} is already quantized ({len(quantized)} tensors); the types below are "
             f"requantized from it, which costs quality beyond what they cost from F16")
    rows = [_measure(model, input_label, tokens, ctx_size, n_decode)]
    with tempfile.TemporaryDirectory(prefix="modelrun-compare-") as folder:
        for mix in mixes:
            path = Path(folder) / f"{mix.name}.gguf"
            quantize_with_bar(model, path, mix, threads, True, f"quantizing to {mix.name}")
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
