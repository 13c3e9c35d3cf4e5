"""The command line of model.run (and `python -m runtime`).

One command with llama.cpp / llamafile style flags (-m MODEL, -p PROMPT, -n, --temp, --chat,
...), not subcommands: model.run's embedded `.args` are prepended to the user's own flags, which
only composes when every action is a flag of the same command. Bad input (a missing file, a
file that is not a GGUF) gets one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading

import click

from runtime.container import MODEL_ENTRY, ContainerError, splice_args
from runtime.gguf import GGUFFile
from runtime.http_connections import DEFAULT_WORKERS
from runtime.info import describe, quantization_mix, unsupported_types
from runtime.reasoning import REASONING_FORMATS
from runtime.hparams import DEFAULT_CTX_CHECKPOINTS, DEFAULT_KV_CACHE_TYPE, KV_CACHE_TYPES
from runtime.session import (Session, UsageError, UserError, load_session, model_name,
                             open_container_model, open_model, open_model_run)
from runtime.terminal import printable


class RuntimeCommand(click.Command):
    """The runtime's command; a model.run's `.args` are spliced into the arguments when
    they start with `--container FILE` (the sh header of model.run passes exactly that)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if len(args) >= 2 and args[0] == "--container":
            with open_model_run(args[1]) as container:
                defaults = container.default_args()
            args = args[:2] + splice_args(defaults, args[2:])
        return super().parse_args(ctx, args)


@click.command(cls=RuntimeCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-m", "--model", "model", metavar="FILE",
              help="The GGUF model file (in a model.run: another model to run instead of its own).")
@click.option("--container", metavar="FILE", hidden=True,
              help="The model.run this runtime runs from (passed by its sh header).")
@click.option("--info", is_flag=True,
              help="Describe the model (architecture, size, tokenizer, quantization) and exit; its "
                   "memory estimate follows -c, -ctk/-ctv and --parallel.")
@click.option("--verify", is_flag=True,
              help="Check the model inside this model.run against the sha256 it was made with, and exit.")
@click.option("-p", "--prompt", metavar="TEXT", help="Continue TEXT and print the continuation.")
@click.option("--chat", is_flag=True, help="Chat in the terminal, using the model's chat template.")
@click.option("--perplexity", "perplexity_file", metavar="FILE",
              help="Measure the model's perplexity on the UTF-8 text in FILE, as llama.cpp's "
                   "llama-perplexity does (chunks of -c tokens, 512 by default), and exit.")
@click.option("--chunks", type=int, default=-1, show_default=True, metavar="N",
              help="With --perplexity: score only the first N chunks (-1: all).")
@click.option("-n", "--n-predict", type=int, default=-1, show_default=True, metavar="N",
              help="Tokens to generate at most (-1: until the model stops or the context is full).")
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature (0: greedy).")
@click.option("--top-k", type=int, default=40, show_default=True, help="Keep the K likeliest tokens (0: off).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling (1: off).")
@click.option("--min-p", type=float, default=0.05, show_default=True,
              help="Drop tokens below this fraction of the likeliest one (0: off).")
@click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="(1: off)")
@click.option("--seed", type=int, default=-1, show_default=True, help="Random seed (-1: random).")
@click.option("-c", "--ctx-size", type=int, default=0, show_default=True, metavar="N",
              help="Context size in tokens (0: the model's, at most 4096).")
@click.option("-ctk", "--cache-type-k", type=click.Choice(list(KV_CACHE_TYPES)), default=DEFAULT_KV_CACHE_TYPE,
              show_default=True, help="KV cache type of the keys (f32: twice f16's memory; q8_0: about half).")
@click.option("-ctv", "--cache-type-v", type=click.Choice(list(KV_CACHE_TYPES)), default=DEFAULT_KV_CACHE_TYPE,
              show_default=True, help="KV cache type of the values.")
@click.option("-t", "--threads", type=int, default=0, metavar="N", help="CPU threads (default: all cores).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on. Anything but loopback exposes the model to your network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to serve on; when taken, the next free one of the following 9 is used.")
@click.option("--api-key", metavar="KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on the API (the page and /health stay open).")
@click.option("--nobrowser", is_flag=True, help="Do not open the chat page in a browser.")
@click.option("--cors", metavar="ORIGIN", default=None,
              help="Let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests that name the server NAME (its Host header), e.g. a "
                   "name in your local DNS; repeatable. Others are refused (DNS rebinding).")
@click.option("--threads-http", type=click.IntRange(1, 256), default=DEFAULT_WORKERS, show_default=True,
              metavar="N", help="Requests answered at once; slow or idle connections wait "
                                "without holding one.")
@click.option("--unsecure", is_flag=True,
              help="Run the server and the chat template renderer without confining them "
                   "(no Landlock or seccomp: they may then write any of your files, run "
                   "programs and connect out; the renderer's time and memory limits stay).")
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=1, show_default=True, metavar="N",
              help="Slots: requests generated at once, decoded together; the context (-c) is "
                   "split among them, as llama.cpp does.")
@click.option("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints", "ctx_checkpoints", type=click.IntRange(min=0),
              default=DEFAULT_CTX_CHECKPOINTS, show_default=True, metavar="N",
              help="Copies of a hybrid model's recurrent state kept per slot (Qwen3.5), so a "
                   "regenerated answer or a next chat turn resumes near the prompt's end instead "
                   "of from its first token (0: none), as llama.cpp's.")
@click.option("--queue", "queue_limit", type=click.IntRange(0, 4096), default=None, metavar="N",
              help="Requests that may wait for a slot; more get 503 with Retry-After "
                   "(default: 4 per slot, at least 16).")
@click.option("--metrics", "metrics_endpoint", is_flag=True,
              help="Serve GET /metrics (Prometheus' text format, llama.cpp's metric names).")
@click.option("--embeddings", "embeddings_endpoint", is_flag=True,
              help="Serve /v1/embeddings and /embedding: the model's pooled final hidden states.")
@click.option("--pooling", type=click.Choice(["none", "mean", "cls", "last"]), default=None,
              help="How --embeddings pools a text's token states (default: the model's "
                   "pooling_type; none for a generative model, as llama.cpp).")
@click.option("--slots/--no-slots", "slots_endpoint", default=True, show_default=True,
              help="Serve GET /slots (each slot's state, as llama.cpp's server).")
@click.option("--reasoning-format", type=click.Choice(list(REASONING_FORMATS)), default="auto",
              show_default=True, help="A thinking model's thoughts: auto/deepseek return them "
              "as reasoning_content (-p, --chat: shown between [Start thinking] and [End "
              "thinking]); none leaves them in the content, inline; deepseek-legacy does both.")
@click.option("--reasoning-budget", type=click.IntRange(-1, 2**31 - 1), default=-1, show_default=True,
              metavar="N", help="Thinking tokens at most: -1 no limit; 0 ask the model not to think "
              "(enable_thinking=false); N > 0 end its thinking after N tokens.")
@click.option("--reasoning-budget-message", metavar="MESSAGE", default="",
              help="Text written before the end of thinking when --reasoning-budget runs out.")
def main(model: str | None, container: str | None, info: bool, verify: bool, prompt: str | None,
         chat: bool, perplexity_file: str | None, chunks: int, n_predict: int, temp: float,
         top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: int, ctx_size: int,
         threads: int, host: str, port: int, api_key: str | None, nobrowser: bool,
         cors: str | None, allowed_hosts: tuple[str, ...], threads_http: int, unsecure: bool,
         parallel: int, ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS, queue_limit: int | None = None,
         slots_endpoint: bool = True, metrics_endpoint: bool = False, embeddings_endpoint: bool = False,
         pooling: str | None = None,
         cache_type_k: str = DEFAULT_KV_CACHE_TYPE,
         cache_type_v: str = DEFAULT_KV_CACHE_TYPE, reasoning_format: str = "auto",
         reasoning_budget: int = -1, reasoning_budget_message: str = "") -> None:
    """Run a GGUF language model on this computer, offline.

    Without -p, --chat or --info it serves a chat page and an OpenAI-compatible API
    (/v1/chat/completions, /v1/completions, /v1/models) on http://127.0.0.1:8080/.
    """
    if verify:
        if container is None:
            raise UsageError("--verify checks the model inside a model.run; run it as "
                             "./model.run --verify")
        verify_container(container)
        return
    if model is None and container is None:
        raise UsageError("no model given; pass -m MODEL.gguf (see --help)")
    if model is None:
        model = container
        gguf, name = open_container_model(container)
    else:
        gguf = open_model(model)
        name = model_name(gguf, model)
    with gguf:
        if info:
            from runtime.confine import availability

            click.echo(describe(gguf, model, ctx_size, (cache_type_k, cache_type_v), parallel, ctx_checkpoints))
            click.echo("  confinement of the server and the chat template renderer: "
                       + ("off (--unsecure)" if unsecure else availability()))
            return
        if unsecure:
            from runtime.chat_worker import renderer

            renderer().confine = False
        if perplexity_file is not None:
            run_perplexity(gguf, perplexity_file, ctx_size or PERPLEXITY_N_CTX, chunks, threads)
            return
        if prompt is None and not chat:
            serve(gguf, name, ctx_size, threads, (cache_type_k, cache_type_v), host=host, port=port,
                  api_key=api_key, open_browser=not nobrowser, cors=cors, parallel=parallel,
                  ctx_checkpoints=ctx_checkpoints,
                  allowed_hosts=allowed_hosts, threads_http=threads_http, queue_limit=queue_limit,
                  slots_endpoint=slots_endpoint,
                  reasoning=(reasoning_format, reasoning_budget, reasoning_budget_message),
                  metrics_endpoint=metrics_endpoint, embeddings=(embeddings_endpoint, pooling),
                  confine_to=None if unsecure else [model])
            return
        from runtime.sampling import SamplingParams

        try:
            params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repeat_penalty=repeat_penalty, seed=seed,
                                    max_tokens=None if n_predict < 0 else max(n_predict, 1))
        except ValueError as e:
            raise UsageError(f"{e}") from None
        session = load_session(gguf, ctx_size, threads, (cache_type_k, cache_type_v),
                               n_ctx_checkpoints=ctx_checkpoints)
        from runtime.openai_chat import ChatSettings

        settings = ChatSettings(reasoning_format, reasoning_budget, reasoning_budget_message)
        if chat:
            run_chat(session, params, settings)
        else:
            run_prompt(session, prompt, params, n_predict, settings)


def has_display() -> bool:
    """Whether a browser could show a window here (Linux needs X11 or Wayland)."""
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def serve(gguf: GGUFFile, name: str, ctx_size: int, threads: int, cache_types: tuple[str, str], *,
          host: str, port: int, api_key: str | None, open_browser: bool, cors: str | None, parallel: int,
          ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS,
          allowed_hosts: tuple[str, ...] = (), threads_http: int = DEFAULT_WORKERS,
          queue_limit: int | None = None, slots_endpoint: bool = True,
          metrics_endpoint: bool = False, embeddings: tuple[bool, str | None] = (False, None),
          reasoning: tuple[str, int, str] = ("auto", -1, ""), confine_to: list[str] | None = None) -> None:
    """Bind at once, load the model on the engine thread, serve until Ctrl-C. confine_to:
    the model's files; the process may then read only those besides its own, and runs no
    program and opens no connection (runtime.confine, applied once the port is bound and
    before any other thread starts)."""
    from runtime.chat_worker import renderer
    from runtime.openai_chat import ChatSettings
    from runtime.server import ModelServer, bind_server
    from runtime.worker import EngineWorker

    missing = unsupported_types(quantization_mix(gguf))
    if missing:  # known before loading: say it before serving anything
        raise UserError("this build cannot run the model: it has no kernels for "
                        + ", ".join(s.name for s in missing))
    failure: list[BaseException] = []
    server_box: list[ModelServer] = []

    def load() -> Session:
        return load_session(gguf, ctx_size, threads, cache_types, n_parallel=parallel,
                            n_ctx_checkpoints=ctx_checkpoints)

    def on_failure(error: BaseException) -> None:
        failure.append(error)
        if server_box:
            threading.Thread(target=server_box[0].shutdown, daemon=True).start()

    worker = EngineWorker(load, on_failure, queue_limit=queue_limit)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    browser_url: queue.Queue[str] = queue.Queue()
    if open_browser and has_display():  # started unconfined: the browser must not inherit it
        import webbrowser

        threading.Thread(target=lambda: webbrowser.open(browser_url.get()), daemon=True,
                         name="browser").start()
    renderer().start()  # the template renderers' launcher: the one program it runs
    try:
        server = bind_server(host, port, lambda address: ModelServer(
            address, worker, name, api_key=api_key, cors_origin=cors, workers=threads_http,
            allowed_hosts=allowed_hosts, chat_settings=ChatSettings(*reasoning),
            slots_endpoint=slots_endpoint, metrics=metrics_endpoint, embeddings=embeddings[0],
            pooling=embeddings[1]), say=say)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    server_box.append(server)
    if confine_to is not None:  # bound, no thread started yet (they start serving)
        from runtime.confine import confine_server

        confinement = confine_server(confine_to)
        say(f"confined: {confinement.summary()}")
        if confinement.warning("the server"):
            say(f"warning: {confinement.warning('the server')}")
    shown_host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    url = f"http://{shown_host}:{server.port}/"
    worker.start()
    click.echo(f"modelrun: serving {printable(name)} at {url} (Ctrl-C to stop)")
    sys.stdout.flush()
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        say(f"warning: listening on {host}: other machines can reach this server"
            + ("" if api_key else " (no --api-key set)"))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
        # Ctrl-C stops it even when started from a shell that ignores SIGINT in background jobs
        signal.signal(signal.SIGINT, _interrupt)
    browser_url.put(url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        say("stopping")
    finally:
        server.server_close()
        worker.stop(timeout=5.0)
    if failure:
        error = failure[0]
        if isinstance(error, UserError):
            raise error
        raise UserError(f"the model failed to load: {type(error).__name__}: {error}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class Answer:
    """A generation shown as llama-cli shows a thinking model's answer: the thinking between
    [Start thinking] and [End thinking] (grey on a terminal), then the answer; with
    --reasoning-format none, the text as the model writes it, tags and all. The thinking and
    the budget are the server's (runtime.openai_chat.ChatRequest: ChatOutput splits the
    text, ReasoningBudget bounds it). A model that does not think is printed as it comes."""

    GREY, RESET = "\x1b[90m", "\x1b[0m"

    def __init__(self, chat, template_source: str, prompt_text: str, tokenizer, thinking_file):
        from runtime.reasoning import thinking_tags

        self.thinks = thinking_tags(template_source, chat.fmt == "harmony") is not None
        self.budget = chat.budget(tokenizer.encode, template_source, prompt_text)
        self.spell_special = chat.spell_special
        self.output = chat.output(prompt_text, stream=True)
        self.thinking_file = thinking_file
        self.text, self.inside = "", False

    def show(self, piece: str, final: bool = False) -> None:
        self.text += piece
        if not self.thinks:
            _echo(piece)
            return
        for delta in self.output.deltas(self.text, final):
            if delta.get("reasoning_content"):
                if not self.inside:
                    self._think("[Start thinking]\n")
                    self.inside = True
                self._think(delta["reasoning_content"])
            if delta.get("content"):
                self._end_thinking()
                _echo(delta["content"])
        if final:
            self._end_thinking()

    def message(self) -> dict:
        """The assistant's message for the conversation (its thinking apart, as a client of
        the server sends it back)."""
        if not self.thinks:
            return {"role": "assistant", "content": self.text}
        return self.output.message(self.text)[0]

    def _think(self, text: str) -> None:
        grey = self.thinking_file.isatty()
        click.echo((self.GREY if grey else "") + printable(text, keep_layout=True)
                   + (self.RESET if grey else ""), nl=False, file=self.thinking_file)
        self.thinking_file.flush()

    def _end_thinking(self) -> None:
        if self.inside:
            self._think("\n[End thinking]\n\n")
            self.inside = False


def _echo(text: str) -> None:
    """Model text on stdout: its escape sequences shown, not obeyed."""
    click.echo(printable(text, keep_layout=True), nl=False)
    sys.stdout.flush()


def generate_text(session: Session, prompt_tokens: list[int], params, answer: Answer | None = None) -> str:
    """Stream the continuation to stdout (as `answer` shows it); timings to stderr. Returns
    the text."""
    from runtime.engine import ContextOverflowError, TextGeneration

    try:
        generation = TextGeneration(session.engine, session.tokenizer, prompt_tokens, params,
                                    budget=answer.budget if answer else None)
    except ContextOverflowError as e:
        raise UserError(f"{e}; shorten it or raise -c (the model allows "
                        f"{session.engine.model.hp.n_ctx_train})") from None
    if answer is not None:
        generation.skip_special = not answer.spell_special
    pieces = []
    for piece in generation:  # a stranger's model may write escape sequences: shown, not obeyed
        pieces.append(piece)
        if answer is None:
            _echo(piece)
        else:
            answer.show(piece)
    if answer is not None:
        answer.show("", final=True)
    stats = session.engine.stats
    click.echo(f"\n[{len(prompt_tokens)} prompt tokens, {len(generation.tokens)} generated; "
               f"prefill {_rate(stats['prefill_tokens'], stats['prefill_s'])}, "
               f"decode {_rate(stats['decode_tokens'], stats['decode_s'])}; "
               f"stopped: {generation.finish_reason}]", err=True)
    return "".join(pieces)


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "-"


def run_prompt(session: Session, prompt: str, params, n_predict: int, settings) -> None:
    """-p: the continuation of the text on stdout. A thinking model's thinking (which the
    text may open with <think>) is bounded by --reasoning-budget and shown on stderr as
    --reasoning-format says, so stdout holds the answer alone (none: inline, as written)."""
    from runtime.openai_chat import chat_request

    if n_predict == 0:
        return
    tokens = session.tokenizer.encode(prompt)
    source = session.model_chat_template()
    answer = Answer(chat_request({"messages": []}, source, settings), source, prompt,
                    session.tokenizer, sys.stderr)
    generate_text(session, tokens, params, answer)
    click.echo()


PERPLEXITY_N_CTX = 512  # llama-perplexity's default chunk size


def run_perplexity(gguf: GGUFFile, text_path: str, n_ctx: int, chunks: int, threads: int) -> None:
    """--perplexity: llama-perplexity's numbers; running values on stderr, result on stdout."""
    from runtime.perplexity import perplexity

    if chunks == 0 or chunks < -1:
        raise UsageError(f"--chunks must be -1 (all) or at least 1, got {chunks}")
    if n_ctx < 4:
        raise UsageError(f"perplexity needs -c of at least 4 tokens, got {n_ctx}")
    text = read_text_file(text_path, "--perplexity")
    if text.endswith("\n"):  # as llama.cpp's -f: the same tokens, so the same numbers
        text = text[:-1]
    session = load_session(gguf, n_ctx, threads)
    tokens = session.tokenizer.encode(text, add_special=True, parse_special=False)
    if len(tokens) < 2 * n_ctx:  # llama-perplexity's own minimum
        raise UserError(f"{text_path} has {len(tokens)} tokens; perplexity with -c {n_ctx} needs at "
                        f"least {2 * n_ctx} (2 x {n_ctx}): pass a longer text or a smaller -c")
    n_chunks = len(tokens) // n_ctx if chunks < 0 else min(chunks, len(tokens) // n_ctx)
    click.echo(f"perplexity: {len(tokens)} tokens; {n_chunks} chunks of {n_ctx}, "
               f"the second half of each scored", err=True)

    def show(chunk: int, running: float) -> None:  # llama-perplexity's "[1]12.3456,[2]..."
        click.echo(f"[{chunk}]{running:.4f},", nl=False, err=True)
        sys.stderr.flush()

    try:
        result = perplexity(session.engine, tokens, n_ctx, n_chunks=n_chunks, on_chunk=show)
    except ValueError as e:
        raise UsageError(f"{e}") from None
    click.echo(err=True)
    click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}")
    click.echo(f"{result.n_chunks} chunks of {n_ctx} tokens ({result.n_tokens} tokens, "
               f"{result.n_scored} scored) in {result.seconds:.1f} s: "
               f"{result.tokens_per_s:.1f} tok/s")


def read_text_file(path: str, option: str) -> str:
    """The UTF-8 text in `path`, or a UserError saying what is wrong with it."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; pass a UTF-8 text file to {option}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass a UTF-8 text file to {option}")
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); convert it to UTF-8 first") from None


def run_chat(session: Session, params, settings) -> None:
    """A terminal chat: the conversation is re-rendered each turn; the engine reuses the
    shared prefix of the KV cache, so only the new turn is computed. The reasoning flags act
    as on the server's chat completions (settings: its ChatSettings): --reasoning-budget 0
    asks the template not to think, N bounds the thinking, and the thinking is shown apart
    from the answer (Answer) and kept apart in the conversation."""
    from runtime.chat import ChatTemplate, ChatTemplateError
    from runtime.openai_chat import chat_request

    template = ChatTemplate.for_model(session.gguf.metadata)
    messages: list[dict] = []
    click.echo("chat: type a message; /clear starts over, /exit (or Ctrl-D) quits", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo(err=True)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/clear":
            messages.clear()
            click.echo("(conversation cleared)", err=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        chat = chat_request({"messages": messages}, template.source, settings)
        try:
            prompt = template.prompt(chat.messages, add_generation_prompt=True, **chat.template_vars)
            tokens = prompt.tokens(session.tokenizer)
        except ChatTemplateError as e:
            messages.pop()
            click.echo(f"error: {e}", err=True)
            continue
        answer = Answer(chat, template.source, prompt.text, session.tokenizer, sys.stdout)
        try:
            generate_text(session, tokens, params, answer)
        except UserError as e:
            messages.pop()
            click.echo(f"error: {e.format_message()}; /clear to start over", err=True)
            continue
        except KeyboardInterrupt:
            answer = None
            click.echo("\n(interrupted)", err=True)
        messages.append(answer.message() if answer else {"role": "assistant", "content": ""})


def verify_container(path: str) -> None:
    """--verify: hash the model inside (progress on stderr) and compare with the manifest."""
    with open_model_run(path) as container:
        try:
            expected = container.expected_model_sha256()
            with click.progressbar(length=container.entries[MODEL_ENTRY].size, file=sys.stderr,
                                   label="verifying model.gguf") as bar:
                actual = container.model_sha256(bar.update)
        except ContainerError as e:
            raise UserError(f"{path}: {e}") from None
    if actual != expected:
        raise UserError(f"{path}: the model does not match the sha256 it was made with "
                        f"(expected {expected}, got {actual}): this file is damaged — "
                        f"download it again")
    click.echo(f"ok: the model in {path} matches its sha256 ({actual})")
