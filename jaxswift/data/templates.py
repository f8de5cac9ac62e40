"""Chat rendering with the tokenizer's own jinja template, and the loss mask over assistant replies.

The mask is found without knowing the template family: the full chat is rendered and tokenized once (so the ids are
exactly those of the full text), and each assistant reply's character span is located by rendering prefixes —
`messages[:i]` with the generation prompt ends where reply i starts, `messages[:i+1]` ends where it stops. Tokens
overlapping that span are trained on, up to and including the turn's end-of-turn special token (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`, `</s>`, ...); whatever the template writes after it (a newline) is not.

Tool traffic (`tools`, assistant `tool_calls`, `role: tool` results) is rendered by the template when it knows tools,
else Hermes-style by data/tools.py (the server's rendering). `loss_scale` is ms-swift's: a base strategy
(`default`, `last_round`, `all`) optionally followed by `+`-joined pattern tables that weight parts of each trained
reply (`hermes`: tool calls x2; `react`; `ignore_empty_think`, ...): the loss then carries float weights per token,
not only a 0/1 mask. Tool results are never trained on, whatever the strategy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from jaxswift.data.tools import has_tool_traffic, normalize_tool_calls, render_hermes, template_handles_tools
from jaxswift.errors import ConfigError, DataError

BASE_LOSS_SCALES = ("default", "last_round", "all")
TRUNCATION_STRATEGIES = ("delete", "left", "right")

# ms-swift's pattern loss scales (swift/loss_scale/config/*.json), applied to the text of every trained assistant
# turn. A `regex` table weights the text each pattern matches (the rest keeps 1.0); a `delimiters` table weights
# each delimiter and, separately, the text from it to the next delimiter (the text before the first keeps 1.0).
PATTERN_LOSS_SCALES: dict[str, tuple[str, dict]] = {
    "hermes": ("regex", {r"<tool_call>.+?</tool_call>": 2.0}),
    "react": ("delimiters", {"Action:": (2.0, 2.0), "Action Input:": (2.0, 2.0), "Thought:": (1.0, 1.0),
                             "Final Answer:": (1.0, 1.0), "Observation:": (2.0, 0.0)}),
    "ignore_empty_think": ("regex", {
        r"^<think>\s*</think>\s*": 0.0,
        r"^<seed:think><seed:cot_budget_reflect>The current thinking budget is 0, so I will directly start "
        r"answering the question\.</seed:cot_budget_reflect>\n</seed:think>\s*": 0.0,
        r"^</think>\s*": 0.0, r"^<\|channel>thought\n<channel\|>": 0.0, r"^</mm:think>\s*": 0.0}),
    "ignore_think_prefix": ("regex", {r"^<think>\n?": 0.0}),
}
# ms-swift's other names, refused by name with the reason.
REFUSED_LOSS_SCALES = {
    "qwen": "it weights Qwen-Agent's ✿FUNCTION✿ / ✿ARGS✿ text, which no jaxswift template writes (tool calls render "
            "as <tool_call> blocks: use hermes)",
    "agentflan": "its weights follow AgentFLAN's query prompts, which jaxswift does not implement",
    "alpha_umi": "it weights alpha-UMI's multi-model agent text, which jaxswift does not render",
}
LOSS_SCALES = BASE_LOSS_SCALES + tuple(PATTERN_LOSS_SCALES)


@dataclasses.dataclass(frozen=True)
class LossScale:
    """A parsed `--loss_scale`: the base strategy and the pattern tables applied in order (weights multiply)."""

    base: str
    patterns: tuple[str, ...] = ()


def parse_loss_scale(spec: str) -> LossScale:
    """`[default|last_round|all+]NAME[+NAME...]` as ms-swift writes it (`hermes`, `last_round+hermes`,
    `hermes+ignore_empty_think`); a base alone is its plain 0/1 mask."""
    usage = (f"expected [{'|'.join(BASE_LOSS_SCALES)}+]NAME[+NAME...] with NAME one of "
             f"{', '.join(PATTERN_LOSS_SCALES)} (or a base alone)")
    parts = spec.split("+") if isinstance(spec, str) else [spec]
    base, names = (parts[0], parts[1:]) if parts[0] in BASE_LOSS_SCALES else ("default", parts)
    for name in names:
        if name in REFUSED_LOSS_SCALES:
            raise ConfigError(f"loss_scale={spec!r}: {name!r} is not supported: {REFUSED_LOSS_SCALES[name]}")
        if name not in PATTERN_LOSS_SCALES:
            raise ConfigError(f"loss_scale={spec!r}: unknown {name!r}; {usage}")
    return LossScale(base, tuple(names))


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation: `input_ids` int32 [T], `loss_mask` bool [T] (True = train on this token), and
    `loss_weights` float32 [T] when a pattern loss scale weighs tokens other than 1 (nonzero exactly on the mask)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    loss_weights: np.ndarray | None = None

    def __post_init__(self):
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
            raise ValueError(f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")
        if self.loss_weights is not None and self.loss_weights.shape != self.loss_mask.shape:
            raise ValueError(f"loss_weights {self.loss_weights.shape} must match loss_mask {self.loss_mask.shape}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def weights(self) -> np.ndarray:
        """The per-token loss weight, float32 [T]: `loss_weights`, or the mask as 0/1."""
        return self.loss_mask.astype(np.float32) if self.loss_weights is None else self.loss_weights


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


def chat_for_template(tokenizer, messages: Sequence[dict], tools=None) -> tuple[list[dict], list | None]:
    """(messages, tools) as the template is given them: tool calls normalized (arguments as objects); for a template
    without tool support, the tool traffic spelled out Hermes-style in the messages (data/tools.py)."""
    messages = list(messages)
    if not has_tool_traffic(messages, tools):
        return messages, tools
    messages = normalize_tool_calls(messages)
    if template_handles_tools(tokenizer):
        return messages, tools or None
    return render_hermes(messages, tools or None), None


def encode_chat(tokenizer, messages: Sequence[dict], *, loss_scale: str = "default", system: str | None = None,
                tools=None) -> EncodedChat:
    """Tokenize the rendered chat and weigh the tokens the loss is taken over (see `parse_loss_scale`)."""
    scale = parse_loss_scale(loss_scale)
    results = [m.get("content") or "" for m in messages if m.get("role") == "tool"]
    messages, tools = chat_for_template(tokenizer, with_system(messages, system), tools)
    text = render_chat(tokenizer, messages, tools=tools)
    if tools:
        _check_tools_rendered(tokenizer, messages, tools, text)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    weights = _loss_weights(tokenizer, messages, tools, text, ids, offsets, scale)
    _zero_tool_results(weights, offsets, text, results)
    binary = bool(np.isin(weights, (0.0, 1.0)).all())
    return EncodedChat(input_ids=np.asarray(ids, dtype=np.int32), loss_mask=weights > 0,
                       loss_weights=None if binary else weights)


def _trained_turns(messages, base: str) -> list[int]:
    """Assistant turns the strategy trains: all of them, or (`last_round`, as ms-swift) those after the last user
    or tool message."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if base == "last_round":
        last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "tool")), default=-1)
        turns = [i for i in turns if i > last_user]
    return turns


def _loss_weights(tokenizer, messages, tools, text: str, ids, offsets, scale: LossScale) -> np.ndarray:
    weights = np.full(len(ids), 1.0 if scale.base == "all" else 0.0, dtype=np.float32)
    if scale.base == "all" and not scale.patterns:
        return weights
    cursor, special = 0, _special_ids(tokenizer)
    for i in _trained_turns(messages, scale.base):
        span = _reply_span(tokenizer, messages, i, tools, text, cursor)
        cursor = span[1]
        tokens = _reply_tokens(ids, offsets, text, span, special)
        if tokens is None:
            continue
        first, last = tokens
        weights[first: last + 1] = _turn_weights(ids, offsets, text, span[0], first, last, special, scale.patterns)
    return weights


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
    weights = None if encoded.loss_weights is None else encoded.loss_weights[keep]
    return EncodedChat(input_ids=encoded.input_ids[keep], loss_mask=encoded.loss_mask[keep], loss_weights=weights)


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


def _reply_tokens(ids, offsets, text: str, span: tuple[int, int, bool], special: frozenset[int]):
    """(first, last) token of the reply: tokens overlapping the span, through its end-of-turn token (the last special
    token of a whole-turn span: anything after it, like ChatML's newline, is template glue; else the first special
    token that follows); None when no token overlaps."""
    start, end, whole_turn = span
    # A token straddling the span's start (a merge across the header) is kept: predicting it emits reply text.
    inside = [t for t, (s, e) in enumerate(offsets) if s < end and (e > start or s == e >= start)]
    if not inside:
        return None
    ends = [t for t in inside if ids[t] in special] if whole_turn else []
    last = ends[-1] if ends else _next_special(ids, offsets, text, inside[-1], special)
    return inside[0], last


def _turn_weights(ids, offsets, text: str, start: int, first: int, last: int, special, patterns) -> np.ndarray:
    """Weights of tokens first..last of one reply. The patterns weigh the reply's text (up to its end-of-turn token,
    which keeps 1.0, as ms-swift's template suffix does); a token takes the weight of its first non-blank character
    inside the reply (a token straddling a part's edge, like "\n<", goes with the part it starts to write)."""
    out = np.ones(last - first + 1, dtype=np.float32)
    if not patterns:
        return out
    stop = offsets[last][0] if ids[last] in special else offsets[last][1]
    chars = reply_char_weights(text[start:stop], patterns)
    for t in range(first, last + 1):
        s, e = max(offsets[t][0], start), min(offsets[t][1], stop)
        if s >= e:
            continue
        piece = text[s:e]
        s += len(piece) - len(piece.lstrip()) if piece.strip() else 0
        out[t - first] = chars[s - start]
    return out


def reply_char_weights(reply: str, patterns: Sequence[str]) -> np.ndarray:
    """Per-character weights of one reply under the pattern tables, applied in order: each splits the parts the
    previous one left (so `^` anchors at a part's start) and the weights multiply (ms-swift's ConcatLossScale)."""
    parts = [(0, len(reply), 1.0)]
    for name in patterns:
        parts = [(s + a, s + b, w * x) for s, e, w in parts for a, b, x in _split_parts(reply[s:e], name)]
    weights = np.ones(len(reply), dtype=np.float32)
    for s, e, w in parts:
        weights[s:e] = w
    return weights


def _split_parts(text: str, name: str) -> list[tuple[int, int, float]]:
    kind, table = PATTERN_LOSS_SCALES[name]
    keys = list(table)
    alternatives = keys if kind == "regex" else [re.escape(k) for k in keys]
    pattern = re.compile("|".join(f"({a})" for a in alternatives), re.DOTALL)
    parts, at, tail = [], 0, 1.0
    for match in pattern.finditer(text):
        if match.end() == match.start():
            continue
        weight = table[keys[match.lastindex - 1]]
        key_weight, next_tail = (weight, 1.0) if kind == "regex" else weight
        parts += [(at, match.start(), tail), (match.start(), match.end(), key_weight)]
        at, tail = match.end(), next_tail
    parts.append((at, len(text), tail))
    return [p for p in parts if p[1] > p[0]]


def _zero_tool_results(weights: np.ndarray, offsets, text: str, results: Sequence[str]) -> None:
    """Tool results are the environment's words, never trained on: each result's text (found in order, inside its
    `<tool_response>` block when the template writes one) gets weight 0."""
    cursor = 0
    for content in results:
        if not content:
            continue
        wrapped = f"<tool_response>\n{content}\n</tool_response>"
        at = text.find(wrapped, cursor)
        at = at + len("<tool_response>\n") if at >= 0 else text.find(content, cursor)
        if at < 0:
            continue
        end = at + len(content)
        for t, (s, e) in enumerate(offsets):
            if s < end and e > at:
                weights[t] = 0.0
        cursor = end


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


__all__ = ["EncodedChat", "LossScale", "render_chat", "encode_chat", "chat_for_template", "parse_loss_scale",
           "reply_char_weights", "truncate", "with_system", "LOSS_SCALES", "BASE_LOSS_SCALES", "PATTERN_LOSS_SCALES",
           "REFUSED_LOSS_SCALES", "TRUNCATION_STRATEGIES"]
