"""`jaxswift eval --eval_url` against `jaxswift deploy` (one server process per module, tiny model): greedy
generation tasks give the in-process results; log-likelihood tasks go through completions with echo + logprobs,
or stop with a clear message where the server does not offer them."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import jaxswift
from jaxswift.cli import main as cli_main
from jaxswift.eval import EvalError, InProcessTarget, RemoteTarget, evaluate, load_tasks


@pytest.fixture(scope="module")
def deployed(tiny_chat_model, tmp_path_factory):
    """`python -m jaxswift.recipes.serve` (= jaxswift deploy) on a free port; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("deploy") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.serve", "--model", str(tiny_chat_model),
                             "--port", str(port), "--max_num_seqs", "8", "--max_model_len", "512",
                             "--log_level", "warning", "--no_warmup"], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            log.seek(0)
            assert proc.poll() is None, f"server exited: {log.read()[-2000:]}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
    yield url + "/v1"
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return jaxswift.load_model(str(tiny_chat_model))


def test_generation_tasks_equal_in_process(deployed, tiny):
    tasks = [t for t in load_tasks(["builtin"]) if t.kind == "generate"]
    kw = dict(limit=6, max_new_tokens=8, seed=0)
    remote = evaluate(tasks, RemoteTarget(deployed), **kw)
    local = evaluate(tasks, InProcessTarget(tiny.params, tiny.config, tiny.tokenizer), **kw)
    for r, l in zip(remote, local):
        assert [x["output"] for x in r.records] == [x["output"] for x in l.records], r.name
        assert r.metrics == l.metrics
    assert any(x["output"] for r in remote for x in r.records)


def _server_echoes(url: str) -> bool:
    body = json.dumps({"prompt": "a b", "echo": True, "logprobs": 1, "max_tokens": 0}).encode()
    req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=60)
        return True
    except urllib.error.HTTPError:
        return False


def test_loglik_tasks_through_echo_or_a_clear_message(deployed, tiny, tmp_path, capsys):
    mcq = [t for t in load_tasks(["builtin"]) if t.name == "general_mcq"]
    if _server_echoes(deployed):  # the server returns prompt log-probs: they equal the in-process ones
        [remote] = evaluate(mcq, RemoteTarget(deployed), limit=5)
        [local] = evaluate(mcq, InProcessTarget(tiny.params, tiny.config, tiny.tokenizer), limit=5)
        np.testing.assert_allclose([x["logliks"] for x in remote.records], [x["logliks"] for x in local.records],
                                   atol=1e-3)
        assert remote.metrics == local.metrics
        return
    with pytest.raises(EvalError, match=r"does not return prompt log-probs \(echo\)"):
        evaluate(mcq, RemoteTarget(deployed), limit=2)
    assert cli_main(["eval", "--eval_url", deployed, "--eval_limit", "2", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the server at {deployed} does not return prompt log-probs (echo)"), err
    assert "\n" not in err


@pytest.fixture(scope="module")
def echo_stub(tiny_chat_model):
    """A server speaking the legacy completions echo shape (vLLM / OpenAI: `tokens`, `token_logprobs` with a null
    first entry, `top_logprobs`, `text_offset`), its numbers computed by transformers on the same tiny model: the
    client's parsing checked against an independent reference."""
    import http.server
    import threading

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)

    def echo(prompt: str) -> dict:
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        texts = [tok.decode([i]) for i in ids]
        lps = [None] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
        tops = [None] + [{tok.decode([int(logp[j - 1].argmax())]): float(logp[j - 1].max())}
                         for j in range(1, len(ids))]
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": [start for start, _ in enc["offset_mapping"]]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["echo"] and body["max_tokens"] == 0 and body["logprobs"] >= 1
            self._send({"choices": [{"index": 0, "text": body["prompt"], "logprobs": echo(body["prompt"]),
                                     "finish_reason": "length"}]})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_loglik_through_standard_echo_shape(echo_stub, tiny):
    mcq = [t for t in load_tasks(["builtin"]) if t.name == "general_mcq"]
    [remote] = evaluate(mcq, RemoteTarget(echo_stub), limit=8)
    [local] = evaluate(mcq, InProcessTarget(tiny.params, tiny.config, tiny.tokenizer), limit=8)
    np.testing.assert_allclose([x["logliks"] for x in remote.records], [x["logliks"] for x in local.records],
                               atol=1e-3)
    assert [x["is_greedy"] for x in remote.records] == [x["is_greedy"] for x in local.records]
    assert remote.metrics == local.metrics
