"""Write model.run files: the sh header (bundler/header.py), the runtime payload, the ZIP
with the model.

Layout (runtime/container.py reads it; DESIGN.md "The container"):

    [sh header, HEADER_SIZE bytes]   checks the platform and the file's size, unpacks the
                                     payload once into the user's cache, exec's the runtime
    [runtime payload]                tar.gz whose top folder is runtime/ (runtime/runtime); from
                                     `make runtime`, two gzip members the header unpacks
                                     on two cores at once (mr_payload_split)
    [zero padding]                   so that model.gguf's data starts at a multiple of 64 KiB
    [ZIP entries, all STORED]        model.gguf, .args, manifest.json
    [ZIP central directory, end record; ZIP64 records when an offset or size needs them]

Every ZIP offset counts from the start of the file, so `unzip -l` and Python's zipfile read
a model.run as an ordinary archive (bundler/zip_writer.py writes those records). Everything
is streamed: the kernel copies the payload and the weights while sha256 reads the same pages
on another thread (bundler/copying.py), and the few values known only at the end (the
model's CRC, the header's fields) are patched in place. Output goes to `OUT.partial`,
renamed over OUT only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bundler.copying import Progress, copy_region, digesting
from bundler.header import HeaderValues, render_header
from bundler.zip_writer import ZipWriter
from runtime.container import (ARGS_ENTRY, BUILD_ID_PATTERN, CENTRAL_HEADER, HEADER_SIZE,
                               LOCAL_HEADER, MANIFEST_ENTRY, MAX32, MODEL_ALIGNMENT, MODEL_ENTRY)
from runtime.session import UserError, model_name, open_model, open_model_run
from runtime.units import format_bytes

FORMAT = "model.run/1"


# ------------------------------------------------------------------------ the runtime payload

@dataclass(frozen=True)
class RuntimePayload:
    """The runtime to embed: a tar.gz whose top folder is runtime/, and what runtime.json
    (written beside it by `make runtime`) says about it."""

    path: Path
    size: int
    build_id: str | None  # these three from runtime.json, when it gives the payload's size
    tiers: tuple[str, ...]  # (else: build id = sha256[:16] of the bytes, no tiers); its sha256
    sha256: str | None  # is trusted, not recomputed: `modelrun verify` checks it on the file
    split: int = 0  # runtime.json's too: where the second gzip member starts (0: unknown)


DEFAULT_PAYLOAD = Path(__file__).resolve().parent.parent / "dist" / "runtime.tar.gz"


def default_payload_path() -> Path | None:
    """$MODELRUN_RUNTIME, else dist/runtime.tar.gz of this repository (if it is there)."""
    env = os.environ.get("MODELRUN_RUNTIME")
    if env:
        return Path(env)
    return DEFAULT_PAYLOAD if DEFAULT_PAYLOAD.exists() else None


def load_payload(path: Path | None) -> RuntimePayload:
    """The payload at `path` (or the default one), checked enough to be sure it is one."""
    if path is None:
        path = default_payload_path()
        if path is None:
            raise UserError("no runtime payload: run `make runtime` or pass --runtime")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such runtime payload; run `make runtime` or pass --runtime")
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a runtime payload (a .tar.gz): {e}") from None
    if first is None or not (first.name == "runtime" or first.name.startswith("runtime/")):
        raise UserError(f"{path} is not a runtime payload: its top folder must be runtime/ "
                        f"(found {first.name if first else 'nothing'})")
    size = path.stat().st_size
    info = _runtime_json(path)
    build_id = sha256 = None
    tiers: tuple[str, ...] = ()
    split = 0
    if info is not None and info.get("size") in (None, size):
        build_id = info.get("build_id")
        sha256 = info.get("sha256")
        tiers = tuple(str(t) for t in info.get("tiers") or ())
        if not isinstance(build_id, str) or not BUILD_ID_PATTERN.fullmatch(build_id):
            raise UserError(f"{path.parent / 'runtime.json'}: build_id must be 1-64 of "
                            f"[0-9A-Za-z._-], got {build_id!r}")
        split = info.get("split") or 0
        if not isinstance(split, int) or not 0 <= split < size:
            raise UserError(f"{path.parent / 'runtime.json'}: split must be a byte offset "
                            f"inside the payload, got {split!r}; rebuild it with `make runtime`")
    return RuntimePayload(path, size, build_id, tiers, sha256, split)


def _runtime_json(payload: Path) -> dict[str, Any] | None:
    """runtime.json beside the payload, if there is one (`make runtime` writes it)."""
    meta = payload.parent / "runtime.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta} is unreadable: {e}") from None
    return info if isinstance(info, dict) else None


# ------------------------------------------------------------------------------ model.run

@dataclass(frozen=True)
class ModelSource:
    """The GGUF bytes to store: `size` bytes of `path` from `offset` (a .gguf, or the
    model.gguf entry of an older model.run). `sha256`: the digest they must have (checked
    while copying; a mismatch aborts). `crc32`: known already, so not computed again."""

    path: Path
    offset: int
    size: int
    sha256: str | None = None
    crc32: int | None = None


@dataclass(frozen=True)
class BuildResult:
    path: Path
    size: int
    manifest: dict[str, Any]
    model_data_offset: int


def modelrun_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelrun")
    except PackageNotFoundError:
        return "unknown"


def args_text(args: list[str]) -> str:
    """.args: one argument a line (a `...` line places the user's arguments)."""
    for arg in args:
        if "\n" in arg or "\r" in arg:
            raise UserError(f"an --arg cannot contain a line break: {arg!r}")
    return "".join(arg + "\n" for arg in args)


def planned_size(payload_size: int, model_size: int, small: int) -> int:
    """The model.run's size to within a few hundred bytes (for the disk-space check)."""
    data = -(-(HEADER_SIZE + payload_size + 100) // MODEL_ALIGNMENT) * MODEL_ALIGNMENT
    return data + model_size + small + 3 * (LOCAL_HEADER.size + CENTRAL_HEADER.size + 64) + 200


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (also through a symlink or a hard link)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_room(out: Path, need: int) -> None:
    """Refuse before writing when the output's file system has too little free space."""
    folder = out.resolve().parent
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder for the output")
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"not enough disk space in {folder}: {out.name} needs "
                        f"{format_bytes(need)}, {format_bytes(free)} free")


@contextmanager
def atomic_output(out: Path, executable: bool) -> Iterator[BinaryIO]:
    """A file written at OUT.partial and renamed to OUT only if the block completes; on any
    error (or Ctrl-C) the partial file is removed, so OUT is never half-written."""
    partial = out.with_name(out.name + ".partial")
    try:
        f = open(partial, "w+b")
    except OSError as e:
        raise UserError(f"cannot write {partial}: {e.strerror or e}") from None
    try:
        with f:
            yield f  # no fsync: like cp; the rename below is what makes OUT appear whole
        if executable:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o777 & ~umask)
        os.replace(partial, out)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{out} was not written: {e.strerror or e}") from None
        raise


def write_model_run(out: Path, payload: RuntimePayload, model: ModelSource, args: str,
                    manifest: dict[str, Any], progress: Progress | None = None,
                    zip64_limit: int = MAX32) -> BuildResult:
    """Write a model.run at `out` (through OUT.partial). `manifest` holds the fields the
    caller decides (name, created, ...); the model and runtime fields are added here from
    what was actually copied."""
    created = time.time()
    with atomic_output(out, executable=True) as f, \
            open(payload.path, "rb", buffering=0) as payload_in, \
            open(model.path, "rb", buffering=0) as model_in:
        # The weights first, at their place after the payload (the gap reads as zeros until
        # the payload fills it), so their sha256 runs beside both copies.
        f.seek(HEADER_SIZE + payload.size)
        zw = ZipWriter(f, created, zip64_limit)
        data_offset = zw.begin(MODEL_ENTRY, model.size, crc=model.crc32 or 0, align=MODEL_ALIGNMENT)
        with digesting(model_in, model.offset, model.size, sha256=True,
                       crc32=model.crc32 is None) as model_digests:
            copy_region(model_in, model.offset, model.size, f, progress)
            f.seek(0)
            f.write(bytes(HEADER_SIZE))  # the header goes in last, with its fields known
            with digesting(payload_in, 0, payload.size, sha256=payload.sha256 is None,
                           crc32=False) as payload_digests:
                copy_region(payload_in, 0, payload.size, f, progress)
        runtime_sha = payload_digests.sha256 or payload.sha256
        build_id = payload.build_id or runtime_sha[:16]
        if model.sha256 and model.sha256 != model_digests.sha256:
            raise UserError(f"{model.path}: the model does not match the sha256 it was made with: "
                            f"the file is damaged — download it again (nothing was written)")
        if model.crc32 is None:
            zw.set_crc(model_digests.crc32)
        f.seek(data_offset + model.size)

        zw.add(ARGS_ENTRY, args.encode("utf-8"))
        manifest = {
            "format": FORMAT,
            **manifest,
            "model": {"entry": MODEL_ENTRY, "size": model.size, "sha256": model_digests.sha256},
            "runtime": {"build_id": build_id, "tiers": list(payload.tiers),
                        "size": payload.size, "sha256": runtime_sha},
            "modelrun_version": modelrun_version(),
        }
        zw.add(MANIFEST_ENTRY, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        total = zw.finish()
        f.seek(0)
        f.write(render_header(HeaderValues(total, HEADER_SIZE, payload.size, build_id,
                                           runtime_sha, payload.split)))
    return BuildResult(out, total, manifest, data_offset)


def _check_output(out: Path, *inputs: Path) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a folder; pass the path of the file to write (-o OUT.run)")
    for source in inputs:
        if same_file(source, out):
            raise UserError(f"{out} is the input {source} itself; choose another output path")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_build_inputs(model_path: Path, out: Path, payload_path: Path | None) -> RuntimePayload:
    """The checks on a build's inputs that need no writing (the output is neither the model
    nor the payload; the payload exists), also for callers with work to do before the build
    (`build --quantize`). Returns the payload."""
    _check_output(out, model_path)
    payload = load_payload(payload_path)
    _check_output(out, payload.path)
    return payload


def build(model_path: Path, out: Path, payload_path: Path | None = None, *, name: str | None = None,
          args: list[str] | tuple[str, ...] = (), progress_factory=None,
          zip64_limit: int = MAX32) -> BuildResult:
    """`modelrun build`: check everything that can be checked (the GGUF parses, the output
    is not the input, the disk has room), then write the model.run.
    progress_factory(total bytes) -> a context manager yielding progress(n)."""
    with open_model(str(model_path)) as gguf:
        name = name or model_name(gguf, str(model_path))
    text = args_text(list(args))
    payload = check_build_inputs(model_path, out, payload_path)
    size = model_path.stat().st_size
    check_room(out, planned_size(payload.size, size, len(text) + 2048))
    source = ModelSource(model_path, 0, size)
    with _progress(progress_factory, payload.size + size) as progress:
        return write_model_run(out, payload, source, text, {"name": name, "created": _now()},
                               progress, zip64_limit)


def upgrade(old_path: Path, out: Path, payload_path: Path | None = None, *, progress_factory=None,
            zip64_limit: int = MAX32) -> BuildResult:
    """`modelrun upgrade`: the same weights and .args with another runtime. The weights are
    hashed once, while being copied, against the old manifest's sha256."""
    with open_model_run(old_path) as old:
        manifest = old.manifest()
        expected = old.expected_model_sha256()
        entry = old.entries[MODEL_ENTRY]
        text = old.read(ARGS_ENTRY).decode("utf-8") if ARGS_ENTRY in old.entries else ""
    _check_output(out, old_path)
    payload = load_payload(payload_path)
    _check_output(out, payload.path)
    check_room(out, planned_size(payload.size, entry.size, len(text) + 2048))
    source = ModelSource(old_path, entry.data_offset, entry.size, sha256=expected, crc32=entry.crc32)
    kept = {k: manifest[k] for k in ("name", "created") if k in manifest}
    with _progress(progress_factory, payload.size + entry.size) as progress:
        return write_model_run(out, payload, source, text, {**kept, "upgraded": _now()},
                               progress, zip64_limit)


def extract(run_path: Path, out: Path, *, force: bool = False, progress_factory=None) -> str:
    """`modelrun extract`: model.gguf byte for byte, checked against the manifest's sha256
    while it is copied. Returns the sha256."""
    with open_model_run(run_path) as run:
        expected = run.expected_model_sha256()
        entry = run.entries[MODEL_ENTRY]
    _check_output(out, run_path)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    check_room(out, entry.size)
    with _progress(progress_factory, entry.size) as progress, \
            atomic_output(out, executable=False) as f, \
            open(run_path, "rb", buffering=0) as src:
        with digesting(src, entry.data_offset, entry.size, sha256=True, crc32=False) as digests:
            copy_region(src, entry.data_offset, entry.size, f, progress)
        if digests.sha256 != expected:
            raise UserError(f"{run_path}: the model does not match the sha256 it was made with: "
                            f"the file is damaged — download it again ({out} was not written)")
    return expected


@contextmanager
def _progress(factory, total: int) -> Iterator[Progress | None]:
    if factory is None:
        yield None
    else:
        with factory(total) as progress:
            yield progress
