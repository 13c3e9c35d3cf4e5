"""Where compiled kernels are cached, and how many came from that cache.

Numba's own locators do not fit a shipped, frozen app: numba 0.68 stamps a frozen app's
functions with a hash of the whole executable, puts the cache in a folder that depends on
the current directory, and finds no source file for modules inside PyInstaller's archive.
`KernelCacheLocator` keys every kernel on the build instead: its folder is
`<cache root>/<build id>/<tier>/` and its freshness stamp is the build id (see
runtime.kernels.build_id and cache_root). Numba's index key still adds the function's
bytecode, the target triple, CPU name and features, so a cache entry is never used for
other code or another tier.

A kernel loaded from the cache is machine code; numba also parses the LLVM IR stored beside
it (~0.5 MB of bitcode, several MB as a module) and keeps it, in case a later compile links
the kernel into a caller. `install_lean_loading` frees that module once loaded and parses
the bitcode again only if such a compile comes: Gemma 3 270M's 13 kernels held ~28 MB.

Importing this module imports numba; runtime.kernels imports it just before the first
kernel module, so the locator is in place when the kernels are decorated.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llvmlite import binding as llvm
from numba.core import caching
from numba.core.codegen import CPUCodeLibrary
from numba.core.dispatcher import Dispatcher

from runtime import cpu

KERNELS_PACKAGE = __name__.rpartition(".")[0]  # "runtime.kernels"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class CacheSettings:
    """The folder every kernel of this process caches in, and the stamp entries must carry."""

    folder: Path
    build_id: str
    tier: str


def choose_folder(root: Path, build_id: str, tier: str, fallback_root: Path | None) -> Path:
    """`root/<build id>/<tier>` if writable, else the same under fallback_root, else a
    temporary folder removed at exit (the kernels are then compiled in every run: JIT is
    the fallback, never a failure)."""
    for base in (root, fallback_root):
        if base is not None:
            folder = base / build_id / tier
            if _writable(folder):
                return folder
    folder = Path(tempfile.mkdtemp(prefix="modelrun-kernels-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


_settings: CacheSettings | None = None


def settings() -> CacheSettings:
    """This process's cache folder, build id and tier, decided once."""
    global _settings
    if _settings is None:
        from runtime import kernels

        tier = cpu.numba_tier().name  # what numba really targets ("host" if not pinned)
        build_id = kernels.build_id()
        fallback = kernels.user_cache_root() if getattr(sys, "frozen", False) else None
        folder = choose_folder(kernels.cache_root(), build_id, tier, fallback)
        _settings = CacheSettings(folder, build_id, tier)
    return _settings


class KernelCacheLocator(caching._CacheLocator):
    """Caches the functions of runtime.kernels under <root>/<build id>/<tier>/."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file  # numba's warnings name it
        self._lineno = py_func.__code__.co_firstlineno
        s = settings()
        self._folder = str(s.folder)
        self._stamp = s.build_id

    def ensure_cache_path(self):
        os.makedirs(self._folder, exist_ok=True)

    def get_cache_path(self):
        return self._folder

    def get_source_stamp(self):
        return self._stamp

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        module = getattr(py_func, "__module__", "") or ""
        if module != KERNELS_PACKAGE and not module.startswith(KERNELS_PACKAGE + "."):
            return None  # not ours: numba's own locators decide
        return cls(py_func, py_file)


def install_locator() -> None:
    """Put KernelCacheLocator first in numba's list (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    if not classes or classes[0] is not KernelCacheLocator:
        if KernelCacheLocator in classes:
            classes.remove(KernelCacheLocator)
        classes.insert(0, KernelCacheLocator)


def kernel_dispatchers() -> list[Dispatcher]:
    """Every cached Numba function of the kernel modules imported so far (the inline-only
    helpers are compiled into their callers, never on their own)."""
    found: dict[int, Dispatcher] = {}
    for name, module in list(sys.modules.items()):
        ours = name == KERNELS_PACKAGE or name.startswith(KERNELS_PACKAGE + ".")
        if module is None or not ours:
            continue
        for value in vars(module).values():
            if (isinstance(value, Dispatcher) and value.py_func.__module__ == name
                    and isinstance(value._cache, caching.Cache)):
                found[id(value)] = value
    return list(found.values())


@dataclass(frozen=True)
class CacheStats:
    """How the kernel signatures this process uses were obtained."""

    loaded: int  # from the cache
    compiled: int  # compiled here (and saved to the cache when it is writable)

    def line(self, tier: str) -> str:
        return f"kernels: {tier}, {self.loaded} from cache, {self.compiled} compiled"


def cache_stats() -> CacheStats:
    """Signatures loaded from the cache vs compiled, over every kernel, since start-up."""
    loaded = compiled = 0
    for dispatcher in kernel_dispatchers():
        stats = dispatcher.stats
        loaded += sum(stats.cache_hits.values())
        compiled += sum(stats.cache_misses.values())
    return CacheStats(loaded, compiled)


def used_signatures() -> list[tuple[str, str, tuple]]:
    """(module, function, argument types) of every kernel signature this process has
    compiled or loaded: what a warm-up records for runtime.precompile to replay."""
    return sorted(((d.py_func.__module__, d.py_func.__name__, tuple(sig))
                   for d in kernel_dispatchers() for sig in d.signatures), key=repr)


def kernels_cache_folder() -> Path:
    """Where this build looks its kernels up first: <cache root>/<build id>/<tier>."""
    from runtime import kernels

    return kernels.cache_folder(settings().tier)


_numba_unserialize = CPUCodeLibrary._unserialize.__func__
_numba_module_for_linking = CPUCodeLibrary._get_module_for_linking


def _unserialize_lean(cls, codegen, state):
    """numba's loading of a cached library, without keeping its parsed linking module: the
    bitcode (bytes) stays, for _module_for_linking_lazy."""
    library = _numba_unserialize(cls, codegen, state)
    _name, kind, data = state
    if kind == "object":  # (object code, linking bitcode); numba has read its symbols
        library._linking_bitcode = data[1]
        library._shared_module = None  # llvmlite disposes the module when it is collected
    return library


def _module_for_linking_lazy(library):
    """The module a compile links in when it calls a kernel loaded from the cache."""
    bitcode = getattr(library, "_linking_bitcode", None)
    if library._shared_module is None and bitcode is not None:
        library._shared_module = llvm.parse_bitcode(bitcode)
    return _numba_module_for_linking(library)


def install_lean_loading() -> None:
    """Make numba free the parsed IR of every library it loads from a cache (idempotent)."""
    CPUCodeLibrary._unserialize = classmethod(_unserialize_lean)
    CPUCodeLibrary._get_module_for_linking = _module_for_linking_lazy


install_locator()
install_lean_loading()
