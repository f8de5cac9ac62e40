"""Chat rendering with the tokenizer's own jinja template, and the loss mask over assistant replies.

The mask is found without knowing the template family: the full chat is rendered and tokenized once (so the ids are
exactly those of the full text), and each assistant reply's character span is located by rendering prefixes —
`messages[:i]` with the generation prompt ends where reply i starts, `messages[:i+1]` ends where it stops. Tokens
overlapping that span are trained on, up to and including the turn's end-of-turn special token (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`, `</s>`, ...); whatever the template writes after it (a newline) is not.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxswift.errors import ConfigError, DataError

LOSS_SCALES = ("default", "last_round", "all")
TRUNCATION_STRATEGIES = ("delete", "left", "right")


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation: `input_ids` int32 [T], `loss_mask` bool [T] (True = train on this token)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
            raise ValueError(f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def render_chat(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False, tools=None) -> str:
    """The chat as text, exactly as the tokenizer's jinja chat template writes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
                          "SFT on chat data needs one (set tokenizer.chat_template)")
    return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def with_system(messages: Sequence[dict], system: str | None) -> list[dict]:
    """`system` replaces the conversation's system message, or is inserted first when it has none."""
    messages = list(messages)
    if system is None:
        return messages
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": system}] + messages[1:]
    return [{"role": "system", "content": system}] + messages


def encode_chat(tokenizer, messages: Sequence[dict], *, loss_scale: str = "default", system: str | None = None,
                tools=None) -> EncodedChat:
    """Tokenize the rendered chat and mark the tokens the loss is taken over (see `LOSS_SCALES`)."""
    if loss_scale not in LOSS_SCALES:
        raise ConfigError(f"loss_scale={loss_scale!r}; expected one of {', '.join(LOSS_SCALES)}")
    messages = with_system(messages, system)
    text = render_chat(tokenizer, messages, tools=tools)
    if tools:
        _check_tools_rendered(tokenizer, messages, tools, text)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    mask = _loss_mask(tokenizer, messages, tools, text, ids, offsets, loss_scale)
    return EncodedChat(input_ids=np.asarray(ids, dtype=np.int32), loss_mask=mask)


def _loss_mask(tokenizer, messages, tools, text: str, ids, offsets, loss_scale: str) -> np.ndarray:
    if loss_scale == "all":
        return np.ones(len(ids), dtype=bool)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if loss_scale == "last_round":
        turns = turns[-1:]
    mask, cursor, special = np.zeros(len(ids), dtype=bool), 0, _special_ids(tokenizer)
    for i in turns:
        span = _reply_span(tokenizer, messages, i, tools, text, cursor)
        mask |= _reply_token_mask(ids, offsets, text, span, special)
        cursor = span[1]
    return mask


def truncate(encoded: EncodedChat, max_length: int, strategy: str) -> EncodedChat | None:
    """Fit into `max_length` tokens: `delete` -> None (the caller counts it), `left` keeps the last tokens,
    `right` the first."""
    if strategy not in TRUNCATION_STRATEGIES:
        raise ConfigError(f"truncation_strategy={strategy!r}; expected one of {', '.join(TRUNCATION_STRATEGIES)}")
    if max_length <= 0:
        raise ConfigError(f"max_length={max_length}; expected a positive number of tokens")
    if len(encoded) <= max_length:
        return encoded
    if strategy == "delete":
        return None
    keep = slice(len(encoded) - max_length, None) if strategy == "left" else slice(0, max_length)
    return EncodedChat(input_ids=encoded.input_ids[keep], loss_mask=encoded.loss_mask[keep])


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    # No add_special_tokens: the template writes BOS itself when the model wants one (as apply_chat_template does).
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("loss masks need a fast (Rust `tokenizers`) tokenizer for character offsets")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _special_ids(tokenizer) -> frozenset[int]:
    # all_special_ids misses added specials such as Llama-3's <|eot_id|>; added_tokens_decoder has them all.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def _reply_span(tokenizer, messages, i: int, tools, text: str, cursor: int) -> tuple[int, int, bool]:
    """Character span [start, end) of assistant turn i in `text`, found by rendering prefixes of the chat; the flag
    says whether the span runs through the end of the turn (True) or stops at the reply text (False)."""
    before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
    through = render_chat(tokenizer, messages[: i + 1], tools=tools)
    content = (messages[i].get("content") or "").strip()
    start = len(before) if i and text.startswith(before) else None
    if start is None:  # the template renders the generation prompt differently from a stored turn
        start = _find_content(text, content, cursor, i)
    if text.startswith(through) and len(through) > start:
        return start, len(through), True
    # Not prefix-stable (e.g. Qwen3 rewrites earlier turns): end at the reply text; the caller adds the end-of-turn.
    return start, _find_content(text, content, start, i) + len(content), False


def _find_content(text: str, content: str, cursor: int, i: int) -> int:
    at = text.find(content, cursor)
    if at < 0 or not content:
        raise DataError(f"messages[{i}]: cannot locate this assistant reply in the rendered chat; the chat template "
                        "rewrites reply text, so its loss mask cannot be derived (use loss_scale='all')")
    return at


def _reply_token_mask(ids, offsets, text: str, span: tuple[int, int, bool], special: frozenset[int]) -> np.ndarray:
    """Tokens overlapping the span, through its end-of-turn token: the last special token of a whole-turn span
    (anything after it, like ChatML's newline, is template glue), else the first special token that follows."""
    start, end, whole_turn = span
    mask = np.zeros(len(ids), dtype=bool)
    # A token straddling the span's start (a merge across the header) is kept: predicting it emits reply text.
    inside = [t for t, (s, e) in enumerate(offsets) if s < end and (e > start or s == e >= start)]
    if not inside:
        return mask
    ends = [t for t in inside if ids[t] in special] if whole_turn else []
    last = ends[-1] if ends else _next_special(ids, offsets, text, inside[-1], special)
    mask[inside[0]: last + 1] = True
    return mask


def _next_special(ids, offsets, text: str, t: int, special: frozenset[int]) -> int:
    """The first special token after token t, skipping whitespace only (Llama-2 writes ' </s>'); else t itself."""
    for u in range(t + 1, len(ids)):
        if ids[u] in special:
            return u
        s, e = offsets[u]
        if text[s:e].strip():
            break
    return t


def _check_tools_rendered(tokenizer, messages, tools, text: str) -> None:
    # A template without tool support silently ignores `tools`; training would then never see them.
    if render_chat(tokenizer, messages) == text:
        raise DataError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} ignores "
                        "`tools`; the row's tool definitions would be dropped")


__all__ = ["EncodedChat", "render_chat", "encode_chat", "truncate", "with_system", "LOSS_SCALES",
           "TRUNCATION_STRATEGIES"]
