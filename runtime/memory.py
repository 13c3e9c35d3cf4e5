"""Will it fit: the memory a model needs at a context size, against what this machine has.

The estimate is the sum of
- the weights: the tensor data of the GGUF file, memory-mapped; a forward pass reads every
  matrix, so all of it ends up resident (as page cache that the process maps);
- the KV cache: the engine's own formula (runtime.hparams.kv_cache_bytes) in the cache types
  asked for (-ctk/-ctv), all of it, as a conversation that fills the context touches every
  position; with --parallel N, N slots of n_ctx // N positions each (as the engine splits the
  context); a hybrid model's KV cache covers its attention layers only;
- the recurrent states of a hybrid model (Qwen3.5's Gated DeltaNet layers: per slot and layer a
  convolution window and the delta-rule matrices, runtime.hparams.RecurrentShape), a fixed size
  per slot whatever the context, so N times it with --parallel N; and up to --ctx-checkpoints
  copies of each slot's state (context checkpoints, runtime.model.recurrent; llama.cpp's
  default 32, taken as a conversation goes on), all of them;
- working memory: the Python runtime with NumPy, Numba and the loaded kernels (a constant),
  the code of the shared libraries it maps (a constant), the tokenizer (in proportion to the
  vocabulary), one prefill batch's activations and the logits (from the model's shapes).

The constants were measured with this runtime (peak RSS, /proc/self/status VmHWM, and the
resident pages of the .so mappings from /proc/self/smaps) with kernels from a warm cache, on
Gemma 3 270M (262,144-token vocabulary). Library code is apart because the kernel, not this
runtime, decides how much of it is resident (page-cache folio sizes: the same libllvmlite.so
mapped 68 MB in one venv and 87 MB in a fresh clone's); LLVM's share is let go once the
kernels are loaded (runtime.resident), which leaves ~26 MB of Python's, NumPy's and the
system's libraries, and tests/test_memory.py checks the rest against real runs: `-p` runs
of Gemma whose prompt fills the context peaked, less their library code, 0.1% below to 0.6%
above the estimate's rest at contexts 512, 1024 and 4096 (347, 356 and 413 MiB), and
differed by the KV cache alone. The tokenizer's share of a BPE model (merges as well as
pieces) is extrapolated from Gemma's SentencePiece one. Running the kernels' first compile
(cold cache) peaks higher, and --perplexity holds a batch of logits more (256 x the
vocabulary, float32).
Imports no kernels (and no Numba), so --info stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.hparams import (DEFAULT_CTX_CHECKPOINTS, DEFAULT_KV_CACHE_TYPE, PREFILL_CHUNK, HParams, default_n_ctx,
                             kv_cache_bytes)
from runtime.units import format_bytes

MEMINFO = "/proc/meminfo"
MiB = 1 << 20
RUNTIME_BYTES = 65 * MiB  # Python, NumPy, Numba, click and the loaded kernels, private memory
LIBRARY_CODE_BYTES = 26 * MiB  # resident code of the .so files once LLVM's is let go, typical
TOKENIZER_BYTES_PER_TOKEN = 110  # vocabulary, merge ranks, index and metadata pages (Gemma)
FLOAT_BYTES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs at a context size, by what they hold."""

    n_ctx: int  # the whole context, shared by the slots
    weights: int
    kv_cache: int  # every slot's
    working: int
    recurrent: int = 0  # every slot's recurrent state (hybrid models)
    checkpoints: int = 0  # every slot's context checkpoints at most (copies of its recurrent state)
    n_parallel: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent + self.checkpoints + self.working


def model_hparams(gguf) -> HParams:
    """The model's shapes from its header (raises UnsupportedModelError or KeyError when the
    metadata lacks them)."""
    embd = gguf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise KeyError("token_embd.weight")
    return HParams.from_metadata(gguf.metadata, n_vocab=int(embd.shape[1]))


def estimate(gguf, n_ctx: int | None = None, cache_type_k: str = DEFAULT_KV_CACHE_TYPE,
             cache_type_v: str = DEFAULT_KV_CACHE_TYPE, n_parallel: int = 1,
             n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> MemoryEstimate:
    """What running the model at n_ctx (default: the engine's default context) takes, with
    the KV cache in the given types (-ctk/-ctv), the context split among n_parallel slots."""
    hp = model_hparams(gguf)
    n_ctx = default_n_ctx(hp.n_ctx_train) if not n_ctx else int(n_ctx)
    if not 0 < n_ctx <= hp.n_ctx_train:
        raise ValueError(f"context {n_ctx} is outside the model's 1..{hp.n_ctx_train}")
    if not 1 <= n_parallel <= n_ctx // 2:  # as runtime.engine.Engine checks it
        raise ValueError(f"{n_parallel} slots cannot share a context of {n_ctx} (each needs at least 2 positions)")
    weights = sum(t.n_bytes for t in gguf.tensors.values())
    recurrent = n_parallel * hp.recurrent.nbytes if hp.recurrent else 0
    return MemoryEstimate(n_ctx=n_ctx, weights=weights, working=working_bytes(hp), recurrent=recurrent,
                          checkpoints=n_ctx_checkpoints * recurrent,
                          kv_cache=n_parallel * kv_cache_bytes(hp, n_ctx // n_parallel, cache_type_k, cache_type_v),
                          n_parallel=n_parallel)


def working_bytes(hp: HParams) -> int:
    """Runtime, tokenizer, and the largest transient arrays: one prefill batch's
    activations (residual, norm, q/k/v, attention output, gate/up) and a few logit rows."""
    q_dim = hp.n_head * hp.head_dim
    kv_dim = hp.n_head_kv * (hp.head_dim + hp.head_dim_v)
    per_token = 3 * hp.n_embd + 2 * q_dim + kv_dim + 2 * hp.n_ff
    activations = FLOAT_BYTES * (PREFILL_CHUNK * per_token + 3 * hp.n_vocab)
    return RUNTIME_BYTES + LIBRARY_CODE_BYTES + TOKENIZER_BYTES_PER_TOKEN * hp.n_vocab + activations


def available_bytes(meminfo: str | None = None) -> int | None:
    """MemAvailable of this machine (what can be allocated without swapping), or None when
    it cannot be read (not Linux, or a kernel without the field)."""
    try:
        with open(meminfo or MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    return int(fields[1]) * 1024 if fields[2:3] == ["kB"] else int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def largest_context(gguf, budget: int, step: int = 256, cache_type_k: str = DEFAULT_KV_CACHE_TYPE,
                    cache_type_v: str = DEFAULT_KV_CACHE_TYPE, n_parallel: int = 1,
                    n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> int | None:
    """The largest context (a multiple of `step`, at most the model's) whose estimate fits
    `budget` bytes, or None when not even `step` tokens fit."""
    hp = model_hparams(gguf)
    step = min(max(step, 2 * n_parallel), hp.n_ctx_train)
    base = estimate(gguf, step, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints)
    if base.total > budget:
        return None
    per_token = kv_cache_bytes(hp, step, cache_type_k, cache_type_v) / step
    n = int((budget - base.weights - base.recurrent - base.checkpoints - base.working) // per_token) // step * step
    return max(step, min(n, hp.n_ctx_train))


def fit_line(gguf, n_ctx: int | None = None, available: int | None = None,
             cache_type_k: str = DEFAULT_KV_CACHE_TYPE, cache_type_v: str = DEFAULT_KV_CACHE_TYPE,
             n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> str:
    """--info's line: "needs ~0.6 GB at 4096 context; this machine has 23.1 GB available",
    with the KV cache and the recurrent states spelled out when the cache types, the slots
    or a hybrid model make them more than the default."""
    est = estimate(gguf, n_ctx, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints)
    text = f"needs ~{format_bytes(est.total)} at {est.n_ctx} context"
    if est.recurrent or n_parallel > 1 or (cache_type_k, cache_type_v) != (DEFAULT_KV_CACHE_TYPE,) * 2:
        parts = [f"weights {format_bytes(est.weights)}",
                 f"KV cache {format_bytes(est.kv_cache)} in {cache_type_k}/{cache_type_v}"]
        if est.recurrent:
            parts.append(f"recurrent states {format_bytes(est.recurrent)}")
        if est.checkpoints:
            parts.append(f"their checkpoints up to {format_bytes(est.checkpoints)}")
        if n_parallel > 1:
            parts.append(f"{n_parallel} slots of {est.n_ctx // n_parallel}")
        text += f" ({', '.join(parts)})"
    if available is None:
        return text + "; this machine's available memory is unknown"
    text += f"; this machine has {format_bytes(available)} available"
    if est.total > available:
        text += " — too little: " + _smaller(gguf, available, cache_type_k, cache_type_v, n_parallel,
                                             n_ctx_checkpoints)
    return text


def fit_warning(gguf, n_ctx: int | None = None, available: int | None = None,
                cache_type_k: str = DEFAULT_KV_CACHE_TYPE, cache_type_v: str = DEFAULT_KV_CACHE_TYPE,
                n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> str | None:
    """The warning to print before loading a model that will not fit, else None."""
    if available is None:
        return None
    est = estimate(gguf, n_ctx, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints)
    if est.total <= available:
        return None
    recurrent = f", recurrent states {format_bytes(est.recurrent)}" if est.recurrent else ""
    if est.checkpoints:
        recurrent += f" and their checkpoints {format_bytes(est.checkpoints)}"
    return (f"warning: the model needs ~{format_bytes(est.total)} at {est.n_ctx} context (weights "
            f"{format_bytes(est.weights)}, KV cache {format_bytes(est.kv_cache)}{recurrent}) but this machine has "
            f"{format_bytes(available)} available; it may swap or be killed. "
            + _smaller(gguf, available, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints))


def _smaller(gguf, available: int, cache_type_k: str = DEFAULT_KV_CACHE_TYPE,
             cache_type_v: str = DEFAULT_KV_CACHE_TYPE, n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> str:
    n = largest_context(gguf, available, 256, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints)
    if n is None:
        return "Use a smaller quantization of the model (fewer bits per weight) or a smaller model"
    needs = estimate(gguf, n, cache_type_k, cache_type_v, n_parallel, n_ctx_checkpoints).total
    return (f"Use -c {n} (needs ~{format_bytes(needs)}) "
            f"or a smaller quantization of the model")
