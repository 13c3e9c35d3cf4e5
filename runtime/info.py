"""--info: what a user wants to know about a model before running it, as text.

Reads only the GGUF header (and the CPU tier and kernel cache it would run with): no model
is loaded and Numba is not imported, so it answers in a moment on any model, even one this
build cannot run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.gguf import GGUFFile, StringArray
from runtime.hparams import (DEFAULT_CTX_CHECKPOINTS, DEFAULT_KV_CACHE_TYPE, SUPPORTED_ARCHITECTURES, RecurrentShape,
                             UnsupportedModelError, unsupported_architecture_message)
from runtime.terminal import printable
from runtime.units import format_bytes

# tokenizer.ggml.model -> what it is, for every model runtime.tokenizer reads (a test checks
# that; it is not imported here, to keep --info free of the regex library) and a few it does not.
TOKENIZER_KINDS = {
    "llama": "SentencePiece",
    "gpt2": "byte-level BPE",
    "gemma4": "Gemma 4's SentencePiece-style BPE",
    "bert": "WordPiece",
    "t5": "Unigram",
    "rwkv": "RWKV",
}


@dataclass
class TypeShare:
    """The tensors of one GGML type in a model."""

    name: str
    tensors: int = 0
    weights: int = 0
    bytes: int = 0


def quantization_mix(gguf: GGUFFile) -> list[TypeShare]:
    """Tensor types by the bytes they take, largest first."""
    shares: dict[str, TypeShare] = {}
    for t in gguf.tensors.values():
        share = shares.setdefault(t.type.name, TypeShare(t.type.name))
        share.tensors += 1
        share.weights += t.n_elements
        share.bytes += t.n_bytes
    return sorted(shares.values(), key=lambda s: (-s.bytes, s.name))


def active_weights(gguf: GGUFFile, n_expert: Any, n_used: Any) -> int | None:
    """Weights a token reads in a mixture-of-experts model: every tensor but the experts'
    (3-D, named *_exps), of which only n_used of n_expert; None when the counts are unusable."""
    try:
        n_expert, n_used = int(np.max(n_expert)), int(np.max(n_used))
    except (TypeError, ValueError):
        return None
    if not 0 < n_used <= n_expert:
        return None
    total = sum(t.n_elements for t in gguf.tensors.values())
    experts = sum(t.n_elements for t in gguf.tensors.values() if "_exps." in t.name)
    return total - experts + experts * n_used // n_expert


def unsupported_types(mix: list[TypeShare]) -> list[TypeShare]:
    # Importing runtime.kernels does not import numba, so --info stays fast.
    from runtime.kernels import SUPPORTED_TYPES

    return [s for s in mix if s.name not in SUPPORTED_TYPES]


def describe(gguf: GGUFFile, path: str, n_ctx: int | None = None,
             cache_types: tuple[str, str] = (DEFAULT_KV_CACHE_TYPE, DEFAULT_KV_CACHE_TYPE),
             n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> str:
    """What a user wants to know before running a model, as text; its memory estimate at the
    context, KV cache types, slots and checkpoints given (-c, -ctk/-ctv, --parallel,
    --ctx-checkpoints; default: the engine's)."""
    arch = gguf.get("general.architecture")
    a = f"{arch}."

    def key(name: str) -> Any:
        return gguf.get(a + name)

    mix = quantization_mix(gguf)
    weights = sum(s.weights for s in mix)
    tensor_bytes = sum(s.bytes for s in mix)

    rows = [
        ("architecture", _text(arch)),
        ("name", _text(gguf.get("general.name"))),
        ("parameters", _count(weights) if weights else "none (no tensors)"),
        ("context length", _number(key("context_length"))),
        ("layers", _number(key("block_count"))),
        ("attention heads", _heads(key("attention.head_count"), key("attention.head_count_kv"),
                                   key("attention.key_length"))),
        ("embedding size", _number(key("embedding_length"))),
        ("feed-forward size", _number(key("feed_forward_length"))),
    ]
    if key("expert_count") is not None:
        rows.append(("experts", f"{_number(key('expert_count'))} "
                                f"({_number(key('expert_used_count'))} used per token)"))
        if key("expert_feed_forward_length") is not None:
            rows.append(("expert FFN size", _number(key("expert_feed_forward_length"))))
        if key("expert_shared_feed_forward_length") is not None:  # read by every token
            rows.append(("shared expert FFN", _number(key("expert_shared_feed_forward_length"))))
        active = active_weights(gguf, key("expert_count"), key("expert_used_count"))
        if active is not None:
            rows.append(("active per token", f"{_count(active)}, {_percent(active, weights)} of the "
                                             f"parameters (a token reads only its experts')"))
    recurrent = _recurrent(gguf, str(arch), key("block_count"), key("nextn_predict_layers"))
    if recurrent is not None:
        n_layer = int(key("block_count")) - int(key("nextn_predict_layers") or 0)
        rows.append(("recurrent layers", f"{len(recurrent.layers)} of {n_layer} are Gated DeltaNet (linear "
                                         f"attention, {recurrent.n_v_heads} heads of {recurrent.head_v}), "
                                         "the others full attention"))
        rows.append(("recurrent state", f"{format_bytes(recurrent.nbytes)} per sequence, whatever the "
                                        "context (a conversation is reused only as a whole)"))
    if key("attention.sliding_window") is not None:
        rows.append(("sliding window", _number(key("attention.sliding_window"))))
    if key("attention.shared_kv_layers"):
        rows.append(("shared KV", f"the last {_number(key('attention.shared_kv_layers'))} layers attend over "
                                  "earlier layers' keys and values (no cache of their own)"))
    if key("embedding_length_per_layer_input"):
        rows.append(("per-layer inputs", f"{_number(key('embedding_length_per_layer_input'))} per layer and token"))
    rows.append(("tokenizer", _tokenizer(gguf, key("vocab_size"))))
    template = gguf.get("tokenizer.chat_template")
    rows.append(("chat template", "yes" if isinstance(template, str) and template else "none"))

    size = gguf.size
    lines = [f"{os.path.basename(path)}: GGUF v{gguf.version}, {format_bytes(size)}"]
    lines += [f"  {label:<18} {value}" for label, value in rows]
    lines.append("")
    lines.append(f"  {'quantization':<12} {'tensors':>7} {'weights':>15} {'size':>11} "
                 f"{'share':>6} {'bits/weight':>11}")
    for s in mix:
        lines.append(f"  {s.name:<12} {s.tensors:>7} {s.weights:>15,} {format_bytes(s.bytes):>11} "
                     f"{_percent(s.bytes, tensor_bytes):>6} {_bpw(s.bytes, s.weights):>11}")
    lines.append(f"  {'total':<12} {len(gguf.tensors):>7} {weights:>15,} "
                 f"{format_bytes(tensor_bytes):>11} {_percent(tensor_bytes, tensor_bytes):>6} "
                 f"{_bpw(tensor_bytes, weights):>11}")
    lines.append("")
    missing = unsupported_types(mix)
    if str(arch) not in SUPPORTED_ARCHITECTURES:
        lines.append(f"  runs on this build: no, {unsupported_architecture_message(str(arch))}")
    elif missing:
        names = ", ".join(f"{s.name} ({s.tensors} tensor{'s' if s.tensors != 1 else ''})"
                          for s in missing)
        lines.append(f"  runs on this build: no, it has no kernels for {names}; use a "
                     f"quantization of this model in other types (e.g. Q4_K_M or Q8_0)")
    else:
        lines.append("  runs on this build: yes, it has kernels for every tensor type in the model")
    lines += kernel_lines()
    lines.append(memory_line(gguf, n_ctx, cache_types, n_parallel, n_ctx_checkpoints))
    return printable("\n".join(lines), keep_layout=True)  # the file's text may hold escapes


def _recurrent(gguf: GGUFFile, arch: str, block_count: Any, nextn: Any) -> RecurrentShape | None:
    """The Gated DeltaNet layers of a hybrid model, or None (none, or metadata too broken to say)."""
    try:
        n_layer = int(block_count) - int(nextn or 0)
        return RecurrentShape.from_metadata(gguf.metadata, arch, n_layer)
    except (UnsupportedModelError, TypeError, ValueError):
        return None


def memory_line(gguf: GGUFFile, n_ctx: int | None = None,
                cache_types: tuple[str, str] = (DEFAULT_KV_CACHE_TYPE, DEFAULT_KV_CACHE_TYPE),
                n_parallel: int = 1, n_ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS) -> str:
    """--info: will the model fit in this machine's memory at the context (default: the engine's)."""
    from runtime import memory

    try:
        line = memory.fit_line(gguf, n_ctx, memory.available_bytes(), *cache_types, n_parallel, n_ctx_checkpoints)
        return f"  memory: {line}"
    except (KeyError, ValueError) as e:  # metadata the estimate needs is missing or bad
        return f"  memory: cannot estimate ({e})"


def kernel_lines() -> list[str]:
    """--info: the CPU tier the kernels run at (and why), and whether they are cached."""
    from runtime import cpu, kernels

    try:
        tier = cpu.select_tier()  # already chosen by the entry point: this only reports it
    except cpu.CpuTierError as e:
        return [f"  CPU tier: {e}"]
    how = {"detected": "the best this CPU runs; MODELRUN_CPU_TIER overrides",
           cpu.OVERRIDE_VARIABLE: f"set by {cpu.OVERRIDE_VARIABLE}"}.get(tier.reason, tier.reason)
    folder = kernels.cache_folder(tier.name)
    cached = sum(1 for _ in folder.glob("*.nbc")) if folder.is_dir() else 0
    if cached:
        state = f"{cached} compiled kernels cached in {folder}: nothing to compile"
    else:
        state = f"none cached yet: compiled on first use (1-3 minutes), then cached in {folder}"
    return [f"  CPU tier: {tier.name} ({how})", f"  kernels: {state}"]


def _tokenizer(gguf: GGUFFile, vocab_size_key: Any) -> str:
    model = gguf.get("tokenizer.ggml.model")
    tokens = gguf.get("tokenizer.ggml.tokens")
    if isinstance(tokens, StringArray):
        vocab = len(tokens)
    elif vocab_size_key is not None:
        vocab = vocab_size_key
    else:
        vocab = None
    if model is None and vocab is None:
        return "none in the file"
    kind = TOKENIZER_KINDS.get(model) if isinstance(model, str) else None
    text = _text(model) + (f" ({kind})" if kind else "")
    pre = gguf.get("tokenizer.ggml.pre")
    if isinstance(pre, str) and pre not in ("", "default"):
        text += f", pre-tokenizer {pre}"
    return f"{text}, vocabulary of {_number(vocab)} tokens"


def _heads(heads: Any, kv_heads: Any, head_size: Any) -> str:
    if heads is None:
        return "unknown"
    text = _number(heads)
    if kv_heads is not None:
        text += f", KV heads {_number(kv_heads)}"
    if head_size is not None:
        text += f", head size {_number(head_size)}"
    return text


def _number(value: Any) -> str:
    """A metadata number; per-layer arrays show as a range."""
    if value is None:
        return "unknown"
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
        if value.size == 0:
            return "unknown"
        low, high = value.min(), value.max()
        return f"{low}" if low == high else f"{low}-{high} (varies by layer)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _text(value: Any) -> str:
    if value is None:
        return "unknown"
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return f"{n:,}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _bpw(n_bytes: int, weights: int) -> str:
    return f"{8 * n_bytes / weights:.2f}" if weights else "-"
