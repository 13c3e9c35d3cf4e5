"""`modelrun`: the command that makes, inspects and runs model.run files.

Today it has `run` (the runtime on a plain GGUF, no bundling); build / inspect / extract /
verify / upgrade come with the container (issue 6).
"""

import click

from runtime.cli import main as runtime_main


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Make and run single-file, offline language-model apps."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("runtime_args", nargs=-1, type=click.UNPROCESSED)
def run(model: str, runtime_args: tuple[str, ...]) -> None:
    """Run MODEL (a .gguf file) with the runtime's options, e.g. `modelrun run m.gguf --info`."""
    runtime_main.main(["-m", model, *runtime_args], prog_name="modelrun run")
