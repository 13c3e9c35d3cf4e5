"""`modelrun`: the command that makes, inspects and runs model.run files.

build / inspect / extract / verify / upgrade work on the container (bundler/container.py
writes it, runtime/container.py reads it); run runs the runtime on a plain GGUF; quantize
and compare are in bundler/quantize.py and bundler/compare.py. Every failure is one line (runtime.session.UserError).
"""

import sys
from contextlib import contextmanager
from pathlib import Path

import click

from bundler import container as model_run
from bundler.compare import compare
from bundler.quantize import quantize, quantize_with_progress
from runtime.container import HEADER_SIZE, MODEL_ALIGNMENT, MODEL_ENTRY
from runtime.info import describe
from runtime.session import UserError, open_model_run
from runtime.terminal import printable
from runtime.units import format_bytes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Make and run single-file, offline language-model apps."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("runtime_args", nargs=-1, type=click.UNPROCESSED)
def run(model: str, runtime_args: tuple[str, ...]) -> None:
    """Run MODEL (a .gguf file) with the runtime's options, e.g. `modelrun run m.gguf --info`."""
    from runtime.cli import main as runtime_main  # the runtime's own command line, only here

    runtime_main.main(["-m", model, *runtime_args], prog_name="modelrun run")


def _bar(label: str):
    """A progress factory for bundler.container: a click progress bar on stderr."""
    @contextmanager
    def factory(total: int):
        with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
            yield bar.update
    return factory


OUTPUT = click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
                      metavar="OUT", help="The file to write.")
RUNTIME = click.option("--runtime", "runtime_path", type=click.Path(path_type=Path), metavar="PAYLOAD",
                       help="The runtime payload (.tar.gz; default: $MODELRUN_RUNTIME, else "
                            "dist/runtime.tar.gz from `make runtime`).")


@main.command()
@click.argument("model", type=click.Path(path_type=Path), metavar="MODEL.gguf")
@OUTPUT
@click.option("--name", help="The model's name in the manifest (default: its general.name).")
@click.option("--arg", "args", multiple=True, metavar="ARG",
              help="A default argument of the model.run, repeatable (e.g. --arg --temp --arg 0.7); "
                   "an --arg ... marks where the user's own arguments go (default: after these).")
@RUNTIME
@click.option("--quantize", "quantize_type", metavar="TYPE",
              help="Quantize MODEL first with this llama.cpp mix (e.g. Q4_K_M, see `modelrun "
                   "quantize`); only the quantized model goes into OUT.")
@click.option("--allow-requantize", is_flag=True,
              help="With --quantize: accept a MODEL that is already quantized (quality suffers).")
def build(model: Path, output: Path, name: str | None, args: tuple[str, ...],
          runtime_path: Path | None, quantize_type: str | None, allow_requantize: bool) -> None:
    """Make OUT, one executable file that runs MODEL.gguf offline (./OUT)."""
    if quantize_type is None:
        result = model_run.build(model, output, runtime_path, name=name, args=args,
                                 progress_factory=_bar(f"writing {output.name}"))
    else:
        # The quantized model is written next to OUT (the size of the result, not of MODEL)
        # and removed once it is inside OUT.
        model_run.check_build_inputs(model, output, runtime_path)
        quantized = output.with_name(f".{output.name}.{quantize_type}.gguf")
        try:
            quantize_with_progress(model, quantized, quantize_type, allow_requantize)
            result = model_run.build(quantized, output, runtime_path, name=name, args=args,
                                     progress_factory=_bar(f"writing {output.name}"))
        finally:
            quantized.unlink(missing_ok=True)
    click.echo(f"wrote {output}: {format_bytes(result.size)}, runtime {result.manifest['runtime']['build_id']}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="MODEL.run")
def inspect(path: Path) -> None:
    """Show what is inside a model.run: manifest, entries, runtime, and the model."""
    with open_model_run(path) as run:
        manifest = run.manifest()
        header = run.header
        lines = [f"{path}: model.run, {format_bytes(run.size)}"]
        for key in ("name", "created", "upgraded", "modelrun_version", "format"):
            if key in manifest:
                lines.append(f"  {key.replace('_', ' '):<17} {printable(manifest[key])}")
        rt = manifest.get("runtime") or {}
        tiers = ", ".join(rt.get("tiers") or []) or "unknown"
        lines.append(f"  {'runtime':<17} build {printable(rt.get('build_id', '?'))}, "
                     f"CPU tiers: {printable(tiers)}")
        if header is not None:
            lines.append(f"  {'':<17} {format_bytes(header.payload_size or 0)} payload at offset "
                         f"{header.payload_offset} after a {HEADER_SIZE}-byte sh header")
        args = run.default_args()
        lines.append(f"  {'default args':<17} {printable(' '.join(args)) if args else '(none)'}")
        lines.append(f"  {'model sha256':<17} "
                     f"{printable((manifest.get('model') or {}).get('sha256', '?'))}")
        lines.append("")
        lines.append(f"  {'entry':<14} {'header at':>12} {'data at':>12} {'size':>14} "
                     f"{'crc32':>8}  alignment")
        for entry in run.entries.values():
            align = entry.data_offset & -entry.data_offset if entry.data_offset else 0
            note = f"{align // 1024} KiB" if align >= 1024 else f"{align} B"
            if entry.name == MODEL_ENTRY:
                note += " (ok, mmap-able)" if entry.data_offset % MODEL_ALIGNMENT == 0 else " (NOT 64 KiB)"
            lines.append(f"  {printable(entry.name):<14} {entry.header_offset:>12} {entry.data_offset:>12} "
                         f"{entry.size:>14} {entry.crc32:08x}  {note}")
        lines.append("")
        with run.model() as gguf:
            lines.append(describe(gguf, MODEL_ENTRY))
    click.echo("\n".join(lines))


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="MODEL.run")
@OUTPUT
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def extract(path: Path, output: Path, force: bool) -> None:
    """Write the model.gguf inside MODEL.run to OUT, byte for byte (checked by sha256)."""
    digest = model_run.extract(path, output, force=force, progress_factory=_bar(f"writing {output.name}"))
    click.echo(f"wrote {output} (sha256 {digest}, as in the manifest)")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="MODEL.run")
def verify(path: Path) -> None:
    """Check MODEL.run's model and runtime against the sha256s it was made with."""
    problems = []
    with open_model_run(path) as run:
        manifest = run.manifest()
        expected = run.expected_model_sha256()
        with _bar("verifying model.gguf")(run.entries[MODEL_ENTRY].size) as progress:
            actual = run.model_sha256(progress)
        if actual != expected:
            problems.append(f"the model does not match its sha256 (expected {expected}, got {actual})")
        rt_sha = (manifest.get("runtime") or {}).get("sha256")
        if run.header and run.header.payload_offset and run.header.payload_size and rt_sha:
            with _bar("verifying the runtime")(run.header.payload_size) as progress:
                got = run.sha256_of(run.header.payload_offset, run.header.payload_size, progress)
            if got != rt_sha:
                problems.append(f"the runtime does not match its sha256 (expected {rt_sha}, got {got})")
        if run.header and run.header.payload_sha256 not in (None, rt_sha):
            problems.append(f"the sh header names runtime sha256 {run.header.payload_sha256}, "
                            f"the manifest {rt_sha}")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}: the file is damaged — download it again")
    click.echo(f"ok: {path} matches its manifest (model sha256 {actual})")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="OLD.run")
@OUTPUT
@RUNTIME
def upgrade(path: Path, output: Path, runtime_path: Path | None) -> None:
    """Write OLD.run's model and default args with another runtime to OUT."""
    result = model_run.upgrade(path, output, runtime_path, progress_factory=_bar(f"writing {output.name}"))
    click.echo(f"wrote {output}: {format_bytes(result.size)}, runtime {result.manifest['runtime']['build_id']}")


main.add_command(quantize)
main.add_command(compare)
