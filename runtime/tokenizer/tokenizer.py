"""The Tokenizer the engine and server use: built from GGUF metadata, text <-> ids, and
StreamDecoder for generated text."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from runtime.tokenizer import special
from runtime.tokenizer.bpe import BpeModel
from runtime.tokenizer.model import PickledWithoutCaches
from runtime.tokenizer.pretokenizers import GEMMA4, PRE_TOKENIZERS
from runtime.tokenizer.spm import SpmModel
from runtime.tokenizer.vocab import (
    TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, TokenIdError,
    TokenizerError, Vocab, as_list, metadata_id, metadata_text, piece_bytes_of)
from runtime.tokenizer.wordpiece import WpmModel

# tokenizer.ggml.model values modelrun reads, and what they are.
TOKENIZER_MODELS = {
    "llama": "SentencePiece/SPM",
    "gpt2": "byte-level BPE",
    "gemma4": "Gemma 4's SentencePiece-style BPE",
    "bert": "WordPiece, for BERT-style embedding models",
}


class Tokenizer(PickledWithoutCaches):
    """Text <-> token ids for one GGUF model, identical to llama.cpp's tokenizer."""

    _CACHES = ("_pieces_cache",)

    def __init__(self, vocab: Vocab, model: SpmModel | BpeModel | WpmModel, *,
                 model_name: str, bos_id: int | None, eos_id: int | None,
                 eog_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 sep_id: int | None = None):
        self._vocab = vocab
        self._model = model
        self._pieces_cache: dict[int, bytes] = {}
        self.model_name = model_name
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._sep_id = sep_id  # WordPiece: [SEP] closes every add_special encoding
        self._eog_ids = eog_ids
        self.add_bos = add_bos
        self.add_eos = add_eos

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> Tokenizer:
        """Build the tokenizer from GGUF key/values (tokenizer.ggml.*)."""
        model_name = metadata_text(metadata.get("tokenizer.ggml.model"))
        if model_name not in TOKENIZER_MODELS:
            raise TokenizerError(
                f"unsupported tokenizer model {model_name!r} (tokenizer.ggml.model); "
                "modelrun supports " + ", ".join(f"'{name}' ({what})" for name, what in
                                                 TOKENIZER_MODELS.items()))
        pieces = piece_bytes_of(metadata.get("tokenizer.ggml.tokens"))
        if not pieces:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        n = len(pieces)
        if b"" in pieces:  # llama.cpp renames empty pieces so they cannot match
            pieces = [piece or f"[EMPTY_{i}]".encode() for i, piece in enumerate(pieces)]
        types = as_list(metadata.get("tokenizer.ggml.token_type")) or [TOKEN_NORMAL] * n
        if len(types) < n:
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = types[:n] if isinstance(types[0], int) else [int(t) for t in types[:n]]
        vocab = Vocab(pieces, types)

        def flag(key: str, default: bool) -> bool:
            value = metadata.get(key)
            return default if value is None else bool(value)

        # llama.cpp's defaults when the metadata names no ids: Llama's for SPM, BERT's for
        # WordPiece. (Its BPE placeholder, id 11, is deliberately not copied: no id is better
        # than a comma.)
        defaults = {"llama": {"bos": 1, "eos": 2, "unknown": 0},
                    "bert": {"bos": 101, "unknown": 100, "seperator": 102}}.get(model_name, {})

        def special_id(name: str) -> int | None:
            found = metadata_id(metadata, f"tokenizer.ggml.{name}_token_id", n)
            if found is None and defaults.get(name, n) < n:
                found = defaults[name]
            return found

        bos_id, eos_id = special_id("bos"), special_id("eos")
        vocab.unknown_id = special_id("unknown")

        if model_name == "llama":
            scores = metadata.get("tokenizer.ggml.scores")
            scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
            if scores.ndim != 1 or len(scores) < n:
                raise TokenizerError(
                    f"tokenizer.ggml.scores has {scores.size} entries for {n} tokens")
            scores = scores[:n]
            model = SpmModel(vocab, scores, flag("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        elif model_name == "bert":
            lowercase = flag("tokenizer.ggml.normalizer.lowercase", True)
            model = WpmModel(vocab, lowercase=lowercase, strip_accents=flag(
                "tokenizer.ggml.normalizer.strip_accents", lowercase))
            add_bos_default = True
        else:
            # Gemma 4's tokenizer model implies its pre-tokenizer, whatever the key says.
            pre_name = "gemma4" if model_name == "gemma4" else \
                metadata_text(metadata.get("tokenizer.ggml.pre")) or "default"
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise TokenizerError(
                    f"unsupported BPE pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); known: "
                    + ", ".join(sorted(PRE_TOKENIZERS)))
            merges = piece_bytes_of(metadata.get("tokenizer.ggml.merges"))
            if not merges:
                raise TokenizerError("BPE tokenizer without tokenizer.ggml.merges")
            model = BpeModel(vocab, merges, pre)
            add_bos_default = pre.add_bos

        eog_ids = special.end_of_generation_ids(metadata, vocab, eos_id)
        special.strip_attributes(metadata, vocab)
        vocab.build_special_index()

        add_bos = flag("tokenizer.ggml.add_bos_token", add_bos_default)
        sep_id = None
        if model_name == "bert":  # llama.cpp's WPM always adds [CLS] ... [SEP]
            add_bos, sep_id = True, special_id("seperator")  # (the GGUF key's spelling)
            if sep_id is None:
                raise TokenizerError("WordPiece vocabulary without tokenizer.ggml."
                                     "seperator_token_id")
        elif model_name != "llama" and model.pre is GEMMA4:
            add_bos = True  # llama.cpp overrides a false add_bos_token for Gemma 4
        add_eos = flag("tokenizer.ggml.add_eos_token", False)
        if add_bos and bos_id is None:
            raise TokenizerError(
                "add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if add_eos and eos_id is None:
            raise TokenizerError(
                "add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")
        return cls(vocab, model, model_name=model_name, bos_id=bos_id, eos_id=eos_id,
                   eog_ids=eog_ids, add_bos=add_bos, add_eos=add_eos, sep_id=sep_id)

    # --- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of text (no token spells more bytes than the
        longest piece): refuses text that cannot fit a context before tokenizing it."""
        longest = getattr(self, "_longest_piece", None)
        if longest is None:
            longest = self._longest_piece = max(map(len, self._vocab.pieces), default=1) or 1
        return len(text.encode("utf-8", "surrogatepass")) // (longest + 1)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end a generation: eos, eot, eom and the end-of-turn tokens."""
        return self._eog_ids

    def token_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece, written as in the GGUF (e.g. '<end_of_turn>')."""
        return self._vocab.id_of(piece)

    def is_control(self, token_id: int) -> bool:
        """Control and unknown tokens: hidden by decode unless asked for."""
        return self._vocab.types[token_id] in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    # --- encode ------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True,
               literal_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of text; add_special adds BOS/EOS as the model asks, parse_special turns
        control-token text (e.g. '<start_of_turn>') into those tokens, except where it
        overlaps one of literal_spans ([start, end) of text: a chat's message text, which
        must not forge the template's markers; runtime.chat)."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._bos_id)
        after_special = True  # SPM's space prefix applies at the start and after specials
        fragments = special.partition(self._vocab, text, parse_special)
        if literal_spans and parse_special:
            fragments = special.unparse_in(self._vocab, text, fragments, literal_spans)
        for fragment in fragments:
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
            else:
                self._model.encode_fragment(fragment, after_special, out)
                after_special = False
        if add_special and self.add_eos:
            out.append(self._eos_id)
        if add_special and self._sep_id is not None:
            out.append(self._sep_id)
        return out

    # --- decode ------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token_id stands for. Control/unknown tokens give their text only when
        special is true (llama.cpp's token_to_piece); pieces may be partial UTF-8."""
        vocab = self._vocab
        if not 0 <= token_id < len(vocab):
            raise TokenIdError(f"token id {token_id} out of range (vocab size {len(vocab)})")
        kind = vocab.types[token_id]
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) and not special:
            return b""
        piece = self._pieces_cache.get(token_id)
        if piece is None:
            raw = vocab.pieces[token_id]
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                piece = raw
            elif kind == TOKEN_NORMAL:
                piece = self._model.normal_piece(raw)
            elif kind == TOKEN_BYTE:
                piece = bytes((int(raw[3:5], 16),))
            else:  # unused and unknown types render as nothing, as in llama.cpp
                piece = b""
            self._pieces_cache[token_id] = piece
        return piece

    def decode(self, tokens: Iterable[int], skip_special: bool = True) -> str:
        """Text of a token sequence.

        As llama.cpp's llama_detokenize with unparse_special = not skip_special: control
        tokens (BOS, <end_of_turn>...) vanish by default, user-defined ones always show, and
        with add_space_prefix (SPM) one leading space of the first token is dropped, undoing
        the prefix encode added. One pass is left out on purpose: the clean-up of spaces
        before punctuation (" ," -> ",") that llama.cpp applies to some BPE vocabularies
        (Llama 3) loses information, and llama-server's completions, streamed or not, are
        built from token pieces without it, as StreamDecoder builds them here.
        """
        special = not skip_special
        pieces = [self.token_to_piece(int(t), special) for t in tokens]
        if pieces and self._model.add_space_prefix:
            if pieces[0].startswith(b" "):
                pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh per-generation StreamDecoder."""
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turns generated token ids into text as they come, one call per token.

    A piece can end inside a multibyte character (byte-fallback tokens, byte-level BPE), so
    feed returns only complete characters and keeps the rest until the next piece.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        """Whatever is held back, with an incomplete trailing character as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
