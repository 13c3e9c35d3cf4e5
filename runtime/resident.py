"""Resident memory the process no longer needs, handed back to the OS after start-up.

LLVM (libllvmlite.so, 170-180 MB of code) is needed to load the cached kernels, not to run
them: loading the library runs its static constructors all over its text, and loading the
kernels runs the JIT linker, which leaves 70-90 MB of its pages resident in this process
(clean pages of the file: counted in its RSS, though the kernel could drop them). After
start-up, `release_compiler_code` unmaps them from the process (MADV_DONTNEED on its mappings
that hold no page of their own); the page cache keeps them, so the next launch finds them
there, and a kernel compiled later (a shape no cache holds) faults back what it runs.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

MADV_DONTNEED = 4
COMPILER_LIBRARIES = ("libllvmlite",)  # file names' starts


def smaps_mappings(smaps: str = "/proc/self/smaps") -> Iterator[tuple[list[str], dict[str, int]]]:
    """Each mapping of the process: its header's fields (address range, permissions, offset,
    device, inode, and the path if any) and its counters in kB (Rss, Anonymous, ...)."""
    header: list[str] | None = None
    counters: dict[str, int] = {}
    with open(smaps) as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                if header is not None:
                    yield header, counters
                header, counters = fields, {}
            elif len(fields) >= 2 and fields[0].endswith(":") and fields[1].isdigit():
                counters[fields[0][:-1]] = int(fields[1])
    if header is not None:
        yield header, counters


def file_only_mappings(names: tuple[str, ...], smaps: str = "/proc/self/smaps") -> list[tuple[int, int]]:
    """(start, end) of the read-only mappings of the libraries whose file names start with
    one of `names` that hold only the file's pages. Dropping those loses nothing; a mapping
    the loader wrote into (relocations: its Anonymous pages) would lose its writes."""
    return [tuple(int(x, 16) for x in header[0].split("-")) for header, counters in smaps_mappings(smaps)
            if len(header) > 5 and os.path.basename(header[5]).startswith(names) and "w" not in header[1]
            and counters.get("Anonymous") == 0]


def release_compiler_code() -> int:
    """Unmap the compiler library's clean pages from the process; the number of its mappings
    released (0 when there is none, or this is not Linux with glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mappings = file_only_mappings(COMPILER_LIBRARIES)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return sum(libc.madvise(start, end - start, MADV_DONTNEED) == 0 for start, end in mappings)
