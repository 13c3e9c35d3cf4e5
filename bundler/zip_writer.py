"""The ZIP records of a model.run: local headers (padded so an entry's data is aligned),
the central directory and the end records, ZIP64 where a size or offset needs it.

Entries are STORED (never compressed) and every offset counts from the start of the file,
so `unzip -l` and Python's zipfile read a model.run as an ordinary archive. The layout's
constants are runtime/container.py's, which reads it.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from isal import isal_zlib

from runtime.container import (CENTRAL_HEADER, CENTRAL_SIG, EOCD, EOCD_SIG, LOCAL_HEADER,
                               LOCAL_SIG, MAX16, MAX32, ZIP64_EOCD, ZIP64_EOCD_SIG,
                               ZIP64_EXTRA_ID, ZIP64_LOCATOR, ZIP64_LOCATOR_SIG)

ZIP_VERSION, ZIP64_VERSION = 20, 45  # "version needed to extract": plain, with ZIP64 records
MADE_BY = (3 << 8) | ZIP64_VERSION  # Unix, spec 4.5 (so unzip shows the Unix file modes)
FILE_MODE = 0o100644 << 16  # external attributes: a regular file, rw-r--r--


@dataclass
class _ZipEntry:
    name: bytes
    header_offset: int
    size: int
    crc: int = 0


@dataclass
class ZipWriter:
    """The ZIP records after the payload; offsets are absolute (from the file's start).
    `zip64_limit`: sizes and offsets at or above it are stored in ZIP64 records (the ZIP
    maximum 0xFFFFFFFF by default; tests lower it to exercise ZIP64 on small files)."""

    out: BinaryIO
    mtime: float
    zip64_limit: int = MAX32
    entries: list[_ZipEntry] = field(default_factory=list)

    def _dos_time(self) -> tuple[int, int]:
        t = time.localtime(self.mtime)
        year = min(max(t.tm_year, 1980), 2107)
        dos_time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
        return dos_time, ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday

    def local_header_size(self, name: str, size: int) -> int:
        return LOCAL_HEADER.size + len(name.encode()) + (20 if size >= self.zip64_limit else 0)

    def begin(self, name: str, size: int, crc: int = 0, align: int = 1) -> int:
        """Pad (zeros) so the entry's data lands on a multiple of `align`, write its local
        header, and return the data's offset; the data is written next by the caller."""
        pos = self.out.tell()
        header_size = self.local_header_size(name, size)
        data_offset = -(-(pos + header_size) // align) * align
        if data_offset - header_size > pos:
            self.out.write(bytes(data_offset - header_size - pos))
        entry = _ZipEntry(name.encode(), data_offset - header_size, size, crc)
        self.entries.append(entry)
        big = size >= self.zip64_limit
        extra = struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, size, size) if big else b""
        dos_time, dos_date = self._dos_time()
        self.out.write(LOCAL_HEADER.pack(
            LOCAL_SIG, ZIP64_VERSION if big else ZIP_VERSION, 0, 0, dos_time, dos_date, crc,
            MAX32 if big else size, MAX32 if big else size, len(entry.name), len(extra)))
        self.out.write(entry.name + extra)
        return data_offset

    def set_crc(self, crc: int) -> None:
        """Patch the CRC-32 of the last entry begun (known once its data is written)."""
        entry = self.entries[-1]
        entry.crc = crc
        here = self.out.tell()
        self.out.seek(entry.header_offset + 14)  # the crc32 field of the local header
        self.out.write(struct.pack("<I", crc))
        self.out.seek(here)

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data), isal_zlib.crc32(data))
        self.out.write(data)

    def finish(self) -> int:
        """Write the central directory and the end record(s); return the file's size."""
        limit = self.zip64_limit
        cd_offset = self.out.tell()
        dos_time, dos_date = self._dos_time()
        for e in self.entries:
            big = [v for v in (e.size, e.size, e.header_offset) if v >= limit]
            extra = struct.pack(f"<HH{len(big)}Q", ZIP64_EXTRA_ID, 8 * len(big), *big) if big else b""
            self.out.write(CENTRAL_HEADER.pack(
                CENTRAL_SIG, MADE_BY, ZIP64_VERSION if big else ZIP_VERSION, 0, 0, dos_time,
                dos_date, e.crc, *(MAX32 if v >= limit else v for v in (e.size, e.size)),
                len(e.name), len(extra), 0, 0, 0, FILE_MODE,
                MAX32 if e.header_offset >= limit else e.header_offset))
            self.out.write(e.name + extra)
        cd_end = self.out.tell()
        cd_size, n = cd_end - cd_offset, len(self.entries)
        if cd_offset >= limit or cd_size >= limit or n >= MAX16:
            self.out.write(ZIP64_EOCD.pack(ZIP64_EOCD_SIG, ZIP64_EOCD.size - 12, MADE_BY,
                                           ZIP64_VERSION, 0, 0, n, n, cd_size, cd_offset))
            self.out.write(ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, cd_end, 1))
        self.out.write(EOCD.pack(EOCD_SIG, 0, 0, min(n, MAX16), min(n, MAX16),
                                 MAX32 if cd_size >= limit else cd_size,
                                 MAX32 if cd_offset >= limit else cd_offset, 0))
        return self.out.tell()
