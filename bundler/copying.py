"""Copying and hashing byte ranges of big files at close to `cp`'s speed, in constant memory.

The kernel copies (copy_file_range: page cache to page cache, as `cp` does) while sha256
reads the same pages through an mmap on a second thread; nothing passes through Python's
memory. bundler/container.py streams the runtime payload and the weights with these.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from isal import isal_zlib

from runtime.session import UserError

COPY_CHUNK = 1 << 23  # bytes per copy step (a progress bar tick) and per sha256 update

Progress = Callable[[int], None]


@dataclass
class Digests:
    sha256: str | None = None
    crc32: int | None = None


@contextmanager
def digesting(src: BinaryIO, offset: int, size: int, *, sha256: bool,
              crc32: bool) -> Iterator[Digests]:
    """The digests of `size` bytes of src at `offset`, filled in when the block ends.

    sha256 (~1.3 GB/s with SHA-NI, one core) is the slow part of a build, so it starts first,
    on a second thread reading an mmap of the bytes, and runs beside whatever the block does:
    the kernel copying those bytes and the payload (copy_region). CRC-32 (ISA-L's, ~10 GB/s
    against zlib's ~2-3) runs at the end, on pages that are hot. Nothing is read into
    Python's memory: the mapping is the page cache's."""
    digests = Digests()
    with _mapped(src, offset, size) as data:
        stop = threading.Event()
        hasher = None
        if sha256:
            hasher = threading.Thread(target=_sha256_into, args=(data, digests, stop),
                                      name="sha256")
            hasher.start()
        try:
            yield digests
        except BaseException:
            stop.set()
            raise
        finally:
            if hasher is not None:
                hasher.join()
        if crc32:
            digests.crc32 = isal_zlib.crc32(data)


def _sha256_into(data: memoryview, digests: Digests, stop: threading.Event) -> None:
    h = hashlib.sha256()
    for at in range(0, len(data), COPY_CHUNK):
        if stop.is_set():
            return
        h.update(data[at:at + COPY_CHUNK])  # releases the GIL
    digests.sha256 = h.hexdigest()


def copy_region(src: BinaryIO, offset: int, size: int, out: BinaryIO,
                progress: Progress | None) -> None:
    """Copy `size` bytes of src from `offset` to out's current position, leaving out after
    them. The kernel copies (copy_file_range: page cache to page cache, as `cp` does), in
    COPY_CHUNK steps for the progress bar; plain reads and writes where it cannot (another
    OS, a file system that refuses)."""
    out.flush()
    start = out.tell()
    done = 0
    while done < size:
        want = min(COPY_CHUNK, size - done)
        try:
            n = _copy_file_range(src.fileno(), out.fileno(), want, offset + done, start + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            n = _user_copy(src, offset + done, want, out, start + done)
        if n == 0:
            raise UserError(f"{getattr(src, 'name', 'the input')} ended {size - done} bytes "
                            f"early (was it changed while being read?)")
        done += n
        if progress:
            progress(n)
    out.seek(start + size)


@contextmanager
def _mapped(src: BinaryIO, offset: int, size: int) -> Iterator[memoryview]:
    """A read-only view of `size` bytes of src at `offset`, through mmap (whose offset must
    be a multiple of the allocation granularity, hence the `skip`)."""
    if size == 0:
        yield memoryview(b"")
        return
    end = os.fstat(src.fileno()).st_size
    if offset + size > end:  # an mmap past the end would fault on reading, not raise
        raise UserError(f"{getattr(src, 'name', 'the input')} ended {offset + size - end} "
                        f"bytes early (was it changed while being read?)")
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    skip = offset - base
    with mmap.mmap(src.fileno(), skip + size, offset=base, access=mmap.ACCESS_READ) as mapping:
        whole = memoryview(mapping)
        view = whole[skip:]
        try:
            yield view
        finally:  # the mapping closes only once no view of it is left
            view.release()
            whole.release()


_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _no_copy_file_range(*args) -> int:
    raise OSError(errno.ENOSYS, "no copy_file_range on this system")


_copy_file_range = getattr(os, "copy_file_range", _no_copy_file_range)


def _user_copy(src: BinaryIO, at: int, size: int, out: BinaryIO, to: int) -> int:
    data = os.pread(src.fileno(), size, at)
    written = 0
    while written < len(data):
        written += os.pwrite(out.fileno(), memoryview(data)[written:], to + written)
    return len(data)
