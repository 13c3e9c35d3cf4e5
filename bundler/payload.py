"""Build the runtime payload of model.run: the frozen runtime with its kernels precompiled.

    python -m bundler.payload [--out dist] [--tier x86-64-v3 ...]      (what `make runtime` runs)

Steps: PyInstaller builds the onedir `runtime/runtime` from build.spec; its files are hashed
into the build id (written to runtime/build_id); the frozen runtime itself then compiles every
kernel signature the engine uses, once per CPU tier, into runtime/kernel-cache/<build id>/<tier>/
(the hidden MODELRUN_PRECOMPILE entry, runtime/precompile.py): first on this machine's tier by
running the test suite's tiny synthetic models (one per architecture family) through the
engine, which records the signatures; a second run in a new process checks that everything
now loads from the cache; then the other tiers replay the signatures, two at a time. Only
the kernels the runtime calls from Python are kept (their callees are compiled into them).
Last, the folder is packed into a deterministic tar.gz, dist/runtime-<build id>.tar.gz, with
dist/runtime.tar.gz pointing at it and dist/runtime.json describing it (build id, tiers,
sha256, size, and `split`: where its second gzip member starts; see pack()).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import click

from runtime import cpu
from runtime import BUILD_ID_FILE
from runtime.kernels import KERNEL_CACHE_FOLDER
from runtime.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "build.spec"
ALL_TIERS = cpu.X86_TIERS
TAR_MTIME = 946684800  # 2000-01-01: a fixed time, so one build always packs to the same bytes


class PayloadError(click.ClickException):
    """A step of the payload build failed; the message says which and why."""


def build_payload(out_dir: Path | str, tiers: Iterable[str] = ALL_TIERS, *,
                  work_dir: Path | str | None = None, jobs: int = 2,
                  say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """Build the payload into out_dir; returns out_dir/runtime-<build id>.tar.gz.

    `tiers`: the CPU tiers to ship compiled kernels for (this machine's tier is always
    compiled first: its run records the signatures). `work_dir` keeps PyInstaller's files
    (default: build/payload in the repository). `jobs`: tiers compiled at a time.
    """
    out_dir, tiers = Path(out_dir), _check_tiers(tiers)
    work = Path(work_dir) if work_dir else ROOT / "build" / "payload"
    t0 = time.perf_counter()
    onedir = freeze(work, say)
    build_id = write_build_id(onedir)
    say(f"payload: build id {build_id}; frozen in {time.perf_counter() - t0:.0f} s, "
        f"{format_bytes(_folder_size(onedir))}")
    t1 = time.perf_counter()
    precompile(onedir, tiers, work, jobs, say)
    say(f"payload: kernels for {', '.join(tiers)} compiled in {time.perf_counter() - t1:.0f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = out_dir / f"runtime-{build_id}.tar.gz"
    split = pack(onedir, payload)
    digest = _sha256(payload)
    latest = out_dir / "runtime.tar.gz"
    latest.unlink(missing_ok=True)
    latest.symlink_to(payload.name)
    (out_dir / "runtime.json").write_text(json.dumps(
        {"build_id": build_id, "tiers": list(tiers), "sha256": digest,
         "size": payload.stat().st_size, "split": split}, indent=2) + "\n")
    say(f"payload: {payload} ({format_bytes(payload.stat().st_size)}; "
        f"{format_bytes(_folder_size(onedir))} unpacked) in {time.perf_counter() - t0:.0f} s")
    return payload


def _check_tiers(tiers: Iterable[str]) -> tuple[str, ...]:
    tiers = tuple(dict.fromkeys(tiers))
    for tier in tiers:
        if tier not in ALL_TIERS:
            raise PayloadError(f"unknown tier {tier!r}; the payload ships {', '.join(ALL_TIERS)}")
    if not tiers:
        raise PayloadError("no tier to compile kernels for")
    return tiers


def freeze(work: Path, say: Callable[[str], None]) -> Path:
    """PyInstaller's onedir build of build.spec: work/dist/runtime (the old one replaced)."""
    dist = work / "dist"
    shutil.rmtree(dist / "runtime", ignore_errors=True)
    say("payload: running PyInstaller (about a minute)")
    cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
           "--distpath", str(dist), "--workpath", str(work / "pyinstaller"), str(SPEC)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise PayloadError(f"PyInstaller failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    onedir = dist / "runtime"
    if not (onedir / "runtime").is_file():
        raise PayloadError(f"PyInstaller made no {onedir / 'runtime'}")
    return onedir


def tree_hash(folder: Path) -> str:
    """sha256 of every file's relative path, mode and bytes (symlinks: their target)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_file():
            h.update(f"F {rel} {path.stat().st_mode & 0o111:o} {path.stat().st_size}\n".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def write_build_id(onedir: Path) -> str:
    """Hash the frozen files (before any cache) into the build id; write it beside the exe."""
    for leftover in (onedir / BUILD_ID_FILE, onedir / KERNEL_CACHE_FOLDER):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    build_id = tree_hash(onedir)[:16]
    (onedir / BUILD_ID_FILE).write_text(build_id + "\n")
    return build_id


def synthetic_models(folder: Path) -> list[Path]:
    """The test suite's tiny models, one per architecture family (tests/conftest.py), as
    the warm-up workload: every op and matrix kernel the engine calls, at a tiny size."""
    spec = importlib.util.spec_from_file_location("modelrun_synthetic_models",
                                                  ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = []
    for seed, arch in enumerate(module.SYNTHETIC_SPECS):
        path = folder / f"{arch}.gguf"
        module.write_synthetic_model(path, arch, seed=seed)
        paths.append(path)
    return paths


def _run_frozen(onedir: Path, tier: str, job: dict, job_file: Path) -> tuple[str, float]:
    """The frozen runtime's precompile entry for one tier; (its summary line, seconds)."""
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(MODELRUN_CPU_TIER=tier, MODELRUN_PRECOMPILE=str(job_file))
    t0 = time.perf_counter()
    done = subprocess.run([str(onedir / "runtime")], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise PayloadError(f"precompiling the kernels for {tier} failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stderr.strip().splitlines()
    return (lines[-1] if lines else ""), time.perf_counter() - t0


def precompile(onedir: Path, tiers: tuple[str, ...], work: Path, jobs: int,
               say: Callable[[str], None]) -> None:
    """Fill onedir/kernel-cache for each tier, with the frozen runtime itself; then keep only
    the kernels the runtime loads (the ones it calls from Python: their callees are compiled
    into them, and stay out of the payload)."""
    host = cpu.best_tier(cpu.host_features(), platform.machine())
    if host not in tiers:
        raise PayloadError(f"the tiers must include this machine's ({host}): its run records "
                           f"the kernel signatures the others replay")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        models = [str(m) for m in synthetic_models(tmp)]
        signatures = tmp / "signatures.pickle"
        line, seconds = _run_frozen(onedir, host, {"models": models, "record": str(signatures)},
                                    tmp / "record.json")
        say(f"payload: {host}: {line} ({seconds:.0f} s)")
        keep: set[tuple[str, str]] = set()

        def check(tier: str) -> None:
            """Load everything again in a new process: nothing may compile."""
            loaded = tmp / f"loaded-{tier}.json"
            line, seconds = _run_frozen(onedir, tier, {"models": models, "check": str(loaded)},
                                        tmp / f"check-{tier}.json")
            say(f"payload: {tier}, check in a new process: {line} ({seconds:.0f} s)")
            keep.update((module, function) for module, function in json.loads(loaded.read_text()))

        check(host)
        others = [t for t in tiers if t != host]

        def replay(tier: str) -> tuple[str, str, float]:
            return (tier, *_run_frozen(onedir, tier, {"replay": str(signatures)},
                                       tmp / f"{tier}.json"))

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for tier, line, seconds in pool.map(replay, others):
                say(f"payload: {tier}: {line} ({seconds:.0f} s)")
        runnable = cpu.tier_features(host) if host in cpu.X86_TIERS else frozenset()
        for tier in others:  # the tiers this machine can run are checked like its own
            if tier in cpu.X86_TIERS and cpu.tier_features(tier) <= runnable:
                check(tier)
    for folder in (onedir / KERNEL_CACHE_FOLDER).glob("*/*"):
        prune_cache(folder, keep)


def prune_cache(folder: Path, keep: set[tuple[str, str]]) -> None:
    """Delete the cache files of every kernel but `keep` ((module, function) pairs). Numba
    names them <module's file name>.<function>-<line>.py<version>.nbi and .<n>.nbc."""
    prefixes = tuple(f"{module.rpartition('.')[2]}.{function}-" for module, function in keep)
    for path in folder.iterdir():
        if path.suffix in (".nbi", ".nbc") and not path.name.startswith(prefixes):
            path.unlink()


def pack(onedir: Path, out: Path) -> int:
    """onedir as runtime/... in a tar.gz that depends only on the files: sorted entries,
    fixed times and owners, no gzip name or time. Written to a temporary name, then renamed.

    The tar.gz is two gzip members, so that model.run's first launch can unpack them on two
    cores at once (gzip decompresses on one; the payload took 1.8 s on one core here): the
    second holds the largest file alone (libllvmlite.so, 60% of the bytes), the first
    everything else, without the tar end marker, so the two read in a row are still one
    ordinary tar.gz for tar, Python's tarfile or gzip -dc. Returns the size of the first
    member: where the second starts.
    """
    partial = out.with_name(out.name + ".partial")

    def entry(path: Path, name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        st = path.lstat()
        info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
        if path.is_symlink():
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
        elif path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.size, info.mode = st.st_size, 0o755 if st.st_mode & 0o111 else 0o644
        return info

    def add(tar: tarfile.TarFile, path: Path) -> None:
        info = entry(path, "runtime/" + path.relative_to(onedir).as_posix())
        if info.isreg():
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)

    paths = sorted(onedir.rglob("*"))
    files = [p for p in paths if p.is_file() and not p.is_symlink()]
    largest = max(files, key=lambda p: p.stat().st_size, default=None)
    with open(partial, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            tar = tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT)
            tar.addfile(entry(onedir, "runtime"))
            for path in paths:
                if path != largest:
                    add(tar, path)
            # not tar.close(): that writes the end marker, which would hide the second member
        split = raw.tell()
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            if largest is not None:
                add(tar, largest)
    os.replace(partial, out)
    return split


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=str(ROOT / "dist"),
              show_default=True, help="Where runtime-<build id>.tar.gz and runtime.json go.")
@click.option("--tier", "tiers", multiple=True, type=click.Choice(ALL_TIERS),
              help="A CPU tier to ship kernels for (repeatable; default: all).")
@click.option("--jobs", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Tiers compiled at a time.")
def main(out_dir: str, tiers: tuple[str, ...], jobs: int) -> None:
    """Build the runtime payload of model.run (PyInstaller + precompiled kernels)."""
    build_payload(out_dir, tiers or ALL_TIERS, jobs=jobs)


if __name__ == "__main__":
    main()
