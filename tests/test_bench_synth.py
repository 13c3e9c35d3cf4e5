"""bench/synth.py (synthetic models at real shapes) and the runtime's hidden bench entry
(runtime/benchmark.py), checked against independent readers: the gguf package's
dequantize and GGUFReader, and bundler.quantize's mix rules applied to the written file."""

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_in_group

from bench import synth
from bundler.mixes import mix_by_name, plan
from runtime.gguf import GGUFFile

ROOT = Path(__file__).resolve().parent.parent

# A tiny Gemma 3: its real vocabulary (262,144 tokens, so the tied embedding is Q6_K), rows of
# 256 (k-quants) and of 384 (too short for a 256-block: llama.cpp's fallbacks).
TINY = synth.Shape("gemma3", n_layer=2, n_embd=256, n_ff=384, n_head=4, n_head_kv=1, head_dim=64,
                   n_vocab=262144, n_ctx_train=64, rope_base=1e6, rms_eps=1e-6, tied=True,
                   vocabulary="gemma3", sliding_window=8)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS", "IQ4_NL"])
def test_random_blocks_have_the_asked_spread(type_name):
    """Weights of std 1/sqrt(cols) and mean ~0, as the gguf package dequantizes them. Bounds:
    the std of 32,768 samples of a bounded distribution is within ~1% of its own, plus the
    f16 rounding of the scale (0.05%); the calibration ran on other blocks: allow 5%. The
    mean: Q4_0's (q - 8) has mean -0.5 d, i.e. -0.11 std; the others are centred."""
    cols = 2048
    raw = synth.random_matrix(np.random.default_rng(1), type_name, 16, cols)
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    assert values.shape == (16, cols) and np.isfinite(values).all()
    assert abs(values.std() * math.sqrt(cols) - 1) < 0.05
    assert abs(values.mean()) < 0.15 * values.std()


@pytest.mark.parametrize("model, counts", [
    ("llama-3.2-1b", {"F32": 34, "Q4_K": 96, "Q6_K": 17}),
    ("llama-3.1-8b", {"F32": 66, "Q4_K": 193, "Q6_K": 33}),
])
def test_q4_k_m_tensor_types_as_llamacpps_files(model, counts):
    """The type counts llama.cpp's loader prints for the real Q4_K_M files of these models
    ("llama_model_loader: - type q4_K: 96 tensors", ...)."""
    types = [t for _, _, t in synth.typed_tensors(synth.SHAPES[model], "Q4_K_M")]
    assert {t: types.count(t) for t in set(types)} == counts


def test_llama3_rope_factors():
    """Llama 3's RoPE scaling: fast pairs unscaled, slow pairs divided by the factor, smooth
    and increasing in between."""
    factors = synth.llama3_rope_factors(synth.SHAPES["llama-3.2-1b"])
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 32.0
    assert np.all(np.diff(factors) >= 0) and ((factors > 1) & (factors < 32)).any()


def written(tmp_path_factory, shape: synth.Shape, name: str, seed: int) -> Path:
    path = tmp_path_factory.mktemp("synth") / f"{name}.gguf"
    synth.write_model(path, shape, "Q4_K_M", seed=seed, name=name)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return written(tmp_path_factory, TINY, "tiny", 3)


def test_written_model_is_llamacpps_q4_k_m_mix_and_reads_back(tiny_model):
    reader = gguf.GGUFReader(tiny_model)
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 + 2 * 13  # token_embd (tied), output_norm, 13 per gemma3 layer
    # every tensor has the type llama.cpp's Q4_K_M rules give it (bundler.mixes.plan)
    with GGUFFile(tiny_model) as parsed:
        wanted = {p.info.name: p.type.name for p in plan(parsed, mix_by_name("Q4_K_M"))}
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    assert got == wanted
    assert got["token_embd.weight"] == "Q6_K"  # tied: the output matrix's type
    assert got["blk.1.ffn_down.weight"] == "Q8_0"  # rows of 384: Q6_K falls back
    assert got["blk.1.ffn_gate.weight"] == "Q4_K"
    fields = reader.fields
    assert len(fields["tokenizer.ggml.tokens"].data) == TINY.n_vocab
    assert int(fields["gemma3.block_count"].parts[-1][0]) == 2
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = gguf.quants.dequantize(np.asarray(embd.data[:64]), embd.tensor_type)
    assert abs(rows.std() * math.sqrt(TINY.n_embd) - 1) < 0.05


def test_written_model_is_deterministic(tiny_model, tmp_path):
    again = tmp_path / "again.gguf"
    synth.write_model(again, TINY, "Q4_K_M", seed=3, name="tiny")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_model, again)]
    assert digest[0] == digest[1]


def test_bench_entry_measures_the_runtime(tiny_model, tmp_path):
    """`MODELRUN_BENCH=job python -m runtime -m M`: the runs asked for, finite activations
    through the random weights (the greedy tokens are real ids), and the memory figures."""
    job, out = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(json.dumps({"threads": [1], "prompt_tokens": 20, "gen_tokens": 4, "repeats": 2,
                               "out": str(out)}))
    done = run_in_group([sys.executable, "-m", "runtime", "-m", tiny_model], timeout=600, cwd=ROOT,
                        env={**os.environ, "MODELRUN_BENCH": str(job)})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert not result["frozen"] and len(result["prompt"]) == 20
    assert [r["threads"] for r in result["runs"]] == [1, 1]
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for r in result["runs"])
    with GGUFFile(tiny_model) as parsed:
        assert result["weight_bytes_per_token"] == sum(t.n_bytes for t in parsed.tensors.values()
                                                       if len(t.shape) >= 2)
    assert result["kv_cache_bytes"] > 0 and result["private_bytes"] > result["kv_cache_bytes"]


def test_engine_logits_are_finite_on_a_synthetic_model(tiny_model):
    from runtime.engine import Engine

    with GGUFFile(tiny_model) as parsed:
        engine = Engine.from_gguf(parsed, n_ctx=32)
        logits = engine.prefill(list(range(100, 116)))
        assert np.isfinite(logits).all() and logits.std() > 0


# A tiny Qwen3 mixture of experts: Qwen's real vocabulary, 4 experts of which 2 run, 2 layers
# (llama.cpp's Q4_K_M gives layer 1's ffn_down_exps and attn_v Q6_K, layer 0's Q4_K).
TINY_MOE = synth.Shape("qwen3moe", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64,
                       n_vocab=151936, n_ctx_train=64, rope_base=1e6, rms_eps=1e-6, tied=False,
                       vocabulary="qwen2", n_expert=4, n_expert_used=2, n_ff_expert=256)


def test_qwen3_30b_a3b_tensors_as_llamacpps_q4_k_m():
    """579 tensors of which 241 F32 (48 layers x attn_norm, q/k norms, ffn_norm, router, plus
    output_norm), as llama.cpp's loader lists the real Qwen3-30B-A3B Q4_K_M files; the others
    Q4_K but the 49 that llama-quant.cpp's Q4_K_M rules give Q6_K: output, and attn_v and
    ffn_down_exps in the 24 layers of use_more_bits (first and last 6, every third between)."""
    tensors = synth.typed_tensors(synth.SHAPES["qwen3-30b-a3b"], "Q4_K_M")
    types = [t for _, _, t in tensors]
    assert {t: types.count(t) for t in set(types)} == {"F32": 241, "Q4_K": 289, "Q6_K": 49}
    dims = dict((name, d) for name, d, _ in tensors)
    assert dims["blk.0.ffn_gate_exps.weight"] == (128, 768, 2048)
    assert dims["blk.0.ffn_down_exps.weight"] == (128, 2048, 768)
    assert dims["blk.0.ffn_gate_inp.weight"] == (128, 2048)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return written(tmp_path_factory, TINY_MOE, "tiny-moe", 5)


def test_written_moe_is_llamacpps_q4_k_m_mix_and_reads_back(tiny_moe):
    """The experts as 3-D tensors in GGUF order [cols, rows, experts], the mix as
    bundler.mixes.plan reads it from the written file, the expert metadata, and each expert's
    weights at the asked spread as the gguf package dequantizes them."""
    reader = gguf.GGUFReader(tiny_moe)
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    with GGUFFile(tiny_moe) as parsed:
        assert got == {p.info.name: p.type.name for p in plan(parsed, mix_by_name("Q4_K_M"))}
    assert [got[f"blk.{i}.ffn_down_exps.weight"] for i in (0, 1)] == ["Q4_K", "Q6_K"]
    assert got["blk.0.ffn_gate_inp.weight"] == "F32" and got["output.weight"] == "Q6_K"
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_up_exps.weight"] == [256, 256, 4]
    assert shapes["blk.1.ffn_down_exps.weight"] == [256, 256, 4]
    assert shapes["blk.0.ffn_gate_inp.weight"] == [256, 4]
    fields = reader.fields
    for key, value in (("expert_count", 4), ("expert_used_count", 2), ("expert_feed_forward_length", 256)):
        assert int(fields[f"qwen3moe.{key}"].parts[-1][0]) == value
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    experts = gguf.quants.dequantize(np.asarray(down.data), down.tensor_type)
    assert experts.shape == (4, 256, 256)
    for e in range(4):
        assert abs(experts[e].std() * math.sqrt(256) - 1) < 0.05


def test_engine_runs_a_synthetic_moe_and_counts_its_active_bytes(tiny_moe):
    """The runtime's qwen3moe loads it with finite logits; the bench's bytes per token count
    2 of the 4 experts' blocks."""
    from runtime.benchmark import weight_bytes_per_token
    from runtime.engine import Engine

    with GGUFFile(tiny_moe) as parsed:
        engine = Engine.from_gguf(parsed, n_ctx=32)
        logits = engine.prefill(list(range(100, 116)))
        assert np.isfinite(logits).all() and logits.std() > 0
        matrices = [t for t in parsed.tensors.values() if len(t.shape) >= 2]
        experts = sum(t.n_bytes for t in matrices if "_exps." in t.name)
        assert weight_bytes_per_token(parsed) == sum(t.n_bytes for t in matrices) - experts // 2
