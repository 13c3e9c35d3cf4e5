"""The runtime's command line for generation: -p, --chat, the sampling flags, bad input."""

import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "runtime", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_prompt_prints_llamacpp_greedy_continuation_on_stdout_only(gemma_path, llamacpp_reference):
    case = next(c for c in llamacpp_reference["greedy"] if c["prompt"].startswith("Once upon"))
    out = run("-m", str(gemma_path), "-p", case["prompt"], "-n", "24", "--temp", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == case["content"] + "\n"
    assert "decode" in out.stderr and "tok/s" in out.stderr


def test_seeded_sampling_reproduces_itself(gemma_path):
    args = ("-m", str(gemma_path), "-p", "My favourite colour is", "-n", "12", "--temp", "1.0", "--seed", "7")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_chat_answers_clears_and_exits(gemma_path):
    out = run("-m", str(gemma_path), "--chat", "-n", "8", "--temp", "0",
              stdin="Hello!\n/clear\nWhat is two plus two?\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "conversation cleared" in out.stderr
    assert out.stdout.count("> ") >= 3 and len(out.stdout.strip()) > 10


@pytest.mark.parametrize("args, message", [
    (("-p", "hi", "-t", "999"), "--threads must be between 1 and"),
    (("-p", "hi", "--temp", "-1"), "temperature"),
    (("-p", "word " * 40, "-c", "16"), "tokens but the context holds only 16"),
])
def test_bad_input_gets_one_line_and_no_traceback(gemma_path, args, message):
    out = run("-m", str(gemma_path), *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
