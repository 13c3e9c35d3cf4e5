"""Tokenizer tests: Gemma (SPM) against llama.cpp's own tokenizations, Llama 3 and Qwen 3
(byte-level BPE) against quicktok's exact tokenizers, plus decoding and streaming."""

import os
import struct
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.tokenizer import StreamDecoder, TokenIdError, Tokenizer, TokenizerError, special

# ---------------------------------------------------------------------------------------------
# Fixtures: GGUF-style tokenizer metadata built from quicktok's shipped vocabulary files.

CONTROL, USER_DEFINED, NORMAL = 3, 4, 1


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as in its encoder.py), kept independent of
    the code under test."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in _gpt2_byte_chars().items()})


def _as_gpt2_text(raw: bytes) -> str:
    return raw.decode("latin-1").translate(_LATIN1_TO_GPT2)


def _quicktok_data_dir() -> str:
    import quicktok

    return os.path.join(os.path.dirname(quicktok.__file__), "data")


def _read_quicktok_ranks(name: str) -> dict[bytes, int]:
    """quicktok's <name>.vocab: u32 count, then per token u16 length, bytes, u32 rank."""
    with open(os.path.join(_quicktok_data_dir(), name + ".vocab"), "rb") as f:
        raw = f.read()
    (count,), offset, ranks = struct.unpack_from("<I", raw), 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", raw, offset)
        token = raw[offset + 2:offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", raw, offset + 2 + length)
        offset += 6 + length
    assert offset == len(raw)
    return ranks


def _read_quicktok_specials(name: str) -> dict[str, int]:
    """quicktok's <name>.special: u32 count, then per token u32 id, u16 length, UTF-8 text."""
    with open(os.path.join(_quicktok_data_dir(), name + ".special"), "rb") as f:
        raw = f.read()
    (count,), offset, specials = struct.unpack_from("<I", raw), 4, {}
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", raw, offset)
        specials[raw[offset + 6:offset + 6 + length].decode()] = token_id
        offset += 6 + length
    assert offset == len(raw)
    return specials


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[str]:
    """Merge list of a tiktoken-style rank vocabulary, the way Hugging Face's
    TikTokenConverter writes it for these models' tokenizer.json: every split of a token into
    two vocabulary pieces is a merge, ordered by the token's rank, then by the pieces' ranks.
    Merging by this list equals merging the pair whose concatenation has the lowest rank."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda merge: merge[0])
    return [_as_gpt2_text(left) + " " + _as_gpt2_text(right) for _, left, right in merges]


def _quicktok_metadata(name: str, pre: str, bos: str, eos: str, add_bos: bool) -> dict:
    """GGUF tokenizer metadata as convert_hf_to_gguf.py writes it for this vocabulary:
    <|...|> added tokens are control tokens, other added tokens (<think>) user-defined."""
    ranks = _read_quicktok_ranks(name)
    specials = _read_quicktok_specials(name)
    size = len(ranks) + len(specials)
    tokens, types = [None] * size, [NORMAL] * size
    for raw, rank in ranks.items():
        tokens[rank] = _as_gpt2_text(raw)
    for text, token_id in specials.items():
        tokens[token_id] = text
        types[token_id] = CONTROL if text.startswith("<|") and text.endswith("|>") else USER_DEFINED
    assert None not in tokens
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": _merges_from_ranks(ranks),
        "tokenizer.ggml.bos_token_id": specials[bos],
        "tokenizer.ggml.eos_token_id": specials[eos],
        "tokenizer.ggml.add_bos_token": add_bos,
    }


@pytest.fixture(scope="session")
def gemma(gemma_metadata) -> Tokenizer:
    return Tokenizer.from_metadata(gemma_metadata)


@pytest.fixture(scope="session")
def llama3_metadata() -> dict:
    """Llama 3's vocabulary as a Llama 3 GGUF describes it."""
    return _quicktok_metadata("llama3", "llama-bpe", "<|begin_of_text|>", "<|end_of_text|>",
                              add_bos=True)


@pytest.fixture(scope="session")
def qwen3_metadata() -> dict:
    """Qwen 3's vocabulary as a Qwen 3 GGUF describes it."""
    return _quicktok_metadata("qwen3", "qwen2", "<|endoftext|>", "<|im_end|>", add_bos=False)


@pytest.fixture(scope="session")
def llama3_pair(llama3_metadata):
    """(our Tokenizer, quicktok's) for Llama 3."""
    import quicktok

    return Tokenizer.from_metadata(llama3_metadata), quicktok.get_encoding("llama3")


@pytest.fixture(scope="session")
def qwen3_pair(qwen3_metadata):
    """(our Tokenizer, quicktok's) for Qwen 3."""
    import quicktok

    return Tokenizer.from_metadata(qwen3_metadata), quicktok.get_encoding("qwen3")


# ---------------------------------------------------------------------------------------------
# A varied corpus. Qwen's reference normalizes to NFC and llama.cpp does not, so every text
# here is NFC already (checked below).

CORPUS = [
    "Hello world",
    " Hello world",
    "Hello  world",
    "hello\nworld\n\n",
    "\t tabs\tand  spaces   ",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\nnewlines\r\nwindows\r\n\r\n  \n",
    "The quick brown fox jumps over the lazy dog.",
    "I'm can't won't they're we'll I'd you've IT'S DON'T She'S",
    "1234567890 3.14159 -42 1e10 12345678901234567890 007",
    "naïve café résumé Zürich Ærøskøbing straße",
    "日本語のテキストです。中文分词测试。한국어 텍스트입니다.",
    "Привет, как дела? Ελληνικά κείμενα.",
    "עברית ועוד. العربية أيضا",
    "हिन्दी पाठ और ไทย ภาษา",
    "emoji 🦙🚀🔥👍 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👋🏽",
    "def f(x):\n    return [i**2 for i in range(100)]  # 1+2+3==6\n",
    "if (a && b) { x->y = z[3]; } else { printf(\"%d\\n\", 42); }",
    "https://example.com/path?q=1&x=2#frag <html><body>x</body></html>",
    "mixed ScRiPt: Latin кириллица 漢字 かな 123 ١٢٣ ⅷ ½",
    "punctuation!!! ??? ... --- *** ((( ))) \"quoted\" 'single' `back`",
    "  \t\n  \u00a0nbsp\u2003emspace\u3000ideographic",
    "",
    "a",
    " ",
    "\n",
    "x" * 300,
    "ab" * 64 + " " + "🙂" * 20,
]


def test_corpus_is_nfc():
    assert all(unicodedata.normalize("NFC", text) == text for text in CORPUS)


# ---------------------------------------------------------------------------------------------
# Gemma 3 (SentencePiece), against llama.cpp.

def test_gemma_matches_llamacpp(gemma, llamacpp_reference):
    """llama.cpp's /tokenize lists the tokens without the BOS (add_special=false)."""
    cases = llamacpp_reference["tokenize"]
    assert cases
    got = {case["text"]: gemma.encode(case["text"], add_special=False) for case in cases}
    expected = {case["text"]: case["tokens"] for case in cases}
    assert got == expected


def test_gemma_add_special_prepends_bos(gemma, gemma_metadata, llamacpp_reference):
    assert gemma.bos_id == gemma_metadata["tokenizer.ggml.bos_token_id"] == 2
    # Gemma's metadata turns SentencePiece's usual space prefix off ("Hello" is not "▁Hello")
    assert gemma_metadata["tokenizer.ggml.add_space_prefix"] is False
    for case in llamacpp_reference["tokenize"]:
        assert gemma.encode(case["text"]) == [2, *case["tokens"]]
    assert gemma.encode("") == [2]
    assert gemma.encode("", add_special=False) == []


def test_gemma_special_ids(gemma, gemma_metadata):
    assert gemma.vocab_size == len(gemma_metadata["tokenizer.ggml.tokens"]) == 262144
    assert gemma.eos_id == gemma_metadata["tokenizer.ggml.eos_token_id"]
    assert {gemma.eos_id, gemma.token_id("<end_of_turn>")} <= gemma.eog_ids
    assert gemma.bos_id not in gemma.eog_ids


def test_gemma_parse_special(gemma):
    start, end = gemma.token_id("<start_of_turn>"), gemma.token_id("<end_of_turn>")
    newline = gemma.token_id("\n")  # a user-defined token: always split out
    text = "<start_of_turn>user\nHi<end_of_turn>\n"
    parsed = gemma.encode(text, add_special=False)
    assert parsed[0] == start and parsed.count(end) == 1 and parsed[-2:] == [end, newline]
    assert gemma.encode("user", add_special=False) == parsed[1:parsed.index(newline)]
    literal = gemma.encode(text, add_special=False, parse_special=False)
    assert start not in literal and end not in literal and newline in literal
    assert gemma.decode(literal) == text
    assert gemma.decode(parsed) == "user\nHi\n"
    assert gemma.decode(parsed, skip_special=False) == text


def test_gemma_special_token_families(gemma):
    """Thousands of <unusedN> control tokens: the longest text that occurs wins."""
    unused1, unused12 = gemma.token_id("<unused1>"), gemma.token_id("<unused12>")
    ids = gemma.encode("x<unused12>y<unused1>2>", add_special=False)
    assert ids.count(unused12) == 1 and ids.count(unused1) == 1
    assert gemma.decode(ids, skip_special=False) == "x<unused12>y<unused1>2>"


def test_gemma_byte_fallback(gemma):
    rare = "\U0010fffd"  # a private-use character no vocabulary holds: four <0xXX> tokens
    ids = gemma.encode(rare, add_special=False)
    assert len(ids) == 4
    assert b"".join(gemma.token_to_piece(i) for i in ids) == rare.encode()
    assert gemma.decode(ids) == rare


@pytest.mark.parametrize("text", CORPUS)
def test_gemma_round_trip(gemma, text):
    assert gemma.decode(gemma.encode(text)) == text
    assert gemma.decode(gemma.encode(text, add_special=False, parse_special=False)) == text


# SentencePiece writes a space as U+2581, so that one character cannot survive a round trip
# (llama.cpp and SentencePiece decode it as a space too).
@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"),
               max_size=60))
def test_gemma_round_trip_any_text(gemma, text):
    assert gemma.decode(gemma.encode(text, add_special=False, parse_special=False)) == text


@pytest.fixture(scope="session")
def gemma_plain_spm(gemma_metadata):
    """llama.cpp's SPM rule spelled out the slow, obvious way: merge the adjacent pair that
    forms the highest-scoring piece (the leftmost on ties) until none does, then spell any
    character outside the vocabulary as <0xXX> bytes."""
    pieces = gemma_metadata["tokenizer.ggml.tokens"].tolist()
    scores = gemma_metadata["tokenizer.ggml.scores"].tolist()
    piece_id = {piece: i for i, piece in enumerate(pieces)}

    def encode(text):
        symbols = list(text.replace(" ", "\u2581"))
        while True:
            candidates = [(scores[piece_id[a + b]], -i) for i, (a, b)
                          in enumerate(zip(symbols, symbols[1:])) if a + b in piece_id]
            if not candidates:
                break
            i = -max(candidates)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return [t for symbol in symbols for t in ([piece_id[symbol]] if symbol in piece_id else
                [piece_id[f"<0x{b:02X}>"] for b in symbol.encode()])]

    return encode


_MERGE_ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDE .,;:!?'-0123456789 éàüñç 日本語中文 ж€🦙"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_MERGE_ALPHABET, max_size=40)
       .filter(lambda text: "  " not in text))  # "  " is a (user-defined) special token
def test_gemma_merge_order_matches_the_plain_rule(gemma, gemma_plain_spm, text):
    assert gemma.encode(text, add_special=False) == gemma_plain_spm(text)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE, against quicktok.

@pytest.mark.parametrize("text", CORPUS)
def test_llama3_matches_quicktok(llama3_pair, text):
    ours, reference = llama3_pair
    assert ours.encode(text, add_special=False) == reference.encode_ordinary(text)


@pytest.mark.parametrize("text", CORPUS)
def test_qwen3_matches_quicktok(qwen3_pair, text):
    ours, reference = qwen3_pair
    assert ours.encode(text, add_special=False) == reference.encode_ordinary(text)


SPECIAL_TEXTS = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 🦙<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen3": "<|im_start|>user\nHi 🦙<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nOk"
             "<tool_call>{\"a\": 1}</tool_call><|im_end|><|endoftext|>",
}


@pytest.mark.parametrize("pair_name", ["llama3_pair", "qwen3_pair"])
def test_special_tokens_inside_text(request, pair_name):
    ours, reference = request.getfixturevalue(pair_name)
    text = SPECIAL_TEXTS[pair_name.removesuffix("_pair")]
    ids = ours.encode(text, add_special=False)
    assert ids == reference.encode(text, allowed_special="all")
    assert ours.decode(ids, skip_special=False) == text
    visible = ours.decode(ids)
    assert "<|" not in visible and "Hi 🦙" in visible


def test_llama3_parse_special_off_is_plain_text(llama3_pair):
    ours, reference = llama3_pair
    text = SPECIAL_TEXTS["llama3"]
    literal = ours.encode(text, add_special=False, parse_special=False)
    assert literal == reference.encode_ordinary(text)


def test_qwen3_user_defined_tokens_always_split(qwen3_pair):
    ours, _ = qwen3_pair
    ids = ours.encode("a<think>b<|im_end|>", add_special=False, parse_special=False)
    assert ours.token_id("<think>") in ids and ours.token_id("<|im_end|>") not in ids


def test_bpe_special_ids(llama3_pair, qwen3_pair):
    llama3, _ = llama3_pair
    assert llama3.encode("Hi")[0] == llama3.bos_id == llama3.token_id("<|begin_of_text|>")
    assert {llama3.token_id("<|eot_id|>"), llama3.token_id("<|end_of_text|>")} <= llama3.eog_ids
    assert llama3.vocab_size == 128256
    qwen3, _ = qwen3_pair
    assert qwen3.encode("Hi") == qwen3.encode("Hi", add_special=False)  # add_bos_token false
    assert {qwen3.token_id("<|im_end|>"), qwen3.token_id("<|endoftext|>")} <= qwen3.eog_ids
    assert qwen3.token_id("<|im_start|>") not in qwen3.eog_ids


@pytest.mark.parametrize("pair_name", ["llama3_pair", "qwen3_pair"])
def test_bpe_round_trip(request, pair_name):
    ours, _ = request.getfixturevalue(pair_name)
    for text in CORPUS:
        assert ours.decode(ours.encode(text)) == text


# Any text, special-token text included. One known difference is left out: llama.cpp makes
# "</s>" an end-of-generation control token in every vocabulary that has it (Qwen's is an
# ordinary piece), so it parses "</s>" as that one token where Qwen's reference does not.
_ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs", "Co", "Cn")), max_size=40)
_ANY_NFC_TEXT = _ANY_TEXT.map(lambda text: unicodedata.normalize("NFC", text))


@settings(max_examples=200, deadline=None)
@given(_ANY_TEXT)
def test_llama3_matches_quicktok_any_text(llama3_pair, text):
    ours, reference = llama3_pair
    assert ours.encode(text, add_special=False) == reference.encode(text, allowed_special="all")
    assert ours.encode(text, False, parse_special=False) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(_ANY_NFC_TEXT.filter(lambda text: "</s>" not in text))
def test_qwen3_matches_quicktok_any_text(qwen3_pair, text):
    ours, reference = qwen3_pair
    assert ours.encode(text, add_special=False) == reference.encode(text, allowed_special="all")


# ---------------------------------------------------------------------------------------------
# Streaming.

STREAM_TEXT = "Café 🦙 says: 日本語! 👩‍👩‍👧 \U0010fffd ok"


def _stream(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", ["gemma", "llama3_pair", "qwen3_pair"])
def test_stream_decoder_never_splits_characters(request, name):
    tokenizer = request.getfixturevalue(name)
    tokenizer = tokenizer[0] if isinstance(tokenizer, tuple) else tokenizer
    ids = tokenizer.encode(STREAM_TEXT, add_special=False)
    partial = [i for i in ids if not _is_complete_utf8(tokenizer.token_to_piece(i))]
    assert partial, "the text should need tokens that carry part of a character"
    chunks = _stream(tokenizer, ids)
    assert "".join(chunks) == STREAM_TEXT
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert chunks[-1] == ""


def _is_complete_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_stream_decoder_hides_control_tokens_and_flushes(gemma):
    decoder = gemma.stream_decoder()
    assert decoder.feed(gemma.bos_id) == ""
    assert decoder.feed(gemma.token_id("<end_of_turn>")) == ""
    first_byte = gemma.token_id("<0xF0>")
    assert decoder.feed(first_byte) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character is not lost silently
    assert StreamDecoder(gemma, skip_special=False).feed(gemma.bos_id) == "<bos>"


# ---------------------------------------------------------------------------------------------
# llama.cpp itself, when llama-cpp-python is installed (it is not a dependency): the same
# three vocabularies, loaded by libllama from GGUF files.

def _write_vocab_gguf(path, metadata: dict) -> None:
    """A vocabulary-only GGUF (a token-free "llama" model) holding this tokenizer metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["gemma", "llama3", "qwen3"])
def test_matches_libllama(request, tmp_path_factory, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    if name == "gemma":
        ours, path = request.getfixturevalue("gemma"), request.getfixturevalue("gemma_path")
    else:
        ours = request.getfixturevalue(f"{name}_pair")[0]
        path = tmp_path_factory.mktemp("vocab") / f"{name}.gguf"
        _write_vocab_gguf(path, request.getfixturevalue(f"{name}_metadata"))
    reference = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in [*CORPUS, *SPECIAL_TEXTS.values(), STREAM_TEXT, "x</s>y <b>z</b>"]:
        raw = text.encode()
        assert ours.encode(text) == reference.tokenize(raw, add_bos=True, special=True)
        plain = reference.tokenize(raw, add_bos=False, special=False)
        assert ours.encode(text, add_special=False, parse_special=False) == plain
    vocab = llama_cpp.llama_model_get_vocab(reference.model)
    assert ours.eog_ids == {i for i in range(ours.vocab_size)
                            if llama_cpp.llama_vocab_is_eog(vocab, i)}


# ---------------------------------------------------------------------------------------------
# The SPM merge rules, on tiny vocabularies whose answers follow from the rules by hand.

def _spm_metadata(pieces_scores, **extra):
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              *(piece for piece, _ in pieces_scores)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(score for _, score in pieces_scores)]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces_scores)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": _LazyStrings(pieces),
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        **extra,
    }


class _LazyStrings:
    """The shape of runtime.gguf's string arrays: len, indexing, iteration, tolist."""

    def __init__(self, items):
        self._items = list(items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def __iter__(self):
        return iter(self._items)

    def tolist(self):
        return list(self._items)


def _pieces(tokenizer, text, **kwargs):
    return [tokenizer.token_to_piece(i).decode() for i in tokenizer.encode(text, False, **kwargs)]


def _spm(vocab, **extra):
    return Tokenizer.from_metadata(_spm_metadata(vocab, **{"tokenizer.ggml.add_space_prefix": False,
                                                           **extra}))


def test_spm_highest_score_merges_first():
    letters = [("a", -1.0), ("b", -1.0), ("c", -1.0)]
    assert _pieces(_spm([*letters, ("ab", -5.0), ("bc", -2.0)]), "abc") == ["a", "bc"]
    assert _pieces(_spm([*letters, ("ab", -2.0), ("bc", -5.0)]), "abc") == ["ab", "c"]
    # merged symbols keep merging: "a" + "bc" is a piece too
    assert _pieces(_spm([*letters, ("ab", -5.0), ("bc", -2.0), ("abc", -9.0)]), "abc") == ["abc"]


def test_pieces_with_the_same_crc32_are_told_apart_and_duplicates_refused():
    """The piece index searches CRC-32s; "plumless" and "buckeroo" share one."""
    import zlib

    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    letters = [(c, -1.0) for c in "plumesbckro"]
    tokenizer = _spm([*letters, ("plumless", -2.0), ("buckeroo", -3.0)])
    index = tokenizer._vocab.piece_to_id
    found = {text: index.get(text.encode()) for text in ("plumless", "buckeroo", "plumlesz")}
    assert found["plumlesz"] is None
    assert [tokenizer.token_to_piece(found[t]) for t in ("plumless", "buckeroo")] == \
        [b"plumless", b"buckeroo"]
    with pytest.raises(ValueError, match="duplicate token in vocabulary: b'buckeroo'"):
        _spm([*letters, ("buckeroo", -2.0), ("plumless", -2.0), ("buckeroo", -3.0)])


def test_spm_ties_go_to_the_leftmost_pair():
    tokenizer = _spm([("a", -1.0), ("ab", -3.0), ("ba", -3.0), ("b", -1.0)])
    assert _pieces(tokenizer, "aba") == ["ab", "a"]
    assert _pieces(tokenizer, "bab") == ["ba", "b"]


def test_spm_space_prefix_and_byte_fallback():
    vocab = [("▁", -1.0), ("h", -1.0), ("i", -1.0), ("▁h", -2.0), ("▁hi", -3.0)]
    tokenizer = Tokenizer.from_metadata(_spm_metadata(vocab))  # add_space_prefix defaults to on
    assert _pieces(tokenizer, "hi hi") == [" hi", " hi"]
    assert tokenizer.decode(tokenizer.encode("hi hi", add_special=False)) == "hi hi"
    assert tokenizer.encode("hi")[0] == 1
    ids = tokenizer.encode("hé", add_special=False)  # é is not in the vocabulary: two bytes
    assert [tokenizer.token_to_piece(i) for i in ids[-2:]] == [b"\xc3", b"\xa9"]
    assert tokenizer.decode(ids) == "hé"
    # after a control token the space prefix applies again, as in llama.cpp
    assert _pieces(tokenizer, "hi</s>hi") == [" hi", "</s>", " hi"]


# ---------------------------------------------------------------------------------------------
# The pre-tokenizers, on a tiny byte-level vocabulary where word boundaries decide which merges
# can happen. Expected splits of "(a 12345", by hand from llama.cpp's regexes:
#   gpt-2   "(" "a" " 12345"                 (' ?\p{N}+' keeps the space with the digits)
#   smollm  digits first, then gpt-2         "(" "a" " " "1" "2" "3" "4" "5"
#   qwen2   "(a" " " "1" "2" "3" "4" "5"     (one leading non-letter joins a word)
#   llama3  "(a" " " "123" "45"              (digits in threes)
#   default punctuation, gpt-2, \p{N}+, [0-9]{3} in turn: "(" "a" " " "123" "45"

def _tiny_bpe(pre):
    byte_chars = list(_gpt2_byte_chars().values())
    merges = ["Ġ 1", "1 2", "12 3", "4 5", "( a"]
    tokens = byte_chars + [m.replace(" ", "") for m in merges]
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [NORMAL] * len(tokens), "tokenizer.ggml.add_bos_token": False,
    })


@pytest.mark.parametrize("pre, pieces", [
    ("gpt-2", ["(", "a", " 1", "2", "3", "45"]),
    ("smollm", ["(", "a", " ", "1", "2", "3", "4", "5"]),
    ("qwen2", ["(a", " ", "1", "2", "3", "4", "5"]),
    ("llama-bpe", ["(a", " ", "123", "45"]),
    ("default", ["(", "a", " ", "123", "45"]),
])
def test_pre_tokenizers_split_words_as_llamacpp(pre, pieces):
    tokenizer = _tiny_bpe(pre)
    ids = tokenizer.encode("(a 12345", add_special=False)
    assert [tokenizer.token_to_piece(i).decode() for i in ids] == pieces
    assert tokenizer.decode(ids) == "(a 12345"


def test_special_tokens_are_cut_longest_first():
    """llama.cpp cuts the text around the longest special token first, wherever it is: in
    "abcd", control "bcd" wins over control "ab" although "ab" starts earlier."""
    vocab = [("a", -1.0), ("b", -1.0), ("c", -1.0), ("d", -1.0)]
    metadata = _spm_metadata(vocab, **{"tokenizer.ggml.add_space_prefix": False})
    tokens = metadata["tokenizer.ggml.tokens"].tolist() + ["ab", "bcd"]
    metadata["tokenizer.ggml.tokens"] = tokens
    metadata["tokenizer.ggml.scores"] = np.zeros(len(tokens), dtype=np.float32)
    metadata["tokenizer.ggml.token_type"] = np.append(metadata["tokenizer.ggml.token_type"],
                                                      [CONTROL, CONTROL])
    tokenizer = Tokenizer.from_metadata(metadata)
    assert _pieces(tokenizer, "abcd") == ["a", "bcd"]
    # Not parsed as specials, the text still merges into any piece, control ones included
    # (llama.cpp's SPM looks pieces up whatever their type).
    assert _pieces(tokenizer, "abcd", parse_special=False) == ["ab", "c", "d"]


def test_unsupported_models_name_themselves():
    with pytest.raises(TokenizerError, match="'t5'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    metadata = _spm_metadata([("a", -1.0)])
    metadata.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
                     "tokenizer.ggml.merges": ["a a"]})
    with pytest.raises(TokenizerError, match="'no-such-pre'"):
        Tokenizer.from_metadata(metadata)


def test_refusals_are_tokenizer_errors_and_still_value_errors():
    """TokenizerError is this layer's typed error; callers that caught ValueError (and
    IndexError for an id outside the vocabulary) before it existed keep working."""
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    tokenizer = Tokenizer.from_metadata(_spm_metadata([("a", -1.0)]))
    for caught in (TokenIdError, TokenizerError, ValueError, IndexError):
        with pytest.raises(caught, match="out of range"):
            tokenizer.token_to_piece(tokenizer.vocab_size)


@pytest.mark.parametrize("which", ["gemma", "qwen3_pair"])
def test_a_pickled_tokenizer_encodes_the_same_and_starts_with_empty_caches(which, request):
    """runtime.tokenizer_cache keeps tokenizers as pickles: SPM and BPE must survive one,
    and what the caches gathered while serving must not be saved with them."""
    import pickle

    tokenizer = request.getfixturevalue(which)
    tokenizer = tokenizer[0] if isinstance(tokenizer, tuple) else tokenizer
    texts = CORPUS[:40]
    expected = [tokenizer.encode(t, parse_special=True) for t in texts]  # fills the caches
    assert tokenizer._model.__dict__[tokenizer._model._CACHES[0]]
    copy = pickle.loads(pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL))
    assert all(not copy._model.__dict__[name] for name in copy._model._CACHES)
    assert copy._pieces_cache == {}
    assert [copy.encode(t, parse_special=True) for t in texts] == expected
    assert [copy.decode(ids) for ids in expected] == [tokenizer.decode(ids) for ids in expected]
    assert (copy.vocab_size, copy.bos_id, copy.eog_ids) == \
        (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eog_ids)


@pytest.mark.parametrize("names, expected, first_literal", [
    ({"general.architecture": "jina-bert-v3"},  # lstrip
     ["x", "<mask>", " y  "], ["x  <mask> y", "<mask>", "  z"]),
    ({"general.name": "Phi-3 mini"},  # rstrip (every special token)
     ["x  ", "<mask>", "y  "], ["x  <mask> y ", "<mask>", "z"]),
    ({"general.name": "Some model"},  # neither
     ["x  ", "<mask>", " y  "], ["x  <mask> y ", "<mask>", "  z"]),
])
def test_special_tokens_strip_whitespace_where_llamacpp_says(names, expected, first_literal):
    """The GGUF has no lstrip/rstrip flags: llama.cpp gives them by the model's name,
    architecture or pre-tokenizer, and the whitespace they swallow is gone from the text;
    text kept literal (a chat message's, runtime.chat) gets it back."""
    metadata = _spm_metadata([("x", -1.0), ("y", -1.0)], **names)
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"].tolist() + ["<mask>"]
    metadata["tokenizer.ggml.scores"] = np.append(metadata["tokenizer.ggml.scores"], 0.0)
    metadata["tokenizer.ggml.token_type"] = np.append(metadata["tokenizer.ggml.token_type"],
                                                      CONTROL)
    tokenizer = Tokenizer.from_metadata(metadata)
    mask = tokenizer.token_id("<mask>")

    def tokens(parts):
        return [mask if part == "<mask>" else part for part in parts]

    assert special.partition(tokenizer._vocab, "x  <mask> y  ", parse_special=True) == tokens(expected)
    text = "x  <mask> y <mask>  z"  # only the first <mask> literal
    fragments = special.partition(tokenizer._vocab, text, parse_special=True)
    assert special.unparse_in(tokenizer._vocab, text, fragments, [(3, 4)]) == \
        [first_literal[0], mask, first_literal[2]]
    for text in ("x  <mask> y  ", " <mask>  <mask>x", "<mask>\n", "y\t<mask>"):
        assert tokenizer.encode(text, literal_spans=[(0, len(text))]) == \
            tokenizer.encode(text, parse_special=False)
def test_long_texts_do_not_stay_in_the_caches(gemma):
    """Issue 16, finding 9: four 2M-character prompts to /tokenize kept 45-65 MB each in
    the fragment cache (bounded in entries, not in size). Texts past the size an entry may
    have are tokenized and not kept."""
    import sys

    def cache_bytes() -> int:
        cache = gemma._model.fragment_cache
        return sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in cache.items())

    gemma.encode("warm up the caches", add_special=False)
    before = cache_bytes()
    for i in range(4):
        gemma.encode(f"{i} " + "lorem ipsum dolor " * 2_000, add_special=False)
    assert cache_bytes() - before < 4096
