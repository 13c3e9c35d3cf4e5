"""The engine thread: the one thread that owns the model, and the scheduler of its slots.

EngineWorker loads the model (a Session) on its own thread, then serves Jobs with the
engine's slots (--parallel N): a Job waits in a bounded queue until it gets a slot (n slots
for n choices), and every step of the engine thread runs one batch through the model: the
next token of every sequence that is generating, plus at most one chunk of a newly
admitted prompt (so a long prompt delays the others by a chunk at a time, never by its
whole prefill). Jobs get slots in the order they came. Each choice samples on its own; the
n choices of one Job share its prompt's prefill (the first slot's cache is copied,
Engine.copy_slot).

Other threads (the HTTP server's) never touch the engine, the model or Numba: they submit
a Job and read its events, and use the worker's text interface (encode, decode,
token_bytes, fewest_tokens, chat_prompt, prompt_tokens), which only reads the tokenizer and
the chat template, both unchanged after loading. A Job's `cancelled` event is the one
cancel signal: a generation checks it between tokens, and `withdraw` also takes a waiting
Job out of the queue at once.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime.chat import ChatTemplate
from runtime.engine import TextGeneration
from runtime.sampling import TokenLogprobs, logprobs


class QueueFull(Exception):
    """Every slot is busy and the queue is at its bound: the request is refused."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class ModelInfo:
    """What other threads may know about the loaded model (copied once, read-only)."""

    n_ctx: int  # the context of one sequence (a slot)
    n_vocab: int
    n_slots: int = 1


@dataclass
class Job:
    """One generation request (with n choices) on its way through the queue.

    The engine thread puts events on `events`: ("piece", choice, text, [TokenLogprobs]) per
    emitted piece, ("done", choice, finish_reason, n_generated, timings) when a choice
    ends, or ("error", message), after which nothing follows.
    """

    prompt_tokens: list[int]
    params: Any  # SamplingParams
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token and N alternatives
    spell_special: bool = False  # control tokens in the text (a tool-call format's markers)
    n: int = 1  # choices: each samples on its own, after one prefill of the prompt
    budget: Any = None  # a runtime.reasoning.ReasoningBudget: thinking tokens at most
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineWorker:
    """The one thread that owns the engine: loads the model, then schedules Jobs on its slots.

    queue_limit: how many Jobs may wait for a slot (None: 4 per slot, at least 16, the
    default HTTP threads); submit refuses more with QueueFull."""

    def __init__(self, load: Callable[[], Any], on_failure: Callable[[BaseException], None] | None = None,
                 queue_limit: int | None = None):
        self._load = load  # -> a runtime.session.Session
        self._on_failure = on_failure
        self.queue_limit = queue_limit
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, queue.Queue]] = collections.deque()
        self._stopping = False
        self.state = "loading"  # -> "ok" or "failed"
        self.error: str | None = None
        self.session = None
        self.chat_template = None
        self.info: ModelInfo | None = None
        self.loaded = threading.Event()
        self.tasks: list[_Task | None] = []  # per slot: the Task it serves (/slots reads it)
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._durations: collections.deque[float] = collections.deque(maxlen=16)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a Job for its slots; QueueFull when the queue is at its bound (Jobs that
        free slots will take at once do not count)."""
        with self._cond:
            free = (self.info.n_slots if self.info else 1) - self.n_busy
            if len(self._waiting) >= self.queue_bound + max(free, 0):
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Cancel a Job (its client left): a waiting one leaves the queue at once, a running
        one stops before its next token and frees its slots."""
        job.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["skipped"] += 1

    @property
    def queue_bound(self) -> int:
        if self.queue_limit is not None:
            return self.queue_limit
        return max(16, 4 * (self.info.n_slots if self.info else 1))

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_busy(self) -> int:
        """Slots serving a Job now."""
        return sum(task is not None for task in self.tasks)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the recent requests' mean duration times
        the queue's turns ahead of it, 1 to 60."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        turns = 1 + len(self._waiting) // (self.info.n_slots if self.info else 1)
        return int(min(60, max(1, math.ceil(mean * turns))))

    @property
    def idle(self) -> bool:
        return not self._waiting and self.n_busy == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs, drop what waits, and end the thread."""
        with self._cond:
            for task in self.tasks:
                if task is not None:
                    task.job.cancel()
            while self._waiting:
                job = self._waiting.popleft()
                job.cancel()
                job.events.put(("error", "the server is shutting down"))
            self._stopping = True
            self._cond.notify()
        if self.state == "ok":  # a load cannot be interrupted; the daemon thread ends with us
            self._thread.join(timeout)

    def slots_state(self) -> list[dict]:
        """Each slot as llama.cpp's GET /slots shows it (its metrics form: no prompt or
        generated text, which belong to whoever sent them). Read from any thread: a
        snapshot that may be a token behind."""
        engine = self.session.engine
        out = []
        for slot, task in zip(engine.slots, list(self.tasks)):
            state = {"id": slot.id, "n_ctx": engine.n_ctx, "speculative": False,
                     "is_processing": task is not None, "id_task": -1}
            if task is not None:
                g = next(g for g in task.generations if g.slot == slot.id)
                p = task.job.params
                state.update({
                    "id_task": id(task.job) & 0x7FFFFFFF, "n_prompt_tokens": len(task.job.prompt_tokens),
                    "params": {"n_predict": -1 if p.max_tokens is None else p.max_tokens,
                               "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                               "min_p": p.min_p, "repeat_penalty": p.repeat_penalty,
                               "repeat_last_n": p.repeat_last_n, "presence_penalty": p.presence_penalty,
                               "frequency_penalty": p.frequency_penalty,
                               "seed": -1 if p.seed is None else p.seed, "stop": list(p.stop),
                               "n_probs": task.job.top_logprobs or 0},
                    "next_token": [{"has_next_token": not g.finished, "has_new_line": False,
                                    "n_remain": g.limit - len(g.tokens), "n_decoded": len(g.tokens)}]})
            out.append(state)
        return out

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
        return self.session.model_chat_template()

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

    def on_engine_thread(self, call: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """call(session) run on the engine thread between two steps (the model is the
        engine thread's alone), its result or exception returned here."""
        answer: queue.Queue = queue.Queue(maxsize=1)
        with self._cond:
            self._calls.append((call, answer))
            self._cond.notify()
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def _run_calls(self, calls: list) -> None:
        for call, answer in calls:
            try:
                answer.put((True, call(self.session)))
            except Exception as e:  # the caller gets it
                answer.put((False, e))

    def prompt_tokens(self, prompt) -> list[int]:
        """A chat prompt's tokens: message text never becomes control tokens."""
        return prompt.tokens(self.session.tokenizer)

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.session = self._load()
            engine = self.session.engine
            self.info = ModelInfo(n_ctx=engine.n_ctx, n_vocab=engine.model.hp.n_vocab,
                                  n_slots=engine.n_parallel)
            self.tasks = [None] * engine.n_parallel
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
        running: list[_Task] = []
        while True:
            with self._cond:
                while not self._waiting and not running and not self._calls and not self._stopping:
                    self._cond.wait()
                calls = list(self._calls)
                self._calls.clear()
                if self._stopping:
                    for task in running:
                        task.job.events.put(("error", "the server is shutting down"))
                    for _, answer in calls:
                        answer.put((False, RuntimeError("the server is shutting down")))
                    return
                self._admit(running)
            self._run_calls(calls)  # outside the lock: submit() need not wait for them
            try:
                self._step(running)
            except Exception:  # a bug: every Job of the step fails, the server goes on
                traceback.print_exc()
                for task in list(running):
                    self._finish(running, task, "failed",
                                 ("error", "the model failed on this request (see the server log)"))

    def _admit(self, running: list[_Task]) -> None:
        """Give waiting Jobs their slots, first come first served (holding the lock)."""
        engine = self.session.engine
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self.counts["skipped"] += 1
                continue
            free = [i for i, task in enumerate(self.tasks) if task is None]
            if len(free) < job.n:
                return
            self._waiting.popleft()
            first = engine.pick_slot(job.prompt_tokens, free)
            others = sorted((i for i in free if i != first), key=lambda i: engine.slots[i].last_used)
            task = self._start(job, [first, *others[:job.n - 1]])
            if task is None:
                self.counts["completed"] += 1
                continue
            for slot in task.slots:
                self.tasks[slot] = task
            running.append(task)

    def _start(self, job: Job, slots: list[int]) -> _Task | None:
        """A Job gets its slots: the Task that runs it (None: it was answered without the
        engine, which a test's scripted worker does)."""
        return _Task(job, slots, self.session.engine, self.session.tokenizer)

    def _step(self, running: list[_Task]) -> None:
        """One engine step: a chunk of the first prompt still prefilling, and the pending
        token of every generating choice, in one batch; then each choice samples."""
        engine = self.session.engine
        for task in list(running):
            if task.job.cancelled.is_set() and task.prompt_left:
                self._finish(running, task, "cancelled", ("error", "cancelled"))
        work, owners = [], []
        prefilling = next((t for t in running if t.prompt_left), None)
        if prefilling is not None:
            chunk = engine.next_chunk(prefilling.slots[0], prefilling.prompt_left)
            work.append((prefilling.slots[0], chunk))
            owners.append(prefilling)
        for task in running:
            for g in task.generations:
                if g.pending is not None:
                    work.append((g.slot, [g.pending]))
                    owners.append(g)
        if work:
            for owner, logits in zip(owners, engine.step(work, prefills=int(prefilling is not None))):
                if isinstance(owner, _Task):
                    owner.prefilled(len(work[0][1]), logits)
                else:
                    owner.feed(logits)
        for task in list(running):
            try:
                ended = task.sample()
            except Exception as e:  # the sampler's refusal (every token banned...) ends this Job only
                traceback.print_exc()
                self._finish(running, task, "failed", ("error", f"sampling failed: {e}"))
                continue
            for slot in ended:
                self.tasks[slot] = None
            if task.done:
                self._finish(running, task, "cancelled" if task.job.cancelled.is_set() else "completed")

    def _finish(self, running: list[_Task], task: _Task, outcome: str, event: tuple | None = None) -> None:
        running.remove(task)
        for slot in task.slots:
            if self.tasks[slot] is task:
                self.tasks[slot] = None
        if outcome == "cancelled":
            event = ("error", "cancelled")
        if event is not None:
            task.job.events.put(event)
        self.counts[outcome] += 1
        if outcome == "completed":
            self._durations.append(time.perf_counter() - task.t_start)


class _Task:
    """A Job in its slots: its prompt's prefill, then its choices' generations."""

    def __init__(self, job: Job, slots: list[int], engine, tokenizer):
        self.job, self.slots, self.engine = job, slots, engine
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.generations = [_JobGeneration(engine, tokenizer, job, i, slot) for i, slot in enumerate(slots)]
        self.prompt_left = self.generations[0].start()  # prefix reuse in the first slot
        self.sent = [0] * len(slots)  # per choice: logprob entries already attached to a piece

    @property
    def done(self) -> bool:
        return all(g.finished for g in self.generations)

    def prefilled(self, n: int, logits) -> None:
        """n more prompt tokens are in the first slot; logits after them."""
        self.prompt_left = self.prompt_left[n:]
        if self.prompt_left:
            return
        self.generations[0].feed(logits)
        for g in self.generations[1:]:  # the other choices start from the same prompt
            self.engine.copy_slot(self.slots[0], g.slot)
            g.feed(logits)

    def sample(self) -> list[int]:
        """Each choice with fresh logits samples its next token and sends its text; the
        slots whose choice ended."""
        ended = []
        for i, g in enumerate(self.generations):
            if g.finished or g.logits is None:
                continue
            text = g.advance()
            now = time.perf_counter()
            if self.t_first is None:
                self.t_first = now
            n = len(g.tokens)
            if text or n > self.sent[i]:
                self.job.events.put(("piece", i, text, g.entries[self.sent[i]:n]))
                self.sent[i] = n
            if g.finished:
                ended.append(g.slot)
                if not self.job.cancelled.is_set():
                    self.job.events.put(("done", i, g.finish_reason, n, self._timings(n, now)))
        return ended

    def _timings(self, n_gen: int, t_end: float) -> dict:
        t_first = self.t_first or t_end
        decode_s = t_end - t_first
        return {"prompt_n": len(self.job.prompt_tokens), "prompt_ms": 1000 * (t_first - self.t_start),
                "predicted_n": n_gen, "predicted_ms": 1000 * decode_s,
                "predicted_per_second": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None}


class _JobGeneration(TextGeneration):
    """One choice of a Job in its slot: stops when the Job is cancelled, records logprobs.
    Choice i of a seeded Job samples with seed + i, so the choices differ yet repeat."""

    def __init__(self, engine, tokenizer, job: Job, choice: int, slot: int):
        params = job.params
        if choice and params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + choice)
        super().__init__(engine, tokenizer, job.prompt_tokens, params, cancel=job.cancelled, slot=slot,
                         budget=job.budget)
        self.skip_special = not job.spell_special
        self.job = job
        self.entries: list[TokenLogprobs] = []  # one per sampled token, when asked for

    def _next_token(self, logits):
        token = super()._next_token(logits)
        if self.job.top_logprobs is not None:
            self.entries.append(logprobs(logits, token, self.job.top_logprobs))
        return token
