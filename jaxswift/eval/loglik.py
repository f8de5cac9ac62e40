"""Log-likelihood of many (context, continuation) pairs in a few jitted forward calls.

Each pair becomes one sequence (context + continuation, minus the last token) whose last len(continuation)
positions are scored. Sequences are packed into rows (segment ids keep them apart; positions restart in each), rows
into batches of a fixed token budget, and the row length, row count and scored-position count are rounded up to
buckets, so a whole evaluation compiles a handful of shapes. Only the scored positions go through the vocabulary
projection: the full [B, T, V] logits are never built.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states, logits_from_hidden

ROW_BUCKETS = (128, 256, 512, 1024, 2048, 4096)
TOKENS_PER_CALL = 8192


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None) -> tuple[list[int], list[int]]:
    """Token ids as lm-evaluation-harness makes them: trailing spaces of the context move to the continuation, the
    whole text is encoded once, and the continuation is what follows the context's own encoding. An empty context
    becomes the prefix token (bos, else eos)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_id], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n = len(tokenizer.encode(context, add_special_tokens=False))
    return whole[:n], whole[n:]


@dataclasses.dataclass(frozen=True)
class Scored:
    loglik: float
    is_greedy: bool


def _bucket(n: int, buckets=ROW_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_positions(params, tokens_BT, positions_BT, segments_BT, rows_P, cols_P, targets_P, *, cfg: ModelConfig):
    """Log-prob of targets_P at the hidden states (rows_P, cols_P), and whether each is the argmax."""
    h_BTD, _ = hidden_states(params, tokens_BT, cfg, positions=positions_BT, segment_ids=segments_BT)
    h_PD = h_BTD[rows_P, cols_P]
    logits_PV = logits_from_hidden(params, h_PD[None], cfg)[0]
    logp_PV = jax.nn.log_softmax(logits_PV, axis=-1)
    tok_logp_P = jnp.take_along_axis(logp_PV, targets_P[:, None], axis=-1)[:, 0]
    return tok_logp_P, jnp.argmax(logits_PV, axis=-1) == targets_P


def _pack(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


def _batch(inputs, by_host, wanted, rows, row_len, pad_id):
    """Arrays for one call (packed tokens/positions/segments, scored (row, col) slots and their targets), and each
    request's slice of the scored slots."""
    B = _pow2(len(rows))
    tokens = np.full((B, row_len), pad_id, np.int32)
    positions = np.zeros((B, row_len), np.int32)
    segments = np.zeros((B, row_len), np.int32)
    slots, slices = [], {}
    for r, members in enumerate(rows):
        col = 0
        for s, j in enumerate(members, 1):
            ids = inputs[j]
            n = len(ids)
            tokens[r, col:col + n] = ids
            positions[r, col:col + n] = np.arange(n)
            segments[r, col:col + n] = s
            for i in by_host[j]:
                slices[i] = (len(slots), len(slots) + len(wanted[i]))
                slots += [(r, col + pos, target) for pos, target in wanted[i]]
            col += n
    P = _pow2(max(len(slots), 64))
    slot_arr = np.zeros((P, 3), np.int32)
    slot_arr[:len(slots)] = slots
    return (tokens, positions, segments, slot_arr[:, 0], slot_arr[:, 1], slot_arr[:, 2]), slices


def _share_prefixes(inputs: list[tuple[int, ...]]) -> list[int]:
    """For each input sequence, the one it runs inside: itself, or a longer one it is a prefix of (causal attention
    makes a prefix's hidden states the same). Sorted, the sequences extending s directly follow it, so following
    each s to its successor while it is a prefix finds a host (a multiple-choice item's one-token choices share one).
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    host = list(range(len(inputs)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):
        if inputs[b][:len(inputs[a])] == inputs[a]:
            host[a] = host[b]
    return host


def loglikelihoods(params, cfg: ModelConfig, pairs: list[tuple[list[int], list[int]]], *, pad_id: int,
                   max_length: int | None = None, tokens_per_call: int = TOKENS_PER_CALL) -> list[Scored]:
    """Summed log-prob of each continuation given its context, and whether greedy decoding would produce it.

    Pairs longer than max_length + 1 tokens keep their last max_length + 1 (lm-evaluation-harness's truncation).
    """
    max_length = max_length or cfg.max_position_embeddings
    full = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        full.append((list(ctx) + list(cont))[-(max_length + 1):])
    inputs = [tuple(s[:-1]) for s in full]
    host = _share_prefixes(inputs)
    hosts = sorted(set(host))
    slot_of = {h: j for j, h in enumerate(hosts)}
    # scored (position, target) per request, positions inside its host sequence
    wanted = []
    for i, (seq, (_, cont)) in enumerate(zip(full, pairs)):
        k = min(len(cont), len(seq) - 1)
        n = len(seq) - 1
        wanted.append([(n - k + j, seq[n - k + j + 1]) for j in range(k)])
    lengths = [len(inputs[h]) for h in hosts]
    row_len = _bucket(max(lengths))
    rows = _pack(lengths, row_len)
    per_call = max(1, tokens_per_call // row_len)
    by_host = {}
    for i, h in enumerate(host):
        by_host.setdefault(slot_of[h], []).append(i)
    results: list[Scored | None] = [None] * len(pairs)
    for start in range(0, len(rows), per_call):
        arrays, slices = _batch([inputs[h] for h in hosts], by_host, wanted, rows[start:start + per_call], row_len,
                                pad_id)
        logp, greedy = _score_positions(params, *map(jnp.asarray, arrays), cfg=cfg)
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        for i, (a, b) in slices.items():
            results[i] = Scored(float(logp[a:b].sum(dtype=np.float64)), bool(greedy[a:b].all()))
    return results
