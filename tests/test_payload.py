"""The runtime payload (bundler/payload.py): the frozen runtime runs with no Python and no JIT.

The payload is built once per tree by the `runtime_payload` fixture (conftest.py), with only
this machine's CPU tier precompiled.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from bundler.payload import pack, tree_hash
from conftest import READY_LIMIT_S, wait_until_serving
from runtime import cpu

ROOT = Path(__file__).resolve().parent.parent
KERNELS_LINE = re.compile(r"^kernels: (\S+), (\d+) from cache, (\d+) compiled$", re.M)


@pytest.fixture(scope="module")
def extracted(runtime_payload, tmp_path_factory) -> Path:
    """The payload unpacked with plain tar into an empty folder, as model.run's header does."""
    folder = tmp_path_factory.mktemp("extracted")
    subprocess.run(["tar", "-xzf", str(runtime_payload), "-C", str(folder)], check=True)
    return folder / "runtime"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A synthetic gemma3 model with a SentencePiece vocabulary (so -p works)."""
    from conftest import write_synthetic_model_with_tokenizer
    from test_server import tokenizer_vocabulary

    path = tmp_path_factory.mktemp("payload-model") / "tiny.gguf"
    write_synthetic_model_with_tokenizer(path, "gemma3", tokenizer_vocabulary(), seed=5, n_ctx_train=64)
    return path


def frozen_env(tmp_path: Path, **extra) -> dict:
    """A user's environment: an empty cache, nothing of this venv or of numba's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "MODELRUN_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "user-cache"), **extra)
    return env


def test_layout_and_metadata(runtime_payload, extracted):
    meta = json.loads((runtime_payload.parent / "runtime.json").read_text())
    build_id = (extracted / "build_id").read_text().strip()
    assert meta["build_id"] == build_id and re.fullmatch(r"[0-9a-f]{16}", build_id)
    assert runtime_payload.resolve().name == f"runtime-{build_id}.tar.gz"
    assert meta["size"] == runtime_payload.stat().st_size
    import hashlib
    assert meta["sha256"] == hashlib.sha256(runtime_payload.read_bytes()).hexdigest()
    with tarfile.open(runtime_payload) as tar:
        names = tar.getnames()
    assert names[0] == "runtime" and all(n.startswith("runtime/") for n in names[1:])
    # two gzip members, the second (unpacked on its own core at first launch) libllvmlite.so
    data = runtime_payload.read_bytes()
    assert 0 < meta["split"] < len(data) and data[meta["split"]:meta["split"] + 3] == b"\x1f\x8b\x08"
    with tarfile.open(fileobj=io.BytesIO(data[meta["split"]:])) as second:
        assert [m.name for m in second.getmembers()] == [names[-1]]
        assert names[-1].endswith("/libllvmlite.so")
    assert os.access(extracted / "runtime", os.X_OK)
    # the build id is the hash of the frozen files, caches and the id itself left out
    frozen = extracted.parent / "frozen-only"
    subprocess.run(["cp", "-a", str(extracted), str(frozen)], check=True)
    for added in ("kernel-cache", "build_id"):
        subprocess.run(["rm", "-rf", str(frozen / added)], check=True)
    assert tree_hash(frozen)[:16] == build_id
    for tier in meta["tiers"]:
        folder = extracted / "kernel-cache" / build_id / tier
        cached = {path.name.split("-")[0] for path in folder.glob("*.nbc")}
        # the kernels the runtime calls; their callees (kquants, legacy, ...) are inside them
        assert {"dispatch.matvec_kernel", "dispatch.matmul_kernel", "ops.rms_norm"} <= cached
        assert not [name for name in cached if name.startswith(("kquants.", "legacy.", "floats."))]
    # numba's OpenMP layer (selectable) with its libgomp inside the payload; no TBB
    assert [n for n in names if re.search(r"/omppool\.", n)]
    assert [n for n in names if re.search(r"/libgomp\.so", n)]
    assert not [n for n in names if re.search(r"tbbpool|libtbb", n)]
    assert (extracted / "_internal" / "runtime" / "web" / "index.html").is_file()


def test_payload_ships_every_tier_that_cpu_py_lists():
    """The tiers `make runtime` compiles are runtime/cpu.py's own list, not a copy of it."""
    from bundler import payload

    assert payload.ALL_TIERS == cpu.X86_TIERS
    assert tuple(payload.main.params[1].type.choices) == cpu.X86_TIERS


def test_packing_is_deterministic(runtime_payload, extracted, tmp_path):
    """The same files pack to the same bytes (times, owners and order fixed)."""
    again = tmp_path / "again.tar.gz"
    pack(extracted, again)
    assert again.read_bytes() == runtime_payload.read_bytes()


def test_frozen_prompt_equals_python_and_compiles_nothing(runtime_payload, extracted, tiny_model,
                                                         tmp_path):
    args = ["-m", str(tiny_model), "-p", "hi", "-n", "4", "--temp", "0"]
    frozen = subprocess.run([str(extracted / "runtime"), *args], env=frozen_env(tmp_path),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert frozen.returncode == 0, frozen.stderr
    source = subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert source.returncode == 0, source.stderr
    assert frozen.stdout == source.stdout and frozen.stdout.strip()
    found = KERNELS_LINE.search(frozen.stderr)
    assert found, frozen.stderr
    tier, loaded, compiled = found.group(1), int(found.group(2)), int(found.group(3))
    assert tier == cpu.best_tier(cpu.host_features())
    assert tier in json.loads((runtime_payload.parent / "runtime.json").read_text())["tiers"]
    assert loaded > 0 and compiled == 0, frozen.stderr
    # outside the payload, only the tokenizer is kept for the next start (no kernels)
    written = sorted(p.relative_to(tmp_path / "user-cache").parts[:2]
                     for p in (tmp_path / "user-cache").rglob("*") if p.is_file())
    assert written == [("modelrun", "tokenizers")], written
    # --info: the tier, and that the kernels are there
    info = subprocess.run([str(extracted / "runtime"), "-m", str(tiny_model), "--info"],
                          env=frozen_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert f"CPU tier: {tier} (" in info.stdout
    assert "compiled kernels cached in" in info.stdout and "nothing to compile" in info.stdout


def test_frozen_threading_layers_and_bench_entry(extracted, tiny_model, tmp_path):
    """The parallel kernels run on numba's OpenMP layer with the libgomp shipped inside the
    payload (a user's machine needs none); NUMBA_THREADING_LAYER=workqueue runs them there. The
    hidden bench entry (runtime/benchmark.py) measures the frozen runtime as bench/engine.py
    reads it."""
    for layer in ("default", "workqueue"):
        job, out = tmp_path / f"job-{layer}.json", tmp_path / f"result-{layer}.json"
        job.write_text(json.dumps({"threads": [1, 2], "prompt_tokens": 12, "gen_tokens": 3,
                                   "repeats": 2, "out": str(out)}))
        env = frozen_env(tmp_path, MODELRUN_BENCH=str(job))
        if layer != "default":
            env["NUMBA_THREADING_LAYER"] = layer
        done = subprocess.run([str(extracted / "runtime"), "-m", str(tiny_model)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["frozen"]
        if layer == "workqueue":
            assert result["threading_layer"] == "workqueue" and not result["openmp"]
        else:
            assert result["threading_layer"] == "omp"
            assert result["openmp"] and all(Path(lib).resolve().is_relative_to(extracted.resolve())
                                            for lib in result["openmp"]), result["openmp"]
        assert [r["threads"] for r in result["runs"]] == [1, 1, 2, 2]
        assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for r in result["runs"])
        assert len(result["prompt"]) == 12 and result["gen_tokens"] == 3
        assert 0 < result["private_bytes"]
        pages = -(-tiny_model.stat().st_size // os.sysconf("SC_PAGE_SIZE")) * os.sysconf("SC_PAGE_SIZE")
        assert 0 < result["mapped_bytes"] <= pages  # resident pages of the model's mapping


def test_frozen_rejects_an_unknown_tier_in_one_line(extracted, tiny_model, tmp_path):
    out = subprocess.run([str(extracted / "runtime"), "-m", str(tiny_model), "--info"],
                         env=frozen_env(tmp_path, MODELRUN_CPU_TIER="skylake"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "skylake" in out.stderr and "x86-64-v2" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_frozen_server_serves_the_page(extracted, tiny_model, tmp_path, spawn):
    """The chat page is found inside the frozen build, and /health turns 200 once loaded."""
    port = _free_port()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        server = spawn([extracted / "runtime", "-m", tiny_model, "--nobrowser", "--port", str(port)],
                       env=frozen_env(tmp_path), stdout=subprocess.DEVNULL, stderr=stderr)
    wait_until_serving(server, port, log=log.read_text)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        page = r.read()
    assert page == (ROOT / "runtime" / "web" / "index.html").read_bytes()
    server.terminate()
    server.wait(timeout=READY_LIMIT_S)
    err = log.read_text()
    found = KERNELS_LINE.search(err)
    assert found and found.group(3) == "0", err
