"""--reasoning-budget N and --reasoning-budget-message (llama.cpp's reasoning-budget sampler):
after N thinking tokens the end of thinking is forced (the message's tokens, then the end tag)
and the answer goes on.

The counting is checked on token ids alone (ThinkingBudget); then a tiny random qwen3 whose
template opens <think> in the generation prompt (as DeepSeek-R1's does) thinks for real
through the server and the official openai client: greedy, with byte tokens above 0x7F, the
end-of-generation tokens and </think> banned by logit_bias, so the random model writes ASCII
and never closes its thinking or stops on its own. logprobs name every token generated, so
the test sees where the forced tokens stand and what the thinking was. The tiny gpt-oss
shows harmony's tags (an analysis message ended by a forced <|end|>) on its own tokenizer.

Under a grammar (response_format, GBNF grammar, a forced tool call) the thinking stays free
text, the budget bounds it, and the grammar constrains the answer after the end of thinking
(llama.cpp's server does the same): the tests cut the thinking at its exact token and parse
the answer after it.
"""

from __future__ import annotations

import json
import re

import pytest

from runtime.openai_api import RequestError
from runtime.openai_chat import ChatSettings, chat_request
from runtime.reasoning import (ANSWERING, COUNTING, DONE, FORCING, IDLE, WAITING_UTF8,
                               ReasoningBudget, ThinkingBudget, thinking_tags, utf8_complete)

# --- the count, on token ids ----------------------------------------------------------------

START, END, SAID = (7,), (9,), (5, 6)
ASCII = {t: b"a" for t in range(100)}


def counted(tokens: int, opened: bool = False, start=START, end=END, pieces=ASCII,
            before_grammar: bool = False) -> ThinkingBudget:
    budget = ReasoningBudget(tokens, start, end, SAID + end, opened)
    return budget.counter(lambda token: pieces[token], before_grammar)


def run(budget: ThinkingBudget, proposals: list[int]) -> list[int]:
    """The tokens a generation takes when the sampler proposes `proposals` in turn (a
    forced token replaces the proposal)."""
    out = []
    for proposal in proposals:
        forced = budget.forced_token()
        token = proposal if forced is None else forced
        budget.accept(token)
        out.append(token)
    return out


def test_counting_starts_at_the_start_tag_and_forces_the_message_and_end_after_n():
    budget = counted(3)
    assert budget.state == IDLE
    taken = run(budget, [1, 7, 2, 3, 4, 1, 1, 1, 8, 8])
    assert taken == [1, 7, 2, 3, 4, 5, 6, 9, 8, 8]
    assert budget.state == DONE
    # a new start opens a fresh budget (a model may think twice)
    assert run(budget, [7, 1, 1, 1, 1]) == [7, 1, 1, 1, 5] and budget.state == FORCING


def test_a_natural_end_stops_the_count():
    budget = counted(3)
    assert run(budget, [7, 2, 9, 3, 3, 3, 3]) == [7, 2, 9, 3, 3, 3, 3] and budget.state == DONE


def test_a_prompt_that_opened_thinking_counts_from_the_first_token():
    budget = counted(2, opened=True)
    assert budget.state == COUNTING
    assert run(budget, [1, 2, 3, 3, 3, 3]) == [1, 2, 5, 6, 9, 3]
    zero = counted(0, opened=True)
    assert zero.state == FORCING and run(zero, [1, 1, 1, 1]) == [5, 6, 9, 1]
    assert run(counted(0), [7, 1, 1, 1]) == [7, 5, 6, 9]


def test_tags_of_several_tokens():
    budget = counted(2, start=(7, 8), end=(9, 9))
    taken = run(budget, [7, 1, 7, 8, 9, 1, 1, 1, 1, 1])
    assert taken == [7, 1, 7, 8, 9, 1, 5, 6, 9, 9]
    natural = counted(5, start=(7, 8), end=(9, 9))
    assert run(natural, [7, 8, 9, 1, 9, 9, 1]) == [7, 8, 9, 1, 9, 9, 1] and natural.state == DONE


def test_the_budget_never_ends_inside_a_character():
    pieces = {**ASCII, 20: "é".encode()[:1], 21: "é".encode()[1:]}
    budget = counted(2, opened=True, pieces=pieces)
    assert run(budget, [1]) == [1] and budget.state == COUNTING
    assert run(budget, [20]) == [20] and budget.state == WAITING_UTF8
    assert run(budget, [21, 1, 1, 1]) == [21, 5, 6, 9]
    # lead bytes that never get their continuation: cut after 3 tokens of waiting
    pieces = {**ASCII, 22: b"\xf0"}
    garbage = counted(2, opened=True, pieces=pieces)
    assert run(garbage, [22, 22, 22, 22, 22, 22, 1]) == [22, 22, 22, 22, 22, 5, 6]


def test_before_a_grammar_the_thinking_opens_only_first_and_only_once():
    """The grammar waits while the model thinks; the start tag is offered only as the first
    token (not with a budget of 0); after the thinking, up to 2 blanks; once the answer
    began, nothing reopens the thinking."""
    def counted_before(tokens: int, **kwargs) -> ThinkingBudget:
        budget = ReasoningBudget(tokens, START, END, SAID + END, kwargs.pop("opened", False))
        return budget.counter(lambda token: ASCII[token], True, blanks=(3, 4))

    budget = counted_before(2)
    assert budget.beside_grammar() == (7,) and not budget.grammar_waits
    assert run(budget, [7, 1, 1, 1]) == [7, 1, 1, 5] and budget.grammar_waits
    assert budget.beside_grammar() is None
    assert run(budget, [1, 1]) == [6, 9] and budget.state == DONE and not budget.grammar_waits
    assert budget.beside_grammar() == (3, 4)
    assert run(budget, [4, 3]) == [4, 3] and budget.state == DONE and budget.beside_grammar() is None
    assert run(budget, [7, 1, 1, 1]) == [7, 1, 1, 1] and budget.state == ANSWERING
    answered = counted_before(2)
    assert run(answered, [1, 7, 1, 1]) == [1, 7, 1, 1] and answered.state == ANSWERING
    assert counted_before(0).beside_grammar() is None
    forced = counted_before(0, opened=True)  # blanks after a forced end too
    assert run(forced, [1, 1, 1, 3, 3]) == [5, 6, 9, 3, 3] and forced.state == DONE
    unbounded = counted(-1, opened=True, before_grammar=True)  # followed, never forced
    assert run(unbounded, [1] * 50 + [9]) == [1] * 50 + [9] and unbounded.state == DONE
    # a start tag of several tokens cannot be told from a grammar's answer: refused
    with pytest.raises(ValueError, match="cannot precede a grammar"):
        counted(2, start=(7, 8), before_grammar=True)
    assert counted(2, opened=True, start=(7, 8), before_grammar=True).grammar_waits


def test_utf8_complete():
    assert utf8_complete(b"") and utf8_complete(b"a") and utf8_complete("é€😀".encode())
    assert not utf8_complete("€".encode()[:2]) and not utf8_complete("😀".encode()[:3])
    # continuation bytes with no lead can never become a character: nothing to wait for (a
    # random model writing such bytes kept its thinking open past the budget for good)
    assert utf8_complete(b"\x80\x80\x80\x80") and utf8_complete(b"\x80")
    assert not utf8_complete(b"\x80\xf0\x9f") and utf8_complete(b"\xf0\x9f\x98\x80")


def test_thinking_tags_and_the_budget_fields_of_a_request():
    assert thinking_tags("{{ '<think>' }}", False) == ("<think>", "</think>")
    assert thinking_tags("<|channel|>", True) == ("<|channel|>analysis<|message|>", "<|end|>")
    assert thinking_tags("{{ messages }}", False) is None
    body = {"messages": [{"role": "user", "content": "hi"}]}
    settings = ChatSettings(reasoning_budget=5, reasoning_budget_message="Done.")
    chat = chat_request(body, "<think>", settings)
    assert (chat.thinking_budget, chat.budget_message) == (5, "Done.")
    chat = chat_request({**body, "thinking_budget_tokens": 2, "reasoning_budget_message": ""},
                        "<think>", settings)
    assert (chat.thinking_budget, chat.budget_message) == (2, "")
    # -1 from a request means the server's budget, as llama.cpp's server reads it
    assert chat_request({**body, "reasoning_budget_tokens": -1}, "<think>", settings).thinking_budget == 5
    assert "enable_thinking" not in chat.template_vars
    assert chat.budget(lambda text, **_: [ord(c) for c in text], "<think>", "<think>\n").forced == \
        tuple(map(ord, "</think>"))
    assert chat.budget(lambda text, **_: [], "<think>", "") is None  # tags it cannot write
    assert chat_request(body, "{{ messages }}", settings).budget(ord, "{{ messages }}", "") is None
    assert chat_request({**body, "reasoning_budget_tokens": 0}, "<think>",
                        settings).template_vars["enable_thinking"] is False
    for field, value in (("reasoning_budget_tokens", -2), ("thinking_budget_tokens", "3"),
                         ("reasoning_budget_tokens", 2.5), ("reasoning_budget_message", 7)):
        with pytest.raises(RequestError) as caught:
            chat_request({**body, field: value}, "<think>", settings)
        assert caught.value.status == 400 and caught.value.param == field


# --- a model that thinks, served ------------------------------------------------------------

openai = pytest.importorskip("openai")

from conftest import write_synthetic_model_with_tokenizer  # noqa: E402
from test_gptoss import gpt_oss_f32  # noqa: E402,F401  (a fixture)
from test_server import EOS, IM_END, N_CTX, loaded_worker, running_server, tokenizer_vocabulary  # noqa: E402

# chatml whose generation prompt opens the thinking (DeepSeek-R1's templates do)
# (chat_template_kwargs {"opened": false}: the model opens it itself, as Qwen3's template;
# the comment makes it a Hermes model's, whose tools the template would show: short prompts)
TEMPLATE = ("{# tools are called as <tool_call>...</tool_call> #}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if opened is not defined or opened %}<think>\n{% endif %}{% endif %}")
THINK, UNTHINK = 320, 321  # user-defined tokens, as Qwen3's vocabulary has them
UNTHINK_TEXT = b"</think>"
ASK = [{"role": "user", "content": "hello world"}]
MESSAGE = " Time is up, answering."
# ASCII only (the byte tokens 0x80-0xFF are ids 5+0x80..5+0xFF), never an end
BANNED = {str(5 + b): -100 for b in range(0x80, 0x100)} | {
    str(IM_END): -100, str(EOS): -100, str(UNTHINK): -100}


def write_thinking_model(folder):
    """The tiny qwen3 with <think> and </think> as tokens and TEMPLATE: its path."""
    tokens, scores, types = tokenizer_vocabulary()
    path = folder / "tiny.gguf"
    write_synthetic_model_with_tokenizer(
        path, "qwen3", (tokens + ["<think>", "</think>"], scores + [0.0, 0.0], types + [4, 4]),
        seed=5, more=lambda w: w.add_chat_template(TEMPLATE), n_ctx_train=N_CTX)
    return path


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    worker = loaded_worker(write_thinking_model(tmp_path_factory.mktemp("thinking")))
    yield worker
    worker.stop()


def client_of(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                         max_retries=0, timeout=300)


def ask(client, stream=False, **extra):
    return client.chat.completions.create(
        model="x", messages=ASK, temperature=0, max_tokens=30, logprobs=not stream,
        logit_bias=BANNED, stream=stream, extra_body=extra or None)


def token_bytes(entries) -> list[bytes]:
    return [bytes(e.bytes) for e in entries]


def forced_pieces(worker, message: str) -> list[bytes]:
    """The forced tokens' bytes: the message as the tokenizer writes it (an SPM vocabulary
    puts a space before a text, as llama.cpp's), then </think>."""
    ids = worker.encode(message, add_special=False, parse_special=False) if message else []
    return [worker.token_bytes(t) for t in ids + [UNTHINK]]


@pytest.mark.parametrize("budget,message", [(6, MESSAGE), (3, ""), (0, MESSAGE)])
def test_the_thinking_ends_after_n_tokens_whole_and_streamed(worker, budget, message):
    settings = ChatSettings(reasoning_budget=budget, reasoning_budget_message=message)
    with running_server(worker, chat_settings=settings) as server:
        client = client_of(server)
        choice = ask(client).choices[0]
        chunks = list(ask(client, stream=True))
    pieces = token_bytes(choice.logprobs.content)
    assert len(pieces) == 30 and choice.finish_reason == "length"
    forced = forced_pieces(worker, message)
    assert pieces[budget:budget + len(forced)] == forced
    assert UNTHINK_TEXT not in b"".join(pieces[:budget] + pieces[budget + len(forced):])
    thought = b"".join(pieces[:budget]).decode()
    said = b"".join(forced[:-1]).decode()
    answer = b"".join(pieces[budget + len(forced):]).decode()
    assert answer.strip(), "the answer goes on after the thinking"
    assert choice.message.reasoning_content == ((thought + said).lstrip() or None)
    assert choice.message.content == answer.lstrip()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert streamed_thought == (choice.message.reasoning_content or "")
    assert "".join(d.content or "" for d in deltas) == choice.message.content


def test_a_request_sets_its_own_budget_and_message(worker):
    with running_server(worker, chat_settings=ChatSettings(reasoning_budget=-1)) as server:
        client = client_of(server)
        free = token_bytes(ask(client).choices[0].logprobs.content)
        assert UNTHINK_TEXT not in b"".join(free)  # no budget: it thinks on
        own = ask(client, thinking_budget_tokens=4, reasoning_budget_message="Enough.")
        pieces = token_bytes(own.choices[0].logprobs.content)
        forced = forced_pieces(worker, "Enough.")
        assert pieces[:4] == free[:4] and pieces[4:4 + len(forced)] == forced
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, reasoning_budget_tokens=-5)
        assert caught.value.body["param"] == "reasoning_budget_tokens"


# the answer's grammar: each is short, so a random model's walk through it ends soon
PICK = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": False}
CONSTRAINTS = {
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "pick", "schema": PICK, "strict": True}}},
        lambda message: json.loads(message.content)["answer"] in ("yes", "no")),
    "grammar": ({"grammar": 'root ::= [a-z]{4,6} "."'},
                lambda message: re.fullmatch(r"[a-z]{4,6}\.", message.content)),
    "tool_choice": ({"tools": [{"type": "function", "function": {"name": "pick", "parameters": PICK}}],
                     "tool_choice": "required"},
                    lambda message: json.loads(message.tool_calls[0].function.arguments)["answer"]
                    in ("yes", "no")),
}


def ask_constrained(client, constraint: str, stream: bool = False, **extra):
    fields, _ = CONSTRAINTS[constraint]
    body = {k: v for k, v in fields.items() if k != "grammar"}
    return client.chat.completions.create(
        model="x", messages=ASK, temperature=0, max_tokens=100, logprobs=True, stream=stream,
        logit_bias={**BANNED, **extra.pop("logit_bias", {})}, **body,
        extra_body={**({"grammar": fields["grammar"]} if "grammar" in fields else {}), **extra})


@pytest.mark.parametrize("constraint", sorted(CONSTRAINTS))
@pytest.mark.parametrize("budget,message", [(4, " ok."), (0, "")])
def test_a_grammar_constrains_the_answer_after_the_budgeted_thinking(worker, constraint, budget,
                                                                      message):
    """The prompt opened the thinking: the first `budget` tokens are free text, then the
    message and </think> are forced, then the answer follows the grammar and ends there.
    Without the budget, the same greedy model thinks on (</think> is banned) until max_tokens."""
    with running_server(worker, chat_settings=ChatSettings(reasoning_budget=budget,
                                                           reasoning_budget_message=message)) as server:
        client = client_of(server)
        choice = ask_constrained(client, constraint).choices[0]
        deltas = [c.choices[0].delta for c in ask_constrained(client, constraint, stream=True)
                  if c.choices] if budget else None
    free = None
    if budget:
        with running_server(worker) as unbounded:
            free = ask_constrained(client_of(unbounded), constraint)
    pieces = token_bytes(choice.logprobs.content)
    forced = forced_pieces(worker, message)
    assert pieces[budget:budget + len(forced)] == forced, pieces
    assert UNTHINK_TEXT not in b"".join(pieces[:budget])
    thought = b"".join(pieces[:budget] + forced[:-1]).decode().lstrip()
    after = pieces[budget + len(forced):]
    blanks = next(i for i, piece in enumerate(after) if piece.strip())
    assert blanks <= 2  # the blanks a model may write before the answer, at most
    answer = b"".join(after[blanks:]).decode()
    message_out = choice.message
    assert choice.finish_reason == ("tool_calls" if constraint == "tool_choice" else "stop"), answer
    assert CONSTRAINTS[constraint][1](message_out), (answer, message_out)
    assert getattr(message_out, "reasoning_content", None) == (thought or None)
    if constraint != "tool_choice":
        assert message_out.content == answer
    if deltas is not None:  # streamed: the same thinking, answer and call
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thought
        assert "".join(d.content or "" for d in deltas) == (message_out.content or "")
        assert "".join(call.function.arguments or "" for d in deltas for call in d.tool_calls or ()) \
            == "".join(call.function.arguments for call in message_out.tool_calls or ())
    if free is not None:  # the thinking before the cut is the model's own, and no grammar's
        free_pieces = token_bytes(free.choices[0].logprobs.content)
        assert free_pieces[:budget] == pieces[:budget] and len(free_pieces) == 100
        assert free.choices[0].finish_reason == "length" and free.choices[0].message.reasoning_content


def test_a_grammar_after_thinking_the_model_opens_itself(worker):
    """A prompt that does not open the thinking (Qwen3's): under a grammar the model may
    still open it with its first token (here pushed to by logit_bias), and the budget cuts it;
    a model that answers at once is the grammar's from its first token. While it thinks,
    no end of generation may come (pushed to here as well): the answer must follow."""
    with running_server(worker, chat_settings=ChatSettings(reasoning_budget=3)) as server:
        client = client_of(server)
        thinks = ask_constrained(client, "json_schema", chat_template_kwargs={"opened": False},
                                 logit_bias={str(THINK): 100, str(EOS): 100}).choices[0]
        answers = ask_constrained(client, "json_schema", chat_template_kwargs={"opened": False},
                                  logit_bias={str(THINK): -100}).choices[0]
    pieces = token_bytes(thinks.logprobs.content)
    assert pieces[0] == worker.token_bytes(THINK) and pieces[4] == UNTHINK_TEXT, pieces
    assert thinks.finish_reason == "stop" and thinks.message.reasoning_content
    assert json.loads(thinks.message.content)["answer"] in ("yes", "no")
    assert answers.finish_reason == "stop" and not getattr(answers.message, "reasoning_content", None)
    assert json.loads(answers.message.content)["answer"] in ("yes", "no")
    assert token_bytes(answers.logprobs.content)[0] == b"{"


def test_harmony_ends_an_analysis_message_with_a_forced_end(gpt_oss_f32):
    """gpt-oss thinks in an analysis message: its budget counts from
    <|channel|>analysis<|message|> (as the model's own tokens) and forces <|end|>."""
    import dataclasses

    from runtime.engine import TextGeneration
    from runtime.gguf import GGUFFile
    from runtime.sampling import SamplingParams
    from runtime.session import load_session

    session = load_session(GGUFFile(gpt_oss_f32), 64, 0)
    tok = session.tokenizer
    template = session.gguf.metadata["tokenizer.chat_template"]
    chat = chat_request({"messages": ASK, "reasoning_budget_tokens": 3}, template, ChatSettings())
    assert chat.fmt == "harmony"
    prompt = "<|start|>user<|message|>hi<|end|><|start|>assistant"
    budget = chat.budget(tok.encode, template, prompt)
    end = tok.encode("<|end|>", add_special=False, parse_special=True)
    assert len(end) == 1 and budget.forced == tuple(end) and not budget.opened
    assert budget.start == tuple(tok.encode("<|channel|>analysis<|message|>", add_special=False,
                                            parse_special=True))
    # the random model does not open an analysis message itself: the prompt does it here
    opened = dataclasses.replace(budget, opened=True)
    prompt_tokens = tok.encode(prompt + "<|channel|>analysis<|message|>", parse_special=True)
    params = SamplingParams(temperature=0, max_tokens=5, logit_bias={t: -100 for t in tok.eog_ids})
    generation = TextGeneration(session.engine, tok, prompt_tokens, params, budget=opened)
    generation.skip_special = False
    text = "".join(generation)
    assert generation.tokens[3] == end[0] and text.count("<|end|>") == 1
    assert len(generation.tokens) == 5  # and the model went on after it
