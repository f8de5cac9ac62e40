"""The orchestrator and the OpenAI-compatible server: a real uvicorn server on localhost driven by the official
`openai` client, over the real JaxEngine on a tiny random llama with SmolLM2's tokenizer.

Greedy outputs are checked against `jaxswift.generate_ids` on each prompt alone; log-probs against a float64
log-softmax of transformers' logits.
"""

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import jaxswift
from jaxswift.api import chat_prompt_ids
from jaxswift.infer.engine import JaxEngine
from jaxswift.infer.engine_api import Engine, RequestSampling, ResultTokens
from jaxswift.infer.orchestrator import (EngineShutdown, GenerationRequest, IncrementalDetokenizer, Orchestrator,
                                         RequestTimeout, StopStringMatcher)
from jaxswift.serve.openai import build_app

from server_fixtures import running

KEY = "test-key"
MODEL = "tiny-chat"
ADAPTER = "tiny-lora"
PROMPTS = ["Tell me a story about a cat.", "What is 2 + 2?", "Name three colours.", "Bonjour, ça va ?",
           "Write a haiku about rain.", "日本語で挨拶して", "List some prime numbers.", "Why is the sky blue?"]


# ---------------------------------------------------------------- fixtures: model, servers


class Served:
    def __init__(self, url, orchestrator, engine):
        self.url, self.orchestrator, self.engine = url, orchestrator, engine

    def client(self, key=KEY, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def idle(self, timeout=20.0) -> bool:
        """Waits until no request runs or waits and every KV page is free."""
        o = self.orchestrator
        return wait_until(lambda: o.running == 0 and o.queue_depth == 0 and self.engine.kv_pages_used == 0
                          and o.free_slots == self.engine.max_concurrent_decodes, timeout)


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return jaxswift.load_model(str(tiny_chat_model))


@pytest.fixture(scope="module")
def adapter_dir(tiny_chat_model, tmp_path_factory):
    """A PEFT LoRA adapter for the tiny model, with random (non-zero) B so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny_lora")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(model, adapter_dir):
    engine = JaxEngine(model, max_concurrent_decodes=8, max_model_len=256, page_size=16, prefill_buckets=(64, 128),
                       adapters={ADAPTER: str(adapter_dir)})
    orchestrator = Orchestrator(engine, max_queue=128)
    app = build_app(orchestrator, model_name=MODEL, adapter_names=[ADAPTER], api_keys=[KEY])
    with running(app) as url:
        yield Served(url, orchestrator, engine)
    orchestrator.shutdown()


@pytest.fixture(scope="module")
def limited(model):
    """One slot, a queue of one, 2 requests/minute and 1 in flight per key: for the 429 tests."""
    engine = JaxEngine(model, max_concurrent_decodes=1, max_model_len=1024, page_size=16, prefill_buckets=(64,))
    orchestrator = Orchestrator(engine, max_queue=1)
    keys = ["rate-a", "rate-b", "rate-c", "conc-a", "conc-b", "queue-a", "queue-b", "queue-c", "queue-d"]
    app = build_app(orchestrator, model_name=MODEL, api_keys=keys, rate_limit="2/minute", max_concurrency=1)
    with running(app) as url:
        yield Served(url, orchestrator, engine)
    orchestrator.shutdown()


REFERENCE_TOKENS = 24  # one compiled reference: greedy output is prefix-consistent, so shorter ones are slices


def wait_until(condition, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def greedy_ids(model, prompt_ids, max_tokens, ignore_eos=False):
    assert max_tokens <= REFERENCE_TOKENS
    ids = jaxswift.generate_ids(model, [list(prompt_ids)], max_new_tokens=REFERENCE_TOKENS, ignore_eos=ignore_eos)
    return ids[0][:max_tokens]


def greedy_chat(model, content, max_tokens):
    ids = greedy_ids(model, chat_prompt_ids(model, [{"role": "user", "content": content}]), max_tokens)
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def post(url, body, key=KEY, raw: bytes | None = None, timeout=60):
    """(status, headers, parsed JSON or text) of a POST, without raising on 4xx/5xx."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


def assert_envelope(body, status):
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and err["message"]


# ---------------------------------------------------------------- text handling (no model)

def test_incremental_detokenizer_matches_full_decode_and_never_emits_broken_characters(smol_tokenizer):
    text = "héllo wörld — ça va? 日本語のテキスト 🙂👍🏽 done"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tokenizer)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == smol_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some characters did span several tokens
    eos = smol_tokenizer.eos_token_id
    assert [detok.push(t) for t in (eos, eos, ids[0])] == ["", "", smol_tokenizer.decode(ids[:1])]


@pytest.mark.parametrize("pieces, stops, expected, stopped", [
    (["Hello wo", "rld! STO", "P here"], ["STOP"], "Hello world! ", True),
    (["a", "b", "c", "d"], ["bc"], "a", True),
    (["abc"], ["x", "bc"], "a", True),
    (["ab", "ab", "ac"], ["abac"], "ab", True),
    (["ST", "ART", " and ST"], ["STOP"], "START and ST", False),
    (["plain text"], [], "plain text", False),
])
def test_stop_strings_match_across_pieces_and_hold_back_partial_matches(pieces, stops, expected, stopped):
    matcher = StopStringMatcher(stops)
    released, pushed = [], ""
    for p in pieces:
        pushed += p
        released.append(matcher.push(p))
        assert not any(s in "".join(released) for s in stops)
        if not matcher.stopped:  # only a possible start of a stop string is held back
            assert "".join(released) + matcher.pending == pushed
            assert matcher.pending == "" or any(s.startswith(matcher.pending) for s in stops)
    if not matcher.stopped:
        released.append(matcher.flush())
    assert "".join(released) == expected and matcher.stopped == stopped


# ---------------------------------------------------------------- the orchestrator on the real engine

def test_orchestrator_greedy_equals_generate_and_frees_everything(served, model):
    prompts = [model.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    requests = [GenerationRequest(p, RequestSampling(max_tokens=12 + i, ignore_eos=True)) for i, p in
                enumerate(prompts)]
    results = served.orchestrator.generate(requests)
    for i, (p, r) in enumerate(zip(prompts, results)):
        assert r.token_ids == greedy_ids(model, p, 12 + i, ignore_eos=True)
        assert r.finish_reason == "length" and r.completion_tokens == 12 + i and r.prompt_tokens == len(p)
    assert served.idle()


class EndlessEngine(Engine):
    """Emits token 1 forever, slowly: requests stay in flight until the orchestrator shuts down."""
    eos_ids, params, tokenizer = (0,), None, None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _result(self, s):
        z = np.zeros(s)
        return ResultTokens(np.ones(s, np.int32), np.ones(s, bool), np.ones(s, np.int32), np.zeros(s, bool), z,
                            np.zeros((s, 0), np.int32), np.zeros((s, 0)))

    def prefill(self, params, padded_tokens, true_length, sampling, existing_prefix=None):
        return None, self._result(1)

    def generate(self, params, decode_state):
        time.sleep(0.01)
        return decode_state, self._result(1)

    insert = free_resource = lambda self, state, *a: state
    init_decode_state = lambda self: None  # noqa: E731
    can_admit = lambda self, n, m: True  # noqa: E731
    pad_prompt = lambda self, ids: (np.asarray(ids), len(ids))  # noqa: E731
    max_concurrent_decodes, max_model_len, max_prefill_length = 1, 10 ** 6, 10 ** 6


def test_orchestrator_timeout_and_shutdown(served, model):
    ids = model.tokenizer.encode("hi", add_special_tokens=False)
    (late,) = served.orchestrator.generate([GenerationRequest(ids, RequestSampling(max_tokens=4), timeout=0.0)])
    assert isinstance(late.error, RequestTimeout)
    orchestrator = Orchestrator(EndlessEngine(model.tokenizer))
    finals, got_text = [], threading.Event()
    orchestrator.submit([GenerationRequest(ids, RequestSampling(max_tokens=10 ** 5))] * 2,
                        lambda i, c: finals.append(c) if c.final else got_text.set())
    assert got_text.wait(10) and orchestrator.running == 1 and orchestrator.queue_depth == 1
    orchestrator.shutdown()
    assert not orchestrator.alive
    assert len(finals) == 2 and all(isinstance(c.error, EngineShutdown) for c in finals)
    with pytest.raises(EngineShutdown):
        orchestrator.submit([GenerationRequest(ids, RequestSampling())], lambda i, c: None)


# ---------------------------------------------------------------- OpenAI client: the happy paths

def test_models_list(served):
    assert [m.id for m in served.client().models.list()] == [MODEL, ADAPTER]


def test_adapter_and_base_requests_mixed_in_one_batch(served, model, adapter_dir):
    import dataclasses

    import openai

    from jaxswift.checkpoints.peft import load_peft_adapter

    adapted = dataclasses.replace(model, params=load_peft_adapter(model.params, model.config, adapter_dir)[0])
    expected = {(name, p): greedy_chat(m, p, 12) for name, m in ((MODEL, model), (ADAPTER, adapted))
                for p in PROMPTS[:3]}
    assert all(expected[(MODEL, p)] != expected[(ADAPTER, p)] for p in PROMPTS[:3])  # the adapter matters

    async def ask(client, name, prompt):
        r = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=12, temperature=0)
        return r.choices[0].message.content

    async def mixed():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(ask(client, name, p) for (name, p) in expected))

    assert asyncio.run(mixed()) == list(expected.values())


def test_chat_completion_greedy_streamed_and_not(served, model):
    client = served.client()
    messages = [{"role": "user", "content": PROMPTS[0]}]
    expected = greedy_chat(model, PROMPTS[0], 16)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    prompt_len = len(chat_prompt_ids(model, messages))
    assert r.usage.prompt_tokens == prompt_len and r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_text_and_logprobs_match_transformers(served, model, tiny_chat_model):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox"
    r = served.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                           extra_body={"ignore_eos": True})
    prompt_ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    new_ids = greedy_ids(model, prompt_ids, 8, ignore_eos=True)
    choice = r.choices[0]
    assert choice.text == model.tokenizer.decode(new_ids) and choice.finish_reason == "length"
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + new_ids])).logits[0].double().numpy()
    steps = logits[len(prompt_ids) - 1:-1]
    logp = steps - steps.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    lp = choice.logprobs
    assert lp.tokens == [model.tokenizer.decode([t]) for t in new_ids]
    np.testing.assert_allclose(lp.token_logprobs, logp[np.arange(8), new_ids], atol=1e-3)
    for row, top in zip(logp, lp.top_logprobs):
        best = np.argsort(-row)[:3]
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True), row[best], atol=1e-3)
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))


def test_chat_logprobs_shape(served):
    r = served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token  # greedy: the best is chosen
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5) and c.logprob <= 0
        assert bytes(c.bytes).decode() == c.token


def test_n2_seeded_sampling_is_reproducible(served):
    client = served.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say something"}], max_tokens=12, n=2,
              temperature=1.0, seed=1234)
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    single = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert texts == [single.choices[0].text] * 2
    both = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert single.usage.completion_tokens == 6 and both.usage.completion_tokens == 12


def test_stop_string_across_token_boundaries(served, model):
    prompt = "Count: one two three"
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    full_ids = greedy_ids(model, ids, 24, ignore_eos=True)
    full = model.tokenizer.decode(full_ids)
    pieces = [model.tokenizer.decode(full_ids[:k]) for k in range(len(full_ids) + 1)]
    # a stop string that starts inside one token and ends inside a later one
    start = len(pieces[3]) - 1
    stop = full[start:len(pieces[5]) + 1]
    assert not any(stop == full[len(pieces[k]):len(pieces[k + 1])] for k in range(len(full_ids)))
    client = served.client()
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(streamed) == full[:full.index(stop)]
    # a stop token id ends the request too (even with ignore_eos), without being part of the output
    stop_id = full_ids[5]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    kept = full_ids[:full_ids.index(stop_id)]
    assert r.choices[0].text == model.tokenizer.decode(kept) and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(kept)


# ---------------------------------------------------------------- load, disconnects

def test_64_concurrent_streams_complete_correctly_and_free_everything(served, model):
    import openai

    expected = {p: greedy_chat(model, p, 20) for p in PROMPTS}

    async def one(client, prompt):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return prompt, text, finish, usage

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    for prompt, text, finish, usage in results:
        assert text == expected[prompt] and finish in ("stop", "length") and usage.completion_tokens >= 1
    assert served.idle()
    metrics = urllib.request.urlopen(served.url + "/metrics").read().decode()
    assert 'jaxswift_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "jaxswift_time_to_first_token_seconds_count" in metrics and "jaxswift_kv_pages_used 0.0" in metrics


def test_client_disconnecting_mid_stream_frees_its_slot(served):
    client = served.client()
    stream = client.completions.create(model=MODEL, prompt="Go on and on", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert wait_until(lambda: served.orchestrator.running == 1)
    stream.close()
    assert served.idle(timeout=10)


# ---------------------------------------------------------------- auth and limits

def test_missing_or_wrong_key_is_401(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    status, headers, body = post(served.url + "/v1/completions", {"prompt": "x"}, key=None)
    assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert_envelope(body, 401)


def test_rate_limit_is_429_with_retry_after_while_other_keys_are_served(limited):
    url = limited.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert [post(url, body, key="rate-a")[0] for _ in range(2)] == [200, 200]
    status, headers, err = post(url, body, key="rate-a")
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert_envelope(err, 429)
    assert post(url, body, key="rate-b")[0] == 200


def test_user_field_gives_each_end_user_of_a_key_its_own_limits(limited):
    url = limited.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    statuses = [post(url, {**body, "user": name}, key="rate-c")[0] for name in ("ann", "ann", "ann", "bob")]
    assert statuses == [200, 200, 429, 200]
    status, _, err = post(url, {**body, "user": ""}, key="rate-c")
    assert status == 400 and "user" in err["error"]["message"]


def test_full_queue_and_concurrency_cap_are_429_while_other_requests_are_served(limited):
    import openai

    url = limited.url + "/v1/completions"
    running = limited.client(key="queue-a").completions.create(
        model=MODEL, prompt="a long one", max_tokens=1000, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    next(iter(running))
    assert wait_until(lambda: limited.orchestrator.running == 1)
    # the one slot is busy: the next request waits in the queue (size 1) ...
    waited = []
    waiting = threading.Thread(target=lambda: waited.append(post(url, {"model": MODEL, "prompt": "b",
                                                                       "max_tokens": 2}, "queue-b")))
    waiting.start()
    assert wait_until(lambda: limited.orchestrator.queue_depth == 1)
    # ... and one more is refused with 429 + Retry-After
    status, headers, err = post(url, {"model": MODEL, "prompt": "c", "max_tokens": 2}, key="queue-c")
    assert status == 429 and int(headers["retry-after"]) >= 1 and "queue" in err["error"]["message"]
    assert_envelope(err, 429)
    # the same client over its concurrency cap (1 in flight) is refused too, while its stream goes on
    with pytest.raises(openai.RateLimitError):
        limited.client(key="queue-a").completions.create(model=MODEL, prompt="again", max_tokens=2)
    assert next(iter(running)).choices[0].finish_reason is None
    running.close()  # the slot frees, and the queued request is served
    waiting.join(60)
    assert waited[0][0] == 200 and waited[0][2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert limited.idle()


# ---------------------------------------------------------------- client mistakes are 4xx with the envelope

@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "8"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": 12}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 64, "n": 16, "max_tokens": 1}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "unknown_field": 1}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 256}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10 ** 9]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("/v1/no-such-route", {"model": MODEL}, 404),
    ("/detokenize", {"tokens": [-1]}, 400),
])
def test_client_mistakes_get_4xx_with_the_error_envelope(served, path, body, status):
    raw = body if isinstance(body, bytes) else None
    got, _, answer = post(served.url + path, body, raw=raw)
    assert got == status, answer
    assert_envelope(answer, status)


def test_fuzzed_request_bodies_never_get_a_5xx(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=False),
                        st.text(max_size=20))
    junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=6)
    valid = {"model": st.just(MODEL), "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2),
             "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
             "n": st.integers(1, 2), "seed": st.integers(0, 2 ** 63 - 1), "stream": st.booleans(),
             "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
             "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
             "ignore_eos": st.booleans()}
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)})
    valid_chat = {**valid, "messages": st.lists(message, min_size=1, max_size=3), "logprobs": st.booleans()}
    valid_completion = {**valid, "prompt": st.one_of(st.text(min_size=1, max_size=40),
                                                     st.lists(st.integers(0, 49151), min_size=1, max_size=5)),
                        "logprobs": st.integers(0, 3), "echo": st.booleans(),
                        "max_tokens": st.integers(0, 4)}
    tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "get_x", "bad name"])},
        optional={"parameters": st.sampled_from([{"type": "object"}, {"type": 3}, {"enum": ["a"]}])})})
    valid_chat.update(tools=st.lists(tool, max_size=2), tool_choice=st.sampled_from(
        ["auto", "none", "required", {"type": "function", "function": {"name": "f"}}]),
        response_format=st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                         {"type": "json_schema", "json_schema": {"schema": {"enum": ["x", "y"]}}}]))
    valid_completion["structured_outputs"] = st.sampled_from(
        [{"choice": ["a", "b"]}, {"regex": "[0-9]{2}"}, {"regex": "("}, {"json": {"type": "integer"}}, {}])
    chat_required, completion_required = {"messages", "max_tokens"}, {"prompt", "max_tokens"}  # short answers

    def bodies_for(fields: dict, required: set):
        exact = st.fixed_dictionaries({k: fields[k] for k in required},
                                      optional={k: v for k, v in fields.items() if k not in required})
        mutated = st.fixed_dictionaries({"max_tokens": st.one_of(fields["max_tokens"], junk)},
                                        optional={k: st.one_of(v, junk) for k, v in fields.items() if k != "max_tokens"})
        return st.one_of(exact, mutated)

    bodies = st.one_of(st.tuples(st.just("/v1/chat/completions"), bodies_for(valid_chat, chat_required)),
                       st.tuples(st.just("/v1/completions"), bodies_for(valid_completion, completion_required)),
                       st.tuples(st.sampled_from(["/tokenize", "/detokenize"]), junk),
                       st.tuples(st.just("/v1/completions"), st.binary(max_size=30)))

    statuses = []

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(case):
        path, body = case
        raw = body if isinstance(body, bytes) else None
        status, _, answer = post(served.url + path, body, raw=raw)
        statuses.append(status)
        assert status < 500, (case, answer)
        if status >= 400:
            assert_envelope(answer, status)

    check()
    assert 200 in statuses and 400 in statuses  # the fuzzer reached generation as well as validation
    assert served.idle()


# ---------------------------------------------------------------- utility endpoints, recipes

def test_health_tokenize_detokenize(served, model):
    assert urllib.request.urlopen(served.url + "/health").status == 200
    status, _, tok = post(served.url + "/tokenize", {"prompt": "Hello there"})
    assert status == 200 and tok["tokens"] == model.tokenizer.encode("Hello there", add_special_tokens=False)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    status, _, chat = post(served.url + "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["tokens"] == chat_prompt_ids(model, [{"role": "user", "content": "Hi"}])
    status, _, text = post(served.url + "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and text["prompt"] == "Hello there"


def test_batch_inference_recipe_writes_one_line_per_row(tmp_path, tiny_chat_model, model):
    from jaxswift.errors import DataError
    from jaxswift.recipes import infer

    rows = [{"messages": [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "4"}]},
            {"instruction": PROMPTS[2]},
            {"query": PROMPTS[3], "response": "Oui"},
            {"conversations": [{"from": "human", "value": PROMPTS[4]}]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    argv = ["--model", str(tiny_chat_model), "--dataset", str(data), "--result_path", str(out),
            "--max_new_tokens", "10", "--max_num_seqs", "2", "--max_model_len", "128"]
    assert infer.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    for line, prompt in zip(lines, PROMPTS[1:5]):
        assert line["messages"][-1] == {"role": "user", "content": prompt}
        assert line["response"] == greedy_chat(model, prompt, 10)
    assert lines[0]["labels"] == "4" and lines[2]["labels"] == "Oui" and "labels" not in lines[1]
    data.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl:2"):
        infer.main(argv)


def test_serve_recipe_flags_are_checked(tmp_path):
    from jaxswift.errors import ConfigError
    from jaxswift.recipes.serve import ServeArguments, build_server, parse_adapters
    from jaxswift.train.args import parse_args

    args = parse_args(ServeArguments, ["--port", "9000", "--api_key", "a", "b", "--rate_limit", "5/second"])
    assert args.port == 9000 and args.api_key == ["a", "b"] and args.model == "smollm2-135m-instruct"
    shipped = Path(__file__).parents[1] / "jaxswift" / "recipes" / "configs" / "serve_smollm2.yaml"
    assert parse_args(ServeArguments, ["--config", str(shipped)]).max_model_len == 2048
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_adapters(["just-a-folder"])
    with pytest.raises(ConfigError, match="adapter_config.json"):
        parse_adapters([f"mine={tmp_path}"])
    with pytest.raises(ConfigError, match="--rate_limit"):
        build_server(parse_args(ServeArguments, ["--rate_limit", "lots"]))
    with pytest.raises(ConfigError, match="--max_num_seqs"):
        parse_args(ServeArguments, ["--max_num_seqs", "0"])
