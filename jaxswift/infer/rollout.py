"""Rollouts: G sampled completions per prompt with the log-prob of every sampled token, from the current params.

One interface, two backends:

    rollout(params, prompts_ids, cfg, sampling=..., num_generations=G, eos_ids=..., pad_id=..., key=...)
        -> Rollout(prompt_ids [N, P] left-padded, completion_ids [N, C], completion_mask [N, C], logprobs [N, C], ...)

`sample_with_logprobs` is jaxswift's batched generation loop (infer/generate.py's prefill + jitted while-loop over a
KV cache) extended to report, for each sampled token, its log-prob under the temperature-scaled distribution
log_softmax(logits / temperature) before top-k / top-p filtering: exactly what the trainer recomputes (TRL divides
the logits by the temperature too). `engine_rollout` drives infer/engine.py's JaxEngine (continuous batching over
a paged KV cache); the engine reports log-probs before temperature (as vLLM), which equal the trainer's at
temperature 1. Rows are ordered prompt by prompt: the G completions of prompt i are rows i*G .. i*G+G-1.

With LoRA the params are the train state's (base + adapters, no merged copy); with full tuning they are the
trained params themselves, so every rollout samples from the latest weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.infer.generate import last_logits, left_pad
from jaxswift.infer.sampling import SamplingParams, categorical_with_logprob, sample, token_logprobs
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import hidden_states, init_cache, logits_from_hidden, unstack_layers
from jaxswift.parallel.distributed import gather_to_host


@dataclasses.dataclass(frozen=True)
class RolloutSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 256

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for rollouts (sampling, not greedy), got {self.temperature}")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        SamplingParams(self.temperature, self.top_p, self.top_k)  # its own range checks


@dataclasses.dataclass
class Rollout:
    """N = prompts x G rows (numpy). completion_mask is 1 on tokens the policy generated (eos included) and 0 on
    padding and on environment tokens (multi-turn); logprobs are 0 where the mask is 0."""
    prompt_ids: np.ndarray  # [N, P] left-padded
    prompt_positions: np.ndarray  # [N, P]
    prompt_segments: np.ndarray  # [N, P] 1 on prompt tokens, 0 on padding
    completion_ids: np.ndarray  # [N, C]
    completion_mask: np.ndarray  # [N, C] float32
    logprobs: np.ndarray  # [N, C] float32, at temperature (see module docstring)
    truncated: np.ndarray  # [N] bool: hit max_completion_length without eos

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(1).astype(np.int64)


def _sample_and_score(logits_BV, key, sampling: SamplingParams):
    """(next tokens [B], their log-probs at temperature before top-k / top-p [B]). Without truncation the draw
    and the log-prob share one pass over the logits."""
    if sampling.top_k or sampling.top_p < 1.0:
        tok = sample(logits_BV, key, sampling)
        return tok, token_logprobs(logits_BV.astype(jnp.float32) / sampling.temperature, tok, 0)[0]
    return categorical_with_logprob(key, logits_BV.astype(jnp.float32) / sampling.temperature)


def _repeat_rows(x, times: int, rows: int):
    """x with each of its `rows` leading rows repeated `times` times in place (row-major Z = rows * K axes too)."""
    return jnp.repeat(x.reshape(rows, -1, *x.shape[1:]), times, axis=0).reshape(-1, *x.shape[1:])


def _fork_cache(cache, times: int, rows: int):
    """The prompts' KV cache, each row repeated for its `times` completions."""
    rep = lambda x: _repeat_rows(x, times, rows)  # noqa: E731
    return cache._replace(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)), positions=rep(cache.positions),
                          segment_ids=rep(cache.segment_ids))


def _split_rows(tree, rows_sharding):
    """Every array of `tree` with its leading (row) axis split as `rows_sharding` says (nothing when None)."""
    if rows_sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows_sharding), tree)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "num_generations",
                                             "rows_sharding"))
def sample_with_logprobs(params, tokens_UP, positions_UP, segments_UP, eos_ids, key, *, cfg: ModelConfig,
                         max_new_tokens: int, sampling: SamplingParams, num_generations: int = 1,
                         rows_sharding=None):
    """(tokens [B, C], logprobs [B, C], lengths [B]) for B = U prompts x num_generations rows, prompt by prompt;
    C = max_new_tokens; after eos, the eos id and logprob 0. Each prompt is prefilled once and its cache copied
    to its rows (the G completions of a prompt share it, as a prefix cache would).

    rows_sharding (a NamedSharding of [B]): the decode loop's rows split over the mesh as it says, so each device
    (each process, in a multi-process job) decodes only its rows; the prompts' prefill stays whole. Draws do not
    depend on the split (jax's partitionable threefry): the tokens are those of an unsplit run."""
    U, P = tokens_UP.shape
    G = num_generations
    B = U * G
    params = unstack_layers(params)
    cache = init_cache(cfg, U, P + max_new_tokens, per_layer=True)
    logits, cache = last_logits(params, tokens_UP, cfg, positions_UP, segments_UP, cache)
    logits = _split_rows(_repeat_rows(logits, G, U), rows_sharding)
    cache = _fork_cache(cache, G, U)
    cache = cache._replace(**_split_rows(dict(k=cache.k, v=cache.v, positions=cache.positions,
                                              segment_ids=cache.segment_ids), rows_sharding))
    fill = eos_ids[0]

    def cond(state):
        step, _, _, _, done, _, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, cache, pos, done, out, logps, lengths, key = state
        key, sub = jax.random.split(key)
        tok, logp = _sample_and_score(logits, sub, sampling)
        tok = jnp.where(done, fill, tok)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        out = out.at[:, step].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos_ids)
        logits, cache = last_logits(params, tok[:, None], cfg, pos[:, None], jnp.ones((B, 1), jnp.int32), cache)
        return step + 1, logits, cache, pos + 1, done, out, logps, lengths, key

    pos, done, out, logps, lengths = _split_rows((jnp.repeat(positions_UP[:, -1] + 1, G), jnp.zeros((B,), bool),
                                                  jnp.zeros((B, max_new_tokens), jnp.int32),
                                                  jnp.zeros((B, max_new_tokens), jnp.float32),
                                                  jnp.zeros((B,), jnp.int32)), rows_sharding)
    out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), logits, cache, pos, done, out, logps, lengths,
                                          key))
    return out[5], out[6], out[7]


def _mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)


def _truncated(tokens: np.ndarray, lengths: np.ndarray, eos_ids) -> np.ndarray:
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    return (lengths == tokens.shape[1]) & ~np.isin(last, np.asarray(eos_ids))


def rollout(params, prompts_ids: list[list[int]], cfg: ModelConfig, *, sampling: RolloutSampling,
            num_generations: int, eos_ids, pad_id: int, key, rows_sharding=None) -> Rollout:
    """G completions per prompt from jaxswift's jitted generation loop (one batch of N = len(prompts) x G rows;
    each prompt prefilled once). rows_sharding: how the N rows are split over the mesh while they decode (see
    `sample_with_logprobs`); the result holds every row, in every process."""
    tokens, positions, segments = left_pad(prompts_ids, pad_id)
    params_sampling = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    out, logps, lengths = sample_with_logprobs(params, tokens, positions, segments, jnp.asarray(eos_ids, jnp.int32),
                                               key, cfg=cfg, max_new_tokens=sampling.max_completion_length,
                                               sampling=params_sampling, num_generations=num_generations,
                                               rows_sharding=rows_sharding)
    out, logps, lengths = (np.asarray(x) for x in gather_to_host((out, logps, lengths)))  # every process's rows
    return rollout_from_samples(prompts_ids, pad_id, num_generations, out, logps, lengths, eos_ids)


def rollout_from_samples(prompts_ids: list[list[int]], pad_id: int, num_generations: int, completion_ids,
                         logprobs, lengths, eos_ids) -> Rollout:
    """The Rollout of sampled completions (tokens [N, C], log-probs [N, C], lengths [N]; G rows per prompt, prompt
    by prompt) of `prompts_ids`: what `rollout` returns, also for samples made elsewhere (a rollout server)."""
    tokens, positions, segments = left_pad(prompts_ids, pad_id)
    tokens, positions, segments = (np.repeat(x, num_generations, axis=0) for x in (tokens, positions, segments))
    out, logps, lengths = np.asarray(completion_ids), np.asarray(logprobs), np.asarray(lengths)
    mask = _mask(lengths, out.shape[1])
    return Rollout(tokens, positions, segments, out, mask, logps * mask, _truncated(out, lengths, eos_ids))


def engine_rollout(engine, params, prompts_ids: list[list[int]], *, sampling: RolloutSampling,
                   num_generations: int, seed: int, ignore_eos: bool = False, images=None) -> Rollout:
    """The same rollout from a JaxEngine (continuous batching: a finished slot takes the next request at once).
    `params` as the engine takes them (unstack_layers of the train state's). Log-probs before temperature. Each
    prompt is prefilled once; its G rows draw their own first tokens from it (engine.resample).
    images: per prompt, engine_vlm.RequestImages or None (a vision-language engine): the tower runs once per
    prompt, at its one prefill. ignore_eos: every row makes exactly max_completion_length tokens (benchmarks)."""
    if images is not None and len(images) != len(prompts_ids):
        raise ValueError(f"{len(images)} image sets for {len(prompts_ids)} prompts")
    from jaxswift.infer.engine_api import RequestSampling

    G = num_generations
    requests = [(i, ids) for i, ids in enumerate(p for p in prompts_ids for _ in range(G))]
    C = sampling.max_completion_length
    out = np.full((len(requests), C), engine.eos_ids[0], np.int32)
    logps = np.zeros((len(requests), C), np.float32)
    lengths = np.zeros((len(requests),), np.int64)
    state, free, running, queue = engine.init_decode_state(), list(range(engine.max_concurrent_decodes)), {}, \
        list(requests)
    shared = (-1, None)  # (prompt index, its prefix): the G rows of a prompt prefill it once

    def record(row, token, logprob):
        out[row, lengths[row]] = token
        logps[row, lengths[row]] = logprob
        lengths[row] += 1

    while queue or running:
        while queue and free and engine.can_admit(len(queue[0][1]), C):
            row, ids = queue.pop(0)
            req = RequestSampling(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                  max_tokens=C, seed=seed * 1_000_003 + row, logprobs=0, ignore_eos=ignore_eos)
            if shared[0] == row // G:
                prefix, first = engine.resample(shared[1], req)
            else:
                prefix, first = engine.prefill(params, *engine.pad_prompt(ids), req,
                                               images=None if images is None else images[row // G])
                shared = (row // G, prefix)
            record(row, int(first.tokens[0]), float(first.logprobs[0]))
            if first.done[0]:
                continue
            slot = free.pop()
            state = engine.insert(prefix, state, slot)
            running[slot] = row
        state, result = engine.generate(params, state)
        for slot, row in list(running.items()):
            if result.valid[slot]:
                record(row, int(result.tokens[slot]), float(result.logprobs[slot]))
            if result.done[slot]:
                state = engine.free_resource(state, slot)
                free.append(slot)
                del running[slot]
    tokens, positions, segments = left_pad([ids for _, ids in requests], engine._pad_id)
    mask = _mask(lengths, C)
    return Rollout(tokens, positions, segments, out, mask, logps * mask, _truncated(out, lengths, engine.eos_ids))


# --------------------------------------------------------------------------------------- training-side log-probs


def sequences(r: Rollout) -> dict[str, np.ndarray]:
    """The training layout of a rollout: [N, P + C] tokens, positions and segment ids (prompt padding 0)."""
    C = r.completion_ids.shape[1]
    starts = r.prompt_segments.sum(1)  # prompt lengths: the completion's first position
    completion_pos = starts[:, None] + np.arange(C)[None, :]
    return {"tokens": np.concatenate([r.prompt_ids, r.completion_ids], 1).astype(np.int32),
            "positions": np.concatenate([r.prompt_positions, completion_pos], 1).astype(np.int32),
            "segment_ids": np.concatenate([r.prompt_segments, np.ones((len(starts), C), np.int32)], 1)
            .astype(np.int32)}


def completion_logps(params, tokens_BT, positions_BT, segments_BT, cfg: ModelConfig, *, prompt_length: int,
                     temperature: float, with_entropy: bool = False):
    """log p(completion token) [B, C] under log_softmax(logits / temperature) (float32), C = T - prompt_length;
    and the per-token entropy of that distribution when asked."""
    h = hidden_states(params, tokens_BT, cfg, positions=positions_BT, segment_ids=segments_BT)[0]
    return _score(params, h[:, prompt_length - 1:-1], tokens_BT[:, prompt_length:], cfg, temperature, with_entropy)


def _score(params, h_BCD, targets_BC, cfg: ModelConfig, temperature: float, with_entropy: bool):
    """Log-probs (and entropies) of the targets from the hidden states that predict them."""
    logits = logits_from_hidden(params, h_BCD, cfg).astype(jnp.float32) / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    logps = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0] - log_z
    if not with_entropy:
        return logps
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    entropy = jax.lax.stop_gradient(log_z) - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)
    return logps, entropy


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_length", "temperature", "num_generations"))
def grouped_completion_logps(params, tokens_BT, positions_BT, segments_BT, *, cfg: ModelConfig, prompt_length: int,
                             temperature: float, num_generations: int):
    """completion_logps for rows in groups of num_generations that share their prompt (a rollout's layout): each
    prompt runs once into a KV cache, copied to its G rows, and only the completions run after it. For scoring
    without gradients (reference and old log-probs): at G = 8 and as many prompt as completion tokens, 44% fewer
    tokens go through the model."""
    G, P = num_generations, prompt_length
    B, T = tokens_BT.shape
    U = B // G
    params = unstack_layers(params)
    prompt = lambda x: x[::G, :P]  # noqa: E731
    cache = init_cache(cfg, U, T, per_layer=True)
    h_prompt, cache = hidden_states(params, prompt(tokens_BT), cfg, positions=prompt(positions_BT),
                                    segment_ids=prompt(segments_BT), cache=cache)
    h_completion, _ = hidden_states(params, tokens_BT[:, P:], cfg, positions=positions_BT[:, P:],
                                    segment_ids=segments_BT[:, P:], cache=_fork_cache(cache, G, U))
    h = jnp.concatenate([_repeat_rows(h_prompt[:, -1:], G, U), h_completion[:, :-1]], axis=1)
    return _score(params, h, tokens_BT[:, P:], cfg, temperature, False)


def shared_prompt_completion_logps(params, tokens_BT, positions_BT, segments_BT, cfg: ModelConfig, *,
                                   prompt_length: int, temperature: float, num_generations: int,
                                   with_entropy: bool = False):
    """completion_logps (differentiable: the policy's loss) for rows in groups of num_generations that share their
    prompt (`shares_prompts`), each group run as one row: its prompt once, then its G completions, each attending
    to the prompt and to itself (the parent segments of `hidden_states`). Rows hold one sequence each (segment 1,
    padding 0), as rollouts do. At G = 8 and as many prompt as completion tokens, 44% fewer tokens run forward and
    backward."""
    G, P = num_generations, prompt_length
    B, T = tokens_BT.shape
    U, C = B // G, T - P
    grouped = lambda x: jnp.concatenate([x[::G, :P], x[:, P:].reshape(U, G * C)], axis=1)  # noqa: E731
    branch_U = jnp.repeat(jnp.arange(G, dtype=jnp.int32), C)[None]  # [1, G*C]: which completion a slot holds
    real = grouped((segments_BT != 0).astype(jnp.int32))
    segments = real.at[:, P:].multiply(branch_U + 2)  # the prompt keeps segment 1, completion g becomes g + 2 ...
    parents = jnp.zeros_like(real).at[:, P:].set(real[:, P:])  # ... under the prompt
    h = hidden_states(params, grouped(tokens_BT), cfg, positions=grouped(positions_BT), segment_ids=segments,
                      parent_segment_ids=parents)[0]
    # completion g's token j is predicted by its token j - 1, its first one by the prompt's last
    j = jnp.arange(C)
    before = jnp.where(j == 0, P - 1, P + jnp.arange(G)[:, None] * C + j - 1)  # [G, C] slots in the group's row
    h_BCD = jnp.take(h, before.reshape(-1), axis=1).reshape(B, C, -1)
    return _score(params, h_BCD, tokens_BT[:, P:], cfg, temperature, with_entropy)


def shares_prompts(tokens_BT, positions_BT, segments_BT, prompt_length: int, num_generations: int) -> bool:
    """Whether the rows come in groups of num_generations with one prompt (ids, positions and padding) each."""
    B, G = tokens_BT.shape[0], num_generations
    if G < 2 or B % G:
        return False
    return all(np.array_equal(x[:, :prompt_length].reshape(B // G, G, prompt_length),
                              np.broadcast_to(x[::G, None, :prompt_length], (B // G, G, prompt_length)))
               for x in (tokens_BT, positions_BT, segments_BT))
