"""A GGUF file's tokenizer, built from its own `tokenizer.ggml.*` metadata with `tokenizers` alone.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the merges (or sentencepiece scores), each
token's type and the special ids as metadata. This module reads those keys and builds the same tokenizer the
model's own tokenizer.json describes, wrapped as a transformers `PreTrainedTokenizerFast` so templates, padding and
`save_pretrained` work as for any HF folder. transformers' own GGUF route imports torch; this one does not.

Two vocabularies exist (`tokenizer.ggml.model`):
  gpt2   byte-level BPE (Llama 3, SmolLM2, Qwen2/3, ...): every token is spelled in GPT-2's byte alphabet, and the
         pre-tokenizer split (`tokenizer.ggml.pre`) decides which regex cuts text into words before merging;
  llama  sentencepiece BPE (Llama 2, Mistral): `▁` marks a word start, `<0xAB>` tokens catch unknown bytes; files
         without merges have them rebuilt from the token scores.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxswift.errors import CheckpointError

# llama.cpp's `token_type` values (gguf.TokenType)
CONTROL, USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> the regex that splits text into words before BPE, as the model's tokenizer.json has it.
# A pre type not listed uses GPT-2's own split (ByteLevel with use_regex), as transformers' GGUF loader does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


def tokenizer_from_gguf(reader: GGUFReader, path: Path, meta):
    """The file's tokenizer as a `PreTrainedTokenizerFast`; `meta(reader, key)` reads one metadata value."""
    from transformers import PreTrainedTokenizerFast  # tokenizer classes only: this does not import torch

    kind = meta(reader, "tokenizer.ggml.model")
    tokens = meta(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens, so it has no tokenizer")
    types = meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta(reader, "tokenizer.ggml.merges")
    if kind == "gpt2":
        backend, spelled = _byte_level_bpe(tokens, merges, meta(reader, "tokenizer.ggml.pre"), path)
    elif kind == "llama":
        backend, spelled = _sentencepiece_bpe(tokens, merges, meta(reader, "tokenizer.ggml.scores"), path)
    else:
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _add_marked_tokens(backend, tokens, types, spelled)

    special = {name: _token(tokens, meta(reader, f"tokenizer.ggml.{key}_token_id"), key, path)
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    add_bos = meta(reader, "tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default per vocabulary
    add_eos = meta(reader, "tokenizer.ggml.add_eos_token", False)
    backend.post_processor = _bos_eos_template(backend, special["bos"] if add_bos else None,
                                               special["eos"] if add_eos else None)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=meta(reader, "tokenizer.chat_template"),
        **{f"{name}_token": token for name, token in special.items() if token is not None})


def _byte_level_bpe(tokens: list[str], merges, pre: str | None, path: Path):
    """(tokenizer, respelled token list): byte-level BPE with the pre type's word split."""
    if merges is None:
        raise CheckpointError(f"{path}: byte-level (gpt2) GGUF tokenizer has no tokenizer.ggml.merges")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # A few converters store a token in plain text (e.g. a space); the BPE model needs every token in the alphabet.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = _vocab(spelled)
    backend = Tokenizer(BPE(vocab=vocab, merges=_split_merges(merges, vocab, path), fuse_unk=False,
                            byte_fallback=False, continuing_subword_prefix="", end_of_word_suffix=""))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece_bpe(tokens: list[str], merges, scores, path: Path):
    """(tokenizer, token list): sentencepiece-style BPE, `▁` prepended to the first word, byte fallback."""
    vocab = _vocab(tokens)
    if merges is not None:
        pairs = _split_merges(merges, vocab, path)
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise CheckpointError(f"{path}: sentencepiece GGUF tokenizer has neither tokenizer.ggml.merges nor .scores")
    unk = next((t for t in ("<unk>",) if t in vocab), None)
    backend = Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend, tokens


def _add_marked_tokens(backend: Tokenizer, tokens: list[str], types: list[int], spelled: list[str]) -> None:
    """Control tokens (`<|im_end|>`) become special added tokens and user-defined ones (`<think>`) plain added
    tokens, so text containing them is never cut into pieces. A byte-level token marked control but spelled outside
    the byte alphabet is a converter's mislabel and stays an ordinary token (`spelled` differs from the original)."""
    control = [AddedToken(t, normalized=False, special=True)
               for t, s, kind in zip(tokens, spelled, types) if kind == CONTROL and t == s]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _bos_eos_template(backend: Tokenizer, bos: str | None, eos: str | None):
    """`[bos] $A [eos]` (pairs: `[bos] $A [eos] [bos] $B:1 [eos]`) with only the markers the file asks for."""
    pre, post = ([f"{bos}"] if bos else []), ([f"{eos}"] if eos else [])
    single = [*pre, "$A:0", *post]
    pair = [*single, *pre, "$B:1", *post]
    used = {t for t in (bos, eos) if t}
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=[(t, backend.token_to_id(t)) for t in sorted(used)])


def _token(tokens: list[str], token_id, key: str, path: Path) -> str | None:
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary "
                              f"(size {len(tokens)})")
    return tokens[int(token_id)]


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice keeps its first id (the BPE model needs a one-to-one map)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _split_merges(merges: list[str], vocab: dict[str, int], path: Path) -> list[tuple[str, str]]:
    """"a b" -> ("a", "b"), checking each merge joins two vocabulary tokens into a third (the BPE model panics
    on anything else)."""
    pairs = [tuple(m.split(" ")) for m in merges]
    for merge, pair in zip(merges, pairs):
        if len(pair) != 2 or not (pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab):
            raise CheckpointError(f"{path}: tokenizer.ggml.merges entry {merge!r} is not two vocabulary tokens "
                                  "joined by a space whose concatenation is a token too")
    return pairs


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two vocabulary tokens, the merged
    token's score ranking them (higher first; ties: longer left piece, longer right piece, then file order), as
    sentencepiece's BPE applies them."""
    vocab = _vocab(tokens)
    ranked = []
    for token, score in zip(tokens, scores):
        pieces = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pieces.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(-score, -len(left), -len(right), left, right) for left, right in pieces]
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


@lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the other 68 are shifted to U+0100 and up so
    no token holds whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}
