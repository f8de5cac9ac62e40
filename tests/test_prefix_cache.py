"""Prefix caching in the paged engine: full prompt pages keyed by chained hashes (and the adapter), shared with
reference counts, evicted least-recently-freed; `existing_prefix`; the counters and the deploy flag.

Reference: the same engine with enable_prefix_caching=False (whose outputs test_engine.py checks against
jaxswift.generate_ids and transformers), and generate_ids itself for adapters.
"""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from test_engine import EOS, VOCAB, drive, greedy, random_prompts, save_random_adapter, tiny_engine
from transformers import AutoConfig, AutoModelForCausalLM

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.infer.engine_api import RequestSampling
from jaxswift.infer.kv_cache import PageAllocator, page_hashes

P = 8  # tiny_engine's page size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_engine's tiny llama (same shapes, so the compiled functions are shared within a test run)."""
    folder = tmp_path_factory.mktemp("tiny_prefix_model")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=512, bos_token_id=0, eos_token_id=EOS)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return jaxswift.load_model(str(folder))


def assert_all_released(engine):
    assert engine.kv_pages_used == 0 and engine.kv_page_references == 0
    assert not engine._pages.promised and not any(engine._pages.owned)


def shared_prefix_prompts():
    """Prompts sharing a 70-token base at lengths around page boundaries (8, 16, 24 exactly), longer than the
    largest bucket (chunked rest), repeated whole, and unrelated ones."""
    base, other, tail = random_prompts([70, 20, 9], seed=11)
    return [base[:16], base[:16] + [5], base[:24], base[:17], base[:40] + tail[:5], base[:70] + tail, base[:8],
            other, base[:16], base[:24] + tail, base[:33], other + tail, base[:70] + tail]


def test_page_hashes_chain_over_the_prefix_and_the_adapter():
    a = list(range(2, 26))
    assert len(page_hashes(a, P)) == 3 and len(page_hashes(a[:23], P)) == 2  # full pages only
    assert page_hashes(a, P)[:2] == page_hashes(a[:16] + [99] * 8, P)[:2]
    b = [3] + a[1:]  # differs in page 0 only: every later page's key differs too (chained)
    assert all(x != y for x, y in zip(page_hashes(a, P), page_hashes(b, P)))
    assert all(x != y for x, y in zip(page_hashes(a, P), page_hashes(a, P, adapter=1)))


def test_allocator_shares_counts_and_evicts_least_recently_freed():
    pages = PageAllocator(num_pages=5, slots=2, max_pages_per_slot=5)
    keys = page_hashes(range(24), P)
    pages.reserve(0, 3)
    owned = pages.grow(0, 3)
    for page, key in zip(owned, keys):
        pages.register(page, key)
    pages.reserve(1, 2)
    pages.share(1, owned[0])
    assert pages.refs[owned[0]] == 2 and pages.used == 3 and pages.promised == 1
    pages.release(0)
    assert pages.used == 1 and pages.available == 4 and list(pages.evictable) == [owned[2], owned[1]]
    pages.release(1)
    assert pages.used == 0 and list(pages.evictable) == [owned[2], owned[1], owned[0]]
    assert pages.lookup(keys) == owned and pages.lookup(page_hashes(range(1, 25), P)) == []
    pages.reserve(1, 5)
    pages.share(1, owned[0])
    pages.grow(1, 4)  # the 2 never-cached pages first, then the least recently freed cached one (the tail)
    assert pages.evictions == 1 and pages.lookup(keys) == owned[:2] and not pages.holds(owned[2], keys[2])
    pages.release(1)
    assert pages.used == 0 and not pages.refs.any() and pages.available == 5


def test_greedy_outputs_equal_with_caching_on_and_off(tiny):
    prompts = shared_prefix_prompts()
    requests = [(p, RequestSampling(max_tokens=12, ignore_eos=True)) for p in prompts]
    arrivals = list(range(len(prompts)))
    on, off = tiny_engine(tiny), tiny_engine(tiny, enable_prefix_caching=False)
    got, _ = drive(on, requests, arrivals=arrivals)
    want, _ = drive(off, requests, arrivals=arrivals)
    assert got == want
    assert off.prefix_cache_hit_tokens == 0 and on.prefix_cache_hit_tokens >= 200
    assert on.prefix_cache_hit_tokens + on.prefix_cache_miss_tokens == sum(map(len, prompts))
    assert off.prefix_cache_miss_tokens == sum(map(len, prompts))
    assert_all_released(on)
    assert_all_released(off)
    assert on.kv_pages_cached > 0 and off.kv_pages_cached == 0


def test_reuse_stops_before_the_last_prompt_token_and_skips_the_partial_page(tiny):
    engine = tiny_engine(tiny)
    base = random_prompts([40], seed=3)[0]
    state = engine.init_decode_state()
    sampling = RequestSampling(max_tokens=3, ignore_eos=True)

    def hits_of(ids):
        nonlocal state
        before = engine.prefix_cache_hit_tokens
        prefix, _ = engine.prefill(engine.params, *engine.pad_prompt(ids), sampling)
        state = engine.free_resource(engine.insert(prefix, state, 0), 0)
        return engine.prefix_cache_hit_tokens - before

    assert hits_of(base[:24]) == 0  # caches 3 full pages
    assert hits_of(base[:24]) == 16  # the third page holds the last prompt token: it runs again
    assert hits_of(base[:16]) == 8
    assert hits_of(base[:25]) == 24
    assert hits_of(base[:21]) == 16  # a partial page (tokens 16..20 of base[:25]) is never cached
    assert hits_of(base[:7] + [1]) == 0
    assert_all_released(engine)


def test_eviction_under_page_pressure_stays_correct(tiny):
    """Few pages: cached pages are evicted for new requests (oldest first), also between a request's prefill and
    its insert; outputs stay those of the engine without caching."""
    prompts = shared_prefix_prompts() + random_prompts([30, 26, 41], seed=7)
    requests = [(p, RequestSampling(max_tokens=6, ignore_eos=True)) for p in prompts]
    arrivals = [i // 2 for i in range(len(prompts))]
    on = tiny_engine(tiny, num_pages=16)
    off = tiny_engine(tiny, num_pages=16, enable_prefix_caching=False)
    got, _ = drive(on, requests, arrivals=arrivals)
    assert got == drive(off, requests, arrivals=arrivals)[0]
    assert on.kv_pages_evicted > 0 and on.prefix_cache_hit_tokens > 0
    assert_all_released(on)

    # prefill reads 3 cached pages; another request then takes two of them before this one is inserted
    engine = tiny_engine(tiny, num_pages=8)
    base, other = random_prompts([26, 40], seed=9)
    state = engine.init_decode_state()
    sampling = RequestSampling(max_tokens=4, ignore_eos=True)
    prefix, _ = engine.prefill(engine.params, *engine.pad_prompt(base[:24]), sampling)
    state = engine.free_resource(engine.insert(prefix, state, 0), 0)  # caches base's 3 full pages
    late, late_first = engine.prefill(engine.params, *engine.pad_prompt(base), sampling)
    assert late.cached_pages and len(late.cached_pages) == 3
    squeeze, _ = engine.prefill(engine.params, *engine.pad_prompt(other), RequestSampling(max_tokens=12,
                                                                                       ignore_eos=True))
    state = engine.insert(squeeze, state, 1)  # 6 pages: 5 never-cached ones, then the oldest freed cached one
    state, _ = engine.generate(engine.params, state)
    state = engine.free_resource(state, 1)
    assert engine.kv_pages_evicted >= 1
    state = engine.insert(late, state, 0)
    out = [int(late_first.tokens[0])]
    for _ in range(3):
        state, result = engine.generate(engine.params, state)
        out.append(int(result.tokens[0]))
    state = engine.free_resource(state, 0)
    assert out == greedy(tiny, base, 4)
    assert_all_released(engine)


def test_the_adapter_separates_caches(tiny, tmp_path):
    from jaxswift.checkpoints.peft import load_peft_adapter
    from jaxswift.tuners.lora import LoraConfig

    # test_engine's two adapters (same stacked shapes: the compiled functions are shared within a test run)
    folder = save_random_adapter(tiny, tmp_path / "all", LoraConfig(rank=4, alpha=8), 1)
    qv = save_random_adapter(tiny, tmp_path / "qv", LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj")),
                             2)
    engine = tiny_engine(tiny, adapters={"all": str(folder), "qv": str(qv)})
    adapted = jaxswift.api.Model(tiny.config, load_peft_adapter(tiny.params, tiny.config, folder)[0])
    ids = random_prompts([30], seed=4)[0]
    plan = [0, 1, 1, 0]
    requests = [(ids, RequestSampling(max_tokens=8, ignore_eos=True, adapter=a)) for a in plan]
    got, _ = drive(engine, requests, arrivals=[0, 1, 2, 3])
    base_out, adapted_out = greedy(tiny, ids, 8), greedy(adapted, ids, 8)
    assert base_out != adapted_out
    assert got == {0: base_out, 1: adapted_out, 2: adapted_out, 3: base_out}
    assert engine.prefix_cache_hit_tokens == 2 * 24  # requests 2 and 3 hit their own adapter's pages only
    assert_all_released(engine)


def test_existing_prefix_runs_only_the_rest_and_checks_what_it_is_given(tiny):
    engine = tiny_engine(tiny, enable_prefix_caching=False)  # existing_prefix works without the automatic cache
    base = random_prompts([45], seed=6)[0]
    sampling = RequestSampling(max_tokens=5, ignore_eos=True)
    head, _ = engine.prefill(engine.params, *engine.pad_prompt(base[:20]), sampling)
    nested, _ = engine.prefill(engine.params, *engine.pad_prompt(base[:37]), sampling, existing_prefix=head)
    assert engine.prefix_cache_hit_tokens == 16  # head's two full pages
    for reused in (head, nested):  # nested itself keeps its keys/values in a prefix-then-rest layout
        before = engine.prefix_cache_hit_tokens
        state = engine.init_decode_state()
        prefix, first = engine.prefill(engine.params, *engine.pad_prompt(base), sampling, existing_prefix=reused)
        assert engine.prefix_cache_hit_tokens - before == (reused.length // P) * P
        state = engine.insert(prefix, state, 0)
        out = [int(first.tokens[0])]
        for _ in range(4):
            state, result = engine.generate(engine.params, state)
            out.append(int(result.tokens[0]))
        engine.free_resource(state, 0)
        assert out == greedy(tiny, base, 5)

    with pytest.raises(ConfigError, match="differ at token 3"):
        engine.prefill(engine.params, *engine.pad_prompt(base[:3] + [0] + base[4:30]), sampling,
                       existing_prefix=head)
    with pytest.raises(ConfigError, match="is not a prefix"):
        engine.prefill(engine.params, *engine.pad_prompt(base[:10]), sampling, existing_prefix=head)
    with pytest.raises(ConfigError, match="must be a Prefix"):
        engine.prefill(engine.params, *engine.pad_prompt(base), sampling, existing_prefix=np.zeros(3))
    with pytest.raises(ConfigError, match="computed with adapter 1; this request uses adapter 0"):
        engine.prefill(engine.params, *engine.pad_prompt(base), sampling,
                       existing_prefix=dataclasses.replace(head, adapter=1))
    with pytest.raises(ConfigError, match="enable_prefix_caching must be True or False"):
        tiny_engine(tiny, enable_prefix_caching="yes")


def test_64_streams_shared_and_unshared_some_cancelled_leave_nothing_behind(tiny, smol_tokenizer):
    from jaxswift.infer.orchestrator import GenerationRequest, Orchestrator
    from jaxswift.serve.metrics import ServerMetrics

    base = random_prompts([40], seed=21)[0]
    tails = random_prompts([3, 9, 14, 5, 11, 1, 7, 20], seed=22)
    unshared = random_prompts([12, 25, 33, 19, 8, 27, 16, 30], seed=23)
    prompts = [base + t for t in tails] + unshared
    reference = tiny_engine(tiny, max_concurrent_decodes=8, enable_prefix_caching=False)
    sampling = RequestSampling(max_tokens=10, ignore_eos=True)
    want, _ = drive(reference, [(p, sampling) for p in prompts])

    engine = tiny_engine(tiny, max_concurrent_decodes=8, num_pages=40)
    orchestrator = Orchestrator(engine, max_queue=128, tokenizer=smol_tokenizer)  # any text will do
    cancel = {i for i in range(64) if i % 5 == 2}
    outputs, finished, all_done = {i: [] for i in range(64)}, set(), threading.Event()

    def sink_for(i):
        def sink(_, chunk):  # called on the engine thread only
            outputs[i] += chunk.token_ids
            gone = i in cancel and len(outputs[i]) >= 2
            if chunk.final or gone:
                finished.add(i)
                if len(finished) == 64:
                    all_done.set()
            if gone:  # a streaming client that went away: the orchestrator abandons the request
                raise ConnectionResetError("client gone")
        return sink

    try:
        for i in range(64):
            orchestrator.submit([GenerationRequest(prompts[i % len(prompts)], sampling)], sink_for(i))
        assert all_done.wait(300)
        assert wait_until_idle(orchestrator, engine)
        metrics = ServerMetrics(orchestrator).render()[0].decode()
    finally:
        orchestrator.shutdown()
    assert all(len(outputs[i]) < 10 for i in cancel)  # they did stop early
    for i in range(64):
        expected = want[i % len(prompts)]
        if i in cancel:
            assert outputs[i] == expected[:len(outputs[i])], i
        else:
            assert outputs[i] == expected, i
    assert_all_released(engine)
    # how much is found depends on the interleaving (and evictions: 40 pages for 8 slots); the exact counts are
    # checked in the sequential tests above
    assert engine.prefix_cache_hit_tokens > 0
    hits = next(line for line in metrics.splitlines() if line.startswith("jaxswift_prefix_cache_hit_tokens_total"))
    assert float(hits.split()[-1]) == engine.prefix_cache_hit_tokens
    assert "jaxswift_prefix_cache_miss_tokens_total" in metrics and "jaxswift_kv_pages_used 0.0" in metrics


def wait_until_idle(orchestrator, engine, timeout=30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while orchestrator.running or orchestrator.queue_depth or engine.kv_pages_used:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_deploy_flag_turns_caching_off(tiny_chat_model):
    from jaxswift.recipes.serve import ServeArguments, build_server
    from jaxswift.train.args import parse_args

    for flags, on in (([], True), (["--enable_prefix_caching", "false"], False)):
        _, orchestrator = build_server(parse_args(ServeArguments, ["--model", str(tiny_chat_model),
                                                                   "--max_model_len", "64", "--no_warmup",
                                                                   *flags]))
        try:
            assert orchestrator.engine.enable_prefix_caching is on
        finally:
            orchestrator.shutdown()
    with pytest.raises(SystemExit):
        parse_args(ServeArguments, ["--enable_prefix_caching", "sometimes"])


def test_other_params_forget_the_cache(tiny):
    """A trainer serving its next step's weights must not reuse keys/values of the previous ones."""
    import jax

    engine = tiny_engine(tiny)
    ids = random_prompts([30], seed=8)[0]
    sampling = RequestSampling(max_tokens=6, ignore_eos=True)
    scaled = jax.tree.map(lambda w: w * 1.5, engine.params)
    state, got = engine.init_decode_state(), []
    for params in (engine.params, scaled, scaled):
        prefix, first = engine.prefill(params, *engine.pad_prompt(ids), sampling)
        state = engine.insert(prefix, state, 0)
        out = [int(first.tokens[0])]
        for _ in range(5):
            state, result = engine.generate(params, state)
            out.append(int(result.tokens[0]))
        state = engine.free_resource(state, 0)
        got.append(out)
    assert engine.prefix_cache_hit_tokens == 24  # the third request only: same params as the second
    fresh = tiny_engine(tiny, enable_prefix_caching=False)
    assert got[1] == got[2] == drive(fresh, [(ids, sampling)], params=scaled)[0][0] != got[0]


def test_a_request_that_ends_at_its_first_token_still_caches_its_prompt(tiny, smol_tokenizer):
    import time

    from jaxswift.infer.orchestrator import GenerationRequest, Orchestrator

    engine = tiny_engine(tiny, num_pages=6)
    ids = random_prompts([26], seed=12)[0]
    orchestrator = Orchestrator(engine, tokenizer=smol_tokenizer)
    try:
        one = orchestrator.generate([GenerationRequest(ids, RequestSampling(max_tokens=1))])[0]
        deadline = time.monotonic() + 10  # the engine thread caches the prompt after sending the token
        while engine.kv_pages_cached < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.kv_pages_cached == 3 and engine.kv_pages_used == 0 and engine.can_admit(26, 20)
        longer = ids + [5, 6]
        more = orchestrator.generate([GenerationRequest(longer, RequestSampling(max_tokens=8, ignore_eos=True))])[0]
    finally:
        orchestrator.shutdown()
    assert engine.prefix_cache_hit_tokens == 24
    assert one.token_ids == greedy(tiny, ids, 1) and more.token_ids == greedy(tiny, longer, 8)
    assert_all_released(engine)


def test_warmup_compiles_a_hit_after_each_bucket_and_counts_no_traffic(tiny):
    from jaxswift.infer.engine import _prefill_after_prefix_jit

    engine = tiny_engine(tiny)  # test_engine's sizes: its warmup test compiled the same functions
    engine.warmup()
    assert engine.prefix_cache_hit_tokens == engine.prefix_cache_miss_tokens == 0 and engine.kv_pages_cached == 0
    compiled = _prefill_after_prefix_jit._cache_size()
    ids = random_prompts([40], seed=13)[0]
    drive(engine, [(ids[:32], RequestSampling(max_tokens=4)), (ids[:35], RequestSampling(max_tokens=4))])
    assert engine.prefix_cache_hit_tokens == 32 and _prefill_after_prefix_jit._cache_size() == compiled


def test_pages_filled_while_decoding_are_cached_for_the_next_turn(tiny):
    """A chat's next prompt starts with the previous prompt and the reply: the pages the reply filled are found."""
    on, off = tiny_engine(tiny), tiny_engine(tiny, enable_prefix_caching=False)
    prompt = random_prompts([13], seed=14)[0]
    sampling = RequestSampling(max_tokens=20, ignore_eos=True)
    state = on.init_decode_state()
    prefix, first = on.prefill(on.params, *on.pad_prompt(prompt), sampling)
    state, reply = on.insert(prefix, state, 0), [int(first.tokens[0])]
    for _ in range(19):
        state, result = on.generate(on.params, state)
        reply.append(int(result.tokens[0]))
    state = on.free_resource(state, 0)
    assert reply == greedy(tiny, prompt, 20)
    # keys/values were written for the prompt and the first 19 reply tokens (the last one was never fed): 4 pages
    assert on.kv_pages_cached == 4
    turn = prompt + reply + [7, 8, 9]
    before = on.prefix_cache_hit_tokens
    prefix, first = on.prefill(on.params, *on.pad_prompt(turn), sampling)
    assert on.prefix_cache_hit_tokens - before == 32
    state = on.insert(prefix, state, 0)
    out = [int(first.tokens[0])]
    for _ in range(7):
        state, result = on.generate(on.params, state)
        out.append(int(result.tokens[0]))
    on.free_resource(state, 0)
    assert out == drive(off, [(turn, RequestSampling(max_tokens=8, ignore_eos=True))])[0][0]
    assert_all_released(on)


def test_pages_shared_with_running_requests_take_none_at_admission(tiny):
    """Two requests with a 40-token common head fit 8 pages together only because they share its 5 pages."""
    engine = tiny_engine(tiny, num_pages=8)
    base, tails = random_prompts([40], seed=15)[0], random_prompts([3, 5], seed=16)
    first_ids, second_ids = base + tails[0], base + tails[1]
    sampling = RequestSampling(max_tokens=4, ignore_eos=True)
    state = engine.init_decode_state()
    prefix, first = engine.prefill(engine.params, *engine.pad_prompt(first_ids), sampling)
    state = engine.insert(prefix, state, 0)  # worst case pages_for(46) = 6 pages, 6 taken now
    assert not engine.can_admit(len(second_ids), 4)  # 6 more pages: only 2 are left
    assert engine.can_admit_prompt(second_ids, 4)  # 5 of its 6 are held by slot 0
    assert not engine.can_admit_prompt(random_prompts([45], seed=17)[0], 4)  # an unrelated prompt still waits
    second, second_first = engine.prefill(engine.params, *engine.pad_prompt(second_ids), sampling)
    state = engine.insert(second, state, 1)
    assert engine.kv_pages_used == 7 and engine.kv_page_references == 12
    outputs = {0: [int(first.tokens[0])], 1: [int(second_first.tokens[0])]}
    for _ in range(3):
        state, result = engine.generate(engine.params, state)
        for slot in (0, 1):
            outputs[slot].append(int(result.tokens[slot]))
    for slot in (0, 1):
        state = engine.free_resource(state, slot)
    assert outputs[0] == greedy(tiny, first_ids, 4) and outputs[1] == greedy(tiny, second_ids, 4)
    assert_all_released(engine)
