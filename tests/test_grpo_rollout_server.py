"""GRPO's rollouts on a rollout server (--rollout_mode server, --async_generate): a weight push makes the server
sample what the trainer scores (log-probs within 1e-4) and exactly what the colocated path samples; 2-step runs in
server and server+async modes (server == colocate; async trains on rollouts one version old); bad inputs (flags,
an unreachable server, bodies the server refuses, a server killed mid-run: a clear stop and a checkpoint that
resumes)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.infer.generate import stop_token_ids
from jaxswift.infer.rollout import RolloutSampling, completion_logps, rollout, sequences
from jaxswift.infer.rollout_remote import RolloutClient, RolloutServerError, host_leaves, rollout_request
from jaxswift.recipes.grpo import train as run_grpo
from jaxswift.recipes.rollout import RolloutArguments
from jaxswift.serve.rollout_server import RolloutService, build_rollout_app
from jaxswift.train.grpo import Generator
from jaxswift.train.grpo_args import GrpoArguments
from jaxswift.train.grpo_remote import tuner_description
from jaxswift.train.loop import BatchSourceLost
from jaxswift.tuners.lora import LoraConfig, add_lora, combine, partition

from server_fixtures import running


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return jaxswift.load_model(str(tiny_chat_model))


@pytest.fixture(scope="module")
def server(tiny, tiny_chat_model):
    """A rollout server on the tiny model, in a thread of this process (its own params copy)."""
    model = jaxswift.load_model(str(tiny_chat_model), load_tokenizer=False)
    with running(build_rollout_app(RolloutService(model, name="tiny"))) as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpo_args(model, out, **overrides) -> GrpoArguments:
    base = dict(model=str(model), output_dir=str(out), dataset=["builtin:arithmetic#32"], max_steps=2,
                logging_steps=1, learning_rate=1e-2, demo_question="", disable_tqdm=True, save_steps=1000,
                mesh="1", num_generations=4, per_device_train_batch_size=8, max_completion_length=4,
                reward_funcs=["accuracy", "answer_format"], beta=0.0, lora_dropout=0.0, seed=5)
    return GrpoArguments(**{**base, **overrides})


def prompts(model, n):
    questions = ["What is 2 + 3?", "What is 10 - 4?", "What is 6 * 7?"][:n]
    return [jaxswift.api.chat_prompt_ids(model, [{"role": "user", "content": q}]) for q in questions]


# --- the mismatch check: after a push, the server samples what the trainer scores --------------------------------


def test_pushed_weights_sample_what_the_trainer_scores(tiny, server):
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    params = add_lora(tiny.params, tiny.config, lora_cfg, jax.random.key(0))
    trainable, frozen = partition(params)
    # adapters as training leaves them: B no longer zero, so the push visibly changes the policy
    bumped = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), trainable)
    params = combine(bumped, frozen)
    client = RolloutClient(server, timeout=60)
    assert client.wait_ready()["model"] == "tiny"
    client.push(host_leaves(add_lora(tiny.params, tiny.config, lora_cfg, jax.random.key(0))), 10, full=True,
                tuner=tuner_description(lora_cfg), chunk_bytes=1 << 16)  # every param, in many chunks
    sampling = RolloutSampling(temperature=0.7, max_completion_length=6)
    eos = stop_token_ids(tiny.config, tiny.tokenizer)
    key = jax.random.key(3)
    request = rollout_request(prompts(tiny, 3), sampling=sampling, num_generations=2, eos_ids=eos, pad_id=0, key=key)
    before, version = client.rollout(request)
    assert version == 10
    client.push(host_leaves(bumped), 11, full=False)  # the adapters only
    arrays, version = client.rollout(request)
    assert version == 11
    local = rollout(params, prompts(tiny, 3), tiny.config.replace(remat="none"), sampling=sampling,
                    num_generations=2, eos_ids=eos, pad_id=0, key=key)
    np.testing.assert_array_equal(arrays["completion_ids"], local.completion_ids)  # same weights, same key
    seqs = sequences(local)
    score = jax.jit(lambda p, t, pos, seg: completion_logps(p, t, pos, seg, tiny.config, temperature=0.7,
                                                            prompt_length=local.prompt_ids.shape[1]))
    trainer = np.asarray(score(params, seqs["tokens"], seqs["positions"], seqs["segment_ids"]))
    assert local.completion_mask.sum() > 0
    np.testing.assert_allclose(arrays["logprobs"], trainer * local.completion_mask, atol=1e-4)
    assert not np.allclose(before["logprobs"], arrays["logprobs"], atol=1e-3)  # the adapters' push mattered


def test_the_server_refuses_bad_bodies_with_the_field_named(tiny, server):
    import httpx

    good = rollout_request(prompts(tiny, 1), sampling=RolloutSampling(max_completion_length=2), num_generations=2,
                           eos_ids=[2], pad_id=0, key=jax.random.key(0))
    for change, status, message in [({"num_generations": 0}, 422, "num_generations"),
                                    ({"temperature": "hot"}, 422, "temperature"),
                                    ({"extra": 1}, 422, "extra"),
                                    ({"prompts": [[10 ** 9]]}, 400, "prompts: token id 1000000000 is outside"),
                                    ({"top_p": 1.5}, 400, "top_p")]:
        r = httpx.post(f"{server}/rollout", json={**good, **change}, timeout=60)
        assert r.status_code == status and message in r.json()["detail"], (change, r.text)
    r = httpx.post(f"{server}/weights?version=1&chunk=0&chunks=1&full=0", content=b"not safetensors", timeout=60)
    assert r.status_code == 400 and "safetensors" in r.json()["detail"]
    client = RolloutClient(server, timeout=60)
    with pytest.raises(RolloutServerError, match=r"refused weights version 12 .*HTTP 400.*not params of this model"):
        client.push({"['nope']": np.zeros(3, np.float32)}, 12, full=False)
    with pytest.raises(RolloutServerError, match=r"HTTP 400.*\['embed'\].*float32\[3\], the model's is"):
        client.push({"['embed']": np.zeros(3, np.float32)}, 13, full=False)


def test_a_restarted_server_refuses_partial_pushes(tiny_chat_model):
    model = jaxswift.load_model(str(tiny_chat_model), load_tokenizer=False)
    with running(build_rollout_app(RolloutService(model))) as url:
        with pytest.raises(RolloutServerError, match="no full push yet"):
            RolloutClient(url, timeout=60).push({"['embed']": np.asarray(model.params["embed"])}, 3, full=False)


# --- flags and an unreachable server -------------------------------------------------------------------------------


def test_bad_placement_flags_and_an_unreachable_server(tiny_chat_model, tmp_path):
    with pytest.raises(ConfigError, match="--rollout_mode 'remote': expected colocate | server"):
        grpo_args(tiny_chat_model, tmp_path, rollout_mode="remote")
    with pytest.raises(ConfigError, match="--rollout_mode server needs --rollout_url"):
        grpo_args(tiny_chat_model, tmp_path, rollout_mode="server")
    for flag, value in (("async_generate", True), ("rollout_url", "http://127.0.0.1:1"), ("rollout_timeout", 5.0)):
        with pytest.raises(ConfigError, match=f"--{flag} needs --rollout_mode server"):
            grpo_args(tiny_chat_model, tmp_path, **{flag: value})
    with pytest.raises(ConfigError, match="--rollout_url 'localhost:8000': expected http://HOST:PORT"):
        grpo_args(tiny_chat_model, tmp_path, rollout_mode="server", rollout_url="localhost:8000")
    with pytest.raises(ConfigError, match="--rollout_backend engine with --rollout_mode server"):
        grpo_args(tiny_chat_model, tmp_path, rollout_mode="server", rollout_url="http://127.0.0.1:1",
                  rollout_backend="engine")
    with pytest.raises(ConfigError, match="--num_processes 2 with --rollout_mode server"):
        grpo_args(tiny_chat_model, tmp_path, rollout_mode="server", rollout_url="http://127.0.0.1:1", num_processes=2)
    with pytest.raises(ConfigError, match="--port must be in 1..65535, got 0"):
        RolloutArguments(port=0)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutServerError, match=f"no rollout server answers at {url} .*jaxswift rollout"):
        run_grpo(grpo_args(tiny_chat_model, tmp_path, rollout_mode="server", rollout_url=url, rollout_timeout=1.0),
                 progress=False)


# --- 2-step runs ---------------------------------------------------------------------------------------------------


@pytest.fixture
def traffic(monkeypatch):
    """The weights versions pushed and the versions that sampled each rollout, as the client sees them."""
    seen = {"pushed": [], "sampled": [], "logprobs": [], "old_logps": []}
    push, sample, make_batch = RolloutClient.push, RolloutClient.rollout, Generator.__call__

    def spy_push(self, leaves, version, *, full, **kw):
        seen["pushed"].append((version, full))
        return push(self, leaves, version, full=full, **kw)

    def spy_rollout(self, request):
        arrays, version = sample(self, request)
        seen["sampled"].append(version)
        seen["logprobs"].append(arrays["logprobs"])
        return arrays, version

    def spy_batch(self, state, generation, rows):
        batch = make_batch(self, state, generation, rows)
        if "old_logps" in batch:
            seen["old_logps"].append(batch["old_logps"].reshape(-1, batch["old_logps"].shape[-1]))
        return batch

    monkeypatch.setattr(RolloutClient, "push", spy_push)
    monkeypatch.setattr(Generator, "__call__", spy_batch)
    monkeypatch.setattr(RolloutClient, "rollout", spy_rollout)
    return seen


def test_server_mode_equals_colocate_and_async_trains_one_step_off_policy(tiny_chat_model, server, tmp_path,
                                                                          traffic):
    colocated = run_grpo(grpo_args(tiny_chat_model, tmp_path / "colocate"), progress=False).history
    remote = run_grpo(grpo_args(tiny_chat_model, tmp_path / "server", rollout_mode="server", rollout_url=server),
                      progress=False).history
    assert traffic["pushed"] == [(0, True), (1, False)] and traffic["sampled"] == [0, 1]  # the latest weights
    assert traffic["old_logps"] == []  # on-policy (num_iterations 1): no old log-probs, ratio 1
    for s in (1, 2):  # the same weights and keys sample the same completions: the same run
        for name in ("loss", "reward", "completion_length"):
            assert remote[s][name] == pytest.approx(colocated[s][name], abs=1e-5), (s, name)
    for seen in traffic.values():
        seen.clear()
    off = run_grpo(grpo_args(tiny_chat_model, tmp_path / "async", rollout_mode="server", rollout_url=server,
                             async_generate=True, max_steps=3), progress=False).history
    # generation 1 was requested before update 1 (from version 0), generation 2 before update 2 (version 1)
    assert traffic["pushed"] == [(0, True), (1, False), (2, False)] and traffic["sampled"] == [0, 0, 1]
    # the importance correction's denominator is the behaviour policy: the server's own log-probs of each rollout
    assert len(traffic["old_logps"]) == 3
    for old, sampled in zip(traffic["old_logps"], traffic["logprobs"]):
        np.testing.assert_array_equal(old, sampled)
    assert set(off) == {1, 2, 3} and all(np.isfinite(off[s]["loss"]) for s in off)
    assert off[1]["loss"] == pytest.approx(colocated[1]["loss"], abs=1e-5)  # the first generation is on-policy


# --- a server that dies mid-run -------------------------------------------------------------------------------------

KILLER = '''
import os, signal
calls = []

def kill_server_at_second_generation(prompts, completions, **columns):
    calls.append(1)
    if len(calls) == 2:
        os.kill(int(os.environ["JAXSWIFT_TEST_ROLLOUT_PID"]), signal.SIGKILL)
    return [0.0] * len(completions)
'''


def test_a_server_killed_mid_run_stops_training_with_a_checkpoint_that_resumes(tiny_chat_model, tmp_path,
                                                                               monkeypatch):
    port = free_port()
    server_log = open(tmp_path / "rollout_server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.rollout", "--model", str(tiny_chat_model),
                             "--port", str(port)], env=os.environ.copy(), stdout=server_log, stderr=subprocess.STDOUT)
    try:
        plugin = tmp_path / "killer_rewards.py"
        plugin.write_text(textwrap.dedent(KILLER))
        monkeypatch.setenv("JAXSWIFT_TEST_ROLLOUT_PID", str(proc.pid))
        url = f"http://127.0.0.1:{port}"
        args = grpo_args(tiny_chat_model, tmp_path / "run", rollout_mode="server", rollout_url=url, max_steps=4,
                         reward_funcs=[f"{plugin}:kill_server_at_second_generation"], rollout_timeout=300.0)
        with pytest.raises(BatchSourceLost, match=rf"rollout server {url} did not answer .*Training stopped after "
                                                  r"step 2; its state is checkpointed .*--resume_from_checkpoint"):
            run_grpo(args, progress=False)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(30)
        server_log.close()
    resumed = run_grpo(grpo_args(tiny_chat_model, tmp_path / "run", max_steps=3, resume_from_checkpoint="latest"),
                       progress=False)
    assert set(resumed.history) == {3}  # steps 1-2 came back from the checkpoint saved at the failure
