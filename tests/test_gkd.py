"""GKD (`jaxswift rlhf --rlhf_type gkd`): the generalized JSD against TRL's GKDTrainer.generalized_jsd_loss, the
top-k teacher semantics, held-out divergence falling on a tiny student, on-policy / seq-KD steps, a remote teacher
(our own server) giving the in-process teacher's loss, and bad inputs."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from server_fixtures import running

import jaxswift
from jaxswift.errors import ConfigError
from jaxswift.losses import distill
from jaxswift.recipes.common import run_main
from jaxswift.recipes.rlhf import main as rlhf_main
from jaxswift.train import gkd
from jaxswift.train.gkd_teacher import RemoteTeacher
from jaxswift.train.rlhf import run_rlhf
from jaxswift.train.rlhf_args import RlhfArguments

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def save_tiny_llama(folder, tokenizer, seed: int, vocab_size: int | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab_size or len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, smol_tokenizer):
    """A differently seeded tiny llama with the student's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("gkd_teacher"), smol_tokenizer, seed=1)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return jaxswift.load_model(str(teacher_dir))


def gkd_args(student, teacher_dir, out, **overrides) -> RlhfArguments:
    base = dict(model=str(student), rlhf_type="gkd", teacher_model=str(teacher_dir), output_dir=str(out),
                dataset=["builtin:preference_demo#24"], max_steps=2, logging_steps=1, learning_rate=1e-3,
                demo_question="", disable_tqdm=True, save_steps=1000, mesh="1", per_device_train_batch_size=4,
                max_completion_length=16, max_length=64, lmbda=0.0)
    base.update(overrides)
    if "teacher_url" in overrides:
        base.pop("teacher_model")
    return RlhfArguments(**base)


# ---------------------------------------------------------------------------------------------------- the loss


def test_generalized_jsd_equals_trl():
    import torch
    from trl.experimental.gkd import GKDTrainer

    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 6, 101)) * 2, rng.normal(size=(3, 6, 101)) * 2
    labels = rng.integers(0, 101, size=(3, 6))
    labels[0, :2] = labels[2, :] = -100  # a prompt, and a row with nothing counted
    checked = 0
    for beta in (0.0, 0.5, 1.0, 0.3):
        for temperature in (1.0, 0.7, 2.0):
            for lab in (None, labels):
                for reduction in ("batchmean", "sum", "mean"):
                    ref = GKDTrainer.generalized_jsd_loss(
                        torch.tensor(student), torch.tensor(teacher), None if lab is None else torch.tensor(lab),
                        beta=beta, temperature=temperature, reduction=reduction).item()
                    with jax.enable_x64(True):
                        ours = float(distill.generalized_jsd_loss(
                            jnp.asarray(student), jnp.asarray(teacher), None if lab is None else jnp.asarray(lab),
                            beta=beta, temperature=temperature, reduction=reduction))
                    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9), (beta, temperature, lab is None, reduction)
                    checked += 1
    assert checked == 72


def _topk_jsd_float64(student_logits, teacher_logits, k, beta, temperature):
    """The documented top-k semantics, transcribed in numpy float64: the teacher's k best ids at temperature 1,
    both distributions restricted to them and renormalised at temperature T, then JSD_beta."""
    ids = np.argsort(-teacher_logits, axis=-1)[..., :k]

    def restricted(logits):
        z = np.take_along_axis(logits, ids, axis=-1) / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    s, t = restricted(student_logits), restricted(teacher_logits)
    kl = lambda p, q: (np.exp(p) * (p - q)).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
def test_top_k_semantics(beta):
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(2, 5, 64)) * 3, rng.normal(size=(2, 5, 64)) * 3
    for k, temperature in ((4, 0.9), (20, 1.0), (64, 1.5)):
        # a server reports temperature-1 log-probs; the loss divides them by T and renormalises on the support
        ids, logps = distill.teacher_top_k(jnp.asarray(teacher, jnp.float32), k)
        ours = distill.topk_jsd(jnp.asarray(student, jnp.float32), ids, logps, beta=beta, temperature=temperature)
        want = _topk_jsd_float64(student, teacher, k, beta, temperature)
        np.testing.assert_allclose(np.asarray(ours), want, rtol=2e-5, atol=1e-6)
    full = distill.token_jsd(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), beta=beta,
                             temperature=1.5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full), rtol=2e-5, atol=1e-6)  # K = V: the full JSD
    with pytest.raises(ValueError, match="beta must be in"):
        distill.generalized_jsd(jnp.zeros(3), jnp.zeros(3), 1.5)


# --------------------------------------------------------------------------------------------------- training


def test_held_out_divergence_drops(tiny_chat_model, teacher_dir, tmp_path):
    """Dataset replies (lmbda 0), full tuning: the student moves toward a differently seeded teacher."""
    args = gkd_args(tiny_chat_model, teacher_dir, tmp_path / "out", max_steps=8, tuner_type="full",
                    learning_rate=2e-3, split_dataset_ratio=0.25, eval_steps=8, per_device_eval_batch_size=6)
    result = run_rlhf(args, progress=False)
    assert result.divergence_before > 0
    assert result.divergence_after < 0.8 * result.divergence_before, (result.divergence_before,
                                                                     result.divergence_after)
    assert all(h["source/dataset"] == 1.0 for h in result.history.values())
    lines = [json.loads(line) for line in (tmp_path / "out" / "logging.jsonl").read_text().splitlines()]
    summary = [line for line in lines if line.get("split") == "summary"]
    assert summary and summary[0]["divergence_after"] == pytest.approx(result.divergence_after)
    assert (result.export_dir / "config.json").is_file()


def test_on_policy_and_seq_kd_steps(tiny_chat_model, teacher_dir, tmp_path):
    """lmbda 0.5 with seq_kd (LoRA): at seed 42 the first step trains on the in-process teacher's samples (with its
    top-5), the second on the student's own."""
    result = run_rlhf(gkd_args(tiny_chat_model, teacher_dir, tmp_path, lmbda=0.5, seq_kd=True,
                               max_completion_length=8, teacher_top_k=5), progress=False)
    assert [(h["source/teacher"], h["source/student"]) for _, h in sorted(result.history.items())] == \
        [(1.0, 0.0), (0.0, 1.0)]
    assert all(1 <= h["completion_length"] <= 8 and h["loss"] > 0 for h in result.history.values())
    assert (result.export_dir / "adapter_config.json").is_file()


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_the_on_policy_draw_is_seeded_with_probability_lmbda(lmbda):
    maker = gkd.BatchMaker(argparse.Namespace(seed=42, lmbda=lmbda, seq_kd=True), None, None, None, 0, 8, 1)
    draws = [maker.source(step) for step in range(2000)]
    assert draws == [maker.source(step) for step in range(2000)]  # a resumed run makes the same choices
    assert set(draws) <= {1, 2} and np.mean(np.asarray(draws) == 1) == pytest.approx(lmbda, abs=0.04)


# ---------------------------------------------------------------------------------------------- remote teacher


@pytest.fixture(scope="module")
def teacher_server(teacher):
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.orchestrator import Orchestrator
    from jaxswift.serve.openai import build_app

    engine = JaxEngine(teacher, max_concurrent_decodes=4, max_model_len=256, page_size=16, prefill_buckets=(64, 128))
    orchestrator = Orchestrator(engine, max_queue=64)
    with running(build_app(orchestrator, model_name="teacher")) as url:
        yield url + "/v1"
    orchestrator.shutdown()


def post(url, body):
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_server_returns_tokens_as_token_ids(teacher_server, teacher):
    ids = teacher.tokenizer.encode("The cat sat on", add_special_tokens=False)
    common = {"prompt": ids, "echo": True, "max_tokens": 2, "logprobs": 3, "temperature": 0.0}
    text = post(teacher_server + "/completions", common)["choices"][0]["logprobs"]
    named = post(teacher_server + "/completions", {**common, "return_tokens_as_token_ids": True})
    lp = named["choices"][0]["logprobs"]
    assert lp["tokens"][:len(ids)] == [f"token_id:{i}" for i in ids]
    assert lp["text_offset"] == text["text_offset"] and lp["token_logprobs"] == text["token_logprobs"]
    assert lp["top_logprobs"][0] is None
    for by_id, by_text in zip(lp["top_logprobs"][1:], text["top_logprobs"][1:]):
        assert len(by_id) == 3 and all(k.startswith("token_id:") for k in by_id)
        assert {teacher.tokenizer.decode([int(k[9:])]): v for k, v in by_id.items()} == by_text
    chat = post(teacher_server + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
                                                       "return_tokens_as_token_ids": True})
    content = chat["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and len(c["top_logprobs"]) == 2 for c in content)


def test_teacher_url_gives_the_in_process_teachers_loss(tiny_chat_model, teacher_dir, teacher, teacher_server,
                                                        tmp_path):
    student = jaxswift.load_model(str(tiny_chat_model))
    args = gkd_args(tiny_chat_model, teacher_dir, tmp_path, max_completion_length=24)
    items = gkd.load_gkd_items(["builtin:preference_demo#6"], student.tokenizer, args, lambda m: None, "test")
    P, C, K = max(len(it.prompt) for it in items), 24, 7
    rows = gkd.gkd_rows([list(it.prompt) for it in items], [it.completion for it in items],
                        [it.mask for it in items], P, C, student.tokenizer.pad_token_id)
    remote = RemoteTeacher(teacher_server, K, student.config.vocab_size)
    assert "the same as the student's" in remote.check_tokenizer(student.tokenizer)
    ids, logps = remote.score(rows["tokens"], rows["segment_ids"], rows["completion_mask"], P)
    t_logits = gkd.completion_logits(teacher.params, rows, teacher.config)
    local_ids, local_logps = distill.teacher_top_k(t_logits, K)
    counted = rows["completion_mask"] > 0
    np.testing.assert_array_equal(ids[counted], np.asarray(local_ids)[counted])
    np.testing.assert_allclose(logps[counted], np.asarray(local_logps)[counted], rtol=1e-5, atol=1e-5)
    for beta, temperature in ((0.5, 0.9), (0.0, 1.0), (1.0, 2.0)):
        loss = gkd.GkdLoss(beta, temperature, K)
        local = gkd.divergence_sums(student.params, rows, teacher.params, cfg=student.config,
                                    teacher_cfg=teacher.config, loss=loss)
        served = gkd.divergence_sums(student.params, {**rows, "teacher_ids": ids, "teacher_logps": logps},
                                     cfg=student.config, teacher_cfg=None, loss=gkd.GkdLoss(beta, temperature, None))
        assert float(served[0]) == pytest.approx(float(local[0]), rel=1e-5)
        assert float(served[1]) == float(local[1]) == counted.sum()


def test_training_against_a_teacher_url(tiny_chat_model, teacher_dir, teacher_server, tmp_path):
    """Seq-KD completions sampled by the server, scored by it: two steps run and the held-out divergence is
    measured with the server's top-k."""
    result = run_rlhf(gkd_args(tiny_chat_model, teacher_dir, tmp_path, teacher_url=teacher_server, seq_kd=True,
                               max_completion_length=8, teacher_top_k=5, split_dataset_ratio=0.2,
                               per_device_eval_batch_size=5), progress=False)
    assert [h["source/teacher"] for h in result.history.values()] == [1.0, 1.0]
    assert all(1 <= h["completion_length"] <= 8 for h in result.history.values())
    assert result.divergence_before > 0 and np.isfinite(result.divergence_after)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_model=None), "needs one teacher"),
    (dict(teacher_url="http://127.0.0.1:9/v1"), "not both"),
    (dict(lmbda=1.5), "--lmbda 1.5: expected a value in"),
    (dict(beta=-0.1), "--beta -0.1: expected a value in"),
    (dict(temperature=0.0), "--temperature 0.0: must be > 0"),
    (dict(max_completion_length=-3), "--max_completion_length -3"),
    (dict(max_completion_length=0), "--max_completion_length 0: must be >= 1"),
    (dict(ref_model="x"), "--ref_model is not used by --rlhf_type gkd"),
    (dict(loss_scale="all"), "only last_round"),
    (dict(teacher_top_k=0), "--teacher_top_k 0"),
])
def test_bad_flags(overrides, message, tmp_path):
    base = dict(rlhf_type="gkd", teacher_model="t", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        RlhfArguments(**{**base, **overrides})


def test_bad_flags_outside_gkd_and_for_servers(tmp_path):
    with pytest.raises(ConfigError, match="--teacher_model is used by --rlhf_type gkd only"):
        RlhfArguments(rlhf_type="dpo", teacher_model="t", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--lmbda is used by --rlhf_type gkd only"):
        RlhfArguments(lmbda=0.5, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="a server returns 1 to 20 top log-probs"):
        RlhfArguments(rlhf_type="gkd", teacher_url="http://127.0.0.1:9/v1", teacher_top_k=21)
    with pytest.raises(ConfigError, match="expected http://host:port/v1"):
        RlhfArguments(rlhf_type="gkd", teacher_url="127.0.0.1:9")
    args = RlhfArguments(rlhf_type="gkd", teacher_url="http://127.0.0.1:9/v1")
    assert (args.beta, args.lmbda, args.temperature, args.max_completion_length, args.teacher_top_k) == \
        (0.5, 0.5, 0.9, 512, 20)


def test_ms_swift_and_trl_flag_names_are_aliases():
    from jaxswift.train.args import parse_args

    args = parse_args(RlhfArguments, ["--rlhf_type", "gkd", "--teacher_model_server", "http://127.0.0.1:9/v1",
                                      "--gkd_logits_topk", "5", "--max_new_tokens", "7"])
    assert (args.teacher_url, args.teacher_top_k, args.max_completion_length) == ("http://127.0.0.1:9/v1", 5, 7)


def test_teacher_with_another_vocabulary_is_refused(tiny_chat_model, smol_tokenizer, tmp_path):
    other = save_tiny_llama(tmp_path / "wide", smol_tokenizer, seed=2, vocab_size=len(smol_tokenizer) + 64)
    with pytest.raises(ConfigError, match=r"has a vocabulary of 49216 tokens, --model .* one of 49152.*not supported"):
        run_rlhf(gkd_args(tiny_chat_model, other, tmp_path / "out"), progress=False)


def test_unreachable_teacher_url_is_one_line(tiny_chat_model, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = run_main(rlhf_main, ["--rlhf_type", "gkd", "--model", str(tiny_chat_model), "--teacher_url",
                      f"http://127.0.0.1:{port}/v1", "--output_dir", str(tmp_path), "--mesh", "1",
                      "--demo_question", ""])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the teacher server" in err and "Traceback" not in err


def test_vision_language_student_is_refused_by_name(tmp_path, teacher_dir):
    from vlm_fixtures import make_qwen2_vl

    make_qwen2_vl(tmp_path / "vlm")
    with pytest.raises(ConfigError, match="gkd trains text-only models so far; this is a qwen2_vl"):
        run_rlhf(gkd_args(tmp_path / "vlm", teacher_dir, tmp_path / "out"), progress=False)
