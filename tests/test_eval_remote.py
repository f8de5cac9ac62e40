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
                             "--log_level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
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
