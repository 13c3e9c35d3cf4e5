"""What constrained decoding costs a token, against the decode step it rides on.

For each model, a generation of --tokens tokens under each grammar (a JSON schema, any JSON
object, a GBNF list), sampled with llama.cpp's default chain, and per token:
  mask       llguidance computing the allowed-token bitmask (runtime.constraint.TokenMatcher)
  unpack     the bitmask unpacked by NumPy into one bool per token
  consume    the chosen token fed to the grammar
  sample     the whole Sampler.sample() call, all of the above included (with a grammar
             the filters and the draw look only at the allowed ids)
  decode     one decode step of the engine (Engine.decode)
with the median and the 90th percentile over the tokens, and the grammar's share of a
decode step (medians). The "free" row samples the same way without a grammar. Also the one-off cost of
building the vocabulary's token trie. Models: Gemma 3 270M (the real model; 262,144 tokens)
and the synthetic Llama 3.2 1B (bench/synth.py; Llama 3's real 128,256-token vocabulary, random
weights: its text is noise, which keeps the grammar inside strings and numbers most of the time).

    python bench/constraint.py [--models gemma-3-270m,llama-3.2-1b] [--threads 2] [--tokens 48]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.engine import model_path  # noqa: E402
from runtime.constraint import ConstraintVocabulary, Grammar, TokenMatcher  # noqa: E402
from runtime.engine import TextGeneration  # noqa: E402
from runtime.gguf import GGUFFile  # noqa: E402
from runtime.sampling import Sampler, SamplingParams  # noqa: E402
from runtime.session import load_session  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "email": {"type": "string", "format": "email"},
    "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "email", "hobbies"], "additionalProperties": False}
GRAMMARS = {
    "JSON schema": lambda: Grammar.json_schema(PERSON),
    "JSON object": Grammar.json_object,
    "GBNF list": lambda: Grammar.gbnf('root ::= item+\nitem ::= "- " [a-zA-Z ,]{1,40} "\\n"'),
}
PROMPT = "A person, as a JSON record with name, age, email and hobbies:\n"


class Timers:
    """Per-token seconds of each measured part."""

    def __init__(self):
        self.parts: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.parts.setdefault(name, []).append(seconds)


def instrumented(timers: Timers):
    """Sampler and TokenMatcher methods wrapped with timers (restored by the caller)."""
    originals = {(TokenMatcher, "bitmask"): TokenMatcher.bitmask,
                 (TokenMatcher, "allowed"): TokenMatcher.allowed,
                 (TokenMatcher, "consume"): TokenMatcher.consume,
                 (Sampler, "sample"): Sampler.sample}

    def timed(key, part, when=lambda *a: True):
        original = originals[key]

        def wrapper(*a, **k):
            measured = when(*a)
            t0 = time.perf_counter()
            out = original(*a, **k)
            if measured:
                timers.add(part, time.perf_counter() - t0)
            return out
        return wrapper

    TokenMatcher.bitmask = timed((TokenMatcher, "bitmask"), "mask")
    # mask + unpack, when it computes (a second call in the same step returns the same array)
    TokenMatcher.allowed = timed((TokenMatcher, "allowed"), "allowed", lambda m: m._allowed is None)
    TokenMatcher.consume = timed((TokenMatcher, "consume"), "consume")
    Sampler.sample = timed((Sampler, "sample"), "sample")
    return originals


def restore(originals) -> None:
    for (cls, name), fn in originals.items():
        setattr(cls, name, fn)


def run(session, params: SamplingParams) -> tuple[Timers, str, list[float]]:
    timers = Timers()
    engine = session.engine
    decode_times: list[float] = []
    original_decode = engine.decode

    def decode(*args, **kwargs):
        t0 = time.perf_counter()
        out = original_decode(*args, **kwargs)
        decode_times.append(time.perf_counter() - t0)
        return out

    engine.decode = decode
    originals = instrumented(timers)
    try:
        generation = TextGeneration(engine, session.tokenizer, session.tokenizer.encode(PROMPT), params)
        text = "".join(generation)
    finally:
        restore(originals)
        engine.decode = original_decode
    return timers, text, decode_times


def ms(values: list[float], width: int = 6) -> str:
    if not values:
        return f"{'-':^{2 * width + 1}}"
    a = np.array(values) * 1000
    return f"{np.median(a):{width}.3f} {np.percentile(a, 90):{width}.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gemma-3-270m,llama-3.2-1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--show-text", action="store_true")
    args = ap.parse_args()
    for name in args.models.split(","):
        gguf = GGUFFile(model_path(name, "Q4_K_M"))
        session = load_session(gguf, 512, args.threads)
        n_vocab = session.engine.model.hp.n_vocab
        t0 = time.perf_counter()
        vocab = ConstraintVocabulary(session.tokenizer, n_vocab)
        build = time.perf_counter() - t0
        print(f"\n{name}: {n_vocab} tokens, {args.threads} threads; vocabulary trie built in "
              f"{build:.2f} s (once per process)")
        print(f"{'':23} | median and 90th percentile, ms per token{'':34} | (mask+unpack")
        print(f"{'grammar':12} {'run':>3} {'tokens':>6} | {'mask':>13} {'unpack':>13} "
              f"{'consume':>13} {'sample':>13} {'decode':>15} | +consume) / decode")
        for repeat in range(args.repeats):
            for label, make in [("free", None), *GRAMMARS.items()]:
                constraint = None if make is None else vocab.compile(make())
                params = SamplingParams(seed=repeat, max_tokens=args.tokens, constraint=constraint)
                timers, text, decodes = run(session, params)
                p = timers.parts
                if "mask" in p:
                    p["unpack"] = [a - m for a, m in zip(p["allowed"], p["mask"])]
                    grammar_s = [sum(x) for x in zip(p["allowed"], p["consume"])]
                    share = f"{100 * np.median(grammar_s) / np.median(decodes):5.1f} %"
                else:
                    share = "      -"
                print(f"{label:12} {repeat:>3} {len(p['sample']):>6} | "
                      f"{ms(p.get('mask', []))} {ms(p.get('unpack', []))} {ms(p.get('consume', []))} "
                      f"{ms(p['sample'])} {ms(decodes, 7)} | {share}")
                if args.show_text:
                    print("    ", repr(text[:160]))


if __name__ == "__main__":
    main()
