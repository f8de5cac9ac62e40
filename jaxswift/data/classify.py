"""Rows for sequence classification and reranking, in ms-swift's formats, encoded for training.

seq_cls:   {"messages": [...], "label": 1}          an int class, a float (regression), a list of ints (multi-label)
reranker:  {"messages": [{"role": "user", "content": QUERY}],
            "positive_messages": [[{"role": "assistant", "content": DOC}], ...],
            "negative_messages": [[{"role": "assistant", "content": DOC}], ...]}

A chat is rendered by the model's chat template, with the assistant prompt appended when it does not end with an
assistant turn (the model reads its last token, as ms-swift encodes a query without response). Reranker documents
are appended to the query's messages, one sequence per document, as ms-swift's `_reranker_encode` does; a row
becomes one group per positive (up to `max_positives`) with up to `max_negatives` sampled negatives (ms-swift's
MAX_POSITIVE_SAMPLES / MAX_NEGATIVE_SAMPLES, 1 and 7). Sampling is seeded and done once, when the data is read.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterator

import numpy as np

from jaxswift.data.formats import DatasetStats, row_to_messages, sampled_rows
from jaxswift.data.templates import EncodedChat, render_chat, truncate, with_system
from jaxswift.errors import DataError

SKIP_TOO_LONG = "longer than max_length (truncation_strategy=delete)"
SKIP_NO_NEGATIVE = "without a negative (listwise groups need one)"


@dataclasses.dataclass(frozen=True)
class LabelledSequence:
    input_ids: np.ndarray  # int32 [T]
    label: np.ndarray  # float32 [C]: one-hot (single label), multi-hot (multi-label) or the regression targets

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class RerankGroup:
    """One query's documents as sequences: the positive first, then its negatives."""

    sequences: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return max(len(s) for s in self.sequences)


def encode_messages(tokenizer, messages: list[dict], *, system: str | None = None) -> np.ndarray:
    """int32 token ids of a chat as the classifier reads it (assistant prompt added unless it ends with a reply)."""
    messages = with_system(messages, system)
    text = render_chat(tokenizer, messages, add_generation_prompt=messages[-1]["role"] != "assistant")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def _fit(ids: np.ndarray, max_length: int, strategy: str) -> np.ndarray | None:
    kept = truncate(EncodedChat(ids, np.zeros(len(ids), bool)), max_length, strategy)
    return None if kept is None else kept.input_ids


# ------------------------------------------------------------------------------------------------------ labels


def parse_label(value, where: str, num_labels: int, problem_type: str) -> np.ndarray:
    """The row's `label` as a float32 [C] target, checked against --num_labels / --problem_type."""
    if problem_type == "regression":
        values = value if isinstance(value, list) else [value]
        if len(values) != num_labels or not all(_is_number(v) for v in values):
            raise DataError(f"{where}: field 'label': regression with --num_labels {num_labels} expects "
                            f"{'a number' if num_labels == 1 else f'a list of {num_labels} numbers'}, got {value!r}")
        return np.asarray(values, np.float32)
    classes = value if problem_type == "multi_label_classification" and isinstance(value, list) else [value]
    if problem_type == "single_label_classification" and isinstance(value, list):
        raise DataError(f"{where}: field 'label': single-label classification expects one class index, got a list "
                        f"{value!r} (use --problem_type multi_label_classification)")
    target = np.zeros(num_labels, np.float32)
    for c in classes:
        if not _is_class_index(c):
            raise DataError(f"{where}: field 'label': expected an integer class index in [0, {num_labels}), got "
                            f"{c!r}" + (" (a float label is regression: --num_labels 1)" if _is_number(c) else ""))
        if not 0 <= int(c) < num_labels:
            raise DataError(f"{where}: field 'label': class {int(c)} is outside --num_labels {num_labels} "
                            f"(classes are 0 .. {num_labels - 1})")
        target[int(c)] = 1.0
    return target


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_class_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------------ reading


def _rows(specs: list[str], seed: int) -> Iterator[tuple[str, dict]]:
    """(where, row) of every --dataset spec, `path#N` sampled as the SFT reader samples it."""
    for where, row, times in sampled_rows(specs, seed):
        for _ in range(times):
            yield where, row


def _stats(n_rows: int, examples: list, tally: collections.Counter) -> DatasetStats:
    seqs = [e.sequences if isinstance(e, RerankGroup) else (e.input_ids,) for e in examples]
    skipped = tuple((reason, n) for reason, n in tally.items() if reason != "truncated")
    # the loss reads one token per sequence (its last)
    return DatasetStats(rows=n_rows, examples=len(examples), tokens=sum(len(s) for g in seqs for s in g),
                        loss_tokens=sum(len(g) for g in seqs),
                        truncated=tally["truncated"], skipped=skipped)


def read_seq_cls_rows(specs: list[str], tokenizer, *, num_labels: int, problem_type: str, max_length: int,
                      truncation_strategy: str = "delete", system: str | None = None,
                      seed: int = 42) -> tuple[list[LabelledSequence], DatasetStats]:
    """Every --dataset row -> (token ids, label target); a bad label is an error naming its file and line."""
    examples, tally, n_rows = [], collections.Counter(), 0
    for where, row in _rows(specs, seed):
        n_rows += 1
        messages = row_to_messages(row, where)
        if "label" not in row or row["label"] is None:
            raise DataError(f"{where}: no 'label' field (seq_cls rows are chats with a label: an int class, a "
                            f"float for regression, or a list of classes for multi-label)")
        label = parse_label(row["label"], where, num_labels, problem_type)
        full = encode_messages(tokenizer, messages, system=system)
        ids = _fit(full, max_length, truncation_strategy)
        if ids is None:
            tally[SKIP_TOO_LONG] += 1
            continue
        tally["truncated"] += len(ids) < len(full)
        examples.append(LabelledSequence(ids, label))
    return examples, _stats(n_rows, examples, tally)


def _documents(row: dict, key: str, where: str) -> list[list[dict]]:
    docs = row.get(key)
    if docs in (None, ""):
        return []
    if not isinstance(docs, list) or not all(isinstance(d, list) for d in docs):
        raise DataError(f"{where}: field {key!r}: expected a list of message lists "
                        f"([[{{\"role\": \"assistant\", \"content\": ...}}], ...])")
    return [row_to_messages({"messages": d}, f"{where}: {key}[{i}]") for i, d in enumerate(docs)]


def read_rerank_rows(specs: list[str], tokenizer, *, max_length: int, truncation_strategy: str = "delete",
                     system: str | None = None, max_positives: int = 1, max_negatives: int = 7,
                     need_negatives: bool = False, seed: int = 42) -> tuple[list[RerankGroup], DatasetStats]:
    """Reranker rows -> groups (one per sampled positive, each with its sampled negatives)."""
    rng = np.random.default_rng(seed)
    groups, tally, n_rows = [], collections.Counter(), 0
    for where, row in _rows(specs, seed):
        n_rows += 1
        query = row_to_messages(row, where)
        positives = _documents(row, "positive_messages", where)
        negatives = _documents(row, "negative_messages", where)
        if not positives:
            raise DataError(f"{where}: no 'positive_messages' (a reranker row needs at least one relevant document: "
                            f"[[{{\"role\": \"assistant\", \"content\": ...}}]])")
        if need_negatives and not negatives:
            tally[SKIP_NO_NEGATIVE] += 1
            continue
        picked_neg = [negatives[i] for i in sorted(rng.choice(len(negatives), min(len(negatives), max_negatives),
                                                              replace=False))]
        for p in rng.choice(len(positives), min(len(positives), max_positives), replace=False):
            seqs = [_fit(encode_messages(tokenizer, query + doc, system=system), max_length, truncation_strategy)
                    for doc in [positives[p], *picked_neg]]
            if seqs[0] is None:  # no positive left: the group has nothing to learn
                tally[SKIP_TOO_LONG] += 1
                continue
            tally[SKIP_TOO_LONG] += sum(s is None for s in seqs)
            groups.append(RerankGroup(tuple(s for s in seqs if s is not None)))
    return groups, _stats(n_rows, groups, tally)
