"""The embedding endpoints, with --embeddings: OpenAI's POST /v1/embeddings and llama.cpp's
POST /embedding. The inputs are checked and tokenized here; the vectors are computed on the
engine thread (runtime.embeddings) between two generation steps.
"""

from __future__ import annotations

from runtime.http_handler import RequestHandler
from runtime.openai_api import RequestError, int_field
from runtime.worker import EngineWorker, ModelInfo

MAX_EMBEDDING_INPUTS = 2048  # as OpenAI's API


def post_embeddings(h: RequestHandler) -> None:
    """OpenAI's POST /v1/embeddings, with --embeddings: one pooled, normalized vector per
    input (runtime.embeddings), as floats or base64 (what the openai client asks for)."""
    import base64

    body = h.json_body()
    worker, info = h.loaded()
    inputs = _embedding_inputs(h, body, "input", worker, info)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"encoding_format must be float or base64, got {fmt!r}",
                           "encoding_format")
    pooling, vectors = _embed(h, body, worker, inputs)
    if pooling == "none":
        raise RequestError(400, "the model's pooling type is none, which gives one vector per "
                                "token: not OpenAI's shape. Use /embedding, or restart the "
                                "server with --pooling mean (or last, cls)", "input")
    n = sum(map(len, inputs))
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
             if fmt == "base64" else v.tolist()} for i, v in enumerate(vectors)]
    h.send_json(200, {"object": "list", "data": data, "model": h.server.model_name,
                      "usage": {"prompt_tokens": n, "total_tokens": n}})


def post_native_embedding(h: RequestHandler) -> None:
    """llama.cpp's POST /embedding: [{"index", "embedding": [[...]]}] per input, one row
    per token when the pooling is none, else the pooled, normalized vector."""
    body = h.json_body()
    worker, info = h.loaded()
    field = "content" if "content" in body else "input"
    inputs = _embedding_inputs(h, body, field, worker, info)
    _, vectors = _embed(h, body, worker, inputs)
    h.send_json(200, [{"index": i, "embedding": v.reshape(-1, v.shape[-1]).tolist()}
                      for i, v in enumerate(vectors)])


def _embedding_inputs(h: RequestHandler, body: dict, field: str, worker: EngineWorker,
                      info: ModelInfo) -> list[list[int]]:
    """The inputs (a string, token ids, or a list of those) as token lists; a 501 without
    --embeddings, a 400 naming the field for anything else wrong."""
    if not h.server.embeddings:
        raise RequestError(501, "this server does not give embeddings (start it with "
                                "--embeddings)", code="not_supported")
    value = body.get(field)
    is_ids = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(t, int) and not isinstance(t, bool) for t in v)
    items = [value] if isinstance(value, str) or (is_ids(value) and value) else value
    if not isinstance(items, list) or not items or len(items) > MAX_EMBEDDING_INPUTS:
        raise RequestError(400, f"{field} must be a string, a list of token ids, or a list of "
                                f"1..{MAX_EMBEDDING_INPUTS} of those", field)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            h.refuse_beyond_context(item, info, field)
            tokens = worker.encode(item)
        elif is_ids(item) and all(0 <= t < info.n_vocab for t in item):
            tokens = list(item)
        else:
            raise RequestError(400, f"{field}[{i}] must be a string or a list of token ids "
                                    f"(0..{info.n_vocab - 1})", field)
        if not tokens:
            raise RequestError(400, f"{field}[{i}] is empty", field)
        if len(tokens) > info.n_ctx:
            raise RequestError(400, f"{field}[{i}] has {len(tokens)} tokens but the context "
                                    f"holds only {info.n_ctx}", field, "context_length_exceeded")
        out.append(tokens)
    return out


def _embed(h: RequestHandler, body: dict, worker: EngineWorker, inputs: list[list[int]]):
    from runtime.embeddings import DEFAULT_NORMALIZE, EmbeddingError, embed

    norm = int_field(body, "embd_normalize", -1)
    norm = DEFAULT_NORMALIZE if norm is None else norm
    pooling = h.server.pooling
    try:
        return worker.on_engine_thread(lambda session: embed(session, inputs, pooling, norm))
    except EmbeddingError as e:
        raise RequestError(400, f"{e}", "input") from None
