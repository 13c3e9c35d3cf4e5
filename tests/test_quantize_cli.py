"""`modelrun quantize` (bundler/quantize.py): llama.cpp's mixes, the streaming GGUF writer, and
`modelrun compare`.

Independent references: the real Gemma Q4_K_M file (made by llama.cpp's quantizer) for the
mix rules and the header layout; gguf.GGUFReader and gguf.quants for reading back what we
write; llama.cpp's rules stated by hand for small made-up models.
"""

import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from bundler import mixes
from bundler import quantize as q
from bundler.cli import main
from conftest import write_synthetic_model_with_tokenizer
from runtime.gguf import GGUFFile

# Relative RMSE of our K quantizers on Gaussian rows (tests/test_quantize.py), with 25% room.
K_RMSE_BOUND = {"Q2_K": 0.37, "Q3_K": 0.19, "Q4_K": 0.09, "Q5_K": 0.046, "Q6_K": 0.023,
                "IQ4_NL": 0.095, "IQ4_XS": 0.095}
LEGACY_AND_FLOAT = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


# --------------------------------------------------------------------------- the mix rules

def test_q4_k_m_plan_reproduces_llamacpp_on_gemma(gemma_path):
    """llama.cpp made this file with Q4_K_M: our rules must give every tensor the same type
    (use_more_bits layers, tied output Q8_0 by row length, 640-wide rows falling back)."""
    with GGUFFile(gemma_path) as f:
        plans = mixes.plan(f, mixes.MIXES["Q4_K_M"])
        assert {p.info.name: p.type.name for p in plans} == \
               {t.name: t.type.name for t in f.tensors.values()}
        assert f.get("general.file_type") == mixes.MIXES["Q4_K_M"].file_type == 15


def facts(n_layer=16, n_gqa=4, n_expert=0, tied=False, arch="llama"):
    return mixes.ModelFacts(arch=arch, n_layer=n_layer, n_gqa=n_gqa, n_expert=n_expert, tied_output=tied)


def typed(mix, name, ncols=4096, model=None):
    """The final type of a 2-D tensor with rows of ncols under mix."""
    model = model or facts()
    return mixes.fit_rows(mixes.mix_type(mixes.MIXES[mix], name, (ncols, 64), model), ncols)


# Expectations read off llama.cpp's llama_tensor_get_type for a 16-layer model with 4 query
# heads per KV head: use_more_bits(i, 16) holds for layers 0, 1, 4, 7, 10, 13, 14, 15.
@pytest.mark.parametrize("mix, name, expected", [
    ("Q4_K_M", "blk.4.attn_v.weight", "Q6_K"), ("Q4_K_M", "blk.5.attn_v.weight", "Q4_K"),
    ("Q4_K_M", "blk.13.ffn_down.weight", "Q6_K"), ("Q4_K_M", "blk.12.ffn_down.weight", "Q4_K"),
    ("Q4_K_M", "blk.3.attn_q.weight", "Q4_K"), ("Q4_K_M", "blk.3.attn_output.weight", "Q4_K"),
    ("Q4_K_M", "output.weight", "Q6_K"), ("Q4_K_M", "token_embd.weight", "Q4_K"),
    ("Q5_K_M", "blk.14.attn_v.weight", "Q6_K"), ("Q5_K_M", "blk.5.ffn_down.weight", "Q5_K"),
    ("Q5_K_S", "blk.0.attn_v.weight", "Q5_K"), ("Q5_K_S", "output.weight", "Q6_K"),
    ("Q4_K_S", "blk.3.attn_v.weight", "Q5_K"), ("Q4_K_S", "blk.4.attn_v.weight", "Q4_K"),
    ("Q4_K_S", "blk.1.ffn_down.weight", "Q5_K"), ("Q4_K_S", "blk.2.ffn_down.weight", "Q4_K"),
    ("Q3_K_S", "blk.0.attn_v.weight", "Q3_K"), ("Q3_K_S", "blk.0.ffn_down.weight", "Q3_K"),
    ("Q3_K_S", "output.weight", "Q6_K"),
    ("Q3_K_M", "blk.1.attn_v.weight", "Q5_K"), ("Q3_K_M", "blk.2.attn_v.weight", "Q4_K"),
    ("Q3_K_M", "blk.0.ffn_down.weight", "Q5_K"), ("Q3_K_M", "blk.1.ffn_down.weight", "Q4_K"),
    ("Q3_K_M", "blk.8.ffn_down.weight", "Q4_K"), ("Q3_K_M", "blk.8.attn_output.weight", "Q4_K"),
    ("Q3_K_M", "blk.8.ffn_gate.weight", "Q3_K"),
    ("Q3_K_L", "blk.8.attn_v.weight", "Q5_K"), ("Q3_K_L", "blk.8.ffn_down.weight", "Q5_K"),
    ("Q3_K_L", "blk.8.attn_output.weight", "Q5_K"), ("Q3_K_L", "blk.8.attn_k.weight", "Q3_K"),
    ("Q2_K", "blk.8.attn_v.weight", "Q4_K"), ("Q2_K", "blk.8.ffn_down.weight", "Q3_K"),
    ("Q2_K", "blk.8.attn_output.weight", "Q3_K"), ("Q2_K", "blk.8.ffn_up.weight", "Q2_K"),
    ("Q2_K", "output.weight", "Q6_K"),
    ("Q6_K", "blk.0.attn_v.weight", "Q6_K"), ("Q6_K", "output.weight", "Q6_K"),
    ("Q8_0", "output.weight", "Q8_0"), ("Q8_0", "blk.4.attn_v.weight", "Q8_0"),
    ("Q4_0", "output.weight", "Q6_K"), ("Q4_0", "blk.4.attn_v.weight", "Q4_0"),
    ("Q5_1", "blk.0.ffn_down.weight", "Q5_1"), ("Q4_1", "token_embd.weight", "Q4_1"),
    ("F16", "output.weight", "F16"), ("BF16", "blk.4.attn_v.weight", "BF16"),
    ("F32", "token_embd.weight", "F32"),
    ("Q4_K_M", "blk.4.attn_qkv.weight", "Q6_K"),  # a fused qkv counts as attn_v
    ("IQ4_XS", "blk.4.attn_v.weight", "Q5_K"), ("IQ4_XS", "blk.3.attn_q.weight", "IQ4_XS"),
    ("IQ4_NL", "blk.1.ffn_down.weight", "Q5_K"), ("IQ4_NL", "blk.2.ffn_down.weight", "IQ4_NL"),
    ("IQ4_XS", "output.weight", "Q6_K"), ("IQ4_NL", "token_embd.weight", "IQ4_NL"),
])
def test_mix_rules_as_llamacpp_states_them(mix, name, expected):
    assert typed(mix, name) == expected


def test_rules_that_depend_on_the_model():
    assert typed("Q2_K", "blk.3.attn_v.weight", model=facts(n_gqa=1)) == "Q3_K"
    assert typed("IQ4_NL", "blk.3.attn_v.weight", model=facts(n_gqa=1)) == "IQ4_NL"
    # tied embeddings: the token embedding is the output matrix and gets its type
    assert typed("Q4_K_M", "token_embd.weight", model=facts(tied=True)) == "Q6_K"
    assert typed("Q8_0", "token_embd.weight", model=facts(tied=True)) == "Q8_0"
    # Llama 70B (80 layers, GQA): attn_v bumped from Q3_K/Q4_K to Q5_K
    assert typed("Q4_K_S", "blk.40.attn_v.weight", model=facts(n_layer=80, n_gqa=8)) == "Q5_K"
    # 8 experts: attn_v and attn_k to Q8_0, attn_output to Q5_K
    moe = facts(n_expert=8)
    assert typed("Q4_K_M", "blk.5.attn_v.weight", model=moe) == "Q8_0"
    assert typed("Q4_K_M", "blk.5.attn_k.weight", model=moe) == "Q8_0"
    assert typed("Q4_K_M", "blk.5.attn_output.weight", model=moe) == "Q5_K"
    # Falcon: output Q8_0, Q4_K_M's ffn_down by its own layer schedule
    falcon = facts(arch="falcon")
    assert typed("Q4_K_M", "output.weight", model=falcon) == "Q8_0"
    assert typed("Q4_K_M", "blk.0.ffn_down.weight", model=falcon) == "Q6_K"
    assert typed("Q4_K_M", "blk.4.ffn_down.weight", model=falcon) == "Q5_K"
    assert typed("Q4_K_M", "blk.5.ffn_down.weight", model=falcon) == "Q4_K"


def test_mxfp4_moe_puts_the_experts_in_mxfp4_and_the_rest_in_q8_0():
    """llama.cpp's MXFP4_MOE (gpt-oss's files): 3-D expert tensors MXFP4, every other
    quantizable tensor Q8_0, the output and a tied embedding included. (The whole rule is
    also checked byte for byte against llama.cpp's file in tests/test_parity.py.)"""
    mix, moe = mixes.MIXES["MXFP4_MOE"], facts(n_expert=8)
    assert mixes.mix_type(mix, "blk.0.ffn_down_exps.weight", (256, 64, 8), moe) == "MXFP4"
    assert mixes.mix_type(mix, "blk.0.ffn_gate_exps.weight", (64, 256, 8), moe) == "MXFP4"
    for name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight", "output.weight", "token_embd.weight"):
        assert mixes.mix_type(mix, name, (64, 256), moe) == "Q8_0", name
    assert typed("MXFP4_MOE", "token_embd.weight", model=facts(tied=True)) == "Q8_0"


@pytest.mark.parametrize("mix, name, ncols, expected", [
    ("Q2_K", "blk.0.attn_q.weight", 640, "Q4_0"), ("Q3_K_S", "blk.0.attn_q.weight", 640, "Q4_0"),
    ("Q4_K_M", "blk.0.attn_q.weight", 640, "Q5_0"), ("Q5_K_S", "blk.0.attn_q.weight", 640, "Q5_1"),
    ("Q6_K", "blk.0.attn_q.weight", 640, "Q8_0"), ("IQ4_XS", "blk.0.attn_q.weight", 640, "IQ4_NL"),
    ("IQ4_NL", "blk.0.attn_q.weight", 48, "F16"),
    ("Q4_K_M", "blk.4.attn_v.weight", 640, "Q8_0"),  # Q6_K chosen, then falls back
    ("Q4_K_M", "output.weight", 640, "Q8_0"),  # rows not a multiple of 256: Q8_0 at once
    ("Q4_0", "output.weight", 640, "Q8_0"),  # Q6_K by the output rule, then the fallback
    ("Q4_K_M", "blk.0.attn_q.weight", 48, "F16"),  # not even 32-element blocks fit
    ("Q8_0", "blk.0.attn_q.weight", 48, "F16"),
    ("F16", "blk.0.attn_q.weight", 48, "F16"),
])
def test_short_rows_fall_back_as_in_llamacpp(mix, name, ncols, expected):
    assert typed(mix, name, ncols) == expected


@pytest.mark.parametrize("name, shape, expected", [
    ("blk.0.attn_norm.weight", (256,), False), ("blk.0.attn_q.bias", (256,), False),
    ("blk.0.attn_q_norm.weight", (64, 4), False),  # a norm, even 2-D
    ("blk.0.ffn_gate_inp.weight", (256, 8), False),  # expert router
    ("rope_freqs.weight", (32,), False),
    ("blk.0.attn_q.weight", (256, 256), True), ("token_embd.weight", (256, 320), True),
    ("blk.0.ffn_up_exps.weight", (256, 512, 8), True),
])
def test_which_tensors_are_quantized(name, shape, expected):
    assert mixes.is_quantizable(name, shape) is expected


def test_use_more_bits_layers():
    assert [i for i in range(16) if mixes.use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(18) if mixes.use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


# ------------------------------------------------------------------ synthetic models, end to end

def _vocabulary():
    """A SentencePiece vocabulary of 320 pieces: 3 specials, the 256 byte pieces, 61 words."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581" + c for c in letters] + list(letters) + [
        "\u2581the", "\u2581and", "\u2581hi", "\u2581is", "\u2581", ".", "hi", "th", "he"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    assert len(tokens) == 320
    return tokens, scores, types


EXTRA_METADATA = {  # every kind of value the writer must carry over byte for byte
    "test.u8": (7, gguf.GGUFValueType.UINT8), "test.i8": (-7, gguf.GGUFValueType.INT8),
    "test.u16": (700, gguf.GGUFValueType.UINT16), "test.i16": (-700, gguf.GGUFValueType.INT16),
    "test.i32": (-70000, gguf.GGUFValueType.INT32), "test.u64": (2**40, gguf.GGUFValueType.UINT64),
    "test.i64": (-2**40, gguf.GGUFValueType.INT64), "test.f64": (0.1, gguf.GGUFValueType.FLOAT64),
    "test.bool": (True, gguf.GGUFValueType.BOOL), "test.text": ("héllo\n", gguf.GGUFValueType.STRING),
}
EXTRA_ARRAYS = {"test.nested": [[1, 2], [3]], "test.bools": [True, False, True],
                "test.floats": [1.5, -2.25], "test.strings": ["a", "bé", ""]}


def write_model(path, arch, alignment=None, **spec):
    """A synthetic model (conftest.write_synthetic_model) that also carries a tokenizer, every
    kind of metadata value and, optionally, a custom alignment."""
    def more(writer: gguf.GGUFWriter) -> None:
        if alignment:
            writer.add_custom_alignment(alignment)
        for key, (value, vtype) in EXTRA_METADATA.items():
            writer.add_key_value(key, value, vtype)
        for key, value in EXTRA_ARRAYS.items():
            writer.add_array(key, value)

    write_synthetic_model_with_tokenizer(path, arch, _vocabulary(), seed=11, more=more, **spec)
    return path


ALL_F32 = {k: "F32" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                              "ffn_down", "token_embd", "output")}


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory):
    """4 layers, rows of 256 and 512 (k-quants fit), GQA 4, untied output; F32 with two F16
    tensors; general.alignment 64."""
    path = tmp_path_factory.mktemp("quantize") / "llama-f32.gguf"
    return write_model(path, "llama", alignment=64, n_vocab=320, n_embd=256, n_layer=4, n_head=4,
                       n_head_kv=1, head_dim=64, n_ff=512, untied=True,
                       types={**ALL_F32, "ffn_gate": "F16", "output": "F16"})


@pytest.fixture(scope="module")
def gemma_f16(tmp_path_factory):
    """gemma3 with tied embeddings and rows of 320 (k-quants do not fit: fallbacks); F16."""
    path = tmp_path_factory.mktemp("quantize") / "gemma-f16.gguf"
    return write_model(path, "gemma3", n_vocab=320, n_embd=320, n_layer=2, n_head=2, n_head_kv=1,
                       head_dim=128, n_ff=512, types={k: "F16" for k in ALL_F32})


# The llama model's types under three mixes, by llama.cpp's rules (4 layers: use_more_bits
# holds for layers 2 and 3; GQA 4).
LLAMA_EXPECTED = {
    "Q4_K_M": {"attn_v": ["Q4_K", "Q4_K", "Q6_K", "Q6_K"], "ffn_down": ["Q4_K", "Q4_K", "Q6_K", "Q6_K"],
               "other": "Q4_K", "attn_output": "Q4_K", "output": "Q6_K", "token_embd": "Q4_K"},
    "Q3_K_M": {"attn_v": ["Q5_K", "Q5_K", "Q4_K", "Q4_K"], "ffn_down": ["Q4_K"] * 4,
               "other": "Q3_K", "attn_output": "Q4_K", "output": "Q6_K", "token_embd": "Q3_K"},
    "Q2_K": {"attn_v": ["Q4_K"] * 4, "ffn_down": ["Q3_K"] * 4, "other": "Q2_K",
             "attn_output": "Q3_K", "output": "Q6_K", "token_embd": "Q2_K"},
}


def _llama_expected_type(mix, name, shape):
    if len(shape) == 1:
        return "F32"
    table = LLAMA_EXPECTED[mix]
    if name in ("output.weight", "token_embd.weight"):
        return table[name.split(".")[0]]
    layer, kind = int(name.split(".")[1]), name.split(".")[2]
    if kind in ("attn_v", "ffn_down"):
        return table[kind][layer]
    return table.get(kind, table["other"])


def _field_bytes(reader, key):
    return b"".join(part.tobytes() for part in reader.fields[key].parts)


def _values(tensor_type, data, shape):
    """A tensor's values through gguf's NumPy reference."""
    return np.asarray(ref_dequantize(np.asarray(data), tensor_type), np.float32).reshape(-1)


def check_output(src, out, mix):
    """Read `out` with gguf.GGUFReader and check it against `src` and the mix."""
    ref, new = gguf.GGUFReader(src), gguf.GGUFReader(out)
    # metadata: byte-identical and in order, except the two keys the quantizer sets (and the
    # key count in the header, when it had to add them)
    own = ("general.file_type", "general.quantization_version", "GGUF.kv_count")
    assert [k for k in new.fields if k not in own] == [k for k in ref.fields if k not in own]
    for key in ref.fields:
        if key not in own:
            assert _field_bytes(new, key) == _field_bytes(ref, key), key
    added = sum(k not in ref.fields for k in own)
    assert new.fields["GGUF.kv_count"].contents() == ref.fields["GGUF.kv_count"].contents() + added
    assert new.fields["general.file_type"].contents() == mixes.MIXES[mix].file_type
    assert new.fields["general.quantization_version"].contents() == 2
    alignment = int(ref.fields["general.alignment"].contents()) if "general.alignment" in ref.fields else 32
    with GGUFFile(src) as f:
        planned = {p.info.name: p.type.name for p in mixes.plan(f, mixes.MIXES[mix])}
    # every tensor, in llama.cpp's order: outside the blocks first, then block by block, by name
    def order(name):
        return (int(name.split(".")[1]) if name.startswith("blk.") else -1, name)

    assert [t.name for t in new.tensors] == sorted((t.name for t in ref.tensors), key=order)
    by_name = {t.name: t for t in ref.tensors}
    types = {}
    for b in new.tensors:
        a = by_name[b.name]
        assert list(a.shape) == list(b.shape)
        assert b.data_offset % alignment == 0
        types[b.name] = b.tensor_type.name
        source = _values(a.tensor_type, a.data, a.shape)
        if b.tensor_type == a.tensor_type:
            assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), b.name
        elif b.tensor_type.name in LEGACY_AND_FLOAT:
            rows = source.reshape(-1, int(a.shape[0]))
            expected = np.asarray(ref_quantize(rows, b.tensor_type)).tobytes()
            assert np.asarray(b.data).tobytes() == expected, b.name
        else:
            error = _values(b.tensor_type, b.data, b.shape) - source
            rel = np.sqrt(np.mean(error ** 2)) / np.sqrt(np.mean(source ** 2))
            assert rel < K_RMSE_BOUND[b.tensor_type.name], (b.name, b.tensor_type.name, rel)
    assert types == planned
    return types


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K"])
def test_k_mixes_type_each_tensor_as_llamacpp_and_stay_within_error(llama_f32, tmp_path, mix):
    out = tmp_path / f"{mix}.gguf"
    result = q.quantize_gguf(llama_f32, out, mix)
    types = check_output(llama_f32, out, mix)
    with GGUFFile(llama_f32) as f:
        assert types == {t.name: _llama_expected_type(mix, t.name, t.shape) for t in f.tensors.values()}
    assert result.file_bytes == out.stat().st_size and not result.requantized


@pytest.mark.parametrize("mix", ["Q8_0", "Q6_K", "Q5_K_S", "Q4_K_S", "Q3_K_L", "Q5_1", "Q4_0", "F16",
                                 "BF16", "F32", "IQ4_NL", "IQ4_XS"])
def test_other_mixes_read_back_with_gguf(llama_f32, tmp_path, mix):
    out = tmp_path / f"{mix}.gguf"
    q.quantize_gguf(llama_f32, out, mix)
    check_output(llama_f32, out, mix)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q6_K", "Q2_K", "Q8_0", "IQ4_XS"])
def test_tied_model_with_short_rows(gemma_f16, tmp_path, mix):
    out = tmp_path / f"{mix}.gguf"
    q.quantize_gguf(gemma_f16, out, mix)
    types = check_output(gemma_f16, out, mix)
    assert types["token_embd.weight"] == "Q8_0"  # tied, 320-wide: Q8_0
    fallback = {"Q4_K_M": "Q5_0", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q8_0": "Q8_0", "IQ4_XS": "IQ4_NL"}[mix]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == fallback
    assert types["blk.0.post_ffw_norm.weight"] == "F32"


def _logits(path, tokens):
    from runtime.engine import Engine

    with GGUFFile(path) as f:
        return Engine.from_gguf(f, n_ctx=32).eval(tokens).copy()


@pytest.mark.parametrize("model", ["llama_f32", "gemma_f16"])
def test_logits_drift_from_the_source_as_bits_fall(request, tmp_path, model):
    """The quantized models compute nearly the source's logits, F16 closest and Q2_K furthest.
    (Random 4-layer models amplify weight error ~5x: Q8_0 measured 2.1% and 0.7%.)"""
    src = request.getfixturevalue(model)
    tokens = [1, 300, 301, 302, 280, 290]
    reference = _logits(src, tokens)
    drift = []
    for mix in ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K"):
        out = tmp_path / f"{mix}.gguf"
        q.quantize_gguf(src, out, mix)
        drift.append(np.linalg.norm(_logits(out, tokens) - reference) / np.linalg.norm(reference))
    assert drift == sorted(drift) and len(set(drift[1:])) == 4, drift
    assert drift[0] < 0.002 and drift[1] < 0.03 and drift[-1] < 0.9, drift


def test_output_runs_in_the_runtime(llama_f32, gemma_f16, tmp_path):
    for src, mix in ((llama_f32, "Q4_K_M"), (gemma_f16, "Q2_K")):
        out = tmp_path / f"{mix}.gguf"
        result = CliRunner().invoke(main, ["quantize", str(src), str(out), "--type", mix])
        assert result.exit_code == 0, result.output
        run = subprocess.run([sys.executable, "-m", "runtime", "-m", str(out), "-p", "hi", "-n", "4",
                              "--temp", "0"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "generated" in run.stderr and "Traceback" not in run.stderr


def test_streams_in_slabs_and_slabs_do_not_change_the_result(llama_f32, tmp_path, monkeypatch):
    """Memory: only a slab of rows is ever decoded; the result equals whole-tensor work."""
    whole = tmp_path / "whole.gguf"
    q.quantize_gguf(llama_f32, whole, "Q4_K_M")
    monkeypatch.setattr(q, "SLAB_ELEMENTS", 4096)
    monkeypatch.setattr(q, "COPY_CHUNK", 16384)
    sliced = tmp_path / "sliced.gguf"
    tracemalloc.start()
    try:
        q.quantize_gguf(llama_f32, sliced, "Q4_K_M")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sliced.read_bytes() == whole.read_bytes()
    with GGUFFile(llama_f32) as f:
        largest = max(t.n_elements for t in f.tensors.values()) * 4
        model_bytes = sum(t.n_bytes for t in f.tensors.values())
    assert peak < largest / 2 and peak < model_bytes / 16, (peak, largest, model_bytes)


def test_progress_reports_every_input_byte(llama_f32, tmp_path):
    seen = []
    q.quantize_gguf(llama_f32, tmp_path / "out.gguf", "Q8_0", progress=lambda d, t: seen.append((d, t)))
    with GGUFFile(llama_f32) as f:
        total = sum(t.n_bytes for t in f.tensors.values())
    assert seen[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


# ----------------------------------------------------------------- requantizing, bad input

def test_requantizing_needs_the_flag_and_warns(llama_f32, tmp_path):
    first = tmp_path / "q8.gguf"
    q.quantize_gguf(llama_f32, first, "Q8_0")
    out = tmp_path / "q4.gguf"
    refused = CliRunner().invoke(main, ["quantize", str(first), str(out), "--type", "Q4_K_M"])
    assert refused.exit_code == 1
    assert "already quantized" in refused.output and "--allow-requantize" in refused.output
    assert "Traceback" not in refused.output and not out.exists()
    assert len(refused.output.strip().splitlines()) == 1
    done = CliRunner().invoke(main, ["quantize", str(first), str(out), "--type", "Q4_K_M",
                                     "--allow-requantize"])
    assert done.exit_code == 0, done.output
    assert "quality suffers" in done.output and out.exists()
    # the same mix again needs no flag: every tensor is kept as it is, byte for byte
    again = tmp_path / "q8-again.gguf"
    kept = CliRunner().invoke(main, ["quantize", str(first), str(again), "--type", "Q8_0"])
    assert kept.exit_code == 0, kept.output
    assert again.read_bytes() == first.read_bytes()


def test_quantize_to_f16_from_a_quantized_model_dequantizes(llama_f32, tmp_path):
    q8 = tmp_path / "q8.gguf"
    q.quantize_gguf(llama_f32, q8, "Q8_0")
    f16 = tmp_path / "f16.gguf"
    result = q.quantize_gguf(q8, f16, "F16", allow_requantize=True)
    assert result.requantized
    reader, src = gguf.GGUFReader(f16), gguf.GGUFReader(q8)
    for a, b in zip(src.tensors, reader.tensors):
        expected = _values(a.tensor_type, a.data, a.shape)
        if len(a.shape) > 1:
            assert b.tensor_type.name == "F16"
            np.testing.assert_array_equal(np.asarray(b.data).reshape(-1), expected.astype(np.float16))


def _garbage(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda src, d: [str(d / "missing.gguf"), str(d / "o.gguf"), "--type", "Q4_0"], "no such file"),
    (lambda src, d: [str(_garbage(d)), str(d / "o.gguf"), "--type", "Q4_0"], "GGUF version"),
    (lambda src, d: [str(src), str(src), "--type", "Q4_0"], "is the input"),
    (lambda src, d: [str(src), str(d / "no" / "o.gguf"), "--type", "Q4_0"], "does not exist"),
    (lambda src, d: [str(src), str(d), "--type", "Q4_0"], "is a directory"),
    (lambda src, d: [str(src), str(d / "o.gguf"), "--type", "Q4_K_XL"], "unknown quantization type"),
    (lambda src, d: [str(src), str(d / "o.gguf"), "--type", "Q4_0", "-t", "999"], "--threads"),
])
def test_bad_input_gets_one_line(llama_f32, tmp_path, make_args, message):
    result = CliRunner().invoke(main, ["quantize", *make_args(llama_f32, tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_write_leaves_no_partial_file(llama_f32, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q, "_write_tensor", broken)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["quantize", str(llama_f32), str(out), "--type", "Q4_0"])
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


# ------------------------------------------------------------------------------ on real Gemma

def test_gemma_f16_to_q4_k_m_rebuilds_llamacpps_header(gemma_path, gemma_f16_path, tmp_path):
    """From the F16 copy, Q4_K_M gives every tensor llama.cpp's type and offset: the header is
    byte for byte the one llama.cpp wrote, and the file has the same size."""
    out = tmp_path / "q4_k_m.gguf"
    q.quantize_gguf(gemma_f16_path, out, "Q4_K_M")
    with GGUFFile(gemma_path) as original, GGUFFile(out) as ours:
        header = original.data_offset
        assert ours.data_offset == header
        assert {n: t.type.name for n, t in ours.tensors.items()} == \
               {n: t.type.name for n, t in original.tensors.items()}
    with open(gemma_path, "rb") as a, open(out, "rb") as b:
        assert a.read(header) == b.read(header)
    assert out.stat().st_size == gemma_path.stat().st_size


def test_gemma_f16_fixture_is_f16_with_f32_vectors(gemma_f16_path, gemma_path):
    with GGUFFile(gemma_f16_path) as f16, GGUFFile(gemma_path) as original:
        assert f16.get("general.file_type") == 1
        for name, t in f16.tensors.items():
            assert t.type.name == ("F32" if len(t.shape) == 1 else "F16"), name
        v = original.tensors["blk.3.attn_v.weight"]
        from runtime import kernels

        np.testing.assert_array_equal(
            kernels.dequantize(f16.tensors["blk.3.attn_v.weight"].data, "F16", v.n_elements),
            kernels.dequantize(v.data, v.type, v.n_elements).astype(np.float16).astype(np.float32))


# ----------------------------------------------------------------------------------- compare

def test_compare_on_gemma_f16(gemma_f16_path, tmp_path, monkeypatch):
    """A short run: Q8_0 within a percent of F16, Q2_K clearly worse, sizes falling; the
    quantized files are gone afterwards."""
    import tempfile
    from pathlib import Path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    text = Path(__file__).parent / "data" / "perplexity_text.txt"
    result = CliRunner().invoke(main, ["compare", str(gemma_f16_path), "--types", "Q8_0,Q2_K",
                                       "--text", str(text), "-c", "128", "--chunks", "2", "-n", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines
            if line.split() and line.split()[0] in ("F16", "Q8_0", "Q2_K")}
    assert set(rows) == {"F16", "Q8_0", "Q2_K"}, result.output
    size = {k: float(v[2] if k == "F16" else v[1]) for k, v in rows.items()}  # "F16 (input)" is 2 words
    ppl = {k: float(v[4] if k == "F16" else v[3]) for k, v in rows.items()}
    assert size["F16"] > size["Q8_0"] > size["Q2_K"]
    assert abs(ppl["Q8_0"] / ppl["F16"] - 1) < 0.01, ppl
    assert ppl["Q2_K"] > ppl["Q8_0"] * 1.02, ppl
    assert not list(tmp_path.iterdir())


def test_compare_bad_input(gemma_f16_path, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["compare", str(gemma_f16_path), "--text", str(tmp_path / "none.txt")])
    assert missing.exit_code == 1 and "no such file" in missing.output
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    few = runner.invoke(main, ["compare", str(gemma_f16_path), "--text", str(short)])
    assert few.exit_code == 2 and "too few" in few.output
    bad_type = runner.invoke(main, ["compare", str(gemma_f16_path), "--text", str(short), "--types", "Q9"])
    assert bad_type.exit_code == 2 and "unknown quantization type" in bad_type.output
    for r in (missing, few, bad_type):
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
