"""`python -m runtime -m MODEL --info`, and one clear line for every kind of bad model file."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT

from runtime.cli import main
from runtime.gguf import GGUFFile
from runtime.kernels import SUPPORTED_TYPES

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def row(output: str, label: str) -> str:
    """The value printed after `label` on its own line of --info."""
    found = re.search(rf"^\s+{re.escape(label)}\s{{2,}}(.+)$", output, re.M)
    assert found, f"no {label!r} row in:\n{output}"
    return found.group(1).strip()


def mix_rows(output: str) -> dict[str, list[str]]:
    """Rows of the quantization table: type name -> [tensors, weights, size, unit, share, bpw]."""
    rows = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[-2].endswith("%"):
            rows[fields[0]] = fields[1:]
    return rows


def test_info_on_gemma(gemma_path):
    result = run("-m", str(gemma_path), "--info")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "architecture") == "gemma3"
    assert row(out, "name") == "Gemma 3 270m"
    assert row(out, "layers") == "18"
    assert row(out, "context length") == "32768"
    assert row(out, "attention heads") == "4, KV heads 1, head size 256"
    assert row(out, "embedding size") == "640"
    assert row(out, "feed-forward size") == "2048"
    assert row(out, "tokenizer") == "llama (SentencePiece), vocabulary of 262144 tokens"
    assert row(out, "chat template") == "none"

    with GGUFFile(gemma_path) as f:
        tensors = list(f.tensors.values())
    counts = Counter(t.type.name for t in tensors)
    weights = sum(t.n_elements for t in tensors)
    assert row(out, "parameters") == f"{weights / 1e6:.2f} M ({weights:,})"
    rows = mix_rows(out)
    assert set(rows) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32", "total"}
    for name, n in counts.items():
        assert rows[name][0] == str(n), name
    assert rows["total"][0] == "236" and rows["total"][4] == "100.0%"
    bpw = 8 * sum(t.n_bytes for t in tensors) / weights
    assert rows["total"][5] == f"{bpw:.2f}"
    assert "runs on this build: yes" in out
    assert "iB" not in out  # one unit system on the screen: decimal (runtime.units)


def test_sizes_read_in_decimal_units():
    from runtime.units import format_bytes

    assert [format_bytes(n) for n in (0, 999, 2_449, 24_000_000, 253_104_000, 23_100_000_000)] == \
        ["0 B", "999 B", "2.4 kB", "24.0 MB", "253 MB", "23.1 GB"]


def _synthetic(w, *, unsupported: bool, per_layer_kv: bool = False) -> None:
    w.add_name("Tiny Test")
    w.add_context_length(4096)
    w.add_block_count(2)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(8)
    if per_layer_kv:
        w.add_key_value("llama.attention.head_count_kv", [2, 4], VT.ARRAY, sub_type=VT.UINT32)
    else:
        w.add_head_count_kv(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b", "c", "ab"])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 8 * 34), np.uint8), raw_dtype=Q.Q8_0)
    if unsupported:
        w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 66), np.uint8), raw_dtype=Q.IQ2_XXS)
        w.add_tensor("blk.1.attn_q.weight", np.zeros((2, 66), np.uint8), raw_dtype=Q.IQ2_XXS)


def test_info_names_a_type_this_build_cannot_run(tmp_path, write_gguf):
    assert "IQ2_XXS" not in SUPPORTED_TYPES  # else pick another type for this test
    path = write_gguf(tmp_path / "tiny.gguf", lambda w: _synthetic(w, unsupported=True))
    result = run("-m", str(path), "--info")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "name") == "Tiny Test" and row(out, "architecture") == "llama"
    assert row(out, "layers") == "2" and row(out, "context length") == "4096"
    assert row(out, "attention heads") == "8, KV heads 2"
    assert row(out, "tokenizer") == "gpt2 (byte-level BPE), pre-tokenizer qwen2, vocabulary of 4 tokens"
    assert row(out, "chat template") == "yes"
    rows = mix_rows(out)
    # 1024 F32 weights (4096 bytes), 512 Q8_0 (544 bytes), 1024 IQ2_XXS (264 bytes)
    assert rows["IQ2_XXS"][:2] == ["2", "1,024"] and rows["IQ2_XXS"][5] == "2.06"
    assert rows["Q8_0"][:2] == ["1", "512"] and rows["Q8_0"][5] == "8.50"
    assert rows["total"][:2] == ["4", "2,560"] and rows["total"][5] == f"{8 * 4904 / 2560:.2f}"
    assert "runs on this build: no, it has no kernels for IQ2_XXS (2 tensors)" in out


def test_info_on_a_fully_supported_synthetic_model(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "ok.gguf",
                      lambda w: _synthetic(w, unsupported=False, per_layer_kv=True))
    out = run("-m", str(path), "--info").stdout
    assert row(out, "attention heads") == "8, KV heads 2-4 (varies by layer)"
    assert "runs on this build: yes" in out


def test_info_explains_the_experts_and_the_parameters_a_token_reads(tmp_path, write_gguf):
    def build(w):
        w.add_block_count(1)
        w.add_expert_count(8)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(32)
        w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))  # 256 weights
        w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))  # 512
        for name, shape in (("gate", (8, 32, 64)), ("up", (8, 32, 64)), ("down", (8, 64, 32))):
            w.add_tensor(f"blk.0.ffn_{name}_exps.weight", np.zeros(shape, np.float32))  # 3 x 16384

    out = run("-m", str(write_gguf(tmp_path / "moe.gguf", build, arch="qwen3moe")), "--info").stdout
    assert row(out, "experts") == "8 (2 used per token)"
    assert row(out, "expert FFN size") == "32"
    # every weight but the experts', and 2 of the 8 experts: 768 + 49152 * 2 / 8
    assert row(out, "active per token").startswith("13.06 K (13,056), 26.2% of the parameters")


def test_info_on_a_model_with_no_architecture_keys(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "bare.gguf",
                      lambda w: w.add_tensor("x", np.zeros(32, np.float32)), arch="mystery")
    result = run("-m", str(path), "--info")
    assert result.exit_code == 0, result.output
    assert row(result.stdout, "layers") == "unknown"
    assert row(result.stdout, "tokenizer") == "none in the file"
    # the refusal names every architecture this build runs, from the same list as the models'
    from runtime.hparams import SUPPORTED_ARCHITECTURES
    from runtime.model import ARCHITECTURES

    assert sorted(ARCHITECTURES) == list(SUPPORTED_ARCHITECTURES)
    assert (f"runs on this build: no, architecture 'mystery' is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})") in result.stdout


@pytest.fixture
def bad_files(tmp_path, write_gguf) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the error line must hold)."""
    good = write_gguf(tmp_path / "good.gguf", lambda w: _synthetic(w, unsupported=False))
    data = good.read_bytes()
    files = {
        "missing": (tmp_path / "missing.gguf", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "text": (tmp_path / "notes.txt", "not a GGUF file (bad magic 0x68656c6c"),
        "empty": (tmp_path / "empty.gguf", "empty"),
        "truncated": (tmp_path / "truncated.gguf", "past the end of the file"),
        "header only": (tmp_path / "header.gguf", "too short"),
        "version 1": (tmp_path / "v1.gguf", "version 1"),
        "corrupt count": (tmp_path / "corrupt.gguf", "cannot fit"),
    }
    (tmp_path / "notes.txt").write_text("hello, this is not a model\n")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 200])
    (tmp_path / "header.gguf").write_bytes(data[:10])
    (tmp_path / "v1.gguf").write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    (tmp_path / "corrupt.gguf").write_bytes(data[:16] + (2**63).to_bytes(8, "little") + data[24:])
    return files


def test_bad_files_get_one_clear_line(bad_files):
    for name, (path, phrase) in bad_files.items():
        for args in (["-m", str(path), "--info"], ["-m", str(path)]):
            result = run(*args)
            assert result.exit_code == 1, (name, result.output)
            assert result.stdout == ""
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
            assert phrase in lines[0], (name, lines[0])
            assert "Traceback" not in result.output


def test_without_an_action_it_serves_and_a_model_that_cannot_load_is_one_line(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "ok.gguf", lambda w: _synthetic(w, unsupported=False))
    # --unsecure: serving confines the process it runs in (runtime.confine), here pytest's
    result = run("-m", str(path), "--port", "0", "--nobrowser", "--unsecure")
    assert result.exit_code == 1  # the model is at fault, not the command line
    assert re.match(r"modelrun: serving Tiny Test at http://127\.0\.0\.1:\d+/ ", result.stdout)
    assert result.stderr == "error: BPE tokenizer without tokenizer.ggml.merges\n"
    result = run("--info")
    assert result.exit_code == 2 and result.stderr.startswith("error: no model given; pass -m")


def test_python_dash_m_runtime_end_to_end(gemma_path, tmp_path):
    """A real process: --info works, does not import numba, and a bad file is one line."""
    script = (
        "import sys, runpy\n"
        "sys.argv = ['runtime', '-m', sys.argv[1], '--info']\n"
        "try:\n"
        "    runpy.run_module('runtime', run_name='__main__')\n"
        "finally:\n"
        "    print('numba imported:', 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(gemma_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gemma3" in done.stdout and done.stdout.rstrip().endswith("numba imported: False")

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00" * 100)
    done = subprocess.run([sys.executable, "-m", "runtime", "-m", str(bad), "--info"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {bad}: not a GGUF file (bad magic 0x00000000")
    assert done.stderr.rstrip().endswith("pass a .gguf model file")


def test_info_survives_metadata_of_unexpected_types(tmp_path, write_gguf):
    """A file can parse yet hold nonsense where numbers belong; --info shows it, never crashes."""

    def odd(w):
        w.add_key_value("general.name", 42, VT.INT32)
        w.add_key_value("llama.block_count", "eighteen", VT.STRING)
        w.add_key_value("llama.context_length", -1.5, VT.FLOAT64)
        w.add_key_value("llama.attention.head_count", ["a", "b"], VT.ARRAY)
        w.add_key_value("llama.attention.head_count_kv", [[1], [2]], VT.ARRAY)
        w.add_key_value("llama.embedding_length", True, VT.BOOL)
        w.add_key_value("tokenizer.ggml.model", 7, VT.UINT8)
        w.add_key_value("tokenizer.ggml.tokens", [1, 2, 3], VT.ARRAY)
        w.add_key_value("tokenizer.chat_template", 0, VT.UINT8)

    path = write_gguf(tmp_path / "odd.gguf", odd)
    result = run("-m", str(path), "--info")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "name") == "42"
    assert row(out, "layers") == "eighteen"
    assert row(out, "context length") == "-1.5"
    assert row(out, "embedding size") == "True"
    assert row(out, "attention heads").startswith("<StringArray of 2 strings>, KV heads [array(")
    assert row(out, "tokenizer") == "7, vocabulary of unknown tokens"
    assert row(out, "chat template") == "none"
    assert row(out, "parameters") == "none (no tensors)"


# --- hyperparameters no model can have (issue 16, finding 12) ----------------------------------

@pytest.mark.parametrize("key, value, vtype, phrase", [
    ("llama.attention.head_count", 0, VT.UINT32, "llama.attention.head_count is 0, but it must be at least 1"),
    ("llama.attention.head_count_kv", 3, VT.UINT32, "head_count_kv is 3, but it must be a divisor of the 8"),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, VT.FLOAT32, "layer_norm_rms_epsilon is -1e-05, but"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), VT.FLOAT32, "rms_epsilon is nan"),
    ("llama.block_count", 0, VT.UINT32, "llama.block_count is 0, but it must be at least 1"),
    ("llama.attention.key_length", 0, VT.UINT32, "key_length is 0"),
    ("llama.rope.dimension_count", 33, VT.UINT32, "an even number from 0 to the head size"),
    ("llama.rope.freq_base", -10000.0, VT.FLOAT32, "freq_base is -10000, but"),
    ("llama.attention.sliding_window", -4, VT.INT32, "sliding_window is -4"),
])
def test_bad_hyperparameters_get_one_clear_line(tmp_path, write_gguf, key, value, vtype, phrase):
    """Before: a ZeroDivisionError traceback (head_count 0), a Numba SystemError (negative
    epsilon). Now --info says what is wrong, and loading refuses with one line."""

    def broken(w):
        _synthetic(w, unsupported=False)
        w.add_key_value("llama.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32)
        w.add_token_merges(["a b"])  # so loading gets as far as the network's shape
        w.kv_data[0].pop(key, None)
        w.add_key_value(key, value, vtype)

    path = write_gguf(tmp_path / "bad.gguf", broken)
    result = run("-m", str(path), "--info")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert phrase in result.stdout
    assert "the file's metadata is wrong" in result.stdout
    result = run("-m", str(path), "-p", "hi", "-n", "1")
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: ") and phrase in lines[-1], result.stderr


def test_info_and_errors_show_escapes_for_terminal_controls(tmp_path, write_gguf):
    """Issue 16, finding 11: metadata was printed raw (a name could clear the screen or set
    the window title)."""

    def evil(w):
        _synthetic(w, unsupported=False)
        w.kv_data[0].pop("general.name", None)
        w.add_name("Nice\x1b[2J\x1b]0;pwned\x07\u202e")

    path = write_gguf(tmp_path / "evil.gguf", evil)
    result = run("-m", str(path), "--info")
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\u202e")
    assert row(result.stdout, "name") == "Nice\\x1b[2J\\x1b]0;pwned\\x07\\u202e"
    bad = write_gguf(tmp_path / "arch.gguf", lambda w: w.add_tensor("x", np.zeros(32, np.float32)),
                     arch="evil\x1b[31m")
    result = run("-m", str(bad), "-p", "hi")
    assert result.exit_code != 0 and "\x1b" not in result.output


def test_info_names_every_tokenizer_the_runtime_reads():
    """--info keeps its own list of tokenizer kinds (it does not import the tokenizer): every
    tokenizer.ggml.model the tokenizer accepts must be in it (gemma4 was missing)."""
    from runtime.info import TOKENIZER_KINDS
    from runtime.tokenizer import TOKENIZER_MODELS

    assert set(TOKENIZER_MODELS) <= set(TOKENIZER_KINDS)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss", "qwen35moe", "gemma4-moe"])
def test_info_explains_the_experts_of_each_mixture_family(synthetic_models, arch):
    """The tiny model of each mixture-of-experts family (tests/parity_models.py's layout,
    quantized as it ships): its experts, and the parameters a token reads, counted here from
    the spec that wrote it: every weight but n_expert - n_used experts' of each layer (gate,
    up and down matrices; gpt-oss's expert biases, Gemma 4's expert output scale too). A
    shared expert, and Gemma 4's dense FFN beside the experts, are read by every token."""
    import parity_models as pm

    spec = pm.SPECS[arch]
    experts = spec.get("gemma4", spec)  # Gemma 4 keeps its expert shapes with its layout's
    n_expert, n_ff_exp, d = experts["n_expert"], experts["n_ff_exp"], spec["n_embd"]
    n_used = spec["keys"]["expert_used_count"][1]
    per_expert = 3 * n_ff_exp * d + (2 * n_ff_exp + d if spec.get("gpt_oss") else 0) + ("gemma4" in spec)
    total = sum(t.n_elements for t in GGUFFile(synthetic_models[arch][0]).tensors.values())
    active = total - spec["n_layer"] * (n_expert - n_used) * per_expert
    out = run("-m", str(synthetic_models[arch][0]), "--info").stdout
    assert row(out, "experts") == f"{n_expert} ({n_used} used per token)"
    assert row(out, "expert FFN size") == str(n_ff_exp)
    assert f"({active:,}), {100 * active / total:.1f}% of the parameters" in row(out, "active per token"), out
    if spec.get("n_ff_shexp"):
        assert row(out, "shared expert FFN") == str(spec["n_ff_shexp"])
    assert "runs on this build: yes" in out
