"""The engine thread: the one thread that owns the model, and the queue of Jobs it runs.

EngineWorker loads the model (a Session) on its own thread, then runs generation Jobs one at
a time, in the order they come. Other threads (the HTTP server's) never touch the engine,
the model or Numba: they submit a Job and read its events, and use the worker's text
interface (encode, decode, token_bytes, fewest_tokens, chat_prompt, prompt_tokens), which
only reads the tokenizer and the chat template, both unchanged after loading. A Job's
`cancelled` event is the one cancel signal: the generation checks it between tokens, and a
queued Job that was cancelled before it started is skipped.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime.chat import ChatTemplate
from runtime.engine import TextGeneration
from runtime.sampling import TokenLogprobs, logprobs


@dataclass
class ModelInfo:
    """What other threads may know about the loaded model (copied once, read-only)."""

    n_ctx: int
    n_vocab: int


@dataclass
class Job:
    """One generation request on its way through the queue.

    The engine thread puts events on `events`: ("piece", text, [TokenLogprobs]) per emitted
    piece, then ("done", finish_reason, n_generated, timings) or ("error", message).
    """

    prompt_tokens: list[int]
    params: Any  # SamplingParams
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token and N alternatives
    spell_special: bool = False  # control tokens in the text (a tool-call format's markers)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineWorker:
    """The one thread that owns the engine: loads the model, then runs Jobs one by one."""

    def __init__(self, load: Callable[[], Any], on_failure: Callable[[BaseException], None] | None = None):
        self._load = load  # -> a runtime.session.Session
        self._on_failure = on_failure
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.state = "loading"  # -> "ok" or "failed"
        self.error: str | None = None
        self.session = None
        self.chat_template = None
        self.info: ModelInfo | None = None
        self.loaded = threading.Event()
        self.current: Job | None = None  # the Job being generated (stop() and tests read it)
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    @property
    def idle(self) -> bool:
        return self.current is None and self.jobs.unfinished_tasks == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs, drop what waits, and end the thread."""
        current = self.current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.events.put(("error", "the server is shutting down"))
            self.jobs.task_done()
        self.jobs.put(None)
        if self.state == "ok":  # a load cannot be interrupted; the daemon thread ends with us
            self._thread.join(timeout)

    # --- the model's text, for any thread (once state is "ok") -------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.session.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def decode(self, tokens: list[int]) -> str:
        return self.session.tokenizer.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token, special tokens spelled out."""
        return self.session.tokenizer.token_to_piece(token, special=True)

    def model_chat_template(self) -> str:
        """The chat template the model file carries, "" when it has none (a base model)."""
        source = self.session.gguf.metadata.get("tokenizer.chat_template")
        return source if isinstance(source, str) else ""

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on text's tokens, without tokenizing it (Tokenizer.fewest_tokens)."""
        return self.session.tokenizer.fewest_tokens(text)

    def chat_prompt(self, messages: Any, **template_vars: Any):
        """The prompt (runtime.chat.Prompt) for a conversation, ready for the assistant's
        turn (raises ChatTemplateError, or ValueError naming a malformed message);
        template_vars: tools, enable_thinking..."""
        return self.chat_template.prompt(messages, add_generation_prompt=True, **template_vars)

    def chat_template_source(self) -> str:
        """The chat template in use (the model's, or the built-in one that replaced it)."""
        self.chat_template.name  # waits for the check at load, which may replace it
        return self.chat_template.source

    def constraint(self, grammar):
        """The grammar compiled against the model's vocabulary (runtime.constraint; raises
        ConstraintError). The first call builds the vocabulary's trie (seconds)."""
        from runtime.constraint import ConstraintVocabulary

        return ConstraintVocabulary.of(self.session.tokenizer, self.info.n_vocab).compile(grammar)

    def prompt_tokens(self, prompt) -> list[int]:
        """A chat prompt's tokens: message text never becomes control tokens."""
        return prompt.tokens(self.session.tokenizer)

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.session = self._load()
            engine = self.session.engine
            self.info = ModelInfo(n_ctx=engine.n_ctx, n_vocab=engine.model.hp.n_vocab)
            self.chat_template = ChatTemplate.for_model(self.session.gguf.metadata)
        except BaseException as e:  # a UserError from load_session, or a bug: report it, stop
            if hasattr(e, "format_message"):
                message = e.format_message()
            else:
                message = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            self.error, self.state = message, "failed"
            self.loaded.set()
            if self._on_failure:
                self._on_failure(e)
            return
        self.state = "ok"
        self.loaded.set()
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if job.cancelled.is_set():  # its client left while it waited
                    self.counts["skipped"] += 1
                    continue
                self.current = job
                self._generate(job)
            except Exception:
                traceback.print_exc()
                self.counts["failed"] += 1
                job.events.put(("error", "the model failed on this request (see the server log)"))
            finally:
                self.current = None
                self.jobs.task_done()

    def _generate(self, job: Job) -> None:
        generation = _JobGeneration(self.session.engine, self.session.tokenizer, job)
        t_start = time.perf_counter()
        t_first = None
        sent = 0  # logprob entries already attached to a piece
        for piece in generation:  # ends a token after job.cancelled is set
            if t_first is None:
                t_first = time.perf_counter()
            n = len(generation.tokens)
            job.events.put(("piece", piece, generation.entries[sent:n]))
            sent = n
        t_end = time.perf_counter()
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.events.put(("error", "cancelled"))
            return
        tail = generation.entries[sent:len(generation.tokens)]
        if tail:
            job.events.put(("piece", "", tail))
        n_gen = len(generation.tokens)
        t_first = t_first or t_end
        timings = {"prompt_n": len(job.prompt_tokens), "prompt_ms": 1000 * (t_first - t_start),
                   "predicted_n": n_gen, "predicted_ms": 1000 * (t_end - t_first)}
        decode_s = t_end - t_first
        timings["predicted_per_second"] = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None
        self.counts["completed"] += 1
        job.events.put(("done", generation.finish_reason, n_gen, timings))


class _JobGeneration(TextGeneration):
    """TextGeneration of a Job: stops when the Job is cancelled, records logprobs."""

    def __init__(self, engine, tokenizer, job: Job):
        super().__init__(engine, tokenizer, job.prompt_tokens, job.params, cancel=job.cancelled)
        self.skip_special = not job.spell_special
        self.job = job
        self.entries: list[TokenLogprobs] = []  # one per sampled token, when asked for

    def _next_token(self, logits):
        token = super()._next_token(logits)
        if self.job.top_logprobs is not None:
            self.entries.append(logprobs(logits, token, self.job.top_logprobs))
        return token
