"""Prompt rows for on-policy training (GRPO): rows -> chat-templated prompt ids, plus the seeded, per-epoch
reshuffled stream of prompts that each generation reads, fed through grain."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxswift.data.formats import iter_rows, parse_dataset_spec, resolve_path, row_media, sample_counts
from jaxswift.data.multimodal import MultimodalPrompt, messages_with_media
from jaxswift.data.pipeline import index_loader
from jaxswift.errors import ConfigError, DataError

PROMPT_FIELDS = ("prompt", "messages", "query")


@dataclasses.dataclass
class PromptRow:
    ids: list[int]
    prompt: Any  # as the row gives it (a string or messages): what reward functions receive
    columns: dict  # every other field of the row
    where: str
    images: MultimodalPrompt | None = None  # a vision-language model's prompt with images: ids, patches, M-RoPE


def prompt_messages(row: dict, where: str, system: str | None) -> tuple[Any, list[dict]]:
    """(the prompt as the row gives it, the chat messages to render): a trailing assistant turn (a reference
    answer) is not part of the prompt."""
    if not isinstance(row, dict) or not any(row.get(k) for k in PROMPT_FIELDS):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no prompt: expected a non-empty {' | '.join(PROMPT_FIELDS)} field; found {found}")
    key = next(k for k in PROMPT_FIELDS if row.get(k))
    value = row[key]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        messages = list(value)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise DataError(f"{where}: field {key!r} holds only assistant turns: no prompt")
    else:
        raise DataError(f"{where}: field {key!r} must be a string or a list of {{role, content}} messages")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return value, messages


def _fit(ids: list[int], max_length: int, truncation_strategy: str) -> list[int] | None:
    """--truncation_strategy over a prompt: delete (None: skipped), left (keep the end), right (keep the start)."""
    if len(ids) <= max_length:
        return ids
    return {"delete": None, "left": ids[-max_length:], "right": ids[:max_length]}[truncation_strategy]


def _encode(messages, row, where, tokenizer, processor, base_dir):
    """(ids, MultimodalPrompt or None): a vision-language model's processor expands images (decoded here)."""
    if processor is None:
        if any(row_media(row, where)) or any(isinstance(m["content"], list) for m in messages):
            raise DataError(f"{where}: the prompt has images or content parts; it needs a vision-language model")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False), None
    prompt = processor.encode_chat(messages_with_media(messages, row, where, "the prompt"), base_dir=base_dir,
                                    where=where)
    return list(prompt.ids), (prompt if prompt.patches else None)


def load_prompts(specs: list[str], tokenizer, *, max_length: int, system: str | None, seed: int, log,
                 truncation_strategy: str = "delete", processor=None) -> list[PromptRow]:
    """Prompt rows of every dataset (`path#N` takes N rows); prompts longer than max_length are skipped (counted)
    or truncated, as --truncation_strategy says. `processor` (a vision-language model's data/multimodal
    VLMProcessor): rows may carry images (ms-swift's `images` + `<image>` markers, or content parts), decoded and
    patchified here; such prompts are never cut (only --truncation_strategy delete)."""
    if processor is not None and truncation_strategy != "delete":
        raise ConfigError(f"--truncation_strategy {truncation_strategy}: prompts with images can only be dropped "
                          "when too long (delete); cutting them would split an image's tokens")
    rows, skipped, cut = [], 0, 0
    for spec in specs:
        path, n = parse_dataset_spec(spec)
        table = list(iter_rows(path))
        base_dir = resolve_path(path).parent if processor is not None else None
        for (where, row), count in zip(table, sample_counts(len(table), n, seed)):
            if count == 0:
                continue
            prompt, messages = prompt_messages(row, where, system)
            full, images = _encode(messages, row, where, tokenizer, processor, base_dir)
            ids = _fit(full, max_length, truncation_strategy)
            if ids is None:
                skipped += int(count)
                continue
            cut += int(count) * (len(ids) < len(full))
            columns = {k: v for k, v in row.items() if k not in PROMPT_FIELDS}
            rows += [PromptRow(ids, prompt, columns, where, images)] * int(count)
    truncated = f" ({cut} cut to --max_length, --truncation_strategy {truncation_strategy})" if cut else ""
    log(f"prompts: {len(rows)} used{truncated}, {skipped} skipped (longer than --max_length {max_length})")
    if not rows:
        raise DataError(f"--dataset {' '.join(specs)}: no usable prompt")
    return rows


@dataclasses.dataclass(frozen=True)
class PromptStream:
    """The endless stream of prompts: each epoch a seeded permutation of all rows."""

    prompts: list[PromptRow]
    seed: int

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def at(self, index: int, count: int) -> list[PromptRow]:
        """`count` prompts from position `index` of the stream."""
        out = []
        for k in range(index, index + count):
            epoch, offset = divmod(k, len(self.prompts))
            out.append(self.prompts[self.order(epoch)[offset]])
        return out

    def generations(self, per_generation: int, count: int, start: int = 0):
        """grain iterator over the prompts of generations start .. count - 1."""
        return iter(index_loader(count, lambda g: self.at(g * per_generation, per_generation), start=start))
