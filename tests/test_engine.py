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
            padded, n = engine.pad_prompt(ids)
            prefix, first = engine.prefill(params, padded, n, sampling)
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


def test_staggered_greedy_with_chunked_prefill_equals_generate(tiny):
    engine = JaxEngine(tiny, max_concurrent_decodes=3, max_model_len=128, page_size=8, prefill_buckets=(16, 32))
    prompts = random_prompts([5, 17, 40, 70, 3])  # 40 and 70 exceed the largest bucket: chunked prefill
    sampling = RequestSampling(max_tokens=20, ignore_eos=True)
    got, _ = drive(engine, [(p, sampling) for p in prompts], arrivals=[0, 2, 3, 3, 9])
    for i, p in enumerate(prompts):
        assert got[i] == jaxswift.generate_ids(tiny, [p], max_new_tokens=20, ignore_eos=True)[0], i
    assert engine.kv_pages_used == 0
