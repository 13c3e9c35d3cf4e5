"""model.run end to end: `modelrun build`, the sh header, runtime/container.py, and the
inspect / extract / verify / upgrade commands.

The runtime payload here is a stand-in for the frozen one (bundler/payload.py): a tar.gz whose
runtime/runtime is a sh script running `python -m runtime` from this checkout, so the whole
path (header -> unpack -> exec -> --container -> ZIP -> mmap'd GGUF) runs in seconds. The
stand-in also points the runtime at the kernel cache the suite already uses (the real payload
ships its compiled kernels), so that each test's fresh XDG_CACHE_HOME does not mean compiling
them again. References are independent of our reader: Python's zipfile, `unzip`, and the
runtime on the plain .gguf.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from bundler import container as bc
from bundler import copying
from bundler.header import HeaderValues, render_header
from bundler.cli import main as modelrun
from conftest import run_in_group, write_synthetic_model, write_synthetic_model_with_tokenizer
from runtime.container import HEADER_SIZE, ContainerError, open_container, splice_args

REPO = Path(__file__).resolve().parent.parent
KERNEL_CACHE_HOME = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
GENERATE = ["-p", "hi", "--temp", "0"]  # with -n N: a few greedy tokens of the tiny model

# A SentencePiece vocabulary: specials, the 256 byte pieces, a few words.
TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
    ["\u2581hi", "\u2581", "h", "i", "hi", "\u2581the", "a", "b"]


def write_tiny_model(path: Path, seed: int) -> Path:
    """A tiny llama (conftest's synthetic spec) with a tokenizer, so `-p hi` runs."""
    types = [2, 3, 3] + [6] * 256 + [1] * (len(TOKENS) - 259)
    write_synthetic_model_with_tokenizer(path, "llama", (TOKENS, [0.0] * len(TOKENS), types), seed=seed)
    return path


def fake_runtime_script(marker: str = "") -> bytes:
    """runtime/runtime of a fake payload: this checkout's `python -m runtime`."""
    return (f"#!/bin/sh\n# fake modelrun runtime {marker}\n"
            f"XDG_CACHE_HOME='{KERNEL_CACHE_HOME}' PYTHONPATH='{REPO}' "
            f"exec '{sys.executable}' -m runtime \"$@\"\n").encode()


def write_fake_payload(path: Path, marker: str = "", filler: int = 0) -> Path:
    """A runtime payload whose runtime/runtime runs this checkout's `python -m runtime`.
    `marker` changes its bytes (another build); `filler` adds incompressible bytes so that
    unpacking takes a moment."""
    script = fake_runtime_script(marker)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("runtime")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        exe = tarfile.TarInfo("runtime/runtime")
        exe.size, exe.mode = len(script), 0o755
        tar.addfile(exe, io.BytesIO(script))
        if filler:
            blob = tarfile.TarInfo("runtime/filler")
            blob.size, blob.mode = filler, 0o644
            tar.addfile(blob, io.BytesIO(os.urandom(filler)))
    return path


def write_split_payload(folder: Path, filler: int, split_shift: int = 0) -> tuple[Path, int]:
    """A fake runtime packed as `make runtime` packs it (bundler.payload.pack: two gzip
    members, the largest file, here the filler, in the second), with runtime.json beside
    it giving the split, off by `split_shift` bytes if asked. Returns (payload, split)."""
    from bundler.payload import pack

    onedir = folder / "onedir"
    onedir.mkdir(parents=True)
    (onedir / "runtime").write_bytes(fake_runtime_script())
    (onedir / "runtime").chmod(0o755)
    (onedir / "lib").mkdir()
    (onedir / "lib" / "filler.so").write_bytes(os.urandom(filler))
    payload = folder / "runtime.tar.gz"
    split = pack(onedir, payload)
    (folder / "runtime.json").write_text(json.dumps(
        {"build_id": "split-" + folder.name, "tiers": [], "size": payload.stat().st_size,
         "split": split + split_shift, "sha256": hashlib.sha256(payload.read_bytes()).hexdigest()}))
    return payload, split


def build(model: Path, out: Path, payload: Path, *args: str) -> Path:
    result = CliRunner().invoke(modelrun, ["build", str(model), "-o", str(out),
                                           "--runtime", str(payload), *args])
    assert result.exit_code == 0, result.output
    return out


class Files:
    """The module's shared files: models, payloads, model.run files, a warm cache."""

    def __init__(self, root: Path):
        self.root = root
        self.model = write_tiny_model(root / "tiny.gguf", seed=1)
        self.other = root / "other.gguf"
        write_synthetic_model(self.other, "qwen3", seed=3)
        self.payload = write_fake_payload(root / "runtime.tar.gz")
        # .args "-n 2": the user's -n comes after it and wins
        self.run = build(self.model, root / "tiny.run", self.payload, "--arg=-n", "--arg=2")
        self.cache = root / "cache"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "XDG_CACHE_HOME": str(self.cache), **extra}

    def launch(self, path: Path, *args: str, env: dict | None = None, timeout: float = 300,
               prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """Run a model.run the way a user does: exec the file itself."""
        return run_in_group([*prefix, path, *args], timeout, env=env or self.env())

    def variant(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        path.chmod(0o755)
        return path


def runtime(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def layout(path: Path) -> dict[str, int]:
    """Offsets of the parts of a model.run, from zipfile and the local header (not from
    runtime/container.py): model data, central directory, payload end."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("model.gguf")
    _, _, _, _, _, _, _, _, _, n_name, n_extra = struct.unpack_from("<IHHHHHIIIHH", data, info.header_offset)
    eocd = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack_from("<I", data, eocd + 16)[0]
    text = data[:HEADER_SIZE].decode("utf-8", "replace")
    payload_size = int(text.split("mr_payload_size=")[1].split()[0])
    return {"model_data": info.header_offset + 30 + n_name + n_extra, "model_size": info.file_size,
            "cd": cd_offset, "payload_end": HEADER_SIZE + payload_size, "total": len(data),
            "checks_end": data.index(b"\n}\n") + 3}


def without_free_memory(info: str) -> str:
    """--info with the machine's available memory (which moves between two runs) blanked."""
    return re.sub(r"[\d.]+ [kKMGT]?i?B available", "_ available", info)


def one_line(stderr: str) -> str:
    """The one line a failure prints, after checking it is one line and no traceback
    (progress lines aside: a progress bar's label, the header's "unpacking" note)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and
             not line.startswith(("verifying", "modelrun: unpacking the runtime"))]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("container"))


# ------------------------------------------------------------------------------ build and run

def test_run_prints_what_the_runtime_prints_on_the_plain_gguf(files):
    ran = files.launch(files.run, *GENERATE, "-n", "4")
    assert ran.returncode == 0, ran.stderr
    reference = runtime("-m", str(files.model), *GENERATE, "-n", "4")
    assert reference.returncode == 0, reference.stderr
    assert ran.stdout == reference.stdout and ran.stdout.strip()
    assert "4 generated" in ran.stderr  # the user's -n 4 came after .args' -n 2
    assert "unpacking the runtime" in ran.stderr  # first launch on an empty cache
    again = files.launch(files.run, "--info")
    assert again.returncode == 0 and "unpacking" not in again.stderr


def test_zip_part_is_an_ordinary_archive_with_the_model_64k_aligned(files):
    listed = subprocess.run(["unzip", "-l", str(files.run)], capture_output=True, text=True)
    assert listed.returncode == 0 and not listed.stderr and "warning" not in listed.stdout
    names = [line.split()[-1] for line in listed.stdout.splitlines()[3:-2]]
    assert names == ["model.gguf", ".args", "manifest.json"]
    tested = subprocess.run(["unzip", "-tq", str(files.run)], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors" in tested.stdout  # every CRC-32 is right
    with zipfile.ZipFile(files.run) as z:
        assert z.testzip() is None
        assert z.read("model.gguf") == files.model.read_bytes()
        assert z.read(".args") == b"-n\n2\n"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        manifest = json.loads(z.read("manifest.json"))
    where = layout(files.run)
    assert where["model_data"] % 65536 == 0
    assert files.run.read_bytes()[where["model_data"]:where["model_data"] + 4] == b"GGUF"
    assert manifest["name"] == "tiny"
    assert manifest["model"] == {"entry": "model.gguf", "size": files.model.stat().st_size,
                                 "sha256": hashlib.sha256(files.model.read_bytes()).hexdigest()}
    payload_sha = hashlib.sha256(files.payload.read_bytes()).hexdigest()
    assert manifest["runtime"]["sha256"] == payload_sha
    assert manifest["runtime"]["build_id"] == payload_sha[:16]  # no runtime.json beside it
    assert os.access(files.run, os.X_OK)
    assert not list(files.root.glob("*.partial"))


def test_args_with_a_splice_mark_put_the_users_arguments_there(files):
    # .args: --temp 0 -p hi ... -n 2  -> the user's -n 4 lands before -n 2, which wins
    spliced = build(files.model, files.root / "spliced.run", files.payload,
                    "--arg=--temp", "--arg=0", "--arg=-p", "--arg=hi", "--arg=...", "--arg=-n", "--arg=2")
    ran = files.launch(spliced, "-n", "4")
    assert ran.returncode == 0, ran.stderr
    reference = runtime("-m", str(files.model), *GENERATE, "-n", "2")
    assert ran.stdout == reference.stdout and "2 generated" in ran.stderr


def test_splice_args():
    assert splice_args(["-n", "2"], ["-p", "x"]) == ["-n", "2", "-p", "x"]
    assert splice_args(["-a", "...", "-b"], ["-p", "x"]) == ["-a", "-p", "x", "-b"]
    assert splice_args(["..."], []) == []
    assert splice_args([], ["-p"]) == ["-p"]


def test_another_model_runs_with_the_same_runtime(files):
    ran = files.launch(files.run, "-m", str(files.other), "--info")
    assert ran.returncode == 0, ran.stderr
    assert without_free_memory(ran.stdout) == without_free_memory(
        runtime("-m", str(files.other), "--info").stdout)
    assert "qwen3" in ran.stdout
    own = files.launch(files.run, "--info")
    assert own.stdout.startswith("tiny.run: GGUF v3") and "llama" in own.stdout


def test_verify_passes_and_catches_a_flipped_weight_byte(files):
    ok = files.launch(files.run, "--verify")
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and hashlib.sha256(files.model.read_bytes()).hexdigest() in ok.stdout
    data = bytearray(files.run.read_bytes())
    where = layout(files.run)
    data[where["model_data"] + where["model_size"] - 100] ^= 0x01  # deep in the last tensor
    flipped = files.variant("flipped.run", bytes(data))
    bad = files.launch(flipped, "--verify")
    assert bad.returncode == 1
    assert "does not match" in one_line(bad.stderr) and "download it again" in bad.stderr
    plain = runtime("-m", str(files.model), "--verify")
    assert plain.returncode == 2 and "model.run" in one_line(plain.stderr)


# ------------------------------------------------------------------------------ damaged files

def cut_points(files: Files) -> dict[str, int]:
    where = layout(files.run)
    return {"header": where["checks_end"] + 50, "end of header": HEADER_SIZE - 1,
            "payload": HEADER_SIZE + (where["payload_end"] - HEADER_SIZE) // 2,
            "padding": where["payload_end"] + 100, "model": where["model_data"] + 1000,
            "central directory": where["cd"] + 10, "last byte": where["total"] - 1}


@pytest.mark.parametrize("where", ["header", "end of header", "payload", "padding", "model",
                                   "central directory", "last byte"])
def test_truncated_copies_say_so_in_one_line(files, where):
    data = files.run.read_bytes()
    cut = cut_points(files)[where]
    path = files.variant(f"cut-{where.replace(' ', '-')}.run", data[:cut])
    expected = f"this file is incomplete, {cut} of {len(data)} bytes — download it again"
    by_header = files.launch(path, "--info")
    assert by_header.returncode == 1 and expected in one_line(by_header.stderr)
    by_runtime = runtime("--container", str(path), "--info")  # the runtime checks too
    assert by_runtime.returncode == 1 and expected in one_line(by_runtime.stderr)


def test_a_copy_cut_inside_the_first_checks_never_runs(files):
    path = files.variant("cut-early.run", files.run.read_bytes()[:300])
    ran = files.launch(path, "--info")
    assert ran.returncode != 0 and ran.stdout == ""  # sh: syntax error, end of file
    by_runtime = runtime("--container", str(path), "--info")
    assert by_runtime.returncode == 1 and "incomplete" in one_line(by_runtime.stderr)


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


def damage_cases(files: Files) -> dict[str, tuple[bytes, str]]:
    data, where = files.run.read_bytes(), layout(files.run)
    with zipfile.ZipFile(files.run) as z:
        args, manifest = z.getinfo(".args"), z.getinfo("manifest.json")
        model_header = z.getinfo("model.gguf").header_offset
    data_of = lambda info: info.header_offset + 30 + len(info.filename)  # noqa: E731 (no extras)
    return {
        "end record": (_flip(data, len(data) - 22), "ZIP"),
        "central directory": (_flip(data, where["cd"]), "ZIP directory"),
        "local header": (_flip(data, model_header), "local header"),
        ".args": (_flip(data, data_of(args)), ".args"),
        "manifest": (_flip(data, data_of(manifest) + 5), "manifest.json"),
        "gguf magic": (_flip(data, where["model_data"]), "model.gguf"),
        "appended": (data + b"\0", "something was added"),
    }


@pytest.mark.parametrize("case", ["end record", "central directory", "local header", ".args",
                                  "manifest", "gguf magic", "appended"])
def test_damaged_copies_say_so_in_one_line(files, case):
    data, words = damage_cases(files)[case]
    path = files.variant(f"damaged-{case.replace(' ', '-')}.run", data)
    ran = files.launch(path, "--info")
    assert ran.returncode == 1, ran.stdout
    line = one_line(ran.stderr)
    assert words in line and "download it again" in line


@pytest.mark.parametrize("split_shift", [0, -100])
def test_a_two_member_payload_unpacks_in_parallel_or_falls_back_to_one_stream(files, tmp_path,
                                                                             split_shift):
    """make runtime's payload is two gzip members unpacked at once; read in a row they are
    one tar.gz. A split that is wrong (-100: inside the first member) must still unpack,
    through the whole payload in one stream."""
    payload, split = write_split_payload(tmp_path / "dist", 3 << 20, split_shift)
    with tarfile.open(payload) as tar:  # one ordinary tar.gz to every reader
        assert tar.getnames() == ["runtime", "runtime/lib", "runtime/runtime",
                                  "runtime/lib/filler.so"]
    run = build(files.model, tmp_path / "split.run", payload)
    assert f"mr_payload_split={split + split_shift} ".encode() in run.read_bytes()[:HEADER_SIZE]
    shim = tmp_path / "bin"  # a tar that notes each call: 2 in parallel, 3 with the fallback
    shim.mkdir()
    (shim / "tar").write_text(f"#!/bin/sh\necho called >> '{tmp_path / 'tar.log'}'\n"
                              f"exec '{shutil.which('tar')}' \"$@\"\n")
    (shim / "tar").chmod(0o755)
    cache = tmp_path / "cache"
    env = files.env(XDG_CACHE_HOME=str(cache), PATH=f"{shim}:{os.environ['PATH']}")
    ran = files.launch(run, "--info", env=env)
    assert ran.returncode == 0, ran.stderr
    assert len((tmp_path / "tar.log").read_text().split()) == (2 if split_shift == 0 else 3)
    unpacked = cache / "modelrun" / hashlib.sha256(payload.read_bytes()).hexdigest() / "runtime"
    assert (unpacked / "lib" / "filler.so").read_bytes() == \
        (tmp_path / "dist" / "onedir" / "lib" / "filler.so").read_bytes()
    assert sorted(p.name for p in unpacked.parent.parent.iterdir()) == [unpacked.parent.name]


def test_a_split_outside_the_payload_is_refused_before_writing(files, tmp_path):
    payload, _ = write_split_payload(tmp_path / "dist", 1 << 16)
    meta = json.loads((payload.parent / "runtime.json").read_text())
    (payload.parent / "runtime.json").write_text(json.dumps({**meta, "split": meta["size"] + 5}))
    result = CliRunner().invoke(modelrun, ["build", str(files.model), "-o",
                                           str(tmp_path / "o.run"), "--runtime", str(payload)])
    assert result.exit_code == 1 and "split must be a byte offset" in result.output
    assert "make runtime" in result.output and not list(tmp_path.glob("o.run*"))


def test_a_damaged_second_member_is_caught_when_unpacking(files, tmp_path):
    payload, split = write_split_payload(tmp_path / "dist", 1 << 20)
    data = bytearray(build(files.model, tmp_path / "split.run", payload).read_bytes())
    data[HEADER_SIZE + split + (payload.stat().st_size - split) // 2] ^= 0xFF
    damaged = files.variant("split-damaged.run", bytes(data))
    cache = tmp_path / "cache"
    ran = files.launch(damaged, "--info", env=files.env(XDG_CACHE_HOME=str(cache)))
    assert ran.returncode == 1
    line = one_line(ran.stderr)
    assert "damaged" in line and "download it again" in line
    assert not list((cache / "modelrun").iterdir())  # no half-unpacked folder left


def test_a_damaged_runtime_payload_is_caught_when_unpacking(files, tmp_path):
    where = layout(files.run)
    # the payload's last 8 bytes are gzip's CRC-32 and size of the tar: flip the CRC
    path = files.variant("damaged-payload.run", _flip(files.run.read_bytes(), where["payload_end"] - 8))
    ran = files.launch(path, "--info", env=files.env(XDG_CACHE_HOME=str(tmp_path)))
    assert ran.returncode == 1
    assert "damaged (its runtime does not unpack" in one_line(ran.stderr)
    assert list((tmp_path / "modelrun").iterdir()) == []  # its temporary folder is gone


# ------------------------------------------------------------------------------ the sh header

@pytest.mark.parametrize("system, machine", [("Darwin", "arm64"), ("Linux", "aarch64")])
def test_other_platforms_get_one_line_naming_both(files, tmp_path, system, machine):
    fake = tmp_path / "uname"
    fake.write_text(f'#!/bin/sh\ncase "$1" in -s) echo {system};; -m) echo {machine};; esac\n')
    fake.chmod(0o755)
    ran = files.launch(files.run, "--info", env=files.env(PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert ran.returncode == 1 and ran.stdout == ""
    line = one_line(ran.stderr)
    assert "Linux x86_64" in line and f"{system} {machine}" in line


def test_concurrent_first_launches_both_work(files, tmp_path, spawn):
    """Three launches on an empty cache at once; a slowed-down tar makes sure they all
    unpack at the same time, so two of them lose the rename."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text(f'#!/bin/sh\nsleep 1\nexec {shutil.which("tar")} "$@"\n')
    (bin_dir / "tar").chmod(0o755)
    cache = tmp_path / "cache"
    env = files.env(XDG_CACHE_HOME=str(cache), PATH=f"{bin_dir}:{os.environ['PATH']}")
    launches = [spawn([files.run, "--info"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True) for _ in range(3)]
    results = [(p.communicate(timeout=300), p.returncode) for p in launches]
    expected = runtime("--container", str(files.run), "--info").stdout
    for (stdout, stderr), code in results:
        assert code == 0, stderr
        assert without_free_memory(stdout) == without_free_memory(expected)
        assert "unpacking the runtime" in stderr  # each one unpacked its own copy
    # named by the payload's sha256 (the build id is the manifest's)
    sha = json.loads(zipfile.ZipFile(files.run).read("manifest.json"))["runtime"]["sha256"]
    assert sha == hashlib.sha256(files.payload.read_bytes()).hexdigest()
    assert sorted(p.name for p in (cache / "modelrun").iterdir()) == [sha]  # no temp left
    assert sorted(p.name for p in (cache / "modelrun" / sha).iterdir()) == ["runtime"]


def read_only(folder: Path) -> tuple[str, ...]:
    """A command prefix under which `folder` is read-only, even for root (a private mount
    namespace with a read-only bind mount); for other users chmod does it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ()
    prefix = ("unshare", "-m", "sh", "-c",
              'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"',
              "sh", str(folder))
    probe = subprocess.run([*prefix, "sh", "-c", f"! mkdir {folder}/probe 2>/dev/null"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a read-only folder here (no mount namespaces)")
    return prefix


def test_read_only_cache_falls_back_to_tmpdir(files, tmp_path):
    cache, tmp = tmp_path / "ro-cache", tmp_path / "tmp"
    cache.mkdir()
    tmp.mkdir()
    prefix = read_only(cache)
    ran = files.launch(files.run, "--info", prefix=prefix,
                       env=files.env(XDG_CACHE_HOME=str(cache), TMPDIR=str(tmp)))
    assert ran.returncode == 0, ran.stderr
    expected = runtime("--container", str(files.run), "--info").stdout
    assert without_free_memory(ran.stdout) == without_free_memory(expected)
    assert list(cache.iterdir()) == []
    unpacked = list(tmp.glob(f"modelrun-{os.geteuid()}/*/runtime/runtime"))
    assert len(unpacked) == 1 and f"into {tmp}/modelrun-{os.geteuid()}/" in ran.stderr


def test_nowhere_to_unpack_says_what_to_do(files, tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    prefix = read_only(cache)
    ran = files.launch(files.run, "--info", prefix=prefix,
                       env=files.env(XDG_CACHE_HOME=str(cache), TMPDIR=str(cache)))
    assert ran.returncode == 1
    assert "set TMPDIR to a writable folder" in one_line(ran.stderr)


def test_header_is_fixed_size_and_plain_posix_sh(files, tmp_path):
    header = files.run.read_bytes()[:HEADER_SIZE]
    assert header.startswith(b"#!/bin/sh\n") and header.endswith(b"\n")
    (tmp_path / "header.sh").write_bytes(header)
    for shell in ("dash", "bash --posix"):
        if shutil.which(shell.split()[0]):
            checked = subprocess.run([*shell.split(), "-n", str(tmp_path / "header.sh")],
                                     capture_output=True, text=True)
            assert checked.returncode == 0, f"{shell}: {checked.stderr}"
    values = HeaderValues(total_size=10**15, payload_offset=HEADER_SIZE, payload_size=10**12,
                          build_id="x" * 64, payload_sha256="f" * 64, payload_split=10**12 - 1)
    assert len(render_header(values)) == HEADER_SIZE


# ------------------------------------------------------------------------------ whose runtime runs

def echo_payload(folder: Path, says: str, build_id: str) -> Path:
    """A payload whose runtime/runtime only prints `says`, with a runtime.json giving
    build_id (which a publisher writes as they like)."""
    folder.mkdir(parents=True)
    payload = folder / "runtime.tar.gz"
    script = f"#!/bin/sh\necho {says}\n".encode()
    with tarfile.open(payload, "w:gz") as tar:
        exe = tarfile.TarInfo("runtime/runtime")
        exe.size, exe.mode = len(script), 0o755
        tar.addfile(exe, io.BytesIO(script))
    (folder / "runtime.json").write_text(json.dumps(
        {"build_id": build_id, "tiers": [], "size": payload.stat().st_size,
         "sha256": hashlib.sha256(payload.read_bytes()).hexdigest()}))
    return payload


def test_a_runtime_is_never_picked_up_by_another_file_with_its_build_id(files, tmp_path):
    """Issue 16, finding 4: a model.run whose runtime.json claimed another file's build id
    planted its runtime where the honest file then ran it. Folders are named by the
    payload's sha256 now, checked while unpacking."""
    honest = build(files.model, tmp_path / "honest.run", echo_payload(tmp_path / "a", "honest", "same"))
    planter = build(files.model, tmp_path / "planter.run", echo_payload(tmp_path / "b", "planted", "same"))
    env = files.env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert files.launch(planter, env=env).stdout == "planted\n"
    ran = files.launch(honest, env=env)
    assert ran.returncode == 0 and ran.stdout == "honest\n", ran.stderr
    assert len(list((tmp_path / "cache" / "modelrun").iterdir())) == 2


def test_a_payload_that_does_not_match_its_sha256_is_not_unpacked(files, tmp_path):
    """A header that names another payload's sha256 (the folder a different runtime would
    go to) is refused when the payload is unpacked: the folder is never made."""
    data = files.run.read_bytes()
    sha = re.search(rb"mr_payload_sha256=([0-9a-f]{64})", data[:HEADER_SIZE]).group(1)
    other = hashlib.sha256(b"another runtime").hexdigest().encode()
    path = files.variant("claims-another.run", data.replace(sha, other, 1))
    ran = files.launch(path, "--info", env=files.env(XDG_CACHE_HOME=str(tmp_path)))
    assert ran.returncode == 1
    assert "damaged (its runtime does not match its sha256)" in one_line(ran.stderr)
    assert list((tmp_path / "modelrun").iterdir()) == []


def _launch_without_cache(files, tmp: Path, path: Path | None = None):
    """A launch whose cache cannot be made (it would be under a file), so $TMPDIR is used."""
    return files.launch(path or files.run, "--info",
                        env=files.env(XDG_CACHE_HOME="/dev/null/cache", TMPDIR=str(tmp)))


def _plant(private: Path, sha: str) -> None:
    exe = private / sha / "runtime" / "runtime"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\necho planted\n")
    exe.chmod(0o755)


@pytest.mark.parametrize("squat", ["open to others", "another user's", "a symlink"])
def test_tmpdir_fallback_trusts_only_a_private_folder_of_ours(files, tmp_path, squat):
    """Issue 16, finding 5: a pre-existing 0777 folder ran a planted runtime; a folder
    another user made gave a wrong "not writable" message. Now either gets a fresh folder
    from mktemp, removed when the runtime exits."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    private = tmp / f"modelrun-{os.geteuid()}"
    sha = json.loads(zipfile.ZipFile(files.run).read("manifest.json"))["runtime"]["sha256"]
    if squat == "a symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        _plant(tmp_path / "elsewhere", sha)
        private.symlink_to(tmp_path / "elsewhere")
    else:
        private.mkdir()
        _plant(private, sha)
        if squat == "open to others":
            private.chmod(0o777)
        else:
            if os.geteuid() != 0:
                pytest.skip("making a folder of another user needs root")
            os.chown(private, 65534, 65534)
            private.chmod(0o755)
    ran = _launch_without_cache(files, tmp)
    assert ran.returncode == 0, ran.stderr
    assert "planted" not in ran.stdout
    expected = runtime("--container", str(files.run), "--info").stdout
    assert without_free_memory(ran.stdout) == without_free_memory(expected)
    assert "is not a private folder of yours; using a fresh one" in ran.stderr
    assert sorted(p.name for p in tmp.iterdir()) == [private.name]  # the fresh one is gone


def test_tmpdir_fallback_reuses_its_private_folder(files, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = _launch_without_cache(files, tmp)
    assert first.returncode == 0 and "unpacking the runtime" in first.stderr, first.stderr
    again = _launch_without_cache(files, tmp)
    assert again.returncode == 0 and "unpacking" not in again.stderr and "fresh" not in again.stderr
    private = tmp / f"modelrun-{os.geteuid()}"
    assert oct(private.stat().st_mode & 0o777) == "0o700"


# ------------------------------------------------------------------------------ ZIP64

def test_zip64_records_when_sizes_pass_the_limit(files):
    """The 4 GiB limit, lowered: every size and offset above 4 KiB goes to ZIP64 records."""
    out = files.root / "zip64.run"
    bc.build(files.model, out, files.payload, args=["-n", "2"], zip64_limit=4096)
    data = out.read_bytes()
    assert struct.unpack_from("<I", data, len(data) - 22 - 20)[0] == 0x07064B50  # locator
    assert struct.unpack_from("<I", data, len(data) - 22 + 16)[0] == 0xFFFFFFFF  # cd offset
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        assert z.read("model.gguf") == files.model.read_bytes()
        assert z.read(".args") == b"-n\n2\n"
        header_offset = z.getinfo("model.gguf").header_offset
    listed = subprocess.run(["unzip", "-tq", str(out)], capture_output=True, text=True)
    assert listed.returncode == 0 and "No errors" in listed.stdout, listed.stdout + listed.stderr
    with open_container(out) as c:
        assert c.entries["model.gguf"].data_offset % 65536 == 0
        assert c.entries["model.gguf"].header_offset == header_offset
        assert c.default_args() == ["-n", "2"]
    ran = files.launch(out, "--info")
    assert ran.returncode == 0 and ran.stdout.startswith("zip64.run: GGUF")


# ------------------------------------------------------------------------------ the commands

def invoke(*args: str):
    return CliRunner().invoke(modelrun, [str(a) for a in args])


def test_inspect_shows_manifest_entries_and_the_model(files):
    result = invoke("inspect", files.run)
    assert result.exit_code == 0, result.output
    manifest = json.loads(zipfile.ZipFile(files.run).read("manifest.json"))
    where = layout(files.run)
    assert manifest["runtime"]["build_id"] in result.output
    assert manifest["model"]["sha256"] in result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("model.gguf "))
    assert str(where["model_data"]) in row.split() and "64 KiB" in row
    assert "default args      -n 2" in result.output
    assert "architecture       llama" in result.output  # runtime.cli.describe of the model


def test_inspect_shows_escapes_for_a_files_terminal_controls(files, tmp_path):
    """Issue 16, finding 11: a name holding ESC sequences rewrote what inspect showed."""
    model = tmp_path / "evil.gguf"
    types = [2, 3, 3] + [6] * 256 + [1] * (len(TOKENS) - 259)
    write_synthetic_model_with_tokenizer(model, "llama", (TOKENS, [0.0] * len(TOKENS), types),
                                         more=lambda w: w.add_name("Nice\x1b[2J\x1b]0;pwned\x07"))
    run = build(model, tmp_path / "evil.run", files.payload, "--name", "ok\rEVIL\u202e",
                "--arg=--temp\x1b[8m")
    result = invoke("inspect", run)
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\r\x07\u202e")
    assert "ok\\x0dEVIL\\u202e" in result.output and "--temp\\x1b[8m" in result.output
    assert "Nice\\x1b[2J\\x1b]0;pwned\\x07" in result.output


def test_extract_is_byte_identical_and_refuses_to_overwrite(files, tmp_path):
    out = tmp_path / "model.gguf"
    assert invoke("extract", files.run, "-o", out).exit_code == 0
    assert out.read_bytes() == files.model.read_bytes()
    again = invoke("extract", files.run, "-o", out)
    assert again.exit_code == 1 and "--force" in again.output
    assert invoke("extract", files.run, "-o", out, "--force").exit_code == 0
    onto_itself = invoke("extract", files.run, "-o", files.run, "--force")
    assert onto_itself.exit_code == 1 and "is the input" in onto_itself.output
    data = bytearray(files.run.read_bytes())
    data[layout(files.run)["model_data"] + 5000] ^= 1
    damaged = files.variant("extract-damaged.run", bytes(data))
    bad = invoke("extract", damaged, "-o", tmp_path / "bad.gguf")
    assert bad.exit_code == 1 and "download it again" in bad.output
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()


def test_verify_command_checks_model_and_runtime(files):
    ok = invoke("verify", files.run)
    assert ok.exit_code == 0 and "ok" in ok.output
    data, where = files.run.read_bytes(), layout(files.run)
    weights = invoke("verify", files.variant("v-model.run", _flip(data, where["model_data"] + 999)))
    assert weights.exit_code == 1 and "model does not match" in weights.output
    payload = invoke("verify", files.variant("v-payload.run", _flip(data, HEADER_SIZE + 20)))
    assert payload.exit_code == 1 and "runtime does not match" in payload.output


def test_upgrade_swaps_the_runtime_and_keeps_weights_and_args(files, tmp_path):
    folder = tmp_path / "dist"
    folder.mkdir()
    payload = write_fake_payload(folder / "runtime.tar.gz", marker="v2")
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    (folder / "runtime.json").write_text(json.dumps(  # as `make runtime` writes it
        {"build_id": "0123456789abcdef", "tiers": ["x86-64-v3", "x86-64-v2"], "sha256": digest,
         "size": payload.stat().st_size}))
    new = tmp_path / "new.run"
    result = invoke("upgrade", files.run, "-o", new, "--runtime", payload)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(files.run) as old_zip, zipfile.ZipFile(new) as new_zip:
        assert new_zip.read("model.gguf") == old_zip.read("model.gguf")
        assert new_zip.read(".args") == old_zip.read(".args")
        old_manifest = json.loads(old_zip.read("manifest.json"))
        manifest = json.loads(new_zip.read("manifest.json"))
    assert manifest["runtime"]["build_id"] == "0123456789abcdef" != old_manifest["runtime"]["build_id"]
    assert manifest["runtime"]["tiers"] == ["x86-64-v3", "x86-64-v2"]
    assert manifest["model"] == old_manifest["model"] and manifest["name"] == old_manifest["name"]
    assert b"mr_build_id=0123456789abcdef " in new.read_bytes()[:HEADER_SIZE]
    assert "x86-64-v3, x86-64-v2" in invoke("inspect", new).output
    cache = tmp_path / "cache"
    ran = files.launch(new, "--info", env=files.env(XDG_CACHE_HOME=str(cache)))
    assert ran.returncode == 0, ran.stderr
    assert (cache / "modelrun" / digest / "runtime" / "runtime").exists()
    # damaged weights are caught while copying: nothing is written
    data = bytearray(files.run.read_bytes())
    data[layout(files.run)["model_data"] + 777] ^= 1
    damaged = files.variant("upgrade-damaged.run", bytes(data))
    bad = invoke("upgrade", damaged, "-o", tmp_path / "bad.run", "--runtime", payload)
    assert bad.exit_code == 1 and "download it again" in bad.output
    assert not list(tmp_path.glob("bad.run*"))


def test_building_gemma_streams_in_constant_memory(files, gemma_path, tmp_path):
    import tracemalloc

    out = tmp_path / "gemma.run"
    tracemalloc.start()
    try:
        result = bc.build(gemma_path, out, files.payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20  # two copy buffers of 8 MiB, not the 253 MB model
    digest = hashlib.sha256()
    with open(gemma_path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert result.manifest["model"]["sha256"] == digest.hexdigest()
    tested = subprocess.run(["unzip", "-tq", str(out)], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors" in tested.stdout  # the CRC-32 streamed along
    assert result.model_data_offset % 65536 == 0


# ------------------------------------------------------------------------------ build refusals

def test_build_refuses_a_file_that_is_not_a_gguf(files, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    result = invoke("build", bad, "-o", tmp_path / "out.run", "--runtime", files.payload)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out.run*"))


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_build_refuses_to_write_over_its_input(files, tmp_path, how):
    model = tmp_path / "m.gguf"
    shutil.copy(files.model, model)
    out = {"same path": model, "symlink": tmp_path / "link.run", "hard link": tmp_path / "hard.run"}[how]
    if how == "symlink":
        out.symlink_to(model)
    elif how == "hard link":
        os.link(model, out)
    result = invoke("build", model, "-o", out, "--runtime", files.payload)
    assert result.exit_code == 1 and "is the input" in result.output
    assert model.read_bytes() == files.model.read_bytes()


def test_build_refuses_when_the_disk_is_too_small(files, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bc.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = invoke("build", files.model, "-o", tmp_path / "out.run", "--runtime", files.payload)
    assert result.exit_code == 1 and "not enough disk space" in result.output
    assert not list(tmp_path.iterdir())


def test_build_without_a_runtime_payload_says_how_to_make_one(files, tmp_path, monkeypatch):
    monkeypatch.delenv("MODELRUN_RUNTIME", raising=False)
    monkeypatch.setattr(bc, "DEFAULT_PAYLOAD", tmp_path / "dist" / "runtime.tar.gz")
    result = invoke("build", files.model, "-o", tmp_path / "out.run")
    assert result.exit_code == 1
    assert "no runtime payload: run `make runtime` or pass --runtime" in result.output
    monkeypatch.setenv("MODELRUN_RUNTIME", str(files.model))  # not a tar.gz
    result = invoke("build", files.model, "-o", tmp_path / "out.run")
    assert result.exit_code == 1 and "is not a runtime payload" in result.output


def test_a_failed_build_leaves_the_old_output_untouched(files, tmp_path, monkeypatch):
    out = tmp_path / "out.run"
    out.write_bytes(b"the previous build")
    real_copy = bc.copy_region
    calls = []

    def copy_then_fail(*args, **kwargs):
        digests = real_copy(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # after the weights: the disk fills up
            raise OSError(28, "No space left on device")
        return digests

    monkeypatch.setattr(bc, "copy_region", copy_then_fail)
    result = invoke("build", files.model, "-o", out, "--runtime", files.payload)
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert out.read_bytes() == b"the previous build"
    assert not (tmp_path / "out.run.partial").exists()


def test_a_file_system_without_kernel_copy_gets_the_same_bytes(files, tmp_path, monkeypatch):
    """copy_file_range refused (another OS, a file system that cannot): plain reads and writes."""
    import errno

    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(copying, "_copy_file_range", refuse)
    out = tmp_path / "user-copy.run"
    build(files.model, out, files.payload, "--arg=-n", "--arg=2")
    with zipfile.ZipFile(out) as z, zipfile.ZipFile(files.run) as ref:
        assert z.testzip() is None
        assert z.read("model.gguf") == ref.read("model.gguf")
        assert json.loads(z.read("manifest.json"))["model"] == json.loads(ref.read("manifest.json"))["model"]


def test_args_cannot_hold_line_breaks(files, tmp_path):
    result = invoke("build", files.model, "-o", tmp_path / "o.run", "--runtime", files.payload,
                    "--arg", "two\nlines")
    assert result.exit_code == 1 and "line break" in result.output


def test_reader_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.run"
    empty.write_bytes(b"")
    for path in (tmp_path / "missing.run", tmp_path, empty):
        with pytest.raises(ContainerError) as e:
            open_container(path)
        assert "\n" not in str(e.value)


def test_build_with_quantize_bundles_only_the_quantized_model(files, tmp_path):
    out = build(files.model, tmp_path / "q.run", files.payload, "--quantize", "Q8_0",
                "--allow-requantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.run"]  # no temporary GGUF left
    extracted = tmp_path / "q.gguf"
    assert invoke("extract", str(out), "-o", str(extracted)).exit_code == 0
    reader = gguf.GGUFReader(extracted)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert matrices and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in matrices)
    assert reader.fields["general.file_type"].parts[-1][0] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    result = files.launch(out, *GENERATE, "-n", "2")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_build_with_quantize_checks_its_inputs_before_quantizing(files, tmp_path):
    result = invoke("build", str(files.model), "-o", str(files.model), "--runtime",
                    str(files.payload), "--quantize", "Q8_0")
    assert result.exit_code != 0 and "quantizing" not in result.output
    result = invoke("build", str(files.model), "-o", str(tmp_path / "x.run"), "--runtime",
                    str(files.payload), "--quantize", "Q9_Z")
    assert result.exit_code != 0 and "Q9_Z" in result.output
    assert not list(tmp_path.iterdir())
