"""Embeddings as llama.cpp's server computes them for a model run with --embeddings: the final
hidden states (after the output norm) of the input's tokens, pooled by the model's pooling
type, then normalized.

- Pooling: `<arch>.pooling_type` from the GGUF (llama.cpp's enum: 0 none, 1 mean, 2 cls,
  3 last); a generative model has none, and llama.cpp then pools nothing (src/
  llama-context.cpp: unspecified -> none), unless --pooling says otherwise. With none its
  /embedding answers one vector per token and /v1/embeddings refuses ("not OAI
  compatible"); so does this server.
- Normalization (tools/server: common_embd_normalize, only when pooled): the request's
  embd_normalize, default 2 = Euclidean; -1 none, 0 max-absolute scaled to int16, p > 0 the
  p-norm. Computed in float64, as there.

The tokens run on a scratch KV cache of their own (the slots' caches and their reusable
prefixes are left alone), causal as the model always is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last"}  # llama_pooling_type (GGUF values)
DEFAULT_NORMALIZE = 2  # llama.cpp's embd_normalize default: Euclidean


class EmbeddingError(ValueError):
    """This model or request cannot give embeddings; the message says why."""


def model_pooling(metadata: Mapping) -> str:
    """The pooling the GGUF names (`<arch>.pooling_type`), "none" when it names none."""
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.pooling_type")
    if value is None:
        return "none"
    try:
        return POOLING_TYPES[int(value)]
    except (KeyError, TypeError, ValueError):
        raise EmbeddingError(f"{arch}.pooling_type is {value!r}; modelrun pools by "
                             + ", ".join(f"{k} ({v})" for k, v in POOLING_TYPES.items())) from None


def hidden_states(model, tokens: list[int], cache_types: tuple[str, str]) -> np.ndarray:
    """float32[n, n_embd]: every token's final hidden state, on a scratch cache."""
    cache = model.new_cache(len(tokens), *cache_types)
    return model.forward(np.asarray(tokens, np.int64), 0, cache, hidden=True)


def embed(session, inputs: list[list[int]], pooling: str | None,
          embd_normalize: int = DEFAULT_NORMALIZE) -> tuple[str, list[np.ndarray]]:
    """(the pooling used, one embedding per input): pooled and normalized, or with pooling
    none each token's state as it is. pooling None: the model's own. Runs on the engine
    thread (runtime.worker.EngineWorker.on_engine_thread), with the slots' cache types."""
    pooling = pooling or model_pooling(session.gguf.metadata)
    model, slot_cache = session.engine.model, session.engine.slots[0].cache
    out = []
    for tokens in inputs:
        vector = pool(hidden_states(model, tokens, (slot_cache.type_k, slot_cache.type_v)), pooling)
        out.append(vector if pooling == "none" else normalize(vector, embd_normalize))
    return pooling, out


def pool(states: np.ndarray, pooling: str) -> np.ndarray:
    """llama.cpp's pooling of one sequence's states: [n_embd], or [n, n_embd] for none."""
    if pooling == "none":
        return states
    if pooling == "mean":
        return states.mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling == "cls":
        return states[0]
    if pooling == "last":
        return states[-1]
    raise EmbeddingError(f"unknown pooling {pooling!r}")


def normalize(vector: np.ndarray, embd_normalize: int = DEFAULT_NORMALIZE) -> np.ndarray:
    """common_embd_normalize: the vector divided by its norm (a zero norm gives zeros)."""
    x = vector.astype(np.float64)
    if embd_normalize == -1:
        norm = 1.0
    elif embd_normalize == 0:
        norm = float(np.abs(x).max(initial=0.0)) / 32760.0
    elif embd_normalize == 2:
        norm = float(np.sqrt(np.sum(x * x)))
    elif embd_normalize > 0:
        norm = float(np.sum(np.abs(x) ** embd_normalize) ** (1.0 / embd_normalize))
    else:
        raise EmbeddingError(f"embd_normalize must be -1, 0 or a positive p-norm, got "
                             f"{embd_normalize}")
    scale = 1.0 / norm if norm > 0 else 0.0
    return (x * scale).astype(np.float32)
