"""Find and check the ZIP at the end of a model.run file, and open its model.gguf in place.

A model.run file (DESIGN.md, "The container"; bundler/container.py writes it):

    [#!/bin/sh header, HEADER_SIZE bytes]  fixed-width fields: total size, payload offset/size, build id
    [runtime payload: tar.gz]
    [ZIP: model.gguf (STORED, data 64 KiB aligned), .args, manifest.json]
    [ZIP central directory, end record]     (ZIP64 records when a size or offset needs them)

ZIP offsets count from the start of the file, so `unzip -l` and Python's zipfile read it as is.
This module is the one reader of the format, for the runtime and the bundler alike. Every
problem is a ContainerError: one line saying what is wrong and what to do (callers prefix
the path).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from runtime.gguf import GGUFError, GGUFFile

HEADER_SIZE = 8192
MODEL_ENTRY = "model.gguf"
ARGS_ENTRY = ".args"
MANIFEST_ENTRY = "manifest.json"
MODEL_ALIGNMENT = 65536
ARGS_PLACEHOLDER = "..."  # a line of .args that marks where the user's own arguments go
BUILD_ID_PATTERN = re.compile(r"[0-9A-Za-z._-]{1,64}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

# ZIP records (APPNOTE.TXT 4.3), little-endian.
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
LOCAL_SIG = 0x04034B50
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
CENTRAL_SIG = 0x02014B50
EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
EOCD_SIG = 0x06054B50
ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
ZIP64_EOCD_SIG = 0x06064B50
ZIP64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
ZIP64_LOCATOR_SIG = 0x07064B50
ZIP64_EXTRA_ID = 0x0001
MAX16 = 0xFFFF
MAX32 = 0xFFFFFFFF
STORED = 0
MAX_SMALL_ENTRY = 16 << 20  # .args and manifest.json are read whole; anything larger is damage

HASH_CHUNK = 8 << 20
AGAIN = "download it again"


class ContainerError(Exception):
    """A model.run that cannot be used; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class HeaderFields:
    """The numbers the sh header was patched with after writing."""

    total_size: int
    payload_offset: int
    payload_size: int
    build_id: str
    payload_sha256: str | None  # None in files made before the header carried it


@dataclass(frozen=True)
class ZipEntry:
    """One member of the embedded ZIP; offsets from the start of the file."""

    name: str
    method: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int


def read_header_fields(head: bytes) -> HeaderFields | None:
    """The sh header's fields from the file's first HEADER_SIZE bytes, or None if absent."""
    text = head.decode("utf-8", "replace")
    numbers = []
    for name in ("mr_total_size", "mr_payload_offset", "mr_payload_size"):
        m = re.search(rf"^{name}=(\d{{1,20}}) *$", text, re.MULTILINE)
        if m is None:
            return None
        numbers.append(int(m.group(1)))
    m = re.search(rf"^mr_build_id=({BUILD_ID_PATTERN.pattern}) *$", text, re.MULTILINE)
    if m is None:
        return None
    sha = re.search(rf"^mr_payload_sha256=({SHA256_PATTERN.pattern}) *$", text, re.MULTILINE)
    return HeaderFields(*numbers, m.group(1), sha.group(1) if sha else None)


def incomplete(have: int, want: int) -> ContainerError:
    return ContainerError(f"this file is incomplete, {have} of {want} bytes — {AGAIN}")


def damaged(what: str) -> ContainerError:
    return ContainerError(f"this file is damaged ({what}) — {AGAIN}")


class Container:
    """An open, checked model.run: its header fields, ZIP entries, manifest and .args.

    Opening reads a few small pieces (header, end records, central directory, local headers,
    .args and manifest.json, each CRC-checked); the model's bytes are only read by
    model_sha256 and mapped (not copied) by model().
    """

    def __init__(self, path: str, f: BinaryIO):
        self.path = path
        self._file = f
        self._mmap: mmap.mmap | None = None
        self.size = os.fstat(f.fileno()).st_size
        self.header = self._read_header()
        zip_start = self.header.payload_offset + self.header.payload_size if self.header else 0
        self.zip64 = False
        cd_offset, cd_size, count = self._find_central_directory(zip_start)
        self.central_directory = (cd_offset, cd_size)
        self.entries: dict[str, ZipEntry] = self._read_central_directory(cd_offset, cd_size, count)
        for entry in self.entries.values():
            if entry.header_offset < zip_start or entry.data_offset + entry.compressed_size > cd_offset:
                raise damaged(f"ZIP entry {entry.name!r} lies outside the ZIP part of the file")
        for name in (MODEL_ENTRY, MANIFEST_ENTRY):
            if name not in self.entries:
                raise damaged(f"it has no {name}")
        model = self.entries[MODEL_ENTRY]
        if model.method != STORED or model.compressed_size != model.size:
            raise ContainerError(f"its {MODEL_ENTRY} is compressed, so it cannot be mapped in place; "
                                 f"make it with `modelrun build`")
        self._manifest = self._parse_manifest(self.read(MANIFEST_ENTRY))
        self._args = parse_args_file(self.read(ARGS_ENTRY)) if ARGS_ENTRY in self.entries else []

    # -- the pieces -------------------------------------------------------------------------

    def _pread(self, offset: int, size: int) -> bytes:
        return os.pread(self._file.fileno(), size, offset) if size > 0 else b""

    def _read_header(self) -> HeaderFields | None:
        head = self._pread(0, min(self.size, HEADER_SIZE))
        if not head.startswith(b"#!"):
            if head[:4] == b"PK\x03\x04":
                return None  # a bare ZIP (no sh header): still readable
            raise ContainerError("it is not a model.run file (no modelrun sh header); "
                                 "pass a file made by `modelrun build`")
        fields = read_header_fields(head)
        if fields is None:
            if self.size < HEADER_SIZE:
                raise ContainerError(f"this file is incomplete: it ends inside its sh header, "
                                     f"after {self.size} bytes — {AGAIN}")
            raise ContainerError("it is not a model.run file (its sh header has no modelrun "
                                 "fields); pass a file made by `modelrun build`")
        if self.size < fields.total_size:
            raise incomplete(self.size, fields.total_size)
        if self.size > fields.total_size:
            raise ContainerError(f"this file has {self.size} bytes but was made with "
                                 f"{fields.total_size}: something was added to it — {AGAIN}")
        if fields.payload_offset < HEADER_SIZE or \
                fields.payload_offset + fields.payload_size > self.size:
            raise damaged("its header places the runtime outside the file")
        return fields

    def _find_central_directory(self, zip_start: int) -> tuple[int, int, int]:
        """(offset, size, entry count) of the central directory, from the end record(s)."""
        tail_start = max(zip_start, self.size - EOCD.size - MAX16)
        tail = self._pread(tail_start, self.size - tail_start)
        end_pos = -1
        pos = len(tail) - EOCD.size
        while pos >= 0:
            pos = tail.rfind(b"PK\x05\x06", 0, pos + 4)
            if pos < 0:
                break
            if pos + EOCD.size <= len(tail) and \
                    pos + EOCD.size + struct.unpack_from("<H", tail, pos + 20)[0] == len(tail):
                end_pos = pos
                break
            pos -= 1
        if end_pos < 0:
            raise damaged("no ZIP end record")
        _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = EOCD.unpack_from(tail, end_pos)
        end_offset = tail_start + end_pos
        locator = end_offset - ZIP64_LOCATOR.size
        if locator >= zip_start and self._pread(locator, 4) == struct.pack("<I", ZIP64_LOCATOR_SIG):
            self.zip64 = True
            _, _, record, _ = ZIP64_LOCATOR.unpack(self._pread(locator, ZIP64_LOCATOR.size))
            if not zip_start <= record <= locator - ZIP64_EOCD.size:
                raise damaged("the ZIP64 locator points outside the ZIP")
            (sig, _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset) = \
                ZIP64_EOCD.unpack(self._pread(record, ZIP64_EOCD.size))
            if sig != ZIP64_EOCD_SIG:
                raise damaged("no ZIP64 end record where its locator points")
            end_offset = record
        elif MAX32 in (cd_size, cd_offset):
            raise damaged("the ZIP end record needs a ZIP64 record that is missing")
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise damaged("the ZIP claims to span several disks")
        if cd_offset < zip_start or cd_offset + cd_size != end_offset:
            raise damaged(f"the ZIP directory (offset {cd_offset}, {cd_size} bytes) does not end "
                          f"where the end record starts ({end_offset})")
        if n_total > cd_size // CENTRAL_HEADER.size:
            raise damaged(f"the ZIP directory claims {n_total} entries in {cd_size} bytes")
        return cd_offset, cd_size, n_total

    def _read_central_directory(self, cd_offset: int, cd_size: int, count: int) -> dict[str, ZipEntry]:
        data = self._pread(cd_offset, cd_size)
        entries: dict[str, ZipEntry] = {}
        pos = 0
        for _ in range(count):
            if pos + CENTRAL_HEADER.size > len(data):
                raise damaged("the ZIP directory is cut short")
            (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len,
             _, _, _, header_offset) = CENTRAL_HEADER.unpack_from(data, pos)
            if sig != CENTRAL_SIG:
                raise damaged(f"bad ZIP directory record at offset {cd_offset + pos}")
            start = pos + CENTRAL_HEADER.size
            end = start + name_len + extra_len + comment_len
            if end > len(data):
                raise damaged("the ZIP directory is cut short")
            raw_name = data[start:start + name_len]
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            if MAX32 in (usize, csize, header_offset):
                big = iter(_zip64_values(data[start + name_len:start + name_len + extra_len]))
                try:
                    usize = next(big) if usize == MAX32 else usize
                    csize = next(big) if csize == MAX32 else csize
                    header_offset = next(big) if header_offset == MAX32 else header_offset
                except StopIteration:
                    raise damaged(f"ZIP entry {name!r} lacks its ZIP64 sizes") from None
            if name in entries:
                raise damaged(f"the ZIP holds {name!r} twice")
            data_offset = self._local_data_offset(raw_name, header_offset, method, crc)
            entries[name] = ZipEntry(name, method, crc, csize, usize, header_offset, data_offset)
            pos = end
        return entries

    def _local_data_offset(self, name: bytes, header_offset: int, method: int, crc: int) -> int:
        """Where an entry's data starts, once its local header agrees with the directory."""
        raw = self._pread(header_offset, LOCAL_HEADER.size + len(name))
        if len(raw) < LOCAL_HEADER.size + len(name):
            raise damaged(f"a ZIP local header at offset {header_offset} is cut short")
        sig, _, flags, local_method, _, _, local_crc, _, _, name_len, extra_len = \
            LOCAL_HEADER.unpack_from(raw)
        if sig != LOCAL_SIG or name_len != len(name) or raw[LOCAL_HEADER.size:] != name \
                or local_method != method or (not flags & 0x8 and local_crc != crc):
            raise damaged(f"the ZIP local header at offset {header_offset} does not match the "
                          f"directory")
        return header_offset + LOCAL_HEADER.size + name_len + extra_len

    @staticmethod
    def _parse_manifest(data: bytes) -> dict[str, Any]:
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise damaged(f"{MANIFEST_ENTRY} is not valid JSON") from None
        if not isinstance(manifest, dict):
            raise damaged(f"{MANIFEST_ENTRY} is not a JSON object")
        return manifest

    # -- what callers use ---------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def default_args(self) -> list[str]:
        """The arguments in .args (one a line), `...` included where it is."""
        return list(self._args)

    def read(self, name: str) -> bytes:
        """A small entry's bytes, CRC-checked."""
        entry = self.entries[name]
        if entry.method != STORED:
            raise ContainerError(f"its {name} is compressed; make it with `modelrun build`")
        if entry.size > MAX_SMALL_ENTRY:
            raise damaged(f"{name} claims {entry.size} bytes")
        data = self._pread(entry.data_offset, entry.size)
        if len(data) != entry.size or zlib.crc32(data) != entry.crc32:
            raise damaged(f"{name} fails its CRC-32 check")
        return data

    def model(self) -> GGUFFile:
        """model.gguf parsed in place over a read-only map of the whole file (no copy); its
        views keep the map alive after close()."""
        entry = self.entries[MODEL_ENTRY]
        if self._mmap is None:
            try:
                self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ContainerError(f"cannot map it: {getattr(e, 'strerror', None) or e}") from None
        try:
            return GGUFFile(self._mmap, offset=entry.data_offset, size=entry.size)
        except GGUFError as e:
            raise damaged(f"its {MODEL_ENTRY}: {e.problem}") from None

    def expected_model_sha256(self) -> str:
        sha = (self._manifest.get("model") or {}).get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise damaged(f"{MANIFEST_ENTRY} has no valid model sha256")
        return sha

    def sha256_of(self, offset: int, size: int, progress: Callable[[int], None] | None = None) -> str:
        """sha256 of `size` bytes from `offset`, read once in large chunks; progress(n) per chunk."""
        digest = hashlib.sha256()
        buffer = bytearray(min(HASH_CHUNK, max(size, 1)))
        view = memoryview(buffer)
        done = 0
        while done < size:
            n = os.preadv(self._file.fileno(), [view[:min(len(buffer), size - done)]], offset + done)
            if n <= 0:
                raise incomplete(offset + done, self.size)
            digest.update(view[:n])
            done += n
            if progress:
                progress(n)
        return digest.hexdigest()

    def model_sha256(self, progress: Callable[[int], None] | None = None) -> str:
        entry = self.entries[MODEL_ENTRY]
        return self.sha256_of(entry.data_offset, entry.size, progress)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a GGUFFile's views still use it; it goes with the last of them
            self._mmap = None
        self._file.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zip64_values(extra: bytes) -> list[int]:
    """The 8-byte values of a ZIP64 extra field (empty without one)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == ZIP64_EXTRA_ID:
            body = extra[pos + 4:pos + 4 + size]
            return [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
        pos += 4 + size
    return []


def open_container(path: str | os.PathLike) -> Container:
    """The checked model.run at `path` (close it, or use it in a `with`)."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ContainerError("no such file") from None
    except IsADirectoryError:
        raise ContainerError("it is a folder; pass a model.run file") from None
    except PermissionError:
        raise ContainerError("cannot read it: permission denied") from None
    except OSError as e:
        raise ContainerError(f"cannot read it: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ContainerError("it is not a regular file; pass a model.run file")
        return Container(path, f)
    except ContainerError:
        f.close()
        raise
    except OSError as e:
        f.close()
        raise ContainerError(f"cannot read it: {e.strerror or e}") from None


def parse_args_file(data: bytes) -> list[str]:
    """.args: one argument a line; blank lines are skipped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise damaged(f"{ARGS_ENTRY} is not UTF-8 text") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def splice_args(defaults: list[str], user: list[str]) -> list[str]:
    """llamafile's convention: the user's arguments replace the `...` line of .args, else
    they follow the defaults (so a user's option given again wins)."""
    if ARGS_PLACEHOLDER in defaults:
        i = defaults.index(ARGS_PLACEHOLDER)
        return defaults[:i] + user + [a for a in defaults[i + 1:] if a != ARGS_PLACEHOLDER]
    return defaults + user
