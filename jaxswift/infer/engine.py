"""JaxEngine: the Engine API (engine_api.py) for jaxswift models, over a paged KV cache.

    engine = JaxEngine(jaxswift.load_model("smollm2-135m-instruct"), max_concurrent_decodes=8)
    state = engine.init_decode_state()
    padded, n = engine.pad_prompt(ids)
    prefix, first = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=64))
    state = engine.insert(prefix, state, slot)
    state, result = engine.generate(engine.params, state)    # one token for every occupied slot
    state = engine.free_resource(state, slot)                 # when result.done[slot] (or the client left)

Prefill runs one prompt, right-padded to a length bucket (one compiled function per bucket), with a contiguous
cache; prompts longer than the largest bucket run in chunks of that size, each attending to the chunks before it.
Insert copies the prompt's keys/values into the slot's pages. Generate decodes one token per slot over the paged
pools (models/attention.py) with the layers unrolled, gathering only as many pages per slot as the longest running
request needs (rounded up to a power of two, one compiled function each); the decode state is donated so the pools
are updated in place. Sampling is per slot (sampling.sample_slots) inside the same jitted step. When no running
request needs penalties, logprobs or a grammar (the host knows), the step is the plain one: only the running slots'
rows, padded to a power of two, go through the model, and there is no penalty pipeline, so a lone request costs a
batch of one whatever max_concurrent_decodes is; otherwise every slot runs, with the per-slot pipelines.

Chunked prefill (`max_num_batched_tokens`, driven by the orchestrator through `prefill_step`): a long prompt runs
in chunks of at most that many tokens, so that the running requests decode between two chunks. The prompt owns a
contiguous cache of its padded length from its first chunk on (with its cached pages, if any, read in once); each
chunk writes its keys/values there in place (the cache is donated) and attends over the tokens before it, so a
chunk costs the same wherever it falls in the prompt and nothing earlier is copied again.

The page allocator and each slot's position live on the host, in the engine: one engine serves one decode state,
driven from one thread (the orchestrator's).

Prefix caching (on unless `enable_prefix_caching=False`; kv_cache.py keeps the hashes, reference counts and the
least-recently-freed list): prefill looks up the longest run of the prompt's full pages already cached (never the
page of the last prompt token, whose logits are needed), gathers those pages from the decode state's pools into a
contiguous cache and runs only the rest of the prompt over it. The engine therefore remembers the pools of the
decode state it last returned. Insert shares the cached pages (one more reference each; a page evicted between
prefill and insert is written anew from the gathered copy) and caches the prompt's other full pages; generate caches
each page a slot fills while decoding; admission (`can_admit_prompt`) counts pages shared with running requests as
taking none.
`existing_prefix` does the same from an earlier Prefix instead of the pools. Prompt log-probs (echo) always run the
whole prompt: they need every prompt token's logits, which cached pages do not keep.

Vision-language models (engine_vlm.py): the engine runs the LLM. A request with images (`prefill(..., images=)`)
runs the tower once at its prefill, then the whole prompt over the image features; it bypasses the prefix cache
and chunked prefill. Each slot keeps its prompt's rope delta (Qwen2-VL's M-RoPE; 0 for text requests) and decoded
tokens rotate by position + delta, so decoding and continuous batching are the text ones.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.infer.engine_api import Engine, RequestSampling, ResultTokens
from jaxswift.infer.generate import stop_token_ids
from jaxswift.infer.kv_cache import (SCRATCH_PAGE, PageAllocator, hash_seed, init_pools, next_page_hash,
                                     page_hashes, pages_for, pool_shape, pool_sharding)
from jaxswift.infer.multi_lora import stack_adapters, with_adapter_index
from jaxswift.infer.sampling import MAX_TOP_LOGPROBS, SlotSampling, apply_token_mask, sample_slots, token_logprobs
from jaxswift.models.attention import paged_decode_hidden
from jaxswift.models.config import ModelConfig
from jaxswift.models.transformer import KVCache, hidden_states, init_cache, logits_from_hidden, unstack_layers
from jaxswift.parallel.params import repeat_kv_heads, serving_kv_copies

MAX_STOP_TOKEN_IDS = 16
MIN_GATHER_TOKENS = 128  # decode gathers at least this many positions per slot (fewer compiled variants)


class DecodeState(NamedTuple):
    """Device arrays of every slot (S = max_concurrent_decodes), donated to each step."""
    k_pages: tuple  # per layer [K, pages, P, H]
    v_pages: tuple  # per layer [K, pages, P, H]
    tokens: jax.Array  # [S] the last sampled token: the next step's input
    positions: jax.Array  # [S] its position (where the next step writes its key/value)
    generated: jax.Array  # [S] tokens generated so far
    active: jax.Array  # [S] bool: the slot's request is still generating
    max_tokens: jax.Array  # [S]
    stop_ids: jax.Array  # [S, stops] stop token ids and eos (unless ignore_eos), padded with -1
    adapter: jax.Array  # [S] LoRA adapter index (0: the base)
    sampling: SlotSampling
    prompt_mask: jax.Array  # [S, V] bool: tokens of the prompt (repetition penalty)
    output_counts: jax.Array  # [S, V] int32: how often each token was generated (penalties)
    rope_delta: jax.Array  # [S] decoded tokens rotate by position + this (Qwen2-VL's M-RoPE delta; else 0)


@dataclasses.dataclass
class Prefix:
    """A prefilled request: its prompt's keys/values (per layer k [K, H, T], v [K, T, H]) and its slot arrays."""
    k: tuple
    v: tuple
    length: int
    sampling: RequestSampling
    slot: dict  # DecodeState fields of this request (tokens, positions, ..., prompt_mask, output_counts)
    done: bool
    logits: jax.Array  # [1, V] after the prompt: what `resample` draws another first token from
    prompt_mask: jax.Array  # [1, V]
    guide: object = None  # grammar.GuideState of a constrained request, advanced past its first token
    tokens: tuple = ()  # the prompt's ids
    adapter: int = 0  # the adapter its keys/values were computed with
    page_hashes: tuple = ()  # prefix-cache key of each full prompt page
    cached_pages: tuple = ()  # pool pages the leading full pages were read from (automatic prefix caching)
    page_of: np.ndarray | None = None  # logical page i of the prompt is k/v page page_of[i] (None: page i)
    first_token: int = -1  # the sampled first token (the first decode step's input)
    rope_delta: int = 0  # a prompt with images (M-RoPE): decoded tokens rotate by position + this
    cacheable: bool = True  # False for a prompt with images: its pages never enter the prefix cache
    chunk_cache: KVCache | None = None  # a chunked prompt in progress: its contiguous cache (k, v are None)


def _finished(tokens_S, generated_S, stop_ids_SX, max_tokens_S):
    """The request ends with this token: a stop id / eos, or max_tokens reached (the engine caps max_tokens so
    that prompt + completion fit max_model_len)."""
    return jnp.any(tokens_S[:, None] == stop_ids_SX, axis=-1) | (generated_S >= max_tokens_S)


def _prompt_kv(params, tokens_T, length, cfg: ModelConfig, chunk: int, cache=None, offset=0):
    """(per-layer k [K, H, S], v [K, S, H], hidden state of the last prompt token [1, 1, D]); the prompt runs
    in T // chunk chunks over a contiguous cache (default: a fresh one of S = T), each attending to those before
    it. With a cache holding `offset` tokens of an earlier prefix, the prompt's positions start at `offset`."""
    T = tokens_T.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    real = index < length
    tokens, positions = tokens_T[None], jnp.where(real, index + offset, 0)[None]
    segments = real.astype(jnp.int32)[None]
    cache = init_cache(cfg, 1, T, per_layer=True) if cache is None else cache

    def run_chunk(c, carry):
        cache, _ = carry
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)  # noqa: E731
        h, cache = hidden_states(params, part(tokens), cfg, positions=part(positions), segment_ids=part(segments),
                                 cache=cache)
        return cache, h

    h = jnp.zeros((1, chunk, cfg.hidden_size), cfg.compute_dtype)
    cache, h = jax.lax.fori_loop(0, T // chunk, run_chunk, (cache, h))
    last = jax.lax.dynamic_slice_in_dim(h, length - 1 - (T - chunk), 1, axis=1)
    return cache.k, cache.v, last


def _prefill(params, tokens_T, length, adapter, *, cfg: ModelConfig, chunk: int):
    """The prompt's keys/values, the logits after it [1, V] and its token set [1, V] (one compile per bucket)."""
    params = with_adapter_index(params, adapter[None])
    k, v, last = _prompt_kv(params, tokens_T, length, cfg, chunk)
    logits = logits_from_hidden(params, last, cfg)[:, 0]
    V = logits.shape[-1]
    prompt_ids = jnp.where(jnp.arange(tokens_T.shape[0]) < length, tokens_T, V)
    prompt_mask = jnp.zeros((1, V), bool).at[0, prompt_ids].set(True, mode="drop")
    return k, v, logits, prompt_mask


def _prefill_after_prefix(params, k_pages, v_pages, pages_C, cached_length, tokens_T, length, adapter, *,
                          cfg: ModelConfig, chunk: int):
    """Prefill of the rest of a prompt whose first `cached_length` tokens (pages_C's pages, then padding) are
    cached: per-layer k [K, H, C*P + T], v [K, C*P + T, H] (the prefix's pages, then the rest's) and the logits
    after the prompt [1, V]. k_pages / v_pages are per-layer [K, pages, P, H]: the decode state's pools or an
    earlier Prefix's keys/values in pages. One compile per (prefix bucket, rest bucket)."""
    params = with_adapter_index(params, adapter[None])
    T = tokens_T.shape[0]
    ks, vs = _gather_pages(k_pages, v_pages, pages_C, cfg.compute_dtype, extra=T)
    S = ks[0].shape[-1]
    index = jnp.arange(S, dtype=jnp.int32)
    cached = index < cached_length  # padding pages and the rest's slots are masked until written
    cache = KVCache(ks, vs, jnp.where(cached, index, 0)[None], cached.astype(jnp.int32)[None], jnp.int32(S - T))
    k, v, last = _prompt_kv(params, tokens_T, length, cfg, chunk, cache=cache, offset=cached_length)
    return k, v, logits_from_hidden(params, last, cfg)[:, 0]


def _chunk_cache(k_pages, v_pages, pages_C, cached_length, *, cfg: ModelConfig, length: int) -> KVCache:
    """The contiguous cache of `length` slots a chunked prompt is prefilled into, holding the keys/values of its
    first `cached_length` tokens read from pool pages pages_C (length // P of them: its cached pages, then any);
    zeros after them, so that the masked slots hold no stale values. k_pages None: an empty cache."""
    cache = init_cache(cfg, 1, length, per_layer=True)
    if k_pages is None:
        return cache
    index = jnp.arange(length, dtype=jnp.int32)
    cached = index < cached_length
    ks, vs = _gather_pages(k_pages, v_pages, pages_C, cfg.compute_dtype, keep=cached)
    return KVCache(ks, vs, jnp.where(cached, index, 0)[None], cached.astype(jnp.int32)[None], jnp.int32(0))


def _gather_pages(k_pages, v_pages, pages_C, dtype, *, extra: int = 0, keep=None):
    """Per-layer contiguous caches k [K, H, S], v [K, S, H] (S = C * P + extra) of the pool pages pages_C, in
    order, then `extra` zero slots; `keep` [C * P] (optional) zeroes the slots it leaves out, so that masked slots
    hold no stale values."""
    ks, vs = [], []
    for k_pool, v_pool in zip(k_pages, v_pages):
        K, _, P, H = k_pool.shape

        def read(pool):
            x = jnp.take(pool, pages_C, axis=1).reshape(K, -1, H)
            x = x if keep is None else jnp.where(keep[None, :, None], x, 0)
            return jnp.pad(x, ((0, 0), (0, extra), (0, 0))).astype(dtype)

        ks.append(read(k_pool).transpose(0, 2, 1))
        vs.append(read(v_pool))
    return tuple(ks), tuple(vs)


def _prefill_chunk(params, cache: KVCache, tokens_C, start, length, adapter, *, cfg: ModelConfig, last: bool):
    """One chunk of a prompt into its contiguous cache, in place (the cache is donated): tokens_C [C] (`length`
    real tokens, then padding) at positions start.., attending over the cache's earlier tokens. Returns the cache
    and, for the `last` chunk, the logits after its last real token [1, V] (None before: the output projection
    reads the whole embedding, a tenth of a chunk's time)."""
    params = with_adapter_index(params, adapter[None])
    index = jnp.arange(tokens_C.shape[0], dtype=jnp.int32)
    real = index < length
    h, cache = hidden_states(params, tokens_C[None], cfg, positions=jnp.where(real, start + index, 0)[None],
                             segment_ids=real.astype(jnp.int32)[None], cache=cache._replace(index=start))
    if not last:
        return cache, None
    return cache, logits_from_hidden(params, jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1), cfg)[:, 0]


def _prompt_logprobs(params, tokens_T, length, adapter, *, cfg: ModelConfig, chunk: int, num_top: int):
    """Each prompt token's log-prob given the tokens before it, and the num_top best alternatives there, under the
    raw float32 logits: (chosen [T], top ids [T, num_top], top log-probs [T, num_top]); entry t scores token t + 1
    (the host shifts them; the first prompt token has none). The prompt runs in T // chunk chunks, as in prefill,
    so the [chunk, V] logits of one chunk at a time are live."""
    params = with_adapter_index(params, adapter[None])
    T = tokens_T.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    real = index < length
    tokens, positions, segments = tokens_T[None], jnp.where(real, index, 0)[None], real.astype(jnp.int32)[None]
    following = jnp.concatenate([tokens_T[1:], tokens_T[:1]])
    cache = init_cache(cfg, 1, T, per_layer=True)
    out = (jnp.zeros((T,), jnp.float32), jnp.zeros((T, num_top), jnp.int32), jnp.zeros((T, num_top), jnp.float32))

    def run_chunk(c, carry):
        cache, out = carry
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)  # noqa: E731
        h, cache = hidden_states(params, part(tokens), cfg, positions=part(positions), segment_ids=part(segments),
                                 cache=cache)
        logits = logits_from_hidden(params, h, cfg)[0]
        scored = token_logprobs(logits, jax.lax.dynamic_slice_in_dim(following, c * chunk, chunk), num_top)
        out = tuple(jax.lax.dynamic_update_slice_in_dim(whole, new, c * chunk, axis=0)
                    for whole, new in zip(out, scored))
        return cache, out

    return jax.lax.fori_loop(0, T // chunk, run_chunk, (cache, out))[1]


def _first_token(logits, prompt_mask, length, sampling: SlotSampling, stop_ids_X, max_tokens, adapter, allowed_1W,
                 rope_delta, *, num_top: int):
    """The first token and the request's slot arrays (one compile for every bucket; allowed_1W None: no
    constraint)."""
    counts = jnp.zeros(logits.shape, jnp.int32)
    masked = logits if allowed_1W is None else apply_token_mask(logits, allowed_1W)
    first = sample_slots(masked, prompt_mask, counts, sampling, jnp.zeros((1,), jnp.int32))
    chosen, top_ids, top_logprobs = token_logprobs(logits, first, num_top)
    one = jnp.ones((1,), jnp.int32)
    done = _finished(first, one, stop_ids_X[None], max_tokens[None])
    slot = dict(tokens=first, positions=length[None], generated=one, active=~done, max_tokens=max_tokens[None],
                stop_ids=stop_ids_X[None], adapter=adapter[None], sampling=sampling, prompt_mask=prompt_mask,
                output_counts=counts.at[0, first[0]].add(1), rope_delta=rope_delta[None])
    return slot, (first, jnp.ones((1,), bool), one, done, chosen, top_ids, top_logprobs)


def _write_pages(state: DecodeState, k, v, pages_C) -> DecodeState:
    """The state with the prompt's keys/values (page c of k/v) copied into pool page pages_C[c] (scratch for the
    pages not to write)."""
    ks, vs = [], []
    for k_pool, v_pool, k_KHT, v_KTH in zip(state.k_pages, state.v_pages, k, v):
        K, H, T = k_KHT.shape
        P = k_pool.shape[2]
        k_KCPH = k_KHT.transpose(0, 2, 1).reshape(K, T // P, P, H)
        ks.append(k_pool.at[:, pages_C].set(k_KCPH.astype(k_pool.dtype)))
        vs.append(v_pool.at[:, pages_C].set(v_KTH.reshape(K, T // P, P, H).astype(v_pool.dtype)))
    return state._replace(k_pages=tuple(ks), v_pages=tuple(vs))


def _insert(state: DecodeState, k, v, slot_fields: dict, slot, pages_C):
    """The state with the prompt's keys/values written (`_write_pages`) and the slot's arrays set."""
    state = _write_pages(state, k, v, pages_C)
    fields = {name: getattr(state, name) for name in slot_fields}
    updated = jax.tree.map(lambda whole, one: whole.at[slot].set(one[0].astype(whole.dtype)), fields, slot_fields)
    return state._replace(**updated)


def _generate(params, state: DecodeState, rows_B, table_BC, allowed_BW, *, cfg: ModelConfig, num_top: int,
              penalties: bool):
    """One decode step for the slots rows_B (distinct; every running slot among them, the rest free ones): B rows,
    not S, go through the model, so a lone request costs a batch of one. The outputs are per slot [S] (the slots
    not in rows_B invalid). With penalties False the step has no penalty pipeline and keeps no output counts
    (no running slot uses them). One compile per (B, gather size, num_top, penalties)."""
    S = state.tokens.shape[0]
    rows = lambda x: jnp.take(x, rows_B, axis=0)  # noqa: E731
    adapter, sampling = rows(state.adapter), jax.tree.map(rows, state.sampling)
    params = with_adapter_index(params, adapter)
    P = state.k_pages[0].shape[2]
    C = table_BC.shape[1]
    active, pos, generated = rows(state.active), rows(state.positions), rows(state.generated)
    page = jnp.take_along_axis(table_BC, jnp.minimum(pos // P, C - 1)[:, None], axis=1)[:, 0]
    page = jnp.where(active, page, SCRATCH_PAGE)
    h, ks, vs = paged_decode_hidden(params, rows(state.tokens), cfg, pos, state.k_pages, state.v_pages, page,
                                    pos % P, table_BC, rope_position_B=pos + rows(state.rope_delta))
    logits = logits_from_hidden(params, h[:, None], cfg)[:, 0]
    masked = logits if allowed_BW is None else apply_token_mask(logits, allowed_BW)  # log-probs stay raw (vLLM)
    if penalties:
        tokens = sample_slots(masked, rows(state.prompt_mask), rows(state.output_counts), sampling, generated)
    else:
        tokens = sample_slots(masked, None, None, sampling, generated)
    chosen, top_ids, top_logprobs = token_logprobs(logits, tokens, num_top)
    generated = generated + active
    done = active & _finished(tokens, generated, rows(state.stop_ids), rows(state.max_tokens))
    scatter = lambda whole, part: whole.at[rows_B].set(part.astype(whole.dtype))  # noqa: E731
    updated = dict(k_pages=ks, v_pages=vs, tokens=scatter(state.tokens, jnp.where(active, tokens, rows(state.tokens))),
                   positions=scatter(state.positions, pos + active), generated=scatter(state.generated, generated),
                   active=scatter(state.active, active & ~done))
    if penalties:
        updated["output_counts"] = state.output_counts.at[rows_B, tokens].add(active.astype(jnp.int32))
    out = (tokens, active, generated, done, chosen, top_ids, top_logprobs)
    out = tuple(scatter(jnp.zeros((S, *x.shape[1:]), x.dtype), x) for x in out)  # per slot; others invalid
    return state._replace(**updated), out


def _free(state: DecodeState, slot) -> DecodeState:
    return state._replace(active=state.active.at[slot].set(False))


# Module-level, so engines of the same model and sizes share compiled functions.
_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "chunk"))
_prefill_after_prefix_jit = jax.jit(_prefill_after_prefix, static_argnames=("cfg", "chunk"))
_chunk_cache_jit = jax.jit(_chunk_cache, static_argnames=("cfg", "length"))
_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnames=("cfg", "last"), donate_argnums=(1,))
_first_token_jit = jax.jit(_first_token, static_argnames=("num_top",))
_prompt_logprobs_jit = jax.jit(_prompt_logprobs, static_argnames=("cfg", "chunk", "num_top"))
_generate_jit = jax.jit(_generate, static_argnames=("cfg", "num_top", "penalties"), donate_argnums=(1,))
_insert_jit = jax.jit(_insert, donate_argnums=(0,))
_write_pages_jit = jax.jit(_write_pages, donate_argnums=(0,))
_free_jit = jax.jit(_free, donate_argnums=(0,))


def _seed_words(seed: int) -> np.ndarray:
    seed &= (1 << 64) - 1
    return np.asarray([seed & 0xFFFFFFFF, seed >> 32], np.uint32)


class JaxEngine(Engine):
    def __init__(self, model, *, max_concurrent_decodes: int = 8, max_model_len: int = 2048, page_size: int = 16,
                 num_pages: int | None = None, prefill_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048),
                 adapters: dict[str, str] | None = None, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int | None = None, mesh=None, seed: int | None = None):
        """`mesh` (a jax.sharding.Mesh with jaxswift's axes, parallel/mesh.make_mesh): params and the paged KV
        cache sharded by the default rule table (heads, kv heads and the MLP over `tensor`), every step run over
        the mesh by the compiler (GSPMD); None: one device. `seed`: where the sampling seeds of requests that
        bring none come from (engines given the same seed and the same calls sample alike: infer/mirror.py);
        None: fresh entropy."""
        cfg: ModelConfig = model.config
        # A vision-language model: the engine runs its LLM; the tower runs at the prefill of requests with images.
        self.vlm_config, self.processor, self._tower_params = None, None, None
        if getattr(model, "is_vlm", False):
            if adapters:
                raise ConfigError("adapters: serving LoRA adapters on a vision-language model is not supported")
            self.vlm_config, self.processor, cfg = model.config, model.processor, model.config.text
            self._tower_params = {k: v for k, v in model.params.items() if k != "llm"}
            model = dataclasses.replace(model, config=cfg, params=model.params["llm"])
        copies = serving_kv_copies(cfg, mesh)
        if copies > 1 and not adapters and all(isinstance(model.params["layers"][n], (np.ndarray, jax.Array))
                                               for n in ("wk", "wv")):  # (quantized or adapted: kept replicated)
            params, cfg = repeat_kv_heads(model.params, cfg, copies)
            model = dataclasses.replace(model, config=cfg, params=params)
        _check_sizes(max_concurrent_decodes, max_model_len, page_size, num_pages, prefill_buckets)
        if max_num_batched_tokens is not None and (not isinstance(max_num_batched_tokens, int)
                                                   or isinstance(max_num_batched_tokens, bool)
                                                   or max_num_batched_tokens < page_size
                                                   or max_num_batched_tokens % page_size):
            raise ConfigError(f"max_num_batched_tokens must be a positive multiple of page_size {page_size} (chunks "
                              f"end on page boundaries) or None (no chunked prefill), got {max_num_batched_tokens!r}")
        self.max_num_batched_tokens = max_num_batched_tokens  # prompt tokens prefilled between two decode steps
        if not isinstance(enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_hit_tokens = 0  # prompt tokens whose keys/values came from the cache (or existing_prefix)
        self.prefix_cache_miss_tokens = 0  # prompt tokens prefilled
        self.config, self.tokenizer = cfg, model.tokenizer
        self.eos_ids = tuple(int(i) for i in stop_token_ids(cfg, model.tokenizer))
        self._slots, self._max_len, self.page_size = max_concurrent_decodes, max_model_len, page_size
        self._buckets = tuple(sorted(b for b in prefill_buckets if b < max_model_len)) or (min(prefill_buckets),)
        self._pages_per_slot = pages_for(max_model_len, page_size)
        self._num_pages = num_pages or max_concurrent_decodes * self._pages_per_slot
        self._adapter_names = list(adapters or {})
        params = stack_adapters(model.params, cfg, list(adapters.values())) if adapters else model.params
        self._mesh, self._rules = mesh, None
        if mesh is not None:
            params = self._shard_params(params, cfg)
        self.params = unstack_layers(params)
        pad = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
        self._pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._seeds = np.random.default_rng(seed)
        # The compiled functions see only the shapes of the model, so engines of variants share them.
        self._shape_cfg = cfg.replace(bos_token_id=None, eos_token_ids=(), pad_token_id=None)
        self._grammar = None
        self._reset_host()

    def set_tower_params(self, tower_params: dict) -> None:
        """The vision tower and aligner weights the prefill of image requests runs ({"vision", "aligner"} of a
        vision-language model's params): a trainer hands its latest ones before each rollout."""
        if self.vlm_config is None:
            raise ConfigError("set_tower_params: this engine serves a text-only model (it has no vision tower)")
        missing = sorted(set(self._tower_params) - set(tower_params))
        if missing:
            raise ConfigError(f"set_tower_params: expected the parts {sorted(self._tower_params)}, missing {missing}")
        self._tower_params = {k: tower_params[k] for k in self._tower_params}

    # --- the mesh -------------------------------------------------------------------------------------------------

    @property
    def mesh(self):
        return self._mesh

    def _shard_params(self, params, cfg):
        from jaxswift.parallel.params import shard_params
        from jaxswift.parallel.rules import rules_for_mesh

        other = [f"{axis}={n}" for axis, n in self._mesh.shape.items() if n > 1 and axis not in ("data", "tensor")]
        if other:
            raise ConfigError(f"mesh {', '.join(other)}: serving shards over data and tensor only (training axes)")
        self._rules = rules_for_mesh("default", self._mesh)
        if self._tower_params is not None:  # the tower is small next to the LLM: a copy on every device
            self._tower_params = jax.device_put(self._tower_params, self._replicated())
        return shard_params(params, cfg, self._rules, self._mesh)

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self._mesh, PartitionSpec())

    def _placed(self, state: DecodeState) -> DecodeState:
        """The decode state on the mesh: each layer's KV pools [K, pages, page, H] split over kv heads as the rule
        table splits the k/v projections (so each device attends with its own heads; made in place, never whole
        on one device), the rest replicated."""
        sharding = pool_sharding(self.config, self._num_pages, self.page_size, self._rules, self._mesh)
        shape = pool_shape(self.config, self._num_pages, self.page_size)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.config.compute_dtype), out_shardings=sharding)
        pools = lambda: tuple(zeros() for _ in range(self.config.num_layers))  # noqa: E731
        return jax.device_put(state, self._replicated())._replace(k_pages=pools(), v_pages=pools())

    # --- sizes ----------------------------------------------------------------------------------------------------

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def max_prefill_length(self) -> int:
        return self._buckets[-1]

    @property
    def kv_pages_total(self) -> int:
        return self._num_pages

    @property
    def kv_pages_used(self) -> int:
        """Pages some running request holds (cached pages nobody holds are not counted: they are reusable)."""
        return self._pages.used

    @property
    def kv_pages_cached(self) -> int:
        """Pages that keep a cached prefix (held or not)."""
        return len(self._pages.page_hash)

    @property
    def kv_pages_evicted(self) -> int:
        """Cached pages handed out for new contents since the decode state was made (their prefix forgotten)."""
        return self._pages.evictions

    @property
    def kv_page_references(self) -> int:
        """Sum of every page's reference count (0 when no request runs)."""
        return int(self._pages.refs.sum())

    def adapter_index(self, name: str) -> int:
        """0 for the base model; i for the i-th served adapter. KeyError for any other name."""
        if name not in self._adapter_names:
            raise KeyError(f"unknown adapter {name!r}; served: {', '.join(self._adapter_names) or 'none'}")
        return self._adapter_names.index(name) + 1

    # --- admission and prefill -------------------------------------------------------------------------------------

    def _worst_case_pages(self, prompt_length: int, max_tokens: int) -> int:
        """Pages of every position the request may write: all but its last token, within max_model_len."""
        return pages_for(min(prompt_length + max_tokens - 1, self._max_len - 1), self.page_size)

    def can_admit(self, prompt_length: int, max_tokens: int) -> bool:
        if prompt_length < 1 or prompt_length >= self._max_len:
            raise ConfigError(f"the prompt has {prompt_length} tokens; this engine takes 1 to "
                              f"{self._max_len - 1} (max_model_len {self._max_len} includes the completion)")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        pages = self._worst_case_pages(prompt_length, max_tokens)
        if pages > self._num_pages:
            raise ConfigError(f"a request of {prompt_length} prompt tokens and max_tokens {max_tokens} needs {pages} "
                              f"KV pages, more than the engine's {self._num_pages}: it could never run")
        return self._pages.can_reserve(pages)

    def can_admit_prompt(self, prompt_ids, max_tokens: int, adapter: int = 0) -> bool:
        """can_admit for this very prompt: with prefix caching, its leading pages that running requests already
        hold are shared at insert and take no page, so it may fit where can_admit(length) says no."""
        fits = self.can_admit(len(prompt_ids), max_tokens)  # also checks the sizes
        if fits or not self.enable_prefix_caching:
            return fits
        held = self._pages.held_pages(page_hashes(prompt_ids, self.page_size, adapter))
        return self._pages.can_reserve(self._worst_case_pages(len(prompt_ids), max_tokens), held)

    def pad_prompt(self, token_ids: list[int]) -> tuple[np.ndarray, int]:
        n = len(token_ids)
        if n == 0 or n >= self._max_len:
            raise ConfigError(f"the prompt has {n} tokens; this engine takes 1 to {self._max_len - 1} "
                              f"(max_model_len {self._max_len} includes the completion)")
        bad = [t for t in token_ids if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ConfigError(f"prompt token ids must be in [0, {self.config.vocab_size}), got {bad[:5]}")
        padded = np.full((self._bucket(n),), self._pad_id, np.int32)
        padded[:n] = token_ids
        return padded, n

    def _bucket(self, n: int) -> int:
        """The padded length of n tokens: a bucket, or (chunked prefill) a multiple of the largest one."""
        bucket = next((b for b in self._buckets if b >= n), None)
        return pages_for(n, self._buckets[-1]) * self._buckets[-1] if bucket is None else bucket

    def _chunked_length(self, n: int) -> int:
        """The cache length of a chunked prompt of n tokens: its padded length, rounded up to a multiple of the
        budget (chunks end on multiples of it), so one compiled chunk serves every prompt of a bucket."""
        return pages_for(self._bucket(n), self.max_num_batched_tokens) * self.max_num_batched_tokens

    def _slot_sampling(self, s: RequestSampling) -> SlotSampling:
        seed = self._seeds.integers(0, 1 << 63) if s.seed is None else s.seed
        f32 = lambda x: jnp.asarray([x], jnp.float32)  # noqa: E731
        return SlotSampling(f32(s.temperature), f32(s.top_p), jnp.asarray([max(s.top_k, 0)], jnp.int32),
                            f32(s.min_p), f32(s.repetition_penalty), f32(s.presence_penalty),
                            f32(s.frequency_penalty), jnp.asarray(_seed_words(int(seed))[None]))

    def _stop_ids(self, s: RequestSampling) -> np.ndarray:
        ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(self.eos_ids))
        out = np.full((MAX_STOP_TOKEN_IDS + len(self.eos_ids),), -1, np.int32)
        out[:len(ids)] = ids
        return out

    def prefill(self, params, padded_tokens, true_length, sampling: RequestSampling, existing_prefix=None,
                images=None):
        """Runs the prompt and samples its first token. Its leading full pages come from `existing_prefix` (a
        Prefix of this engine whose prompt this one starts with, same adapter) or, with prefix caching on, from
        the cache; only the rest runs (at least the last prompt token, whose logits are needed).
        `images` (a vision-language model: engine_vlm.RequestImages of this prompt): the tower runs once and the
        whole prompt is prefilled, without the prefix cache."""
        check_sampling(sampling, self.config.vocab_size, len(self._adapter_names))
        padded_tokens = np.asarray(padded_tokens, np.int32)
        T = padded_tokens.shape[0]
        if not 0 < true_length <= T or T % self.page_size or (T > self.max_prefill_length
                                                              and T % self.max_prefill_length):
            raise ConfigError(f"prefill got {T} padded tokens with true_length {true_length}: use pad_prompt")
        n, P = int(true_length), self.page_size
        self._check_params(params)
        tokens = tuple(int(t) for t in padded_tokens[:n])
        if images is not None:
            return self._prefill_with_images(params, padded_tokens, n, sampling, existing_prefix, images)
        hashes = tuple(page_hashes(tokens, P, sampling.adapter)) if self.enable_prefix_caching else ()
        reusable = (n - 1) // P  # full pages before the last prompt token
        source, pages, cached_pages = None, [], ()
        if existing_prefix is not None:
            source, pages = self._existing_pages(existing_prefix, tokens, sampling.adapter, reusable)
        elif hashes and self._pools is not None:
            cached_pages = tuple(self._pages.lookup(list(hashes[:reusable])))
            source, pages = self._pools, list(cached_pages)
        self.prefix_cache_hit_tokens += len(pages) * P
        self.prefix_cache_miss_tokens += n - len(pages) * P
        prefix = Prefix(None, None, n, sampling, {}, False, None, None, tokens=tokens, adapter=sampling.adapter,
                        page_hashes=hashes, cached_pages=cached_pages)
        if not pages:
            prefix.k, prefix.v, prefix.logits, prefix.prompt_mask = _prefill_jit(
                params, padded_tokens, jnp.int32(n), jnp.int32(sampling.adapter), cfg=self._shape_cfg,
                chunk=min(T, self.max_prefill_length))
            return self._first(prefix, sampling)
        cached = len(pages) * P
        rest, rest_length = self.pad_prompt(list(tokens[cached:]))
        pages_C = np.full((self._bucket(cached) // P,), SCRATCH_PAGE, np.int32)
        pages_C[:len(pages)] = pages
        prefix.k, prefix.v, prefix.logits = _prefill_after_prefix_jit(
            params, *source, pages_C, jnp.int32(cached), rest, jnp.int32(rest_length), jnp.int32(sampling.adapter),
            cfg=self._shape_cfg, chunk=min(rest.shape[0], self.max_prefill_length))
        # the rest's page j sits after the prefix's bucket of pages
        prefix.page_of = np.concatenate([np.arange(len(pages)), len(pages_C) + np.arange(rest.shape[0] // P)])
        prefix.prompt_mask = self._prompt_mask(tokens)
        return self._first(prefix, sampling)

    def _prefill_with_images(self, params, padded_tokens, n: int, sampling: RequestSampling, existing_prefix,
                             images):
        from jaxswift.infer.engine_vlm import prefill_with_images

        if self.vlm_config is None:
            raise ConfigError("this engine serves a text-only model: a request with images cannot run on it")
        if existing_prefix is not None:
            raise ConfigError("a prompt with images is prefilled whole: existing_prefix does not apply to it")
        tokens = tuple(int(t) for t in padded_tokens[:n])
        k, v, logits, prompt_mask = prefill_with_images(params, self._tower_params, padded_tokens, n, images,
                                                        self.vlm_config)
        self.prefix_cache_miss_tokens += n
        prefix = Prefix(k, v, n, sampling, {}, False, logits, prompt_mask, tokens=tokens, adapter=sampling.adapter,
                        rope_delta=images.rope_delta, cacheable=False)
        return self._first(prefix, sampling)

    def prefill_step(self, params, token_ids, sampling: RequestSampling, partial: Prefix | None = None):
        """Chunked prefill: (Prefix, None) after one more chunk of at most max_num_batched_tokens prompt tokens,
        or (Prefix, first ResultTokens) as `prefill` gives once the prompt is done. `partial` is the Prefix the
        previous call returned; it is consumed (its cache is updated in place). A prompt that fits the budget is
        one `prefill`. A longer one starts with its cached pages, if any, read into its own contiguous cache
        (`_chunk_cache`); its chunks then end on multiples of the budget, so every chunk fits that cache."""
        budget = self.max_num_batched_tokens
        if budget is None:
            raise ConfigError("prefill_step needs max_num_batched_tokens (the engine was built without it)")
        token_ids = [int(t) for t in token_ids]
        if partial is None:
            if len(token_ids) <= budget:
                return self.prefill(params, *self.pad_prompt(token_ids), sampling)
            partial = self._start_chunks(params, token_ids, sampling)
        else:
            self._check_partial(partial, token_ids, sampling)
        done = partial.length
        end = min(len(token_ids), (done // budget + 1) * budget)
        chunk = np.full((budget,), self._pad_id, np.int32)
        chunk[:end - done] = token_ids[done:end]
        cache, logits = _prefill_chunk_jit(params, partial.chunk_cache, chunk, jnp.int32(done),
                                           jnp.int32(end - done), jnp.int32(sampling.adapter), cfg=self._shape_cfg,
                                           last=end == len(token_ids))
        self.prefix_cache_miss_tokens += end - done
        tokens = tuple(token_ids[:end])
        if end < len(token_ids):
            return dataclasses.replace(partial, length=end, tokens=tokens, chunk_cache=cache), None
        prefix = dataclasses.replace(partial, k=cache.k, v=cache.v, length=end, tokens=tokens, logits=logits,
                                     prompt_mask=self._prompt_mask(tokens), chunk_cache=None)
        return self._first(prefix, sampling)

    def _prompt_mask(self, tokens) -> np.ndarray:
        """[1, V] bool: which vocabulary ids the prompt holds (repetition penalties count them)."""
        mask = np.zeros((1, self.config.vocab_size), bool)
        mask[0, list(tokens)] = True
        return mask

    @staticmethod
    def _check_partial(partial: Prefix, token_ids: list[int], sampling: RequestSampling):
        if not isinstance(partial, Prefix) or partial.chunk_cache is None:
            raise ConfigError("prefill_step: `partial` must be the unfinished Prefix an earlier prefill_step returned "
                              "(a finished one has no chunks left; pass None to start a prompt)")
        if partial.tokens != tuple(token_ids[:partial.length]) or partial.adapter != sampling.adapter:
            raise ConfigError("prefill_step: `partial` is not an earlier chunk of this prompt and adapter")
        if partial.chunk_cache.k[0].is_deleted():
            raise ConfigError("prefill_step: `partial` was already used by a later prefill_step call (its cache is "
                              "updated in place): pass the Prefix that call returned")

    def _start_chunks(self, params, token_ids: list[int], sampling: RequestSampling) -> Prefix:
        """The Prefix of a chunked prompt before its first chunk: its contiguous cache (the padded length, rounded
        up to a multiple of the budget) with the prompt's cached leading pages read in."""
        check_sampling(sampling, self.config.vocab_size, len(self._adapter_names))
        self.pad_prompt(token_ids)  # checks the length and the ids
        self._check_params(params)
        n, P = len(token_ids), self.page_size
        length = self._chunked_length(n)
        hashes = tuple(page_hashes(token_ids, P, sampling.adapter)) if self.enable_prefix_caching else ()
        cached_pages = ()
        if hashes and self._pools is not None:
            cached_pages = tuple(self._pages.lookup(list(hashes[:(n - 1) // P])))
        self.prefix_cache_hit_tokens += len(cached_pages) * P
        if self._pools is None:
            cache = _chunk_cache_jit(None, None, None, 0, cfg=self._shape_cfg, length=length)
            cache = cache if self._mesh is None else jax.device_put(cache, self._replicated())
        else:
            pages_C = np.full((length // P,), SCRATCH_PAGE, np.int32)
            pages_C[:len(cached_pages)] = cached_pages
            cache = _chunk_cache_jit(*self._pools, pages_C, jnp.int32(len(cached_pages) * P), cfg=self._shape_cfg,
                                     length=length)
        done = len(cached_pages) * P
        return Prefix(None, None, done, sampling, {}, False, None, None, tokens=tuple(token_ids[:done]),
                      adapter=sampling.adapter, page_hashes=hashes, cached_pages=cached_pages, chunk_cache=cache)

    def _existing_pages(self, existing, tokens: tuple, adapter: int, reusable: int):
        """(per-layer k/v pages of an earlier Prefix, its leading pages this prompt reuses) or a ConfigError
        naming what does not match."""
        if not isinstance(existing, Prefix) or existing.k is None:
            raise ConfigError(f"existing_prefix must be a Prefix returned by this engine's prefill, got "
                              f"{type(existing).__name__}")
        if existing.adapter != adapter:
            raise ConfigError(f"existing_prefix was computed with adapter {existing.adapter}; this request uses "
                              f"adapter {adapter}: the keys/values differ")
        shared = existing.tokens[:len(tokens)]
        if len(existing.tokens) > len(tokens) or shared != tokens[:len(shared)]:
            first = next((i for i, (a, b) in enumerate(zip(shared, tokens)) if a != b), len(tokens))
            raise ConfigError(f"existing_prefix's prompt ({len(existing.tokens)} tokens) is not a prefix of this "
                              f"prompt ({len(tokens)} tokens): they differ at token {first}")
        P = self.page_size
        count = min(existing.length // P, reusable)
        k = tuple(k_KHT.transpose(0, 2, 1).reshape(k_KHT.shape[0], -1, P, k_KHT.shape[1]) for k_KHT in existing.k)
        v = tuple(v_KTH.reshape(v_KTH.shape[0], -1, P, v_KTH.shape[2]) for v_KTH in existing.v)
        page_of = np.arange(count) if existing.page_of is None else existing.page_of[:count]
        return (k, v), [int(i) for i in page_of]

    def prompt_logprobs(self, params, token_ids: list[int], num_top: int, adapter: int = 0) -> list:
        """vLLM's prompt_logprobs: for each prompt token, None for the first, else (its log-prob given the tokens
        before it, [(token id, log-prob)] of the num_top best alternatives there, best first), under the raw
        logits (as `logprobs` of generated tokens). Runs the prompt once more than prefill does: only echo-scoring
        requests ask for it."""
        if not 0 <= num_top <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"prompt logprobs: num_top must be in 0..{MAX_TOP_LOGPROBS}, got {num_top}")
        if not 0 <= adapter <= len(self._adapter_names):
            raise ConfigError(f"sampling adapter must be in [0, {len(self._adapter_names)}], got {adapter}")
        padded, n = self.pad_prompt(token_ids)
        k = MAX_TOP_LOGPROBS if num_top else 0  # two compiled variants per bucket, not one per k
        chosen, top_ids, top_lps = jax.device_get(_prompt_logprobs_jit(
            params, padded, jnp.int32(n), jnp.int32(adapter), cfg=self._shape_cfg,
            chunk=min(padded.shape[0], self.max_prefill_length), num_top=k))
        return [None] + [(float(chosen[t]), [(int(i), float(p)) for i, p in zip(top_ids[t, :num_top],
                                                                               top_lps[t, :num_top])])
                         for t in range(n - 1)]

    def resample(self, prefix: Prefix, sampling: RequestSampling) -> tuple[Prefix, ResultTokens]:
        """Another request over the same prompt, without running it again: the prefix's keys/values (shared; insert
        copies them) and a first token drawn anew under `sampling`. For n completions of one prompt (GRPO's G)."""
        check_sampling(sampling, self.config.vocab_size, len(self._adapter_names))
        if sampling.adapter != prefix.sampling.adapter:
            raise ConfigError(f"resample keeps the prefix's adapter ({prefix.sampling.adapter}); the new request "
                              f"asks for adapter {sampling.adapter}: prefill it instead")
        return self._first(prefix, sampling)

    def _first(self, prefix: Prefix, sampling: RequestSampling) -> tuple[Prefix, ResultTokens]:
        max_tokens = min(sampling.max_tokens, self._max_len - prefix.length)  # prompt + completion fit the context
        guide, allowed = None, None
        if sampling.constraint is not None:
            guide = sampling.constraint.guide(self.grammar)
            allowed = np.zeros((1, self.grammar.words), np.uint32)
            guide.write_mask(allowed[0])
        slot, out = _first_token_jit(prefix.logits, prefix.prompt_mask, jnp.int32(prefix.length),
                                     self._slot_sampling(sampling), self._stop_ids(sampling), jnp.int32(max_tokens),
                                     jnp.int32(sampling.adapter), allowed, jnp.int32(prefix.rope_delta),
                                     num_top=MAX_TOP_LOGPROBS if sampling.logprobs else 0)
        first = self._result(jax.device_get(out), [sampling])
        if guide is not None and not first.done[0]:
            guide.advance(int(first.tokens[0]))
        return dataclasses.replace(prefix, sampling=sampling, slot=slot, done=bool(first.done[0]), guide=guide,
                                   first_token=int(first.tokens[0])), first

    @property
    def grammar(self):
        """The grammar.GrammarCompiler of this engine's tokenizer (built on first use: it indexes the vocabulary)."""
        if self._grammar is None:
            from jaxswift.infer.grammar import GrammarCompiler

            if self.tokenizer is None:
                raise ConfigError("structured output needs the model's tokenizer")
            self._grammar = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.eos_ids)
        return self._grammar

    # --- slots ----------------------------------------------------------------------------------------------------

    def _reset_host(self):
        self._pages = PageAllocator(self._num_pages, self._slots, self._pages_per_slot)
        self._requests: list[RequestSampling | None] = [None] * self._slots
        self._guides: list = [None] * self._slots  # grammar.GuideState of constrained slots
        self._positions = np.zeros((self._slots,), np.int64)
        self._active = np.zeros((self._slots,), bool)
        self._pools = None  # (k pools, v pools) of the decode state last returned: where cached pages live
        self._fed: list[list[int] | None] = [None] * self._slots  # tokens whose keys/values the slot writes
        self._chain: list = [None] * self._slots  # (prefix hash of the slot's last hashed page, pages hashed)
        self._cached_params = None  # weak reference to a leaf of the params the cached pages were computed with

    def _returned(self, state: DecodeState) -> DecodeState:
        self._pools = (state.k_pages, state.v_pages)
        return state

    def _check_params(self, params):
        """Cached keys/values hold for the weights that computed them: other params (a trainer's next step)
        forget the cache."""
        leaf = jax.tree.leaves(params)[0]
        if self._cached_params is None or self._cached_params() is not leaf:
            self._pages.clear_cache()
            try:
                self._cached_params = weakref.ref(leaf)
            except TypeError:  # not weakly referable: every prefill counts as new params
                self._cached_params = None

    def _check_state(self, state: DecodeState):
        """A decode state other than the one this engine last returned holds other pools: the cached hashes no
        longer describe them, so the cache is forgotten (reference counts stay: they are the slots')."""
        if self._pools is None or state.k_pages[0] is not self._pools[0][0]:
            self._pages.clear_cache()

    def init_decode_state(self) -> DecodeState:
        self._reset_host()
        S, V, cfg = self._slots, self.config.vocab_size, self.config
        k, v = init_pools(cfg, self._num_pages, self.page_size) if self._mesh is None else ((), ())
        zeros = lambda dtype: jnp.zeros((S,), dtype)  # noqa: E731
        sampling = SlotSampling(*(zeros(jnp.float32) for _ in range(7)), jnp.zeros((S, 2), jnp.uint32))
        sampling = sampling._replace(top_k=zeros(jnp.int32), top_p=jnp.ones((S,), jnp.float32))
        state = DecodeState(
            k, v, zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32), zeros(bool), zeros(jnp.int32),
            jnp.full((S, MAX_STOP_TOKEN_IDS + len(self.eos_ids)), -1, jnp.int32), zeros(jnp.int32), sampling,
            jnp.zeros((S, V), bool), jnp.zeros((S, V), jnp.int32), zeros(jnp.int32))
        return self._returned(state if self._mesh is None else self._placed(state))

    def _check_slot(self, slot: int):
        if not 0 <= slot < self._slots:
            raise ConfigError(f"slot {slot} is out of range (max_concurrent_decodes {self._slots})")

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        self._check_slot(slot)
        if prefix.done:  # finished at its first token (max_tokens=1, eos...): nothing to decode
            return decode_state
        self._check_state(decode_state)
        held = self._pages.held_pages(list(prefix.page_hashes)) if self.enable_prefix_caching else 0
        self._pages.reserve(slot, self._worst_case_pages(prefix.length, prefix.sampling.max_tokens), held)
        shared = self._share_cached_pages(prefix, slot)
        owned = self._pages.owned[slot]
        self._pages.grow(slot, pages_for(prefix.length, self.page_size))
        page_of = np.arange(len(owned)) if prefix.page_of is None else prefix.page_of
        pages = np.full((prefix.k[0].shape[-1] // self.page_size,), SCRATCH_PAGE, np.int32)
        pages[page_of[shared:len(owned)]] = owned[shared:]  # shared pages already hold these keys/values
        state = _insert_jit(decode_state, prefix.k, prefix.v, prefix.slot, jnp.int32(slot), pages)
        for page, key in zip(owned[shared:], prefix.page_hashes[shared:]):
            self._pages.register(page, key)
        if self.enable_prefix_caching and prefix.cacheable:  # pages the slot fills while decoding are cached
            self._fed[slot] = [*prefix.tokens, prefix.first_token]
            self._chain[slot] = (prefix.page_hashes[-1] if prefix.page_hashes else hash_seed(prefix.adapter),
                                 len(prefix.page_hashes))
        self._requests[slot], self._positions[slot], self._active[slot] = prefix.sampling, prefix.length, True
        self._guides[slot] = prefix.guide
        return self._returned(state)

    def cache_prefix(self, prefix: Prefix, decode_state: DecodeState) -> DecodeState:
        """Caches the full prompt pages of a request that takes no slot (it ended at its first token, or its
        client left), so that the next request with this prompt finds them. The pages go straight to the
        evictable list: they take nothing from running requests (a never-cached page, or the least recently
        freed cached one, is reused). A no-op with prefix caching off."""
        if not self.enable_prefix_caching or prefix.k is None:
            return decode_state
        self._check_state(decode_state)
        page_of = np.arange(len(prefix.page_hashes)) if prefix.page_of is None else prefix.page_of
        new = [i for i, key in enumerate(prefix.page_hashes) if key not in self._pages.cached]
        new = new[:self._pages.available]
        if not new:
            return decode_state
        pages = self._pages.keep(prefix.page_hashes[i] for i in new)
        pages_C = np.full((prefix.k[0].shape[-1] // self.page_size,), SCRATCH_PAGE, np.int32)
        pages_C[page_of[new]] = pages
        return self._returned(_write_pages_jit(decode_state, prefix.k, prefix.v, pages_C))

    def _share_cached_pages(self, prefix: Prefix, slot: int) -> int:
        """Gives the slot the cached pages its prompt starts with, as cached now: those prefill read, unless one
        was evicted since, and any cached meanwhile (an identical prompt inserted in between). Returns how many;
        the slot writes the rest of the prompt's pages from the prefix's own keys/values."""
        if not self.enable_prefix_caching:
            return 0
        pages = self._pages.lookup(list(prefix.page_hashes))
        for page in pages:
            self._pages.share(slot, page)
        return len(pages)

    def free_resource(self, decode_state: DecodeState, slot: int) -> DecodeState:
        self._check_slot(slot)
        self._check_state(decode_state)
        self._pages.release(slot)
        self._requests[slot], self._active[slot], self._guides[slot] = None, False, None
        self._fed[slot] = self._chain[slot] = None
        return self._returned(_free_jit(decode_state, jnp.int32(slot)))

    def _gather_pages(self) -> int:
        """Pages per slot the step reads: enough for the longest running request, as a power of two."""
        needed = max((int(p) // self.page_size + 1 for p in self._positions[self._active]), default=1)
        pages = pages_for(MIN_GATHER_TOKENS, self.page_size)
        while pages < needed:
            pages *= 2
        return min(pages, self._pages_per_slot)

    def _step_rows(self, plain: bool) -> np.ndarray:
        """The slots a step runs: all of them unless `plain`; then the running ones, padded with free slots to a
        power of two (a few compiled sizes), so that the step's cost follows the load, not max_concurrent_decodes.
        Steps that need the per-slot pipelines (penalties, logprobs, grammar) run every slot: fewer compiles."""
        if not plain:
            return np.arange(self._slots, dtype=np.int32)
        running = np.flatnonzero(self._active)
        rows = 1
        while rows < len(running):
            rows *= 2
        rows = min(rows, self._slots)
        free = np.flatnonzero(~self._active)[:rows - len(running)]
        return np.sort(np.concatenate([running, free])).astype(np.int32)

    @staticmethod
    def _needs_penalties(r: RequestSampling) -> bool:
        return r.repetition_penalty != 1 or r.presence_penalty != 0 or r.frequency_penalty != 0

    def generate(self, params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        self._check_state(decode_state)
        for slot in np.flatnonzero(self._active):
            self._pages.grow(slot, int(self._positions[slot]) // self.page_size + 1)
        requests = [r if a else None for r, a in zip(self._requests, self._active)]
        num_top = MAX_TOP_LOGPROBS if any(r is not None and r.logprobs for r in requests) else 0
        penalties = any(r is not None and self._needs_penalties(r) for r in requests)
        guided = [slot for slot in np.flatnonzero(self._active) if self._guides[slot] is not None]
        rows = self._step_rows(plain=not (num_top or penalties or guided))
        table = self._pages.table[rows, :self._gather_pages()]
        allowed = None  # no constrained slot: the step compiled without the mask
        if guided:
            allowed = np.full((self._slots, self.grammar.words), 0xFFFFFFFF, np.uint32)
            for slot in guided:
                self._guides[slot].write_mask(allowed[slot])
        state, out = _generate_jit(params, decode_state, rows, table, allowed, cfg=self._shape_cfg, num_top=num_top,
                                   penalties=penalties)
        result = self._result(jax.device_get(out), requests)
        for slot in guided:
            if result.valid[slot] and not result.done[slot]:
                self._guides[slot].advance(int(result.tokens[slot]))
        self._positions += result.valid
        self._cache_filled_pages(result)
        self._active &= ~result.done
        return self._returned(state), result

    def _cache_filled_pages(self, result: ResultTokens):
        """Caches each page a decode step filled (a multi-turn chat's next prompt starts with the reply)."""
        P = self.page_size
        for slot in np.flatnonzero(result.valid):
            fed = self._fed[slot]
            if fed is None:
                continue
            fed.append(int(result.tokens[slot]))  # the next step's input
            key, hashed = self._chain[slot]
            while hashed < int(self._positions[slot]) // P:  # pages whose every position is written
                key = next_page_hash(key, fed[hashed * P:(hashed + 1) * P])
                self._pages.register(self._pages.owned[slot][hashed], key)
                hashed += 1
            self._chain[slot] = (key, hashed)

    def _smallest_of_each_bucket(self, lengths) -> dict[int, int]:
        """{padded length: the smallest of `lengths` padded to it}."""
        out = {}
        for n in lengths:
            out.setdefault(self._bucket(n), n)
        return out

    def warmup(self, params=None) -> DecodeState:
        """Compiles what serving runs, so that no request waits for a compile (a server calls this before taking
        traffic): prefill, insert and first-token sampling for every bucket; with prefix caching, the prefill
        after a cached prefix for every (prefix bucket, rest bucket) pair a prompt can have, and its insert; with
        chunked prefill, for each cache length a chunked prompt can have, its cache, a chunk and its insert; and the decode step for every gather size: the per-slot pipelines
        (penalties, with and without logprobs) over all slots, and the plain step for each power-of-two count of
        running slots. Still compiled on first use: prompts beyond the largest bucket (without chunked prefill),
        a grammar-constrained step, and the caching of a prompt that ended at its first token after a cache hit. Returns a fresh decode state (the previous
        one is reset)."""
        params = self.params if params is None else params
        counters = self.prefix_cache_hit_tokens, self.prefix_cache_miss_tokens  # warmup is no traffic
        state = self.init_decode_state()
        two_tokens = RequestSampling(max_tokens=2, ignore_eos=True)  # not done at its first token: inserted
        for bucket in self._buckets:
            for logprobs in (None, 1):
                prefix, _ = self.prefill(params, np.zeros((bucket,), np.int32), 1,
                                         RequestSampling(max_tokens=2, logprobs=logprobs, ignore_eos=True))
            state = self.free_resource(self.insert(prefix, state, 0), 0)
        if self.enable_prefix_caching:  # a head of zeros is cached; each hit reads c of its pages, then ones
            P, last = self.page_size, self._max_len - 1
            heads = self._smallest_of_each_bucket(range(P, last, P))
            rests = self._smallest_of_each_bucket(range(1, last))
            pairs = [(c, r) for c in heads.values() for r in rests.values() if c + r <= last]
            if pairs:
                head, _ = self.prefill(params, *self.pad_prompt([0] * max(c for c, _ in pairs)),
                                       RequestSampling(max_tokens=1))
                state = self.cache_prefix(head, state)
            for c, r in pairs:  # (inserted too: insert compiles per prefix shape)
                hit, _ = self.prefill(params, *self.pad_prompt([0] * c + [1] * r), two_tokens)
                state = self.free_resource(self.insert(hit, state, 0), 0)
        budget = self.max_num_batched_tokens
        if budget is not None:  # per cache length a chunked prompt can have: its cache, a chunk, and the insert
            prompt_length = {self._chunked_length(n): n for n in range(budget + 1, self._max_len)}
            for n in prompt_length.values():
                prompt = [2] * n
                partial = self._start_chunks(params, prompt, two_tokens)
                # only the last two chunks run (one of each kind): the keys/values do not matter here
                start = max((n - 1) // budget * budget - budget, partial.length)
                partial, first = dataclasses.replace(partial, length=start, tokens=tuple(prompt[:start])), None
                while first is None:
                    partial, first = self.prefill_step(params, prompt, two_tokens, partial)
                state = self.free_resource(self.insert(partial, state, 0), 0)
        self.prefix_cache_hit_tokens, self.prefix_cache_miss_tokens = counters
        every = np.arange(self._slots, dtype=np.int32)
        variants = [(every, num_top, True) for num_top in (0, MAX_TOP_LOGPROBS)]  # the per-slot pipelines
        rows = 1
        while True:  # plain steps (greedy / temperature / top-p): one per power-of-two count of running slots
            variants.append((every[:min(rows, self._slots)], 0, False))
            if rows >= self._slots:
                break
            rows *= 2
        pages = pages_for(MIN_GATHER_TOKENS, self.page_size)
        while True:
            for rows, num_top, penalties in variants:
                table = self._pages.table[rows, :min(pages, self._pages_per_slot)]
                state, _ = _generate_jit(params, state, rows, table, None, cfg=self._shape_cfg, num_top=num_top,
                                         penalties=penalties)
            if pages >= self._pages_per_slot:
                return self.init_decode_state()
            pages *= 2

    @staticmethod
    def _result(out, requests: list[RequestSampling | None]) -> ResultTokens:
        tokens, valid, lengths, done, chosen, top_ids, top_logprobs = (np.asarray(x) for x in out)
        k = max((r.logprobs or 0 for r in requests if r is not None), default=0)
        return ResultTokens(tokens, valid.astype(bool), lengths, done.astype(bool), chosen, top_ids[:, :k],
                            top_logprobs[:, :k])


def _check_sizes(slots, max_model_len, page_size, num_pages, buckets):
    for name, value in (("max_concurrent_decodes", slots), ("max_model_len", max_model_len),
                        ("page_size", page_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if max_model_len < 2:
        raise ConfigError(f"max_model_len must be >= 2 (a prompt token and a completion token), got {max_model_len}")
    if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 1):
        raise ConfigError(f"num_pages must be a positive integer, got {num_pages!r}")
    if not buckets or any(not isinstance(b, int) or b < 1 or b % page_size for b in buckets):
        raise ConfigError(f"prefill_buckets must be positive multiples of page_size {page_size}, got {buckets}")


def check_sampling(s: RequestSampling, vocab_size: int, num_adapters: int):
    """ConfigError naming the first field of `s` out of range (vLLM's bounds)."""
    checks = [
        ("temperature", s.temperature >= 0, ">= 0"), ("top_p", 0 < s.top_p <= 1, "in (0, 1]"),
        ("top_k", s.top_k >= -1, ">= -1 (0 or -1: off)"), ("min_p", 0 <= s.min_p <= 1, "in [0, 1]"),
        ("repetition_penalty", s.repetition_penalty > 0, "> 0"),
        ("presence_penalty", -2 <= s.presence_penalty <= 2, "in [-2, 2]"),
        ("frequency_penalty", -2 <= s.frequency_penalty <= 2, "in [-2, 2]"),
        ("max_tokens", isinstance(s.max_tokens, int) and s.max_tokens >= 1, "an integer >= 1"),
        ("logprobs", s.logprobs is None or 0 <= s.logprobs <= MAX_TOP_LOGPROBS, f"None or 0..{MAX_TOP_LOGPROBS}"),
        ("stop_token_ids", len(s.stop_token_ids) <= MAX_STOP_TOKEN_IDS
         and all(0 <= int(t) < vocab_size for t in s.stop_token_ids),
         f"at most {MAX_STOP_TOKEN_IDS} ids in [0, {vocab_size})"),
        ("adapter", 0 <= s.adapter <= num_adapters, f"in [0, {num_adapters}]"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"sampling {name} must be {expected}, got {getattr(s, name)!r}")
