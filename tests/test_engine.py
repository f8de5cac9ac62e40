"""The serving engine: paged KV cache, continuous batching, per-request sampling, multi-LoRA.

References: jaxswift.generate_ids on each prompt alone, transformers (greedy text, logits for logprobs), peft-format
adapters loaded the training way, and a float64 numpy transcription of vLLM's sampling formulas.
"""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.infer.engine import JaxEngine
from jaxswift.infer.engine_api import RequestSampling

VOCAB, EOS = 256, 1


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_engine_model")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=512, bos_token_id=0, eos_token_id=EOS)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return jaxswift.load_model(str(tiny_folder))


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, n).tolist() for n in lengths]


def drive(engine, requests, *, arrivals=None, params=None):
    """Runs requests [(ids, RequestSampling)] through the engine as an orchestrator would: request i is admitted
    after arrivals[i] decode steps (when a slot and pages are free). Returns each request's tokens and results."""
    params = engine.params if params is None else params
    arrivals = arrivals or [0] * len(requests)
    state = engine.init_decode_state()
    waiting, free_slots, owner = list(range(len(requests))), list(range(engine.max_concurrent_decodes)), {}
    tokens, results, step = {i: [] for i in range(len(requests))}, {i: [] for i in range(len(requests))}, 0
    while waiting or owner:
        for i in [i for i in waiting if arrivals[i] <= step]:
            ids, sampling = requests[i]
            if not free_slots or not engine.can_admit(len(ids), sampling.max_tokens):
                break
            if getattr(engine, "max_num_batched_tokens", None) and len(ids) > engine.max_num_batched_tokens:
                prefix, first = None, None  # chunked prefill (here without decode steps in between)
                while first is None:
                    prefix, first = engine.prefill_step(params, ids, sampling, prefix)
            else:
                prefix, first = engine.prefill(params, *engine.pad_prompt(ids), sampling)
            waiting.remove(i)
            tokens[i].append(int(first.tokens[0]))
            results[i].append(first.slot(0))
            if not first.done[0]:
                slot = free_slots.pop(0)
                state = engine.insert(prefix, state, slot)
                owner[slot] = i
        if owner:
            state, result = engine.generate(params, state)
            for slot, i in list(owner.items()):
                assert result.valid[slot]
                tokens[i].append(int(result.tokens[slot]))
                results[i].append(result.slot(slot))
                if result.done[slot]:
                    state = engine.free_resource(state, slot)
                    free_slots.append(slot)
                    del owner[slot]
        step += 1
    return tokens, results


def tiny_engine(model, **sizes):
    return JaxEngine(model, **{**dict(max_concurrent_decodes=3, max_model_len=128, page_size=8,
                                      prefill_buckets=(16, 32)), **sizes})


def greedy(model, ids, n=20):
    """jaxswift.generate_ids alone (always 20 tokens, one compile: greedy tokens do not depend on the length)."""
    return jaxswift.generate_ids(model, [ids], max_new_tokens=20, ignore_eos=True)[0][:n]


def test_staggered_greedy_with_chunked_prefill_and_full_context_equals_generate(tiny):
    engine = tiny_engine(tiny)
    # 40, 70 and 120 exceed the largest bucket (32): chunked prefill. 120 + 8 tokens fill max_model_len 128.
    prompts = random_prompts([5, 17, 40, 70, 3, 120])
    sampling = RequestSampling(max_tokens=20, ignore_eos=True)
    got, results = drive(engine, [(p, sampling) for p in prompts], arrivals=[0, 2, 3, 3, 9, 10])
    for i, p in enumerate(prompts[:5]):
        assert got[i] == greedy(tiny, p), i
    assert got[5] == greedy(tiny, prompts[5], 8) and results[5][-1]["done"]
    assert engine.kv_pages_used == 0


QUESTIONS = ["What is 2+2?", "Name a fruit.", "Say hello in French.", "What colour is the sky?",
             "Write a haiku about rain.", "Why do cats purr?", "List three prime numbers.",
             "Explain gravity to a child in one long paragraph."]


def test_smollm2_eight_staggered_prompts_equal_generate_and_transformers(smollm2, smollm2_hf):
    """The engine's 64 greedy tokens per prompt equal jaxswift.generate_ids on that prompt alone, and are
    transformers' greedy choice at every step: the argmax of its logits given the prompt and the tokens before
    (teacher forcing; by induction the very sequence transformers' greedy generate produces, in one forward)."""
    model = smollm2
    prompts = [jaxswift.api.chat_prompt_ids(model, [{"role": "user", "content": q}]) for q in QUESTIONS]
    engine = JaxEngine(model, max_concurrent_decodes=6, max_model_len=256, page_size=16, prefill_buckets=(64,))
    sampling = RequestSampling(max_tokens=64, ignore_eos=True)
    got, _ = drive(engine, [(p, sampling) for p in prompts], arrivals=[0, 0, 3, 5, 5, 9, 20, 30])
    assert engine.kv_pages_used == 0 and not engine._pages.promised
    for i, ids in enumerate(prompts):
        assert got[i] == jaxswift.generate_ids(model, [ids], max_new_tokens=64, ignore_eos=True)[0], i

    reference = smollm2_hf[0]
    sequences = [ids + got[i] for i, ids in enumerate(prompts)]
    width = max(map(len, sequences))  # right padding: causal attention keeps it out of every real token's view
    batch = torch.tensor([seq + [0] * (width - len(seq)) for seq in sequences])
    with torch.no_grad():
        choices = reference(batch).logits.argmax(-1)
    for i, ids in enumerate(prompts):
        assert choices[i, len(ids) - 1:len(ids) + 63].tolist() == got[i], i
    assert len({tuple(g) for g in got.values()}) == 8


# --- sampling: vLLM's formulas, transcribed in float64 numpy -------------------------------------------------------


def vllm_processed_logits(logits, prompt_mask, counts, temperature, min_p, top_k, top_p, repetition, presence,
                          frequency):
    """One row, as vLLM's sampler: penalties (repetition over prompt+output, frequency, presence), temperature,
    min_p, then top-k and top-p on the ascending sort."""
    x = logits.astype(np.float64)
    output_mask = counts > 0
    penalty = np.where(prompt_mask | output_mask, repetition, 1.0)
    x = np.where(x > 0, x / penalty, x * penalty)
    x = x - frequency * counts - presence * output_mask
    penalized = x.copy()
    x = x / (temperature if temperature > 0 else 1.0)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    ascending = np.sort(x)
    if 0 < top_k < x.size:
        x = np.where(x < ascending[x.size - top_k], -np.inf, x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    finite = sorted_x[np.isfinite(sorted_x)]
    probs = np.exp(sorted_x - finite.max())
    probs = probs / probs.sum()
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
    return penalized, x


def test_penalties_min_p_top_k_top_p_equal_vllm_formulas():
    import jax.numpy as jnp

    from jaxswift.infer.sampling import SlotSampling, penalized_logits, sampling_logits

    rng = np.random.default_rng(0)
    S, V = 6, 97
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    prompt_mask = rng.random((S, V)) < 0.2
    counts = rng.integers(0, 4, (S, V)) * (rng.random((S, V)) < 0.15)
    rows = dict(temperature=[0.0, 0.7, 1.0, 1.3, 0.5, 1.0], min_p=[0.0, 0.05, 0.0, 0.2, 0.01, 0.0],
                top_k=[0, 5, 20, 0, 40, 1], top_p=[1.0, 0.9, 0.5, 0.8, 1.0, 1.0],
                repetition=[1.0, 1.3, 0.8, 1.1, 1.0, 2.0], presence=[0.0, 0.5, -0.4, 1.5, 0.2, 0.0],
                frequency=[0.0, 0.3, 0.6, -0.5, 0.0, 1.0])
    s = SlotSampling(*(jnp.asarray(rows[name], jnp.float32) for name in ("temperature", "top_p")),
                     jnp.asarray(rows["top_k"], jnp.int32),
                     *(jnp.asarray(rows[name], jnp.float32) for name in ("min_p", "repetition", "presence",
                                                                         "frequency")),
                     jnp.zeros((S, 2), jnp.uint32))
    penalized = penalized_logits(jnp.asarray(logits), jnp.asarray(prompt_mask), jnp.asarray(counts, jnp.int32), s)
    final = np.asarray(sampling_logits(penalized, s))
    for i in range(S):
        want_penalized, want = vllm_processed_logits(logits[i], prompt_mask[i], counts[i],
                                                     **{name: values[i] for name, values in rows.items()})
        np.testing.assert_allclose(np.asarray(penalized[i]), want_penalized, rtol=1e-6, atol=1e-6)
        assert (np.isinf(final[i]) == np.isinf(want)).all(), i
        kept = np.isfinite(want)
        np.testing.assert_allclose(final[i][kept], want[kept], rtol=1e-6, atol=1e-6)
    kept_per_row = np.isfinite(final).sum(axis=1)
    assert kept_per_row[5] == 1 and kept_per_row[0] == V and 1 < kept_per_row[1] <= 5  # the test can fail



def test_samples_follow_the_processed_distribution():
    import jax
    import jax.numpy as jnp

    from jaxswift.infer.sampling import SlotSampling, sample_slots

    rng = np.random.default_rng(1)
    S, V, N = 3, 12, 4000
    logits = rng.normal(0, 1.5, (S, V)).astype(np.float32)
    rows = dict(temperature=[0.0, 0.8, 1.2], min_p=[0.0, 0.0, 0.1], top_k=[0, 6, 0], top_p=[1.0, 0.9, 0.85],
                repetition=[1.0, 1.0, 1.2], presence=[0.0, 0.3, 0.0], frequency=[0.0, 0.0, 0.2])
    prompt_mask, counts = rng.random((S, V)) < 0.3, rng.integers(0, 3, (S, V))
    s = SlotSampling(jnp.asarray(rows["temperature"], jnp.float32), jnp.asarray(rows["top_p"], jnp.float32),
                     jnp.asarray(rows["top_k"], jnp.int32),
                     *(jnp.asarray(rows[name], jnp.float32) for name in ("min_p", "repetition", "presence",
                                                                         "frequency")),
                     jnp.asarray([[7, 0], [8, 0], [9, 1]], jnp.uint32))
    draws = jax.vmap(lambda i: sample_slots(jnp.asarray(logits), jnp.asarray(prompt_mask),
                                            jnp.asarray(counts, jnp.int32), s, jnp.full((S,), i)))(jnp.arange(N))
    draws = np.asarray(draws)
    for i in range(S):
        penalized, final = vllm_processed_logits(logits[i], prompt_mask[i], counts[i],
                                                 **{name: values[i] for name, values in rows.items()})
        if rows["temperature"][i] == 0:
            assert (draws[:, i] == np.argmax(penalized)).all()
            continue
        probs = np.exp(final - final[np.isfinite(final)].max())
        probs /= probs.sum()
        frequencies = np.bincount(draws[:, i], minlength=V) / N
        assert (frequencies[probs == 0] == 0).all(), i
        np.testing.assert_allclose(frequencies, probs, atol=0.03)


# --- pages, stopping, bad inputs (tiny model) ----------------------------------------------------------------------


def test_page_exhaustion_makes_requests_wait_and_never_corrupts(tiny):
    engine = tiny_engine(tiny, max_model_len=64, num_pages=6)
    long_ids, small_ids, blocked_ids = random_prompts([20, 5, 10], seed=1)
    state = engine.init_decode_state()
    assert engine.can_admit(20, 20)  # worst case: positions 0..38 -> 5 pages of 8
    padded, n = engine.pad_prompt(long_ids)
    prefix, first = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=20, ignore_eos=True))
    state = engine.insert(prefix, state, 0)
    assert engine.kv_pages_used == 3  # the prompt's pages only; the rest is reserved
    assert not engine.can_admit(10, 10)  # needs 3 pages, 1 is left unpromised
    assert engine.can_admit(5, 4)
    padded, n = engine.pad_prompt(small_ids)
    small_prefix, small_first = engine.prefill(engine.params, padded, n,
                                               RequestSampling(max_tokens=4, ignore_eos=True))
    state = engine.insert(small_prefix, state, 1)
    assert not engine.can_admit(5, 4)
    padded, n = engine.pad_prompt(blocked_ids)
    blocked, _ = engine.prefill(engine.params, padded, n, RequestSampling(max_tokens=10, ignore_eos=True))
    with pytest.raises(RuntimeError, match="can_admit"):
        engine.insert(blocked, state, 2)  # refused before touching anything
    outputs, finished = {0: [int(first.tokens[0])], 1: [int(small_first.tokens[0])]}, set()
    while len(finished) < 2:
        state, result = engine.generate(engine.params, state)
        for slot in np.flatnonzero(result.valid):
            outputs[slot].append(int(result.tokens[slot]))
        for slot in np.flatnonzero(result.done):
            state = engine.free_resource(state, slot)
            finished.add(slot)
    assert outputs[0] == greedy(tiny, long_ids, 20) and outputs[1] == greedy(tiny, small_ids, 4)
    assert engine.kv_pages_used == 0 and engine.can_admit(10, 10)


def test_max_tokens_one_stop_ids_eos_and_ignore_eos(tiny):
    engine = tiny_engine(tiny)
    ids = random_prompts([9], seed=2)[0]
    reference = greedy(tiny, ids, 12)
    k = next(i for i in range(2, 12) if reference[i] not in reference[:i])  # stop there, not before
    stop = reference[k]

    engine.warmup()
    got, results = drive(engine, [(ids, RequestSampling(max_tokens=1))])
    assert got[0] == reference[:1] and results[0][0]["done"] and results[0][0]["lengths"] == 1
    assert engine.kv_pages_used == 0
    got, results = drive(engine, [(ids, RequestSampling(max_tokens=12, stop_token_ids=(stop,)))])
    assert got[0] == reference[:k + 1] and results[0][-1]["done"] and results[0][-1]["lengths"] == k + 1

    eos_model = jaxswift.api.Model(tiny.config.replace(eos_token_ids=(stop,)), tiny.params)
    eos_engine = tiny_engine(eos_model)
    assert eos_engine.eos_ids == (stop,)
    assert drive(eos_engine, [(ids, RequestSampling(max_tokens=12))])[0][0] == reference[:k + 1]
    assert drive(eos_engine, [(ids, RequestSampling(max_tokens=12, ignore_eos=True))])[0][0] == reference


def test_bad_inputs_name_what_is_wrong(tiny):
    engine = tiny_engine(tiny)
    with pytest.raises(ConfigError, match="prompt has 0 tokens"):
        engine.pad_prompt([])
    with pytest.raises(ConfigError, match="max_model_len 128"):
        engine.pad_prompt([5] * 128)
    with pytest.raises(ConfigError, match="max_model_len 128"):
        engine.can_admit(128, 1)
    with pytest.raises(ConfigError, match="max_tokens"):
        engine.can_admit(5, 0)
    with pytest.raises(ConfigError, match="could never run"):
        tiny_engine(tiny, num_pages=2).can_admit(20, 20)
    with pytest.raises(ConfigError, match=r"token ids must be in \[0, 256\), got \[256, -1\]"):
        engine.pad_prompt([5, 256, -1])
    padded, n = engine.pad_prompt([5, 6, 7])
    for field, value in [("temperature", -0.5), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                         ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("max_tokens", 0),
                         ("logprobs", 21), ("stop_token_ids", (VOCAB,)), ("adapter", 1)]:
        with pytest.raises(ConfigError, match=f"sampling {field} must be"):
            engine.prefill(engine.params, padded, n, RequestSampling(**{field: value}))
    with pytest.raises(ConfigError, match="multiples of page_size 8"):
        tiny_engine(tiny, prefill_buckets=(20,))
    with pytest.raises(ConfigError, match="page_size"):
        tiny_engine(tiny, page_size=0)
    with pytest.raises(KeyError, match="unknown adapter 'x'"):
        engine.adapter_index("x")


# --- seeds, logprobs -----------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny):
    engine = tiny_engine(tiny, max_concurrent_decodes=4)
    ids, other, third = random_prompts([7, 12, 30], seed=3)
    target = RequestSampling(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = drive(engine, [(ids, target)])[0][0]
    companions = [(other, RequestSampling(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True)),
                  (third, RequestSampling(max_tokens=10, repetition_penalty=1.2, ignore_eos=True)),
                  (other, RequestSampling(temperature=1.0, max_tokens=16, ignore_eos=True))]
    mixed = drive(engine, companions + [(ids, target)], arrivals=[0, 0, 1, 3])[0]
    assert mixed[3] == alone
    import dataclasses
    assert drive(engine, [(ids, dataclasses.replace(target, seed=99))])[0][0] != alone
    assert alone != greedy(tiny, ids, 16)


def test_logprobs_equal_log_softmax_of_transformers_logits(tiny, tiny_folder):
    engine = tiny_engine(tiny)
    ids, other = random_prompts([6, 11], seed=4)
    requests = [(ids, RequestSampling(max_tokens=8, logprobs=5, ignore_eos=True)),
                (other, RequestSampling(temperature=1.5, seed=3, max_tokens=8, logprobs=0, ignore_eos=True))]
    got, results = drive(engine, requests, arrivals=[0, 2])
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    for (prompt, sampling), tokens, steps in zip(requests, got.values(), results.values()):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1).numpy()[len(prompt) - 1:-1]
        chosen = logprobs[np.arange(len(tokens)), tokens]
        np.testing.assert_allclose([s["logprobs"] for s in steps], chosen, atol=2e-5)
        for step, row in zip(steps, logprobs):
            top = np.argsort(-row)[:sampling.logprobs]
            assert step["top_ids"][:len(top)].tolist() == top.tolist()  # k: the batch's largest request
            np.testing.assert_allclose(step["top_logprobs"][:len(top)], row[top], atol=2e-5)
    assert [len(step["top_ids"]) for step in results[0]] == [5] * 8
    assert [len(step["top_ids"]) for step in results[1]][0] == 0  # its prefill: alone, logprobs=0


# --- multi-LoRA ----------------------------------------------------------------------------------------------------


def save_random_adapter(model, folder, lora_cfg, seed):
    """A PEFT adapter folder with random (non-zero) A and B."""
    import jax
    import jax.numpy as jnp

    from jaxswift.checkpoints.peft import save_peft_adapter
    from jaxswift.tuners.lora import add_lora, is_lora

    rng = np.random.default_rng(seed)
    params = add_lora(model.params, model.config, lora_cfg, jax.random.key(seed))
    params = jax.tree.map(lambda w: w.replace(b=jnp.asarray(rng.normal(0, 0.5, w.b.shape), jnp.float32))
                          if is_lora(w) else w, params, is_leaf=is_lora)
    return save_peft_adapter(params, model.config, lora_cfg, folder)


def test_multi_lora_mixed_batch_equals_each_adapter_alone(tiny, tmp_path):
    from jaxswift.checkpoints.peft import load_peft_adapter
    from jaxswift.errors import CheckpointError
    from jaxswift.tuners.lora import LoraConfig

    folders = {"all": save_random_adapter(tiny, tmp_path / "all", LoraConfig(rank=4, alpha=8), 1),
               "qv": save_random_adapter(tiny, tmp_path / "qv", LoraConfig(rank=8, alpha=16,
                                                                           target_modules=("q_proj", "v_proj")), 2)}
    engine = tiny_engine(tiny, adapters={name: str(f) for name, f in folders.items()})
    assert (engine.adapter_index("all"), engine.adapter_index("qv")) == (1, 2)
    p0, p1, p2 = random_prompts([6, 13, 21], seed=5)
    plan = [(p0, 0), (p1, 1), (p2, 2), (p0, 1), (p1, 2), (p2, 0)]
    requests = [(p, RequestSampling(max_tokens=12, ignore_eos=True, adapter=a)) for p, a in plan]
    got, _ = drive(engine, requests, arrivals=[0, 0, 1, 2, 2, 4])
    models = [tiny] + [jaxswift.api.Model(tiny.config, load_peft_adapter(tiny.params, tiny.config, f)[0])
                       for f in folders.values()]
    for i, (p, a) in enumerate(plan):
        assert got[i] == greedy(models[a], p, 12), (i, a)
    assert got[0] != got[3] and got[1] != got[4]  # the adapters change the output

    dora = save_random_adapter(tiny, tmp_path / "dora", LoraConfig(rank=4, use_dora=True), 3)
    with pytest.raises(CheckpointError, match="DoRA adapters cannot share a base"):
        tiny_engine(tiny, adapters={"dora": str(dora)})


def test_categorical_draws_follow_the_distribution_and_never_masked_tokens():
    import jax
    import jax.numpy as jnp

    from jaxswift.infer.sampling import categorical

    probs = np.array([0.1, 0.0, 0.6, 0.3, 0.0], np.float32)
    logits = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-30)), -1e30)
    n = 20000
    draws = np.asarray(categorical(jax.random.key(1), jnp.broadcast_to(logits, (n, 5))))
    freq = np.bincount(draws, minlength=5) / n
    assert freq[1] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))  # 4 sigma


def test_two_level_categorical_spans_blocks_and_scores_its_draws():
    """A vocabulary of several CDF blocks (and a partial last one): draws follow the distribution, never a
    zero-probability entry, and the log-prob returned with each draw is log_softmax's."""
    import jax
    import jax.numpy as jnp

    from jaxswift.infer.sampling import CDF_BLOCK, categorical_with_logprob

    V = 2 * CDF_BLOCK + 37
    probs = np.random.default_rng(0).random(V).astype(np.float32)
    probs[::3] = 0
    probs[-CDF_BLOCK // 2:] = 0  # the last block holds no mass at all
    probs /= probs.sum()
    logits = jnp.where(probs > 0, jnp.log(np.maximum(probs, 1e-30)), -jnp.inf)
    n = 100_000
    draws, logps = jax.jit(categorical_with_logprob)(jax.random.key(2), jnp.broadcast_to(logits, (n, V)))
    draws, logps = np.asarray(draws), np.asarray(logps)
    freq = np.bincount(draws, minlength=V) / n
    assert freq[probs == 0].sum() == 0
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs)[probs > 0] < 5 * sigma[probs > 0])
    want = np.asarray(jax.nn.log_softmax(logits))[draws]
    np.testing.assert_allclose(logps, want, atol=1e-5)


def test_resample_equals_a_fresh_prefill_of_the_same_prompt(tiny):
    """resample reuses a prompt's keys/values: the request it starts decodes exactly as if it had been prefilled
    itself (same first token, log-probs and continuation), while the original keeps its own draws."""
    engine = tiny_engine(tiny, enable_prefix_caching=False)  # "fresh" means the whole prompt runs again
    ids = random_prompts([11])[0]
    a, b = (RequestSampling(temperature=1.0, max_tokens=6, seed=s, logprobs=1, ignore_eos=True) for s in (3, 4))
    padded, n = engine.pad_prompt(ids)

    def decode(prefix_first):
        prefix, first = prefix_first
        state = engine.insert(prefix, engine.init_decode_state(), 0)
        out = [(int(first.tokens[0]), float(first.logprobs[0]))]
        for _ in range(5):
            state, result = engine.generate(engine.params, state)
            out.append((int(result.tokens[0]), float(result.logprobs[0])))
        return out

    shared = engine.prefill(engine.params, padded, n, a)[0]
    resampled = decode(engine.resample(shared, b))
    fresh = decode(engine.prefill(engine.params, padded, n, b))
    assert [t for t, _ in resampled] == [t for t, _ in fresh]
    np.testing.assert_allclose([lp for _, lp in resampled], [lp for _, lp in fresh], atol=1e-6)
    assert decode(engine.resample(shared, a)) == decode(engine.prefill(engine.params, padded, n, a))
    with pytest.raises(ConfigError, match="adapter"):
        engine.resample(shared, RequestSampling(adapter=1))


def test_orchestrator_prefills_the_n_choices_of_a_prompt_once(tiny_chat_model):
    """Requests queued together with one prompt (an OpenAI request with n > 1) share one prefill; each still
    decodes exactly as it would alone (seeded)."""
    from jaxswift.infer.orchestrator import GenerationRequest, Orchestrator

    chat = jaxswift.load_model(str(tiny_chat_model))
    engine = tiny_engine(chat, max_concurrent_decodes=4)
    calls = []
    prefill = engine.prefill
    engine.prefill = lambda *a, **k: calls.append(1) or prefill(*a, **k)
    ids, other = (chat.tokenizer.encode(text) for text in ("What is 2 + 2?", "Name a colour."))
    sampled = lambda seed: RequestSampling(temperature=1.0, max_tokens=5, seed=seed, logprobs=1,  # noqa: E731
                                           ignore_eos=True)
    requests = [GenerationRequest(ids, sampled(s)) for s in (1, 2, 3)] + [GenerationRequest(other, sampled(4))]
    orchestrator = Orchestrator(engine)
    try:
        together = orchestrator.generate(requests)
        assert len(calls) == 2  # one per distinct prompt
        alone = [orchestrator.generate([r])[0] for r in requests]
    finally:
        orchestrator.shutdown()
    assert len(calls) == 6
    for a, b in zip(together, alone):
        assert a.error is None and a.token_ids == b.token_ids and len(a.token_ids) == 5
        np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=1e-6)
    assert len({tuple(c.token_ids) for c in together[:3]}) > 1  # the shared prompt's choices drew their own tokens


def test_a_failure_while_admitting_fails_that_request_instead_of_losing_it(tiny):
    """The tiny model has no tokenizer, so handling the first token raises inside admission: the request must end
    with an error (it used to be dropped, and its caller waited forever)."""
    import queue

    from jaxswift.infer.orchestrator import EngineFailure, GenerationRequest, Orchestrator

    orchestrator = Orchestrator(tiny_engine(tiny))
    try:
        chunks = queue.Queue()
        orchestrator.submit([GenerationRequest(random_prompts([5])[0], RequestSampling(max_tokens=3))],
                            lambda index, chunk: chunks.put(chunk))
        chunk = chunks.get(timeout=120)  # raises queue.Empty if the request was lost
        assert isinstance(chunk.error, EngineFailure) and "the engine failed" in str(chunk.error)
        assert orchestrator.alive and orchestrator.free_slots == 3
    finally:
        orchestrator.shutdown()
