"""Preference rows -> encoded items, and the batch layout that keeps an item's sequences together in one row.

An item is what one loss term reads: a pair (chosen, rejected) for DPO, CPO, SimPO, ORPO and reward models, or a
labelled completion for KTO (with its mismatched "KL" sequence: this prompt, the previous example's reply).

Row formats, told apart by their keys (strings are chat turns: a prompt string is the user's message, a reply string
the assistant's; lists are {role, content} messages):
  ms-swift  {"messages": [..., {"role": "assistant", "content": CHOSEN}], "rejected_response": "REJECTED"}
            (any SFT row format works in place of `messages`: conversations, query/response, instruction/output)
  TRL       {"chosen": [messages], "rejected": [messages]}     two whole chats with the same prompt
            {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}
  KTO       {"messages": [...], "label": true}   or   {"prompt": ..., "completion": ..., "label": false}
For KTO a pair row gives one desirable and one undesirable example (as TRL's KTOTrainer unpairs it).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from typing import Any, Sequence

import numpy as np

from jaxswift.data.formats import (SKIP_NO_LOSS, SKIP_TOO_LONG, DatasetStats, _message, _present, _text, count_rows,
                                   iter_rows, parse_dataset_spec, row_media, row_to_messages, sample_counts)
from jaxswift.data.packing import Batch, empty_batch, write_row
from jaxswift.data.templates import EncodedChat, encode_chat, truncate
from jaxswift.errors import ConfigError, DataError

SKIP_EMPTY_REPLY = "with an empty chosen, rejected or KTO reply"
REJECTED_MEDIA_KEYS = ("rejected_images", "rejected_videos")
PAIR_KEYS = ("rejected_response", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """A parsed row: the prompt messages and the reply messages (each ends with the assistant's turn)."""

    where: str
    prompt: list[dict]
    chosen: list[dict]  # KTO: the completion
    rejected: list[dict] | None = None
    label: bool | None = None  # KTO: desirable?


@dataclasses.dataclass(frozen=True)
class PreferenceItem:
    """Sequences laid out as consecutive segments of one row: (chosen, rejected), (completion, KL) or (completion,)."""

    sequences: tuple[EncodedChat, ...]
    label: bool = True

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)


# ---------------------------------------------------------------- rows -> PreferenceRow


def parse_preference_row(row: Any, where: str, *, kto: bool) -> list[PreferenceRow]:
    """The row's pair (or, for KTO, its labelled completions: two when the row is a pair)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
    is_pair = any(_present(row, k) for k in PAIR_KEYS)
    if _present(row, "rejected_messages"):
        raise DataError(f"{where}: ms-swift's 'rejected_messages' (a rejected chat with its own prompt) is not "
                        "supported; give the rejected reply as 'rejected_response' (and 'rejected_images' when the "
                        "rejected side shows other pictures), or 'chosen' and 'rejected' chats with one prompt")
    if not kto:
        if is_pair:
            return [_pair(row, where)]
        if "label" in row:
            raise DataError(f"{where}: an unpaired KTO row (it has a 'label'); pairs need a rejected response "
                            "('rejected_response', or 'chosen' and 'rejected'), or use --rlhf_type kto")
        raise DataError(f"{where}: row has no rejected response; expected 'rejected_response' next to the chat, or "
                        f"'chosen' and 'rejected'; found keys {sorted(row)}")
    if is_pair and "label" not in row:
        pair = _pair(row, where)
        return [PreferenceRow(where, pair.prompt, pair.chosen, label=True),
                PreferenceRow(where, pair.prompt, pair.rejected, label=False)]
    if "label" not in row:
        raise DataError(f"{where}: KTO row without a 'label' (true for a desirable reply, false for an undesirable "
                        f"one); found keys {sorted(row)}")
    return [_kto(row, where)]


def _present_any(row, keys) -> bool:
    return isinstance(row, dict) and any(_present(row, k) for k in keys)


def _pair(row: dict, where: str) -> PreferenceRow:
    if _present(row, "rejected_response"):
        chat = row_to_messages({k: v for k, v in row.items() if k not in ("rejected_response", "label")}, where)
        prompt, chosen = _split_reply(chat, where, "messages")
        rejected = [{"role": "assistant", "content": _text(row["rejected_response"], where, "rejected_response")}]
        return PreferenceRow(where, prompt, chosen, rejected)
    missing = [k for k in ("chosen", "rejected") if not _present(row, k)]
    if missing:
        raise DataError(f"{where}: row has {'chosen' if missing == ['rejected'] else 'rejected'} but no "
                        f"{missing[0]!r}; a pair needs both")
    if _present(row, "prompt"):
        prompt = _as_prompt(row["prompt"], where)
        chosen, rejected = _as_reply(row["chosen"], where, "chosen"), _as_reply(row["rejected"], where, "rejected")
    else:
        prompt, chosen = _split_reply(_as_chat(row["chosen"], where, "chosen"), where, "chosen")
        other, rejected = _split_reply(_as_chat(row["rejected"], where, "rejected"), where, "rejected")
        if other != prompt:
            k = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
            raise DataError(f"{where}: 'chosen' and 'rejected' have different prompts (they first differ at message "
                            f"{k}); a pair must answer the same prompt")
    return PreferenceRow(where, _with_system(prompt, row, where), chosen, rejected)


def _kto(row: dict, where: str) -> PreferenceRow:
    label = _label(row["label"], where)
    if _present(row, "completion"):
        prompt = _as_prompt(row["prompt"], where) if _present(row, "prompt") else []
        return PreferenceRow(where, _with_system(prompt, row, where), _as_reply(row["completion"], where,
                                                                               "completion"), label=label)
    chat = row_to_messages({k: v for k, v in row.items() if k != "label"}, where)
    prompt, completion = _split_reply(chat, where, "messages")
    return PreferenceRow(where, prompt, completion, label=label)


def _label(value: Any, where: str) -> bool:
    # CSV gives strings, Parquet may give 0/1.
    known = {True: True, False: False, "true": True, "false": False, "True": True, "False": False, 1: True, 0: False}
    if isinstance(value, (bool, int, str)) and value in known:
        return known[value]
    raise DataError(f"{where}: field 'label': expected true or false, got {value!r}")


def _json_list(value: Any) -> Any:
    """A JSON-encoded message list (CSV and some hub files store them so); any other string stays text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _as_prompt(value: Any, where: str) -> list[dict]:
    value = _json_list(value)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, where, "prompt")


def _as_reply(value: Any, where: str, field: str) -> list[dict]:
    value = _json_list(value)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, where, field)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r}: expected the assistant's reply, got roles "
                        f"{[m['role'] for m in messages]}")
    return messages


def _as_chat(value: Any, where: str, field: str) -> list[dict]:
    value = _json_list(value)
    if isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a plain string, so the row needs a 'prompt' too (or give "
                        f"{field!r} as a whole chat: a list of messages)")
    return _messages(value, where, field)


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field {field!r}: expected a string or a list of {{role, content}} messages, got "
                        f"{type(value).__name__}")
    return [_message(m, where, f"{field}[{k}]", "role", "content", None) for k, m in enumerate(value)]


def _split_reply(messages: list[dict], where: str, field: str) -> tuple[list[dict], list[dict]]:
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise DataError(f"{where}: field {field!r}: the last message must be the assistant's reply, got {last}")
    return messages[:-1], messages[-1:]


def _with_system(prompt: list[dict], row: dict, where: str) -> list[dict]:
    if not _present(row, "system"):
        return prompt
    if prompt and prompt[0]["role"] == "system":
        raise DataError(f"{where}: row has both a 'system' field and a system message; keep one")
    return [{"role": "system", "content": _text(row["system"], where, "system")}] + prompt


# ---------------------------------------------------------------- PreferenceRow -> PreferenceItem


def read_preference_rows(specs: list[str], *, kto: bool, seed: int) -> list[PreferenceRow]:
    """Every row of every `--dataset` spec (`path#N` samples N rows), parsed."""
    if not specs:
        raise ConfigError("--dataset: no dataset given")
    rows: list[PreferenceRow] = []
    for k, spec in enumerate(specs):
        path, n = parse_dataset_spec(spec)
        counts = itertools.repeat(1) if n is None else sample_counts(count_rows(path), n, seed + k)
        for (where, row), times in zip(iter_rows(path), counts):
            if isinstance(row, dict) and any(row_media(row, where)) or _present_any(row, REJECTED_MEDIA_KEYS):
                raise DataError(f"{where}: the row has images or videos; it needs a vision-language model")
            if times:
                rows.extend(parse_preference_row(row, where, kto=kto) * int(times))
    return rows


def build_preference_items(specs: list[str], tokenizer, *, kto: bool, kl_sequences: bool = True,
                           max_length: int, truncation_strategy: str = "delete", loss_scale: str = "last_round",
                           system: str | None = None, seed: int = 42) -> tuple[list[PreferenceItem], DatasetStats]:
    """Read, encode and truncate; a row whose chosen or rejected side is skipped is skipped whole (and counted).

    The scored tokens (loss mask) are the final assistant reply's with loss_scale `last_round`: what TRL calls the
    completion, through its end-of-turn token.
    """
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer, which preference training needs to encode chats")
    encode = _Encoder(tokenizer, max_length, truncation_strategy, loss_scale, system)
    tally: collections.Counter = collections.Counter()
    kept: list[tuple[PreferenceRow, tuple[EncodedChat, ...]]] = []
    for row in read_preference_rows(specs, kto=kto, seed=seed):
        replies = [row.chosen] + ([row.rejected] if row.rejected is not None else [])
        outcomes = [encode(row.prompt + reply, row.where) for reply in replies]
        skipped = next((why for enc, why in outcomes if enc is None), None)
        tally[skipped or ("truncated" if "truncated" in [w for _, w in outcomes] else "kept")] += 1
        if skipped is None:
            kept.append((row, tuple(enc for enc, _ in outcomes)))
    if kto and kl_sequences:
        items = _with_kl_sequences(kept, encode)
    else:
        items = [PreferenceItem(seqs, True if row.label is None else row.label) for row, seqs in kept]
    return items, _stats(items, tally)


class _Encoder:
    def __init__(self, tokenizer, max_length, truncation_strategy, loss_scale, system):
        self.tokenizer, self.max_length, self.strategy = tokenizer, max_length, truncation_strategy
        self.loss_scale, self.system = loss_scale, system

    def __call__(self, messages: list[dict], where: str, strategy: str | None = None):
        """(encoded or None, outcome): "kept", "truncated" or a skip reason."""
        reply = messages[-1]
        if not (reply.get("content") or "").strip() and not reply.get("tool_calls"):
            return None, SKIP_EMPTY_REPLY
        try:
            full = encode_chat(self.tokenizer, messages, loss_scale=self.loss_scale, system=self.system)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        enc = truncate(full, self.max_length, strategy or self.strategy)
        if enc is None:
            return None, SKIP_TOO_LONG
        if not enc.loss_mask.any():
            return None, SKIP_NO_LOSS
        return enc, "truncated" if len(enc) < len(full) else "kept"


def _with_kl_sequences(kept, encode: _Encoder) -> list[PreferenceItem]:
    """KTO's KL reference point reads mismatched pairs: prompt i with the reply of example i-1 (TRL cycles the
    completions of a batch the same way). Too long ones are cut, never dropped: they only estimate a mean."""
    items = []
    for i, (row, (completion,)) in enumerate(kept):
        previous = kept[i - 1][0]
        strategy = "right" if encode.strategy == "delete" else None
        kl, _ = encode(row.prompt + previous.chosen, row.where, strategy)
        if kl is None:  # an empty reply cannot reach here; no scored token left: score nothing
            kl = EncodedChat(completion.input_ids[:1], np.zeros(1, dtype=bool))
        items.append(PreferenceItem((completion, kl), row.label))
    return items


def _stats(items: list[PreferenceItem], tally: collections.Counter) -> DatasetStats:
    skipped = tuple((reason, n) for reason, n in tally.items() if reason not in ("kept", "truncated"))
    seqs = [s for item in items for s in item.sequences]
    return DatasetStats(rows=sum(tally.values()), examples=len(items), tokens=sum(len(s) for s in seqs),
                        loss_tokens=sum(int(s.loss_mask.sum()) for s in seqs), truncated=tally["truncated"],
                        skipped=skipped)


# ---------------------------------------------------------------- the batch


def max_items_per_row(lengths: Sequence[int], length: int) -> int:
    """The most items any row of `length` tokens can hold (the shortest ones, end to end): a static bound, so
    per-item arrays keep one shape for the whole run."""
    total, count = 0, 0
    for n in sorted(lengths):
        if total + n > length:
            break
        total, count = total + n, count + 1
    return max(count, 1)


def assemble_items(items: Sequence[PreferenceItem], rows: Sequence[Sequence[int]], length: int, num_rows: int,
                   items_per_row: int, ref_logps: np.ndarray | None = None) -> Batch:
    """The SFT batch arrays ([R, T]; item k's sequences are segments k*S+1 .. k*S+S of its row) plus
      item_mask  [R, I]     1.0 where slot k of the row holds an item
      labels     [R, I]     KTO: 1.0 for a desirable completion
      ref_logps  [R, I, S]  the reference's sequence log-probs, when precomputed (`ref_logps[item]`)
    """
    first = next((r[0] for r in rows if r), None)  # rows may be empty (the fill of an epoch's last step)
    S = len(items[first].sequences) if first is not None else 1
    batch = empty_batch(num_rows, length)
    batch["item_mask"] = np.zeros((num_rows, items_per_row), np.float32)
    batch["labels"] = np.zeros((num_rows, items_per_row), np.float32)
    if ref_logps is not None:
        batch["ref_logps"] = np.zeros((num_rows, items_per_row, S), np.float32)
    for r, members in enumerate(rows):
        if len(members) > items_per_row or sum(len(items[i]) for i in members) > length:
            raise DataError(f"row {r}: {len(members)} items of {sum(len(items[i]) for i in members)} tokens do not "
                            f"fit {items_per_row} slots of a {length}-token row")
        write_row(batch, r, [s for i in members for s in items[i].sequences])
        for k, i in enumerate(members):
            batch["item_mask"][r, k] = 1.0
            batch["labels"][r, k] = float(items[i].label)
            if ref_logps is not None:
                batch["ref_logps"][r, k] = ref_logps[i]
    return batch
