"""The `modelrun` console script."""

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bundler.cli import main


def test_run_passes_the_model_and_options_to_the_runtime(gemma_path):
    result = CliRunner().invoke(main, ["run", str(gemma_path), "--info"])
    assert result.exit_code == 0, result.output
    assert "gemma3" in result.output and "262144" in result.output


def test_run_on_a_missing_file_says_so_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.gguf"), "--info"])
    assert result.exit_code == 1
    assert "no such file" in result.output and "Traceback" not in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "modelrun"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "run" in out.stdout


def test_every_command_is_listed_in_the_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert {"build", "inspect", "extract", "verify", "upgrade", "run"} <= listed


def test_build_needs_an_output_path(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "m.gguf")])
    assert result.exit_code == 2 and "-o" in result.output
