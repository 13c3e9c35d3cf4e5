# SPM, BPE and WordPiece tokenizers built from GGUF metadata, token for token as llama.cpp
# does it (its whole tokenizer test suite runs in tests/test_tokenizer_llamacpp.py).
#
# Every encode runs in two stages, exactly as llama.cpp's llama_vocab::tokenize:
#
# 1. Special-token partition. The text is cut around the literal text of "special" tokens
#    (control, user-defined and unknown types). They are taken longest first: for each such
#    token in turn, every raw fragment left is split at each of its (non-overlapping, leftmost)
#    occurrences. Control/unknown tokens take part only when parse_special is on; user-defined
#    tokens (Gemma's "\n", "\t", runs of spaces; Qwen's <think>) always do. Only the special
#    tokens that occur in the text are tried: an index by their first few characters finds
#    those candidates without scanning thousands of <unusedN> tokens per call. Some special
#    tokens swallow the whitespace before or after them (lstrip/rstrip: Phi-3's, by model
#    name, as llama.cpp decides; the GGUF does not say).
#
# 2. Each raw fragment is tokenized by the model's algorithm:
#
#    SPM ("llama": Llama 1/2, Mistral, Gemma). Optionally prefix a space (add_space_prefix, and
#    only at the start or right after a special token), replace every space by U+2581, split
#    into characters, then repeatedly merge the adjacent pair whose concatenation is a
#    vocabulary piece with the highest score (leftmost pair on ties). A max-heap of candidate
#    pairs over a linked list of symbols makes this O(n log n); entries made stale by an
#    earlier merge are recognised by their length and skipped. A final symbol that is not a
#    piece (a character outside the vocabulary) falls back to one <0xXX> token per UTF-8 byte.
#    Fragment -> ids results are cached (a chat re-encodes the same lines every turn).
#
#    BPE ("gpt2": Llama 3, Qwen, SmolLM, GPT-2...). The pre-tokenizer that
#    tokenizer.ggml.pre names splits the fragment into words with one or more regexes (as
#    llama.cpp writes them) applied in sequence: each splits every piece the previous one
#    left, and text between matches stays a piece of its own. Each word's UTF-8 bytes are
#    mapped to printable characters with GPT-2's byte-to-unicode table, then the adjacent pair
#    with the lowest merge rank (tokenizer.ggml.merges, rank = line number) is merged until no
#    ranked pair is left, with the same heap as SPM. Some pre-tokenizers (llama3) first take a
#    word that is already a whole vocabulary piece as is ("ignore_merges"). Word -> ids
#    results are cached. Regexes llama.cpp runs through std::regex rather than its own
#    splitters are ported to its ECMAScript meaning where Python's differs (DeepSeek's).
#    Gemma 4 ("gemma4") is BPE the SentencePiece way: spaces become U+2581, words are lines,
#    merges run over characters' UTF-8 (no byte table) and fall back to <0xXX> tokens.
#
#    WordPiece ("bert": embedding models). BERT's basic tokenizer (lowercase, strip accents,
#    cut at whitespace and punctuation), then the longest vocabulary piece at each position
#    of each word; a word that cannot be covered is the unknown token.
#
# Decoding concatenates per-token byte pieces: SPM turns U+2581 back into spaces and <0xXX>
# tokens into raw bytes; BPE maps each character back through the inverse byte table;
# user-defined tokens decode to their literal text; control and unknown tokens decode to
# their text only when asked (special=True), as llama.cpp's token_to_piece. StreamDecoder
# turns a stream of token ids into text without ever emitting half a UTF-8 character.
#
# End-of-generation ids follow llama.cpp's rules too: the ids the metadata names (eos, eot,
# eom) plus tokens recognised by their text, which become control tokens. That includes
# "</s>" wherever a vocabulary has it, so Gemma's HTML </s> (id 212) ends a generation there.
"""SPM, BPE and WordPiece tokenizers built from GGUF metadata only, matching llama.cpp token
for token.

The rooms: vocab.py (pieces, types, the piece index, the errors), special.py (special-token
partition, end-of-generation ids, lstrip/rstrip), pretokenizers.py (BPE's word-splitting
regexes by tokenizer.ggml.pre), model.py (the merge loop and what the models share), spm.py,
bpe.py, wordpiece.py (one model each), tokenizer.py (Tokenizer: building from metadata,
encode, decode; StreamDecoder)."""

from runtime.tokenizer.pretokenizers import PRE_TOKENIZERS
from runtime.tokenizer.tokenizer import TOKENIZER_MODELS, StreamDecoder, Tokenizer
from runtime.tokenizer.vocab import TokenIdError, TokenizerError

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "TokenIdError", "TOKENIZER_MODELS",
           "PRE_TOKENIZERS"]
