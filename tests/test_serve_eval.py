"""Evaluator support: lm-evaluation-harness's `local-completions` model pointed at `jaxswift deploy` scores a
multiple-choice task exactly as lm-eval's own `hf` model does on the same weights (transformers loading the same HF
folder): the same per-item log-likelihoods (1e-3) and the same accuracy. The task is a local YAML over a local JSONL
file, both written here. Also the echo / prompt log-prob / token-id prompt shapes directly, and their bad inputs.

One `jaxswift deploy` subprocess serves the whole module.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

MODEL = "tiny-eval"

QUESTIONS = [
    ("The sky on a clear day is", [" blue", " green", " loud", " square"], 0),
    ("Two plus two equals", [" four", " seven", " a cat"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Parisian"], 0),
    ("The opposite of hot is", [" warm", " cold", " purple"], 1),
    ("A week has seven", [" days", " apples", " rivers"], 0),
    ("Birds can usually", [" fly", " dissolve", " compile"], 0),
    ("The capital of France is", [" Berlin", " Paris", " Rome", " Madrid"], 1),
    ("Ice is frozen", [" fire", " water", " sand"], 1),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def deployed(tiny_chat_model, tmp_path_factory):
    """`jaxswift deploy` on the tiny random llama, in a subprocess (this worktree's jaxswift), until the module ends."""
    port = _free_port()
    log = tmp_path_factory.mktemp("deploy") / "deploy.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxswift.cli", "deploy", "--model", str(tiny_chat_model), "--port", str(port),
             "--served_model_name", MODEL, "--max_model_len", "512", "--max_num_seqs", "4", "--log_level",
             "warning", "--no_warmup"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"jaxswift deploy exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"jaxswift deploy did not come up:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def hf_model(tiny_chat_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_chat_model))


def _reference_logprobs(hf_model, ids):
    """float64 log-softmax of transformers' logits: lp[t] scores ids[t + 1]."""
    import torch

    model, _ = hf_model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_echo_scores_token_id_prompts_like_transformers(deployed, hf_model):
    _, tok = hf_model
    prompts = [tok.encode("The quick brown fox jumps over the lazy dog"), tok.encode("Hello there, general")]
    status, body = post(deployed + "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 0,
                                                       "echo": True, "logprobs": 3, "temperature": 0})
    assert status == 200, body
    assert len(body["choices"]) == 2
    for choice, ids in zip(sorted(body["choices"], key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids)
        assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = _reference_logprobs(hf_model, ids)
        np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[t, ids[t + 1]] for t in range(len(ids) - 1)],
                                   atol=1e-4)
        for t in range(1, len(ids)):
            top = lp["top_logprobs"][t]
            assert len(top) <= 3
            assert max(top.values()) == pytest.approx(ref[t - 1].max(), abs=1e-4)
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0


def test_echo_with_generated_tokens_and_n(deployed, hf_model):
    _, tok = hf_model
    ids = tok.encode("Once upon a time")
    status, body = post(deployed + "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3,
                                                       "echo": True, "logprobs": 1, "temperature": 0, "n": 2,
                                                       "ignore_eos": True})
    assert status == 200, body
    ref = _reference_logprobs(hf_model, ids)
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert choice["text"].startswith("Once upon a time") and len(lp["tokens"]) == len(ids) + 3
        np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)],
                                   [ref[t, ids[t + 1]] for t in range(len(ids) - 1)], atol=1e-4)
        assert lp["text_offset"][len(ids)] == len("Once upon a time")
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy


def test_echo_without_logprobs_prefixes_the_prompt(deployed):
    status, body = post(deployed + "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                       "echo": True, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"].startswith("Hi") and body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "echo": True, "stream": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[1, 2], [3, 10 ** 9]], "echo": True, "max_tokens": 0, "logprobs": 1}, "prompt"),
    ({"prompt": [1, -4], "echo": True, "max_tokens": 0}, "prompt"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": [[]], "echo": True, "max_tokens": 0}, None),
])
def test_bad_echo_requests_are_400_and_the_server_keeps_serving(deployed, body, param):
    status, out = post(deployed + "/v1/completions", {"model": MODEL, **body})
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert out["error"]["param"] == param, out
    status, _ = post(deployed + "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 1})
    assert status == 200


def test_tokenize_detokenize_round_trip(deployed, hf_model):
    _, tok = hf_model
    status, body = post(deployed + "/tokenize", {"model": MODEL, "prompt": "Hello world"})
    assert status == 200 and body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    status, back = post(deployed + "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == "Hello world"
    status, bad = post(deployed + "/detokenize", {"model": MODEL, "tokens": [10 ** 9]})
    assert status == 400 and bad["error"]["param"] == "tokens"


# ---------------------------------------------------------------- lm-evaluation-harness parity

def _write_task(folder):
    data = folder / "mc.jsonl"
    with open(data, "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (folder / "jaxswift_mc.yaml").write_text(
        "task: jaxswift_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "target_delimiter: \"\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")


def _evaluate(model, model_args, include_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["jaxswift_mc"], device="cpu", batch_size=4,
                          task_manager=TaskManager(include_path=str(include_path)), log_samples=True,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(out["samples"]["jaxswift_mc"], key=lambda s: s["doc_id"])
    lls = [[resp[0][0] for resp in s["resps"]] for s in samples]
    return out["results"]["jaxswift_mc"]["acc,none"], lls


def test_lm_eval_local_completions_matches_lm_eval_hf(deployed, tiny_chat_model, tmp_path):
    _write_task(tmp_path)
    served_acc, served = _evaluate(
        "local-completions",
        f"model={MODEL},base_url={deployed}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tiny_chat_model},tokenized_requests=True,num_concurrent=1,max_retries=1", tmp_path)
    hf_acc, reference = _evaluate("hf", f"pretrained={tiny_chat_model},dtype=float32", tmp_path)
    assert len(served) == len(reference) == len(QUESTIONS)
    for got, want in zip(served, reference):
        assert all(math.isfinite(x) for x in got)
        np.testing.assert_allclose(got, want, atol=1e-3)
    assert served_acc == hf_acc
