"""Sharded serving (`jaxswift deploy --mesh`) on the test process's 8 virtual CPU devices: params and the paged KV
cache split over `tensor` (and requests' rows over `data`); through the openai client the greedy answers and their
log-probs equal the one-device engine's."""

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from jaxswift.errors import ConfigError
from jaxswift.recipes.serve import ServeArguments, build_server, serve_from_processes
from jaxswift.train.args import parse_args

from server_fixtures import free_port, running

PROMPTS = ["Name three colours.", "What is two plus two?", "Write a word that rhymes with cat."]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, smol_tokenizer):
    """A random llama whose 4 kv heads and 8 heads split over tensor=4, with weights large enough that greedy
    decoding does not settle on one repeated token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("mesh_model")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(smol_tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=256, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(str(folder))
    return folder


def answers(folder, *flags):
    """[(text, [(token, logprob, {top-5})]) per prompt], and the engine, served with these flags."""
    args = parse_args(ServeArguments, ["--model", str(folder), "--served_model_name", "m", "--max_num_seqs", "4",
                                       "--max_model_len", "128", "--no_warmup", *flags])
    app, orchestrator = build_server(args)
    try:
        with running(app) as url:
            return asked(url), orchestrator.engine
    finally:
        orchestrator.shutdown()


def asked(url):
    """The PROMPTS through the openai client, greedy with top-5 log-probs, then the first one streamed."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    out = []
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0,
            logprobs=True, top_logprobs=5)
        choice = reply.choices[0]
        out.append((choice.message.content, [(t.token, t.logprob, {a.token: a.logprob for a in t.top_logprobs})
                                             for t in choice.logprobs.content]))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=12, temperature=0, stream=True)
    out.append(("".join(c.choices[0].delta.content or "" for c in stream if c.choices), []))
    return out


def assert_same_answers(got, want):
    for (text, steps), (want_text, want_steps) in zip(got, want, strict=True):
        assert text == want_text
        for (token, logprob, top), (want_token, want_logprob, want_top) in zip(steps, want_steps, strict=True):
            assert token == want_token and top.keys() == want_top.keys()
            assert abs(logprob - want_logprob) < 1e-4
            assert all(abs(top[k] - want_top[k]) < 1e-4 for k in top)


@pytest.fixture(scope="module")
def one_device(model_folder):
    return answers(model_folder)[0]


@pytest.mark.parametrize("mesh, tensor, chunk", [("tensor=8", 8, None), ("data=2,tensor=4", 4, None),
                                                 ("data=2,tensor=4", 4, 16)])
def test_sharded_engine_answers_as_one_device(model_folder, one_device, mesh, tensor, chunk):
    """tensor=8 outnumbers the 4 kv heads: each is repeated twice (vLLM's way), one kv head per device. With chunk,
    the chat prompts (over 16 tokens with the template) are prefilled in chunks into a cache on the mesh."""
    chunked = [] if chunk is None else ["--max_num_batched_tokens", str(chunk)]
    got, engine = answers(model_folder, "--mesh", mesh, *chunked)
    assert engine.max_num_batched_tokens == chunk
    assert len({text for text, _ in one_device[:3]}) == 3 and all(len(t) > 5 for t, _ in one_device)
    assert_same_answers(got, one_device)
    assert engine.mesh is not None and engine.mesh.shape["tensor"] == tensor
    assert engine.config.num_kv_heads == max(4, tensor)
    wq = engine.params["layers"][0]["wq"]
    assert "tensor" in str(wq.sharding.spec) and len(wq.sharding.device_set) == engine.mesh.size
    k_pages = engine._pools[0][0]  # the live KV pools: each device holds its kv heads only
    assert k_pages.sharding.spec[0] == "tensor"
    assert k_pages.addressable_shards[0].data.shape[0] == k_pages.shape[0] // tensor == 1


def test_int8_engine_on_a_mesh_answers_as_on_one_device(model_folder):
    """--quant_method int8 on data=2,tensor=4: the int8 leaves stay whole on every device (the decode kernel's
    custom call has no sharding rule) and the answers equal the one-device int8 engine's."""
    want, _ = answers(model_folder, "--quant_method", "int8")
    got, engine = answers(model_folder, "--quant_method", "int8", "--mesh", "data=2,tensor=4")
    assert engine.mesh is not None and hasattr(engine.params["layers"][0]["wq"], "codes")
    assert_same_answers(got, want)


def test_bad_meshes_are_refused(model_folder):
    for mesh, message in (("stage=2", "serving shards over data and tensor only"),
                          ("tensor=16", "needs 16 devices")):
        with pytest.raises(ConfigError, match=message):
            build_server(parse_args(ServeArguments, ["--model", str(model_folder), "--no_warmup", "--mesh", mesh]))


def test_two_processes_serve_as_one_device(model_folder, one_device):
    """`jaxswift deploy` from two processes (4 virtual CPU devices each, gloo) over one data=2,tensor=4 mesh:
    process 0 answers HTTP and the other replays its engine calls; the answers equal the one-device engine's, and
    when process 0 stops, the other stops cleanly."""
    port, coordinator = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the recipe makes 4 devices per process
    env["JAX_PLATFORMS"] = "cpu"
    flags = ["--model", str(model_folder), "--served_model_name", "m", "--max_num_seqs", "4", "--max_model_len",
             "128", "--no_warmup", "--mesh", "data=2,tensor=4", "--port", str(port), "--coordinator_address",
             f"localhost:{coordinator}", "--num_processes", "2", "--log_level", "warning"]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.serve", *flags, "--process_id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, procs)
        assert_same_answers(asked(url), one_device)
        procs[0].send_signal(signal.SIGINT)  # uvicorn stops; process 0 tells the other to stop
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert procs[1].returncode == 0, outputs[1][-3000:]
        assert procs[0].returncode == 0, outputs[0][-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_until_serving(url, procs, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                pytest.fail(f"process {i} exited ({p.returncode}) before serving:\n{p.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"no server at {url} after {timeout_s} s")


def test_multi_process_serving_needs_a_mesh(model_folder):
    args = parse_args(ServeArguments, ["--model", str(model_folder), "--num_processes", "2"])
    with pytest.raises(ConfigError, match="multi-process serving needs --mesh"):
        serve_from_processes(args)
