"""Write tests/data/parity/<arch>.json: llama.cpp's logits on the parity models (tests/parity_models.py).

Needs llama.cpp (not a dependency of modelrun): the Python binding of llama-cpp-python 0.3.36
on a build of the same sdist. From the repository root:

    PYTHONPATH=.:tests:/path/to/llama_cpp_parent LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin \\
        .venv/bin/python tests/make_parity_reference.py VOCAB_DIR [ARCH ...]

VOCAB_DIR holds llama.cpp's models/ggml-vocab-*.gguf. For each architecture the script writes
the F32 model, quantizes it to Q8_0 and Q4_K_M (and gpt-oss to MXFP4_MOE, as it ships)
with libllama's own quantizer, and evaluates
the fixed sequence on each file in one batch (F32 KV cache, no flash attention, so only the
weights' and activations' types differ from our engine). Per file it records the sha256,
and per position the top TOP_K logits (ids, values) and the log-sum-exp of all logits (so
the test can form llama.cpp's probabilities of those ids exactly).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import parity_models as pm

QUANT_FTYPES = {"Q8_0": 7, "Q4_K_M": 15}  # llama_ftype values
# further file types of one architecture: the quantization it ships in
ARCH_FTYPES = {"gpt-oss": {"MXFP4_MOE": 38}}
COMMAND = ("PYTHONPATH=.:tests:<llama-cpp-python 0.3.36 sdist> LLAMA_CPP_LIB_PATH=<its llama.cpp build>/bin "
           ".venv/bin/python tests/make_parity_reference.py <sdist>/vendor/llama.cpp/models {arch}")
LLAMA_CPP = ("llama.cpp vendored in the llama-cpp-python 0.3.36 sdist from PyPI (ggml 0.25.3), built "
             "with cmake -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release on x86-64 (AVX-512, VNNI)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantize(llama_cpp, src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed on {src} ({rc})")


def without_extra_buffers(llama_cpp) -> None:
    """Models load with use_extra_bufts off: the weight-repacking (AMX) buffers of this build
    crash in batched evaluation of Q8_0 weights on this machine's CPU (AMX-INT8); without
    them the quantized matmuls take ggml's plain path (activations quantized to Q8_0/Q8_K)."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def logits(llama_cpp, path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens), n_batch=len(tokens),
                          n_ubatch=len(tokens), logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, n_threads=2, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)], np.float32)
    llm.close()
    return out


def summary(all_logits: np.ndarray) -> dict:
    top = np.argsort(-all_logits, axis=1, kind="stable")[:, :pm.TOP_K]
    values = np.take_along_axis(all_logits, top, axis=1)
    x = all_logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    return {"top_ids": top.tolist(),
            "top_values": [[float(v) for v in row] for row in values],
            "logsumexp": [float(v) for v in lse]}


def main(vocab_dir: str, archs: list[str]) -> None:
    import llama_cpp

    without_extra_buffers(llama_cpp)
    for arch in archs or list(pm.SPECS):
        vocab = Path(vocab_dir) / f"ggml-vocab-{pm.SPECS[arch]['vocab']}.gguf"
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / f"{arch}-F32.gguf"
            digest = pm.write_model(f32, arch, vocab)
            n_vocab = len(pm.GGUFFile(vocab).metadata["tokenizer.ggml.tokens"])
            tokens = pm.tokens(arch, n_vocab)
            files = {"F32": {"sha256": digest, **summary(logits(llama_cpp, f32, tokens))}}
            for name, ftype in {**QUANT_FTYPES, **ARCH_FTYPES.get(arch, {})}.items():
                q = Path(tmp) / f"{arch}-{name}.gguf"
                quantize(llama_cpp, f32, q, ftype)
                files[name] = {"sha256": sha256(q), **summary(logits(llama_cpp, q, tokens))}
        out = pm.reference_path(arch)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"arch": arch, "vocab": pm.SPECS[arch]["vocab"], "command": COMMAND.format(arch=arch),
               "llama_cpp": LLAMA_CPP, "tokens": tokens, "files": files}
        out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{arch}: wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
