"""llama.cpp's tokenizer test vocabularies, fetched once per machine from PyPI.

llama.cpp tests its tokenizers with vocabulary-only GGUFs (models/ggml-vocab-NAME.gguf) and,
for most of them, inputs and the ids llama.cpp gives them (NAME.gguf.inp, NAME.gguf.out, run
by its tests/test-tokenizer-0 with add_special=false, parse_special=false). They ship inside
the llama-cpp-python sdist, which pip fetches here the way the Gemma model package comes from
PyPI; only the vocabulary files are kept, under ${XDG_CACHE_HOME:-~/.cache}/modelrun/
llamacpp-sdist/<version>/ (about 80 MB). Used by the tokenizer tests and by bench/ for
synthetic models with real tokenizers:

    folder = vocab_dir()                # raises VocabUnavailable (with the reason) offline;
                                        # $MODELRUN_LLAMACPP_MODELS names a folder to use instead
    templates_dir()                     # llama.cpp's chat template collection (models/templates)
    vocab_path(folder, "qwen2")         # .../ggml-vocab-qwen2.gguf
    vocab_names(folder)                 # every vocabulary; names_with_cases(): those with cases
    load_cases(folder, "qwen2")         # {input text: expected ids}, as test-tokenizer-0
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
# The sdist's sha256 as PyPI serves it: a different file fails loudly instead of testing
# against other expectations.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_PREFIX = "ggml-vocab-"
_CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


class VocabUnavailable(Exception):
    """The sdist could not be fetched (no network, no pip); the message says why."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modelrun" / "llamacpp-sdist"


def vocab_dir(root: Path | None = None) -> Path:
    """The folder of ggml-vocab-* files, downloaded and extracted on the first call."""
    given = os.environ.get("MODELRUN_LLAMACPP_MODELS")
    if given and root is None:  # a folder that holds them already, e.g. llama.cpp's models/
        return Path(given)
    return _fetched((root or cache_root()) / VERSION, _extract_vocabularies)


def templates_dir(root: Path | None = None) -> Path:
    """The folder of llama.cpp's chat template collection (models/templates/*.jinja: the
    real models' templates), from the same sdist, extracted on the first call."""
    given = os.environ.get("MODELRUN_LLAMACPP_MODELS")
    if given and root is None:
        return Path(given) / "templates"
    return _fetched((root or cache_root()) / f"{VERSION}-templates", _extract_templates)


def _fetched(folder: Path, extract) -> Path:
    """`folder`, filled by `extract(sdist, into)` from the downloaded sdist on the first call.

    Safe when several processes call it at once: each extracts into a folder of its own and
    renames it into place; the first rename wins.
    """
    if (folder / "complete").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as work:
        work = Path(work)
        sdist = _download(work / "download")
        staged = work / folder.name
        extract(sdist, staged)
        (staged / "complete").touch()
        try:
            staged.rename(folder)
        except OSError:  # another process renamed its complete copy first
            if not (folder / "complete").exists():
                raise
    return folder


def _download(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
               "-d", str(into), f"llama-cpp-python=={VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VocabUnavailable(f"pip download of llama-cpp-python {VERSION} failed: {e}") from e
    found = sorted(into.glob("llama_cpp_python-*.tar.gz")) if into.exists() else []
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VocabUnavailable(f"pip could not download llama-cpp-python {VERSION} from PyPI "
                               f"(exit {done.returncode}): {last}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{found[0].name} has sha256 {digest}, expected {SDIST_SHA256}")
    return found[0]


def _extract_vocabularies(sdist: Path, into: Path) -> None:
    _extract(sdist, into, lambda path, name: "/models/" in path and name.startswith(_PREFIX))


def _extract_templates(sdist: Path, into: Path) -> None:
    _extract(sdist, into, lambda path, name: "/models/templates/" in path and name.endswith(".jinja"))


def _extract(sdist: Path, into: Path, wanted) -> None:
    """The sdist's files for which wanted(path, file name) holds, flat into `into`."""
    into.mkdir()
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and wanted(member.name, name):
                with tar.extractfile(member) as src, open(into / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def vocab_path(folder: Path, name: str) -> Path:
    """The GGUF of vocabulary `name` (e.g. "qwen2", "gemma-4", "bert-bge")."""
    return folder / f"{_PREFIX}{name}.gguf"


def vocab_names(folder: Path) -> list[str]:
    """Every vocabulary in the folder, sorted."""
    return sorted(p.name[len(_PREFIX):-len(".gguf")] for p in folder.glob(f"{_PREFIX}*.gguf"))


def names_with_cases(folder: Path) -> list[str]:
    """The vocabularies that come with inputs and expected ids."""
    return [name for name in vocab_names(folder)
            if vocab_path(folder, name).with_suffix(".gguf.out").exists()]


def load_cases(folder: Path, name: str) -> dict[str, list[int]]:
    """{input: expected ids} as test-tokenizer-0 reads them: inputs split at the separator
    line (nothing after the last one is no input), one output line per input (ids separated
    by spaces); a repeated input keeps its last expectation."""
    gguf = vocab_path(folder, name)
    raw = gguf.with_suffix(".gguf.inp").read_bytes().decode("utf-8")
    outputs = gguf.with_suffix(".gguf.out").read_bytes().decode("utf-8").split("\n")
    if outputs and outputs[-1] == "":  # the file ends with a newline
        outputs.pop()
    inputs = raw.split(_CASE_SEPARATOR)
    if inputs[-1] == "":  # the file ends with a separator
        inputs.pop()
    if len(inputs) != len(outputs):
        raise ValueError(f"{gguf.name}: {len(inputs)} inputs but {len(outputs)} outputs")
    return {text: [int(t) for t in ids.split()] for text, ids in zip(inputs, outputs)}
