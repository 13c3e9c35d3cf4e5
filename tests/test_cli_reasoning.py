"""-p and --chat with a thinking model: the reasoning flags act as on the server.

--reasoning-budget N cuts the thinking after N tokens (the message, then </think>, forced),
0 asks the template not to think; the thinking is shown as llama-cli shows it, between
[Start thinking] and [End thinking] (-p: on stderr, so stdout holds the answer alone;
--chat: in the conversation), or inline as the model writes it with --reasoning-format none;
a chat keeps the thinking out of the next turn's prompt.

The model is test_reasoning_budget.py's tiny random qwen3 whose template opens <think>,
greedy, with the same logit_bias (ASCII only, no end of generation, no </think> of its own),
so it thinks until the budget ends it. The cut is checked against a free run's tokens.
"""

from __future__ import annotations

import io

import pytest

from runtime.cli import Answer, main, run_chat, run_prompt
from runtime.openai_chat import ChatSettings, chat_request
from runtime.sampling import SamplingParams
from runtime.terminal import printable

pytest.importorskip("openai")  # test_reasoning_budget's module needs it

from test_reasoning_budget import BANNED, TEMPLATE, UNTHINK, write_thinking_model  # noqa: E402
from test_server import N_CTX  # noqa: E402

PROMPT = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n<think>\n"
BIAS = {int(k): v for k, v in BANNED.items()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_thinking_model(tmp_path_factory.mktemp("cli-thinking"))


@pytest.fixture(scope="module")
def session(model):
    from runtime.gguf import GGUFFile
    from runtime.session import load_session

    return load_session(GGUFFile(model), N_CTX, 0)


def text_of(session, tokens: list[int], message: str = "") -> str:
    """The text of tokens, then of a message as the budget forces it (its tokens, which an
    SPM vocabulary starts with a space, as llama.cpp's)."""
    tok = session.tokenizer
    said = tok.encode(message, add_special=False, parse_special=False) if message else []
    return b"".join(tok.token_to_piece(t, special=False) for t in tokens + said).decode()


def params(n: int = 24) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, logit_bias=BIAS)


@pytest.fixture(scope="module")
def free_thinking(session) -> list[int]:
    """The tokens the model thinks with no budget (it never closes: </think> is banned)."""
    from runtime.engine import TextGeneration

    generation = TextGeneration(session.engine, session.tokenizer,
                                session.tokenizer.encode(PROMPT), params())
    "".join(generation)
    assert UNTHINK not in generation.tokens and len(generation.tokens) == 24
    return generation.tokens


@pytest.mark.parametrize("budget,message", [(5, " Stop."), (0, "")])
def test_prompt_shows_the_cut_thinking_on_stderr_and_the_answer_on_stdout(
        session, free_thinking, capsys, budget, message):
    run_prompt(session, PROMPT, params(), 24, ChatSettings("auto", budget, message))
    out, err = capsys.readouterr()
    thought = text_of(session, free_thinking[:budget], message).lstrip()
    if thought:
        assert f"[Start thinking]\n{thought}\n[End thinking]\n\n" in err, err
    else:
        assert "[Start thinking]" not in err
    assert out.strip() and "</think>" not in out and not (thought and thought in out), out


def test_reasoning_format_none_keeps_the_thinking_inline(session, free_thinking, capsys):
    run_prompt(session, PROMPT, params(), 24, ChatSettings("none", 5, " Stop."))
    out, err = capsys.readouterr()
    cut = text_of(session, free_thinking[:5], " Stop.") + "</think>"
    assert out.startswith(cut) and len(out) > len(cut) + 1, out
    assert "[Start thinking]" not in err + out


def test_no_budget_thinks_until_max_tokens(session, free_thinking, capsys):
    run_prompt(session, PROMPT, params(), 24, ChatSettings())
    out, err = capsys.readouterr()
    # (as every model text on a terminal: its control characters shown as escapes)
    assert out == "\n" and printable(text_of(session, free_thinking).strip()) in err


def test_chat_cuts_the_thinking_and_keeps_it_out_of_the_next_turn(session, monkeypatch, capsys):
    lines = iter(["hello world", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    run_chat(session, params(16), ChatSettings("auto", 3, ""))
    out, _ = capsys.readouterr()
    turns = out.split("[Start thinking]\n")[1:]
    assert len(turns) == 2, out
    thought, answer = turns[0].split("\n[End thinking]\n\n")
    answer = answer.split("\n")[0]
    assert thought and answer and "</think>" not in answer
    # the second turn's prompt (the slot's tokens) holds the first answer, not its thinking
    seen = session.tokenizer.decode(session.engine.slots[0].tokens, skip_special=False)
    assert f"assistant\n{answer}<|im_end|>" in seen
    assert thought not in seen.split("and again")[0]


def test_a_budget_of_zero_asks_the_template_not_to_think():
    chat = chat_request({"messages": []}, TEMPLATE, ChatSettings("auto", 0, ""))
    assert chat.template_vars == {"enable_thinking": False}


def test_thinking_is_grey_on_a_terminal_only(session):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def shown(file) -> str:
        chat = chat_request({"messages": []}, TEMPLATE, ChatSettings())
        answer = Answer(chat, TEMPLATE, "<think>\n", session.tokenizer, file)
        answer.show("Hmm.\x1b[2J")  # model text cannot drive the terminal, inside the grey either
        return file.getvalue()

    assert shown(Terminal()) == "\x1b[90m[Start thinking]\n\x1b[0m\x1b[90mHmm.\\x1b[2J\x1b[0m"
    assert shown(io.StringIO()) == "[Start thinking]\nHmm.\\x1b[2J"


def test_the_flags_reach_prompt_and_chat(model):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["-m", str(model), "-p", PROMPT, "-n", "8", "--temp", "0",
                                       "--reasoning-budget", "2", "--reasoning-format", "none"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("</think>") >= 1 and "[Start thinking]" not in result.stderr
    result = CliRunner().invoke(main, ["-m", str(model), "--chat", "-n", "8", "--temp", "0",
                                       "--reasoning-budget", "0", "--reasoning-budget-message", "Ok"],
                                input="hello\n/exit\n")
    assert result.exit_code == 0, result.output  # (the template opened <think>: closed at once)
    assert "[Start thinking]\nOk\n[End thinking]\n\n" in result.stdout
