"""The generation endpoints: POST /v1/chat/completions, /v1/completions (OpenAI's),
/completion and /apply-template (llama.cpp's). A request is checked (runtime.openai_api, openai_chat),
its prompt rendered and tokenized through the worker's text interface, and run as a Job
whose events are relayed to its Reply (whole or streamed) until the choices are done; a
client that goes away withdraws its Job.
"""

from __future__ import annotations

import queue

from runtime.http_handler import ClientGone, RequestHandler
from runtime.llamacpp_api import NativeReply, completion_body
from runtime.openai_api import (MAX_TOP_LOGPROBS, RequestError, bool_field, error_body, int_field,
                                refuse_unsupported, requested_grammar, sampling_params)
from runtime.openai_chat import chat_request
from runtime.openai_responses import Reply
from runtime.worker import EngineWorker, Job, ModelInfo, QueueFull

POLL_SECONDS = 0.1  # how often a waiting HTTP thread checks whether its client is still there


def _chat_prompt(h: RequestHandler, body: dict, worker: EngineWorker, info: ModelInfo):
    """The request's chat (runtime.openai_chat.ChatRequest) and its prompt rendered by the
    model's template; a 400 naming messages when they cannot be rendered or fit."""
    from runtime.chat import ChatTemplateError

    if "messages" not in body:
        raise RequestError(400, "messages is required", "messages")
    chat = chat_request(body, worker.chat_template_source(), h.server.chat_settings)
    try:
        prompt = worker.chat_prompt(chat.messages, **chat.template_vars)
    except ChatTemplateError as e:
        raise RequestError(400, f"{e}", "messages") from None
    except ValueError as e:  # validate_messages names the message and what is wrong
        raise RequestError(400, f"{e}", "messages") from None
    h.refuse_beyond_context(prompt.text, info, "messages")
    return chat, prompt


def post_apply_template(h: RequestHandler) -> None:
    """llama.cpp's POST /apply-template: the prompt a chat request would run, unrun."""
    body = h.json_body()
    worker, info = h.loaded()
    _, prompt = _chat_prompt(h, body, worker, info)
    h.send_json(200, {"prompt": prompt.text})


def post_chat(h: RequestHandler) -> None:
    body = h.json_body()
    refuse_unsupported(body)
    worker, info = h.loaded()
    stream = bool_field(body, "stream")
    want_logprobs = bool_field(body, "logprobs")
    top_n = int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_n is not None and not want_logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = sampling_params(body, info.n_vocab)
    chat, prompt = _chat_prompt(h, body, worker, info)
    try:
        tokens = worker.prompt_tokens(prompt)
    except ValueError as e:
        raise RequestError(400, f"{e}", "messages") from None
    source = worker.chat_template_source()
    params.constraint = _constraint(h, body, worker, chat.forced_grammar(worker.encode, source))
    # a thinking model thinks first, bounded by the budget; a grammar constrains the answer
    budget = chat.budget(worker.encode, source, prompt.text, params.constraint is not None)
    job = Job(tokens, params, (top_n or 0) if want_logprobs else None,
              spell_special=chat.spell_special, n=_choices(body, info), budget=budget)
    _run_job(h, job, info, "chat", stream, body, [chat.output(prompt.text, stream) for _ in range(job.n)])


def post_completion(h: RequestHandler) -> None:
    body = h.json_body()
    refuse_unsupported(body)
    worker, info = h.loaded()
    stream = bool_field(body, "stream")
    top_n = int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    params = sampling_params(body, info.n_vocab)
    params.constraint = _constraint(h, body, worker)
    job = Job(_prompt_tokens(h, body, worker, info), params, top_n, n=_choices(body, info))
    _run_job(h, job, info, "text", stream, body)


def post_native_completion(h: RequestHandler) -> None:
    """llama.cpp's POST /completion: its field names in, its response shape out."""
    body = completion_body(h.json_body())
    refuse_unsupported(body)
    worker, info = h.loaded()
    stream = bool_field(body, "stream")
    params = sampling_params(body, info.n_vocab)
    params.constraint = _constraint(h, body, worker)
    job = Job(_prompt_tokens(h, body, worker, info), params, None)
    reply = NativeReply(h, worker.token_bytes, len(job.prompt_tokens), stream,
                        h.server.model_name)
    _run_job(h, job, info, "text", stream, body, reply=reply)


def _prompt_tokens(h: RequestHandler, body: dict, worker: EngineWorker, info: ModelInfo) -> list[int]:
    """A completion's prompt (a string, or token ids) as tokens; a 400 naming prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        h.refuse_beyond_context(prompt, info, "prompt")
        tokens = worker.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab for t in prompt):
        tokens = list(prompt)
    else:
        raise RequestError(400, "prompt must be a string or a list of token ids (one prompt "
                                "per request)", "prompt")
    if not tokens:
        raise RequestError(400, "prompt is empty", "prompt")
    return tokens


def _choices(body: dict, info: ModelInfo) -> int:
    """n: choices of one prompt, each in a slot of its own, so at most the slots."""
    n = int_field(body, "n", 1) or 1
    if n > info.n_slots:
        raise RequestError(400, f"n must be at most {info.n_slots}, this server's slots (each "
                                "choice takes one; start it with --parallel N for more)", "n")
    return n


def _constraint(h: RequestHandler, body: dict, worker: EngineWorker, forced_call=None):
    """The compiled grammar the request's output must follow (None: free text).
    forced_call: the grammar of the tool call tool_choice demands, if it does."""
    from runtime.constraint import ConstraintError

    requested = requested_grammar(body)
    if forced_call is not None:
        if requested is not None:
            raise RequestError(400, f"tool_choice demands a tool call and {requested[0]} "
                                    "constrains the output too: give only one",
                               "tool_choice")
        requested = ("tools", forced_call)
    if requested is None:
        return None
    name, grammar = requested
    try:
        return worker.constraint(grammar)
    except ConstraintError as e:
        raise RequestError(400, f"{name}: {e}", name) from None


def _run_job(h: RequestHandler, job: Job, info: ModelInfo, kind: str, stream: bool, body: dict,
             outputs: list | None = None, reply: Reply | None = None) -> None:
    n_prompt = len(job.prompt_tokens)
    if n_prompt + 1 > info.n_ctx:
        raise RequestError(400, f"the prompt has {n_prompt} tokens but the context holds only "
                                f"{info.n_ctx} (and at least one token must be generated); "
                                "shorten it or restart the server with a larger -c",
                           "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    include_usage = False
    options = body.get("stream_options")
    if isinstance(options, dict):
        include_usage = bool(options.get("include_usage"))
    outputs = outputs or [None] * job.n
    reply = reply or Reply(h, h.server.worker.token_bytes, kind, n_prompt, stream,
                           include_usage, h.server.model_name,
                           job.top_logprobs is not None, outputs[0])
    replies = [reply] + [reply.sibling(i, outputs[i]) for i in range(1, job.n)]
    worker = h.server.worker
    try:
        worker.submit(job)
    except QueueFull as e:
        h.discard_body()
        h.send_json(503, error_body(503, f"every slot is busy and {worker.queue_bound} requests "
                                         f"already wait: retry in {e.retry_after} s",
                                    code="server_busy"),
                    extra={"Retry-After": str(e.retry_after)})
        return
    choices, n_gen, timings = [None] * job.n, 0, {}
    try:
        if stream:
            reply.start_stream()
            for other in replies[1:]:
                other.open_choice()
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if h.client_gone():
                    raise ClientGone()
                continue
            if event[0] == "piece":
                replies[event[1]].piece(event[2], event[3])
                if stream and h.client_gone():
                    raise ClientGone()
            elif event[0] == "done":
                if h.server.metrics is not None:
                    h.server.metrics.record(event[4])
                i, finish_reason, n, timings = event[1:]
                if job.n == 1:
                    reply.finish(finish_reason, n, timings)
                    return
                choices[i] = replies[i].finish_choice(finish_reason, timings)
                n_gen += n
                if all(r.finished for r in replies):
                    reply.end(choices, n_gen, timings)
                    return
            elif event[1] == "cancelled":  # the engine saw the client leave first
                raise ClientGone()
            else:
                reply.fail(event[1])
                return
    except BaseException:
        worker.withdraw(job)
        raise
