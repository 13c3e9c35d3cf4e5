"""Write llama.cpp's tokenizations that tests/test_tokenizer_llamacpp.py checks beyond its suite:

- tests/data/llamacpp_vocab_special_tokens.json: every test vocabulary, texts built around its
  special tokens, add_special and parse_special on;
- tests/data/llamacpp_pre_tokenizers.json: the llama-bpe vocabulary with tokenizer.ggml.pre
  rewritten to every name modelrun accepts, 20 texts, both off.

Needs llama.cpp (not a dependency of modelrun): libllama built from the llama-cpp-python
0.3.36 sdist, called through that sdist's ctypes bindings (llama_cpp/llama_cpp.py, loaded on
its own so the high-level package's dependencies are not needed). From the repository root:

    LLAMA_CPP_LIB_PATH=<sdist>/vendor/llama.cpp/build/bin \\
        .venv/bin/python tests/make_tokenizer_reference.py <sdist>
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import tempfile
import types
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from llamacpp_vocab import names_with_cases, vocab_dir, vocab_path  # noqa: E402

from runtime.gguf import GGUFFile  # noqa: E402
from runtime.tokenizer import PRE_TOKENIZERS  # noqa: E402

DATA = Path(__file__).parent / "data"
SOURCE = ("llama.cpp vendored in the llama-cpp-python 0.3.36 sdist, built from it; "
          "llama_tokenize through the sdist's ctypes bindings (tests/make_tokenizer_reference.py)")
PRE_TEXTS = [
    "'sa 'LLama x'VEry 'Dd 're're don't I'M", "a \n\n b\r\n\r\n  c \n \n",
    "1234567 89 0.5 12,345,678", "\t\t\n x  y   z    ", "Hello\n\n\nWorld  \n",
    "ünïcode Ελληνικά русский ع ไทย क्षि 中文字 ひらがな カタカナ 한국어",
    "e\u0301 n\u0303\u0303 \u0345x a\u200db",
    "¿Qué? ¡Sí! «quote» “smart” ‘single’ — – … 。、，！",
    "$100 + 5% = <x> ^~| `code` {a:[1,2]} @user #tag",
    "🦙🚀 😶\u200d🌫️ ✅ ½ Ⅷ ² ①",
    "\u3000full\u3000width\u2000space\u00a0nbsp\u2028x",
    "ＡＢＣ ａｂｃ １２３ ！？",
    "x/y/z\\w path/to/file.py:12", "CamelCaseWord HTTPServer iPhone O'Neil",
    "3.14159265358979 1e-10 0x1F 1_000_000", "tab\tsep\tvalues\r\nline2\r\n",
    "  leading and trailing  ", "a'b'c 'x' '' ' ' x''y", "\x00\x07\x1b[0m\x7f\x85",
    "Ꭰ ꭰ ᏸ Ⴀ ⰰ ꙁ 𐐀 𞤀 ℂ K ﬀ",
]


def libllama(sdist: Path):
    package = types.ModuleType("llama_cpp")
    package.__path__ = [str(sdist / "llama_cpp")]
    sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as lib

    lib.llama_backend_init()
    quiet = lib.llama_log_callback(lambda *_: None)
    lib.llama_log_set(quiet, ctypes.c_void_p())
    lib._quiet = quiet  # keep the callback alive
    return lib


def tokenizer(lib, path: Path):
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = lib.llama_model_get_vocab(model)

    def encode(text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode()
        size = len(raw) + 16
        ids = (lib.llama_token * size)()
        n = lib.llama_tokenize(vocab, raw, len(raw), ids, size, add_special, parse_special)
        assert n >= 0, text
        return list(ids[:n])

    return encode


def with_pre(src: Path, dst: Path, name: str) -> None:
    """A copy of a vocabulary GGUF with its tokenizer.ggml.pre string replaced."""
    raw = src.read_bytes()
    key = b"tokenizer.ggml.pre"
    at = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", raw, at)[0] == 8  # a string
    (length,) = struct.unpack_from("<Q", raw, at + 4)
    value = name.encode()
    dst.write_bytes(raw[:at + 4] + struct.pack("<Q", len(value)) + value + raw[at + 12 + length:])


def special_texts(path: Path) -> list[str]:
    """Texts around the special tokens the metadata names, then the first control and
    user-defined ones, then the last two (chat markers come last)."""
    metadata = GGUFFile(path).metadata
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types_ = list(metadata["tokenizer.ggml.token_type"])
    named = [metadata.get(f"tokenizer.ggml.{k}_token_id")
             for k in ("bos", "eos", "unknown", "seperator", "padding")]
    specials = [tokens[i] for i in named if i is not None]
    specials += [t for t, k in zip(tokens, types_) if k == 3 and t not in specials][:3]
    specials += [t for t, k in zip(tokens, types_)
                 if k == 4 and t not in specials and t.strip()][:3]
    a, b, c = (specials * 3)[:3]
    last = [t for t, k in zip(tokens, types_) if k in (3, 4) and t.strip()][-2:]
    d, e = (last * 2)[:2]
    return [f"{a}Hello world{b}", f"  {a}  Hello\n\n{b} \t{c}\nworld  ", f"{b}{b}{a} x {c}{c}",
            f"{c} It's 2026; ünïcode 中文 🦙 {a}\n", f"x{a}y{b}z{c}", f" {c}", f"{a}\n",
            f"{d}\n  Hi {e} \t{d}x\n {a}", f"{e}  {d}\n\n"]


def main(sdist: str) -> None:
    lib = libllama(Path(sdist))
    folder = vocab_dir()
    lines = ["{", f' "source": {json.dumps(SOURCE + "; add_special=true, parse_special=true")},',
             ' "cases": {']
    names = names_with_cases(folder)
    for i, name in enumerate(names):
        encode = tokenizer(lib, vocab_path(folder, name))
        pairs = [f"   [{json.dumps(t, ensure_ascii=False)}, {json.dumps(encode(t, True, True))}]"
                 for t in special_texts(vocab_path(folder, name))]
        lines += [f"  {json.dumps(name)}: [", ",\n".join(pairs),
                  "  ]" + ("," if i < len(names) - 1 else "")]
    lines += [" }", "}"]
    (DATA / "llamacpp_vocab_special_tokens.json").write_text("\n".join(lines) + "\n")

    groups: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for name in sorted(PRE_TOKENIZERS):
            copy = Path(work) / f"{name}.gguf"
            with_pre(vocab_path(folder, "llama-bpe"), copy, name)
            encode = tokenizer(lib, copy)
            ids = [encode(t, False, False) for t in PRE_TEXTS]
            for group in groups:
                if group["ids"] == ids:
                    group["names"].append(name)
                    break
            else:
                groups.append({"names": [name], "ids": ids})
    source = (SOURCE + "; the llama-bpe vocabulary with tokenizer.ggml.pre rewritten, "
              "add_special=false, parse_special=false; names whose ids are equal on every text "
              "share an entry")
    lines = ["{", f' "source": {json.dumps(source)},', ' "vocabulary": "llama-bpe",',
             ' "texts": [', ",\n".join("  " + json.dumps(t, ensure_ascii=False) for t in PRE_TEXTS),
             " ],", ' "groups": [']
    for j, group in enumerate(groups):
        lines.append(f'  {{"names": {json.dumps(group["names"])}, "ids": [')
        lines.append(",\n".join("   " + json.dumps(ids) for ids in group["ids"]))
        lines.append("  ]}" + ("," if j < len(groups) - 1 else ""))
    lines += [" ]", "}"]
    (DATA / "llamacpp_pre_tokenizers.json").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
