"""Embedding rows (ms-swift's format) -> token ids -> [b, S, T] batches of anchor, positive and hard negatives.

    {"messages": [{"role": "user", "content": "anchor"}], "positive_messages": [[{"role": "user", "content": "doc"}]],
     "negative_messages": [[...], [...]]}                                           infonce (negatives optional)
    {"messages": [...], "positive_messages": [[...]], "label": 0.8}                 cosine_similarity
    {"messages": [...], "positive_messages": [[...]], "label": 1}                   contrastive, online_contrastive (0 / 1)

`messages` is the anchor; `positive_messages` a list holding exactly one message list (ms-swift's current
constraint); `negative_messages` a list of message lists (infonce's hard negatives). A message list becomes one text
as Qwen3-Embedding's template writes it: the system content, a space, then the other messages' contents (joined by
newlines), and the tokenizer's end-of-text token last (its hidden state is what last-token pooling reads). The
server encodes an input string the same way (`encode_text`), so a trained model sees at serving time what it saw
in training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from jaxswift.data.formats import _maybe_json, row_to_messages, sampled_rows
from jaxswift.errors import ConfigError, DataError

LENGTH_MULTIPLE = 16  # batch lengths are rounded up to this, so few distinct shapes compile


@dataclasses.dataclass(frozen=True)
class EmbeddingRow:
    """One row's token ids: the anchor, its positive, its hard negatives; a label for the pair losses."""

    anchor: tuple[int, ...]
    positive: tuple[int, ...]
    negatives: tuple[tuple[int, ...], ...] = ()
    label: float | None = None
    where: str = ""


def messages_text(messages: Sequence[dict], where: str) -> str:
    """Qwen3-Embedding's rendering: "{system} {contents}" (contents of the other messages joined by newlines)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m["content"] for m in messages if m["role"] != "system"]
    if any(not isinstance(c, str) for c in system + rest):
        raise DataError(f"{where}: content parts (images) need a vision-language embedding model; give text")
    text = "\n".join(rest)
    if not text.strip():
        raise DataError(f"{where}: no text to embed (the messages' contents are empty)")
    return f"{' '.join(system)} {text}" if system else text


def end_token(tokenizer) -> int:
    """The token whose hidden state last-token pooling reads: the tokenizer's EOS (Qwen's <|endoftext|>)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token, which an embedding input ends with")
    return int(eos)


def encode_text(tokenizer, text: str) -> list[int]:
    """A text's ids as an embedding model reads them: the tokenizer's own special tokens (e.g. a BOS), then the EOS
    appended unless the tokenizer already ends the text with it."""
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    eos = end_token(tokenizer)
    return ids if ids and ids[-1] == eos else ids + [eos]


def fit_length(ids: list[int], max_length: int, strategy: str, eos: int) -> list[int] | None:
    """ids cut to max_length (the EOS kept last): None for `delete`, the text's end (`left`) or start (`right`)."""
    if len(ids) <= max_length:
        return ids
    if strategy == "delete":
        return None
    body = ids[:-1]
    keep = max_length - 1
    return (body[-keep:] if strategy == "left" else body[:keep]) + [eos]


def _message_lists(row: dict, key: str, where: str) -> list[list[dict]]:
    value = _maybe_json(row.get(key), where, key)
    if value in (None, "", []):
        return []
    if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
        raise DataError(f"{where}: field {key!r}: expected a list of message lists ([[{{role, content}}, ...]]), "
                        f"got {value!r:.80}")
    return [row_to_messages({"messages": v}, f"{where}: {key}[{k}]") for k, v in enumerate(value)]


def _label(row: dict, loss_type: str, where: str) -> float | None:
    label = row.get("label")
    if loss_type == "infonce":
        if label not in (None, ""):
            raise DataError(f"{where}: field 'label': infonce takes no label (the positive is the target); the "
                            "pair losses cosine_similarity / contrastive / online_contrastive read labels")
        return None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
        raise DataError(f"{where}: field 'label': --loss_type {loss_type} needs a number per row, got {label!r}")
    if loss_type != "cosine_similarity" and label not in (0, 1):
        raise DataError(f"{where}: field 'label': --loss_type {loss_type} takes labels 0 or 1, got {label!r}")
    return float(label)


def parse_row(row: Any, where: str, loss_type: str) -> tuple[list[dict], list[dict], list[list[dict]], float | None]:
    """(anchor, positive, negatives, label) message lists of one row, checked; a DataError names the row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
    if "messages" not in row:
        raise DataError(f"{where}: an embedding row needs 'messages' (the anchor); found keys {sorted(row)}")
    anchor = row_to_messages({"messages": row["messages"]}, where)
    positives = _message_lists(row, "positive_messages", where)
    if not positives:
        raise DataError(f"{where}: the row has no positive: 'positive_messages' must hold one message list "
                        "([[{role, content}, ...]])")
    if len(positives) != 1:
        raise DataError(f"{where}: field 'positive_messages': exactly one positive per row, got {len(positives)} "
                        "(ms-swift's rule; put other documents in negative_messages or their own rows)")
    negatives = _message_lists(row, "negative_messages", where)
    if negatives and loss_type != "infonce":
        raise DataError(f"{where}: field 'negative_messages': hard negatives are read by --loss_type infonce only; "
                        f"{loss_type} compares the anchor with its positive and the label")
    return anchor, positives[0], negatives, _label(row, loss_type, where)


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    rows: int = 0
    examples: int = 0
    skipped_too_long: int = 0
    truncated: int = 0

    def summary(self) -> str:
        text = f"{self.rows} rows -> {self.examples} examples"
        if self.truncated:
            text += f"; {self.truncated} truncated"
        if self.skipped_too_long:
            text += f"; skipped {self.skipped_too_long} longer than max_length (truncation_strategy=delete)"
        return text


def load_embedding_rows(specs: list[str], tokenizer, *, loss_type: str, max_length: int,
                        truncation_strategy: str = "delete", seed: int = 42) -> tuple[list[EmbeddingRow],
                                                                                        EmbeddingStats]:
    """Every `--dataset` spec's rows encoded; a row whose anchor, positive or a negative is over max_length is
    skipped (delete, counted) or cut (left / right)."""
    eos = end_token(tokenizer)
    out: list[EmbeddingRow] = []
    rows = skipped = truncated = 0
    for where, row, times in sampled_rows(specs, seed):
        rows += times
        anchor, positive, negatives, label = parse_row(row, where, loss_type)
        full = [encode_text(tokenizer, messages_text(m, where)) for m in (anchor, positive, *negatives)]
        kept = [fit_length(ids, max_length, truncation_strategy, eos) for ids in full]
        if any(ids is None for ids in kept):
            skipped += times
            continue
        truncated += times * any(len(a) != len(b) for a, b in zip(kept, full))
        example = EmbeddingRow(tuple(kept[0]), tuple(kept[1]), tuple(tuple(x) for x in kept[2:]), label, where)
        out.extend([example] * times)
    return out, EmbeddingStats(rows, len(out), skipped, truncated)


def fix_negatives(rows: list[EmbeddingRow], count: int, seed: int) -> list[EmbeddingRow]:
    """INFONCE_HARD_NEGATIVES: every row's negatives made exactly `count` — the first `count` kept, or, with fewer,
    drawn again at random (with replacement, seeded) from the row's own, as ms-swift does. A row without negatives
    cannot be filled: a DataError names it."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        if not r.negatives:
            raise DataError(f"{r.where}: --infonce_hard_negatives {count} needs negative_messages in every row; "
                            "this row has none")
        extra = rng.choice(len(r.negatives), size=max(count - len(r.negatives), 0), replace=True)
        negatives = r.negatives[:count] + tuple(r.negatives[i] for i in extra)
        out.append(dataclasses.replace(r, negatives=negatives))
    return out


def sequences_per_row(rows: Sequence[EmbeddingRow]) -> int:
    """S: anchor + positive + the most hard negatives any row has (rows with fewer are padded, masked)."""
    return 2 + max((len(r.negatives) for r in rows), default=0)


def batch_length(rows: Sequence[EmbeddingRow], max_length: int) -> int:
    longest = max(len(s) for r in rows for s in (r.anchor, r.positive, *r.negatives))
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_length)


def assemble_embedding_batch(rows: Sequence[EmbeddingRow], seqs: int, length: int) -> dict[str, np.ndarray]:
    """{tokens, segment_ids: [b, S, T], doc_mask: [b, S], labels: [b, 1]}: row i's sequence 0 is the anchor, 1 its
    positive, 2.. its hard negatives, right-padded (segment 0); doc_mask is False for the missing negatives."""
    b = len(rows)
    tokens = np.zeros((b, seqs, length), np.int32)
    segments = np.zeros((b, seqs, length), np.int32)
    doc_mask = np.zeros((b, seqs), bool)
    labels = np.zeros((b, 1), np.float32)
    for i, r in enumerate(rows):
        for j, ids in enumerate((r.anchor, r.positive, *r.negatives)):
            tokens[i, j, :len(ids)] = ids
            segments[i, j, :len(ids)] = 1
            doc_mask[i, j] = True
        labels[i, 0] = 0.0 if r.label is None else r.label
    return {"tokens": tokens, "segment_ids": segments, "doc_mask": doc_mask, "labels": labels}
