"""Write tests/data/embeddings/<arch>.json: llama.cpp's embeddings of a parity model
(tests/parity_models.py) with each pooling type, for tests/test_embeddings.py.

Needs llama.cpp (not a dependency of modelrun): the Python binding of llama-cpp-python 0.3.36
on a build of the same sdist, as tests/make_parity_reference.py. From the repository root:

    PYTHONPATH=.:tests:/path/to/llama_cpp_parent LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin \\
        .venv/bin/python tests/make_embedding_reference.py VOCAB_DIR [ARCH ...]

The F32 model evaluates the first N_TOKENS tokens of the parity sequence in one batch with
embeddings on (F32 KV cache, no flash attention), once per pooling type; recorded raw, as
llama_get_embeddings_seq (mean, cls, last) and llama_get_embeddings (none: one row per
token) return them, before the server's normalization.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import parity_models as pm
from make_parity_reference import LLAMA_CPP, without_extra_buffers

N_TOKENS = 16
POOLINGS = {"none": 0, "mean": 1, "cls": 2, "last": 3}  # llama_pooling_type
COMMAND = ("PYTHONPATH=.:tests:<llama-cpp-python 0.3.36 sdist> LLAMA_CPP_LIB_PATH=<its llama.cpp build>/bin "
           ".venv/bin/python tests/make_embedding_reference.py <sdist>/vendor/llama.cpp/models {arch}")


def reference_path(arch: str) -> Path:
    return Path(__file__).resolve().parent / "data" / "embeddings" / f"{arch}.json"


def embeddings(llama_cpp, path: Path, tokens: list[int], pooling: int) -> np.ndarray:
    n = len(tokens)
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=pooling, n_ctx=n,
                          n_batch=n, n_ubatch=n, type_k=0, type_v=0, flash_attn=False,
                          n_threads=2, verbose=False)
    n_embd = llm.n_embd()
    llm._batch.reset()
    llm._batch.add_sequence(tokens, 0, True)
    llm._ctx.decode(llm._batch)
    if pooling == POOLINGS["none"]:
        ptr = llama_cpp.llama_get_embeddings(llm._ctx.ctx)
        out = np.array(ptr[:n * n_embd], np.float32).reshape(n, n_embd)
    else:
        out = np.array(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[:n_embd], np.float32)
    llm.close()
    return out


def main(vocab_dir: str, archs: list[str]) -> None:
    import llama_cpp

    without_extra_buffers(llama_cpp)
    for arch in archs or ["llama"]:
        vocab = Path(vocab_dir) / f"ggml-vocab-{pm.SPECS[arch]['vocab']}.gguf"
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / f"{arch}-F32.gguf"
            digest = pm.write_model(f32, arch, vocab)
            n_vocab = len(pm.GGUFFile(vocab).metadata["tokenizer.ggml.tokens"])
            tokens = pm.tokens(arch, n_vocab)[:N_TOKENS]
            pooled = {name: embeddings(llama_cpp, f32, tokens, value).tolist()
                      for name, value in POOLINGS.items()}
        out = reference_path(arch)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"arch": arch, "vocab": pm.SPECS[arch]["vocab"], "command": COMMAND.format(arch=arch),
               "llama_cpp": LLAMA_CPP, "sha256": digest, "tokens": tokens, "embeddings": pooled}
        out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{arch}: wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
