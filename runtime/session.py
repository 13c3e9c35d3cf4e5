"""Opening a model and making it ready to run: the one path every front end takes.

A path becomes a parsed GGUF (a plain file, or the model inside a model.run), then a Session
(engine, tokenizer, the GGUF) with its kernels loaded. Whatever the user can fix surfaces as
a UserError: one line on stderr, no traceback. Exit codes mean one thing each: 1 for a file
or model this runtime cannot use (UserError), 2 for a command line that is wrong
(UsageError, as click's own usage errors).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import click

from runtime.hparams import DEFAULT_CTX_CHECKPOINTS, DEFAULT_KV_CACHE_TYPE
from runtime.container import Container, ContainerError, open_container
from runtime.gguf import GGUFError, GGUFFile
from runtime.terminal import printable
from runtime.units import format_bytes


class UserError(click.ClickException):
    """Input the user can fix (a file, a model this build cannot run): one line on stderr,
    no traceback, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {printable(self.format_message())}", err=True)


class UsageError(UserError):
    """A command line that cannot work (a missing or out-of-range option): exit code 2."""

    exit_code = 2


@dataclass
class Session:
    """A loaded model: engine, tokenizer, and the GGUF they read."""

    engine: Any
    tokenizer: Any
    gguf: GGUFFile

    def model_chat_template(self) -> str:
        """The chat template the model file carries, "" when it has none (a base model)."""
        source = self.gguf.metadata.get("tokenizer.chat_template")
        return source if isinstance(source, str) else ""


# --- opening files -----------------------------------------------------------------------------

def open_model(path: str | os.PathLike) -> GGUFFile:
    """The parsed header of the GGUF at `path`, or a UserError that says what to do."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; pass the path of a .gguf model file")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the .gguf model file itself")
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise UserError(f"{path}: {e.problem}; {e.hint}") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: mmap refuses some special files
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot read {path}: {reason}; pass a regular .gguf file") from None


def open_model_run(path: str | os.PathLike) -> Container:
    """The model.run at `path`, or a UserError that says what is wrong with it."""
    try:
        return open_container(path)
    except ContainerError as e:
        raise UserError(f"{path}: {e}") from None


def open_container_model(path: str) -> tuple[GGUFFile, str]:
    """The model inside the model.run at `path`, parsed in place (no copy), and its name in
    the API (the name it was built with)."""
    container = open_model_run(path)
    try:
        gguf = container.model()  # its views keep the container's map alive
        name = container.manifest().get("name")
        return gguf, name if isinstance(name, str) and name.strip() else model_name(gguf, path)
    except ContainerError as e:
        raise UserError(f"{path}: {e}") from None
    finally:
        container.close()


def model_name(gguf: GGUFFile, path: str) -> str:
    """The model's id in the API: its general.name, else the file's name without .gguf."""
    name = gguf.get("general.name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    base = os.path.basename(path)
    return base[:-5] if base.lower().endswith(".gguf") else base


# --- loading -----------------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    """Run the parallel kernels on `threads` threads (0: Numba's default, all cores)."""
    if not threads:
        return
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise UsageError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                         f"(this machine's cores), got {threads}")
    numba.set_num_threads(threads)


def load_session(gguf: GGUFFile, ctx_size: int, threads: int,
                 cache_types: tuple[str, str] = (DEFAULT_KV_CACHE_TYPE, DEFAULT_KV_CACHE_TYPE),
                 n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> Session:
    """The model ready to run, with its KV cache in cache_types (-ctk, -ctv) split among
    n_parallel slots (--parallel), each keeping up to n_ctx_checkpoints copies of a hybrid
    model's recurrent state (--ctx-checkpoints), or a UserError naming what this build
    cannot run."""
    from runtime.engine import ContextSizeError, Engine, return_freed_memory
    from runtime.ggml_types import UnsupportedTypeError
    from runtime.model import UnsupportedModelError
    from runtime.resident import release_compiler_code
    from runtime.tokenizer import Tokenizer
    from runtime.tokenizer_cache import TokenizerCache

    set_threads(threads)
    warn_if_too_big(gguf, ctx_size, cache_types, n_parallel, n_ctx_checkpoints)
    t0 = time.perf_counter()
    tokenizer_cache = TokenizerCache(gguf)
    cached_tokenizer = tokenizer_cache.load()
    try:
        tokenizer = cached_tokenizer or Tokenizer.from_metadata(gguf.metadata)
        engine = Engine.from_gguf(gguf, n_ctx=ctx_size or None, cache_type_k=cache_types[0],
                                  cache_type_v=cache_types[1], n_parallel=n_parallel,
                                  n_ctx_checkpoints=n_ctx_checkpoints)
    except (UnsupportedModelError, UnsupportedTypeError) as e:
        raise UserError(f"this build cannot run the model: {e}") from None
    except ContextSizeError as e:
        raise UsageError(f"{e}") from None
    except ValueError as e:  # the model's metadata (a TokenizerError, ...) says why
        raise UserError(f"{e}") from None
    release_compiler_code()  # what loading LLVM and numba touched; loading the kernels touches less
    kernels_line = load_kernels(engine, tokenizer)
    if cached_tokenizer is None:
        tokenizer_cache.save_in_background(tokenizer)
    start_up_done()
    return_freed_memory()
    release_compiler_code()  # LLVM's pages: it has loaded the kernels (runtime.resident)
    slots = f" ({engine.n_parallel} slots of {engine.n_ctx})" if engine.n_parallel > 1 else ""
    click.echo(f"loaded in {time.perf_counter() - t0:.2f} s; context {engine.n_ctx_total} tokens{slots}, "
               f"KV cache {format_bytes(engine.kv_cache_bytes)}", err=True)
    click.echo(kernels_line, err=True)
    return Session(engine, tokenizer, gguf)


def start_up_done() -> None:
    """The start-up's objects are made: the garbage collector (which the entry point turned
    off for the start-up, saving ~0.1 s of scans while they were made) comes back on, and
    leaves them out of its scans from now on."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def warn_if_too_big(gguf: GGUFFile, ctx_size: int,
                    cache_types: tuple[str, str] = (DEFAULT_KV_CACHE_TYPE, DEFAULT_KV_CACHE_TYPE),
                    n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> None:
    """Say before loading when the model will not fit this machine's available memory."""
    from runtime import memory

    try:
        warning = memory.fit_warning(gguf, ctx_size, memory.available_bytes(), *cache_types, n_parallel,
                                     n_ctx_checkpoints)
    except (KeyError, ValueError):  # loading reports what is wrong with the model
        return
    if warning:
        click.echo(warning, err=True)


def load_kernels(engine: Any, tokenizer: Any) -> str:
    """Run the model once (two tokens, then one decoded) so every kernel it needs is loaded
    from the cache, or compiled, now rather than on the first request; the line says which."""
    from runtime.kernels.cache import cache_stats, settings

    if not any(settings().folder.glob("*.nbc")):
        click.echo(f"kernels: compiling for {settings().tier} (the first run takes 1-3 "
                   f"minutes; then they are cached)", err=True)
    if engine.n_ctx >= 3:
        first = tokenizer.bos_id or 0
        engine.eval([first, first])
        engine.decode(first)
        engine.reset()
        for key in engine.stats:  # the warm-up is not the user's work
            engine.stats[key] = type(engine.stats[key])()
    return cache_stats().line(settings().tier)
