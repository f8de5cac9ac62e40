"""Chunked prefill (max_num_batched_tokens), the plain decode step over the running slots only, and warmup.

Reference: jaxswift.generate_ids on each prompt alone (greedy), and the same engine without chunking.
"""

import pytest
from test_engine import drive, greedy, random_prompts, save_random_adapter, tiny_engine  # noqa: F401
from test_prefix_cache import assert_all_released, tiny  # noqa: F401  (the shared tiny llama fixture)

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.infer.engine_api import RequestSampling


def test_prefill_step_chunks_equal_whole_prefill_and_count_no_self_hits(tiny):  # noqa: F811
    whole = tiny_engine(tiny)
    chunked = tiny_engine(tiny, max_num_batched_tokens=16)
    ids = random_prompts([61], seed=31)[0]
    sampling = RequestSampling(max_tokens=8, ignore_eos=True)
    partial, first, chunks = None, None, []
    while first is None:
        partial, first = chunked.prefill_step(chunked.params, ids, sampling, partial)
        chunks.append(partial.length)
    assert chunks == [16, 32, 48, 61]  # page-aligned chunks of at most 16 tokens, then the rest
    assert chunked.prefix_cache_hit_tokens == 0 and chunked.prefix_cache_miss_tokens == 61
    state = chunked.insert(partial, chunked.init_decode_state(), 1)
    got = [int(first.tokens[0])]
    for _ in range(7):
        state, result = chunked.generate(chunked.params, state)
        got.append(int(result.tokens[1]))
    assert got == drive(whole, [(ids, sampling)])[0][0] == greedy(tiny, ids, 8)


def test_chunks_after_cached_pages_start_off_the_budget_grid_and_equal_generate(tiny):  # noqa: F811
    engine = tiny_engine(tiny, max_num_batched_tokens=16)
    head, tail = random_prompts([40, 30], seed=37)
    sampling = RequestSampling(max_tokens=8, ignore_eos=True)
    state = engine.init_decode_state()
    partial, first = None, None
    while first is None:
        partial, first = engine.prefill_step(engine.params, head, sampling, partial)
    state = engine.insert(partial, state, 0)  # caches the head's 5 full pages
    hits, misses = engine.prefix_cache_hit_tokens, engine.prefix_cache_miss_tokens
    partial, first, chunks = None, None, []
    while first is None:
        partial, first = engine.prefill_step(engine.params, head + tail, sampling, partial)
        chunks.append(partial.length)
    assert chunks == [48, 64, 70]  # from the 40 cached tokens up to the budget's grid, then chunks of 16
    assert engine.prefix_cache_hit_tokens - hits == 40 and engine.prefix_cache_miss_tokens - misses == 30
    state = engine.insert(partial, state, 1)
    got = [int(first.tokens[0])]
    for _ in range(7):
        state, result = engine.generate(engine.params, state)
        got.append(int(result.tokens[1]))
    assert got == greedy(tiny, head + tail, 8)


def test_orchestrator_decodes_between_chunks_and_outputs_stay_the_same(tiny, smol_tokenizer):  # noqa: F811
    from jaxswift.infer.orchestrator import GenerationRequest, Orchestrator

    engine = tiny_engine(tiny, max_num_batched_tokens=16)
    calls = []  # what the engine thread ran, in order
    for name in ("prefill_step", "prefill", "generate"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    short, long_a, long_b = random_prompts([6, 100, 45], seed=32)
    orchestrator = Orchestrator(engine, tokenizer=smol_tokenizer)
    try:  # the short prompt is admitted first and decodes 40 tokens: it runs while both long prompts are prefilled
        got = orchestrator.generate([GenerationRequest(short, RequestSampling(max_tokens=40, ignore_eos=True)),
                                     GenerationRequest(long_a, RequestSampling(max_tokens=10, ignore_eos=True)),
                                     GenerationRequest(long_b, RequestSampling(max_tokens=10, ignore_eos=True))])
    finally:
        orchestrator.shutdown()
    assert got[0].token_ids == jaxswift.generate_ids(tiny, [short], max_new_tokens=40, ignore_eos=True)[0]
    assert got[1].token_ids == greedy(tiny, long_a, 10) and got[2].token_ids == greedy(tiny, long_b, 10)
    assert_all_released(engine)
    # 100 tokens: 7 chunks (6 of 16, then 4), 45: 3; the short stream decodes between every two of them
    steps = [c for c in calls if c != "prefill"]
    assert steps.count("prefill_step") == 10
    first, last = steps.index("prefill_step"), len(steps) - 1 - steps[::-1].index("prefill_step")
    between = steps[first:last + 1]
    assert not any(a == b == "prefill_step" for a, b in zip(between, between[1:])), between


def test_max_num_batched_tokens_bad_values_are_rejected(tiny, tiny_chat_model):  # noqa: F811
    for bad in (0, -8, 12, 4, True, 16.0, "16"):
        with pytest.raises(ConfigError, match="max_num_batched_tokens must be a positive multiple of page_size 8"):
            tiny_engine(tiny, max_num_batched_tokens=bad)
    with pytest.raises(ConfigError, match="prefill_step needs max_num_batched_tokens"):
        engine = tiny_engine(tiny)
        engine.prefill_step(engine.params, [3, 4, 5], RequestSampling(max_tokens=2))
    engine = tiny_engine(tiny, max_num_batched_tokens=16)
    ids = random_prompts([40], seed=33)[0]
    partial, _ = engine.prefill_step(engine.params, ids, RequestSampling(max_tokens=2))
    with pytest.raises(ConfigError, match="not an earlier chunk"):
        engine.prefill_step(engine.params, [9] + ids[1:], RequestSampling(max_tokens=2), partial)
    later, _ = engine.prefill_step(engine.params, ids, RequestSampling(max_tokens=2), partial)
    with pytest.raises(ConfigError, match="already used by a later prefill_step call"):
        engine.prefill_step(engine.params, ids, RequestSampling(max_tokens=2), partial)
    finished, first = engine.prefill_step(engine.params, ids, RequestSampling(max_tokens=2), later)
    assert first is not None
    with pytest.raises(ConfigError, match="a finished one has no chunks left"):
        engine.prefill_step(engine.params, ids, RequestSampling(max_tokens=2), finished)

    from jaxswift.infer.orchestrator import GenerationRequest
    from jaxswift.recipes.serve import ServeArguments, build_server
    from jaxswift.train.args import parse_args

    with pytest.raises(ConfigError, match="--max_num_batched_tokens must be a positive multiple of --page_size"):
        parse_args(ServeArguments, ["--max_num_batched_tokens", "24", "--page_size", "16"])
    _, orchestrator = build_server(parse_args(ServeArguments, [
        "--model", str(tiny_chat_model), "--max_model_len", "64", "--max_num_batched_tokens", "32", "--no_warmup"]))
    try:
        assert orchestrator.engine.max_num_batched_tokens == 32
        got = orchestrator.generate([GenerationRequest(list(range(5, 50)),
                                                       RequestSampling(max_tokens=3, ignore_eos=True))])[0]
        assert got.finish_reason == "length" and len(got.token_ids) == 3
    finally:
        orchestrator.shutdown()


def test_plain_steps_run_only_the_running_slots_and_penalties_switch_to_every_slot(tiny):  # noqa: F811
    engine = tiny_engine(tiny, max_concurrent_decodes=8)
    a, b, c = random_prompts([7, 19, 12], seed=34)
    plain = RequestSampling(max_tokens=12, ignore_eos=True)
    penalized = RequestSampling(max_tokens=12, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5)
    state = engine.init_decode_state()
    got = {}
    for slot, ids in ((5, a), (2, b)):
        prefix, first = engine.prefill(engine.params, *engine.pad_prompt(ids), plain)
        state, got[slot] = engine.insert(prefix, state, slot), [int(first.tokens[0])]
    assert engine._step_rows(plain=True).tolist() == [2, 5]  # 2 running slots of 8: a 2-row step
    state, result = engine.generate(engine.params, state)
    for slot in (5, 2):
        got[slot].append(int(result.tokens[slot]))
    assert not result.valid[[0, 1, 3, 4, 6, 7]].any()
    prefix, first = engine.prefill(engine.params, *engine.pad_prompt(c), penalized)
    state, got[7] = engine.insert(prefix, state, 7), [int(first.tokens[0])]
    assert sorted(engine._step_rows(plain=True).tolist()) == [0, 2, 5, 7]  # 3 running: 4 rows
    for _ in range(11):
        state, result = engine.generate(engine.params, state)
        for slot in (5, 2, 7):
            if result.valid[slot]:
                got[slot].append(int(result.tokens[slot]))
    assert got[5] == greedy(tiny, a, 12) and got[2] == greedy(tiny, b, 12)
    alone = tiny_engine(tiny, max_concurrent_decodes=1)
    assert got[7] == drive(alone, [(c, penalized)])[0][0]
    assert got[7] != greedy(tiny, c, 12)  # the penalties did act


def test_warmup_leaves_nothing_to_compile_for_hits_chunks_and_step_sizes(tiny):  # noqa: F811
    import jaxswift.infer.engine as engine_module

    caching = tiny_engine(tiny, max_model_len=64)
    chunking = tiny_engine(tiny, max_model_len=64, max_num_batched_tokens=16)
    for engine in (caching, chunking):
        engine.warmup()
        assert engine.prefix_cache_hit_tokens == engine.prefix_cache_miss_tokens == engine.kv_pages_cached == 0
        assert engine.kv_pages_used == engine.kv_page_references == 0
    jitted = [getattr(engine_module, name) for name in dir(engine_module) if name.endswith("_jit")]
    compiled = [f._cache_size() for f in jitted]
    base, tails = random_prompts([40], seed=35)[0], random_prompts([1, 9, 20, 23], seed=36)
    sampling = RequestSampling(max_tokens=4, ignore_eos=True)
    # hits after 8..40 cached tokens with rests of each bucket (16, 32, 64), prompts of 1 to 4 chunks, 1 to 3
    # running slots
    requests = [(base[:9], sampling), (base[:33], sampling), (base[:8] + tails[2], sampling),
                (base[:24] + tails[3], sampling), (base[:40] + tails[1], sampling), (base + tails[2], sampling),
                (base[:16] + tails[0], sampling), (base[:14], sampling)]
    arrivals = [0, 1, 1, 2, 6, 6, 6, 7]
    got = {engine.max_num_batched_tokens: drive(engine, requests, arrivals=arrivals)[0]
           for engine in (caching, chunking)}
    assert caching.prefix_cache_hit_tokens > 0 and chunking.prefix_cache_hit_tokens > 0
    assert [f._cache_size() for f in jitted] == compiled
    reference = tiny_engine(tiny, max_model_len=64, enable_prefix_caching=False)
    assert got[None] == got[16] == drive(reference, requests, arrivals=arrivals)[0]
