"""SFT end to end on a tiny model: mesh invariance, packing equivalence, resume, bad inputs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxswift
from jaxswift.data.packing import assemble
from jaxswift.data.templates import encode_chat
from jaxswift.errors import CheckpointError, ConfigError, DataError
from jaxswift.train.args import SftArguments, parse_args
from jaxswift.train.step import nll_sums
from jaxswift.train.sft import run_sft


def sft_args(model, out, **overrides) -> SftArguments:
    base = dict(model=str(model), output_dir=str(out), max_steps=5, logging_steps=1, learning_rate=1e-3,
                per_device_train_batch_size=1, max_length=128, demo_question="", disable_tqdm=True,
                save_steps=1000, lr_scheduler_type="constant", lora_dropout=0.0)
    return SftArguments(**{**base, **overrides})


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_meshes_give_the_same_losses(tiny_chat_model, tmp_path, tuner):
    """Same global batch (8 rows) on data x tensor 4x2, 2x4, fsdp=8 and a plain 8-way data mesh."""
    runs = {"4x2": 2, "2x4": 4, "fsdp=8": 1, None: 1}  # mesh -> per-device batch giving 8 rows per step
    losses = {}
    for mesh, per_device in runs.items():
        args = sft_args(tiny_chat_model, tmp_path / str(mesh), tuner_type=tuner, mesh=mesh,
                        per_device_train_batch_size=per_device)
        losses[mesh] = np.array(list(run_sft(args, progress=False).losses.values()))
    reference = losses[None]
    assert len(reference) == 5 and reference[-1] < reference[0]
    for mesh, got in losses.items():
        np.testing.assert_allclose(got, reference, rtol=1e-4, err_msg=f"mesh {mesh}")


def test_packed_loss_and_gradients_equal_unpacked(tiny_chat_model, smol_tokenizer):
    model = jaxswift.load_model(str(tiny_chat_model))
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
             [("Hi", "Hello there!"), ("What is 2+2?", "4."), ("Name a colour, then explain why you like it.",
                                                                "Green, because it is calm and everywhere.")]]
    examples = [encode_chat(smol_tokenizer, c) for c in chats]
    total = sum(len(e) for e in examples)
    packed = assemble(examples, [[0, 1, 2]], total + 5)
    unpacked = assemble(examples, [[0], [1], [2]], max(len(e) for e in examples))

    def loss(params, batch):
        nll, weight = nll_sums(params, {k: jnp.asarray(v) for k, v in batch.items()}, model.config, 512)
        return nll / weight

    loss_p, grad_p = jax.value_and_grad(loss)(model.params, packed)
    loss_u, grad_u = jax.value_and_grad(loss)(model.params, unpacked)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
    for gp, gu in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(gp, gu, atol=1e-5, rtol=1e-5)
    assert packed["tokens"].size < unpacked["tokens"].size


def test_gradient_accumulation_equals_one_big_batch(tiny_chat_model, tmp_path):
    one = run_sft(sft_args(tiny_chat_model, tmp_path / "a", tuner_type="full", per_device_train_batch_size=4,
                           max_steps=3, mesh="1"), progress=False)
    accumulated = run_sft(sft_args(tiny_chat_model, tmp_path / "b", tuner_type="full", mesh="1",
                                   per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=3),
                          progress=False)
    np.testing.assert_allclose(list(one.losses.values()), list(accumulated.losses.values()), rtol=1e-5)


def read_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_killed_run_resumes_to_the_same_loss(tiny_chat_model, tmp_path):
    flags = ["--model", str(tiny_chat_model), "--tuner_type", "lora", "--max_steps", "30", "--save_steps", "5",
             "--logging_steps", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
             "--max_length", "128", "--demo_question", "", "--disable_tqdm", "true", "--mesh", "1",
             "--lora_dropout", "0.1"]
    straight = tmp_path / "straight"
    run_sft(parse_args(SftArguments, flags + ["--output_dir", str(straight)]), progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxswift.recipes.sft", *flags, "--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "logging.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and max(read_losses(killed), default=0) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(read_losses(killed))
    assert killed_at < 30

    resumed = run_sft(parse_args(SftArguments, flags + ["--output_dir", str(killed), "--resume_from_checkpoint",
                                                         "latest"]), progress=False)
    assert min(resumed.losses) > 10  # it really restarted from a checkpoint, not from step 0
    expected = read_losses(straight)
    for step, loss in resumed.losses.items():
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])


def test_interrupted_save_leaves_the_previous_checkpoint(tiny_chat_model, tmp_path):
    from jaxswift.checkpoints.state import resolve_resume

    out = tmp_path / "run"
    run_sft(sft_args(tiny_chat_model, out, max_steps=4, save_steps=2, mesh="1"), progress=False)
    root, step = resolve_resume("latest", out)
    assert step == 4
    # What a kill during the save of step 6 leaves behind: orbax's temporary folder, never committed.
    partial = root / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(root / "4", partial)
    shutil.rmtree(partial / "state")
    assert resolve_resume("latest", out) == (root, 4)
    resumed = run_sft(sft_args(tiny_chat_model, out, max_steps=6, save_steps=2, mesh="1",
                               resume_from_checkpoint="latest"), progress=False)
    assert sorted(resumed.losses) == [5, 6]


def test_outputs_logs_plot_and_export(tiny_chat_model, tmp_path):
    out = tmp_path / "run"
    result = run_sft(sft_args(tiny_chat_model, out, max_steps=4, eval_steps=2, split_dataset_ratio=0.1,
                              mesh="1"), progress=False)
    assert (out / "loss.png").stat().st_size > 0
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert sorted(result.eval_losses) == [2, 4]
    assert (result.export_dir / "adapter_config.json").is_file()

    # The export recipe merges the trained adapter into a full HF folder that transformers loads.
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "jaxswift.recipes.export", "--adapters", str(result.export_dir),
                           "--output_dir", str(merged)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import torch
    from transformers import AutoModelForCausalLM

    from jaxswift.checkpoints.peft import load_peft_adapter

    model = jaxswift.load_model(str(tiny_chat_model))
    params, _ = load_peft_adapter(model.params, model.config, result.export_dir)
    tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 12))
    ours = np.asarray(jaxswift.forward(params, jnp.asarray(tokens), model.config))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(merged)(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(ours - np.asarray(jaxswift.forward(model.params, jnp.asarray(tokens), model.config))).max() > 1e-4


# --- bad inputs -------------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tiny_chat_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_sft(sft_args(tiny_chat_model, tmp_path / "o", dataset=[str(data)], mesh="1"), progress=False)


def test_rows_without_assistant_are_skipped_and_reported(tiny_chat_model, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "anyone?"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [good, bad, good, bad, bad])
    result = subprocess.run([sys.executable, "-m", "jaxswift.recipes.sft", "--model", str(tiny_chat_model),
                             "--dataset", str(data), "--max_steps", "1", "--demo_question", "", "--mesh", "1",
                             "--output_dir", str(tmp_path / "o"), "--disable_tqdm", "true"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "3 without an assistant turn" in result.stdout + result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "4x4"], "needs 16 devices"),
    (["--mesh", "data=2,pipe=4"], "unknown axis 'pipe'"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--dataset", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--tuner_type", "qlora9"], "--tuner_type"),
    (["--lora_rank", "0"], "--lora_rank"),
])
def test_bad_flags_get_clear_errors(tiny_chat_model, tmp_path, flags, message):
    cmd = [sys.executable, "-m", "jaxswift.recipes.sft", "--model", str(tiny_chat_model), "--max_steps", "1",
           "--output_dir", str(tmp_path / "o"), *flags]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_yaml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 16\nlearning_rate: 3.0e-4\ndataset: [a.jsonl, b.jsonl#10]\n")
    args = parse_args(SftArguments, ["--config", str(cfg), "--learning_rate", "1e-5"])
    assert args.lora_rank == 16 and args.learning_rate == 1e-5 and args.dataset == ["a.jsonl", "b.jsonl#10"]
    cfg.write_text("lora_rnak: 16\n")
    with pytest.raises(ConfigError, match="lora_rnak"):
        parse_args(SftArguments, ["--config", str(cfg)])


def test_shipped_recipe_yaml_parses():
    from jaxswift.recipes.common import resolve_config

    args = parse_args(SftArguments, ["--config", resolve_config("sft_lora_smollm2")])
    assert args.packing and args.tuner_type == "lora"


def test_resume_without_checkpoint(tiny_chat_model, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_sft(sft_args(tiny_chat_model, tmp_path / "o", resume_from_checkpoint="latest", mesh="1"),
                progress=False)


def test_fsdp_shards_optimizer_state_like_the_weights(tiny_chat_model, tmp_path):
    from jaxswift.train.loop import init_state, start_run
    from jaxswift.train.tuning import build_optimizer, prepare_tuner

    args = sft_args(tiny_chat_model, tmp_path, tuner_type="full", mesh="fsdp=8")
    ctx = start_run(args)
    tuned = prepare_tuner(ctx.model.params, args, ctx.cfg)
    optimizer, _ = build_optimizer(args, 10, ctx.cfg)
    state, _ = init_state(ctx, tuned, optimizer, [])
    weight = state.trainable["layers"]["wq"]
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if "wq" in jax.tree_util.keystr(path)]
    assert "fsdp" in str(weight.sharding.spec)
    assert moments and all(m.sharding.spec == weight.sharding.spec for m in moments)
    assert all(m.addressable_shards[0].data.size * 8 == m.size for m in moments)  # one eighth per device


@pytest.mark.parametrize("param_dtype, state_dtype", [(None, jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_bfloat16_state_keeps_its_dtypes_across_a_step(tiny_chat_model, tmp_path, param_dtype, state_dtype):
    """--dtype bfloat16: float32 master weights and moments by default, bfloat16 with --param_dtype bfloat16; a
    step returns each leaf in its dtype (donated buffers reused, no recompilation)."""
    from jaxswift.train.loop import init_state, start_run
    from jaxswift.train.tuning import build_optimizer, prepare_tuner
    from jaxswift.train.step import make_train_step

    args = sft_args(tiny_chat_model, tmp_path, tuner_type="full", mesh="1", dtype="bfloat16", param_dtype=param_dtype)
    ctx = start_run(args)
    tuned = prepare_tuner(ctx.model.params, args, ctx.cfg)
    optimizer, _ = build_optimizer(args, 10, ctx.cfg)
    state, _ = init_state(ctx, tuned, optimizer, [])
    tokens = np.arange(32, dtype=np.int32).reshape(1, 1, 32) % 50 + 3
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, -1), loss_weights=np.ones(tokens.shape, np.float32),
                 segment_ids=np.ones_like(tokens), positions=np.arange(32, dtype=np.int32)[None, None])
    new_state, _ = jax.jit(make_train_step(ctx.cfg, optimizer))(state, batch)
    dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s)]  # noqa: E731
    assert {jnp.dtype(d) for d in dtypes(state.trainable)} == {jnp.dtype(state_dtype)}
    assert jnp.dtype(state_dtype) in dtypes(state.opt_state)
    assert dtypes(new_state) == dtypes(state)


def test_nonfinite_step_is_skipped_and_counted(tiny_chat_model):
    """A NaN loss leaves weights and optimizer state untouched and counts the skip; the next finite step updates."""
    import optax

    from jaxswift.train.state import init_train_state
    from jaxswift.train.step import make_train_step

    model = jaxswift.load_model(str(tiny_chat_model))
    mask = jax.tree.map(lambda _: True, model.params)
    state = init_train_state(model.params, mask, optax.adamw(1e-3), 0)
    shape = (1, 2, 16)
    batch = {"tokens": np.ones(shape, np.int32), "targets": np.full(shape, 2, np.int32),
             "loss_weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), shape)}
    step = jax.jit(make_train_step(model.config, optax.adamw(1e-3)))
    poisoned = {**batch, "loss_weights": np.where(np.arange(16) == 3, np.nan, 1.0).astype(np.float32)[None, None]
                .repeat(2, 1)}
    skipped, metrics = step(state, poisoned)
    assert not bool(metrics["finite"]) and int(metrics["skipped_steps"]) == 1 and int(metrics["bad_streak"]) == 1
    for old, new in zip(jax.tree.leaves((state.trainable, state.opt_state)),
                        jax.tree.leaves((skipped.trainable, skipped.opt_state))):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    updated, metrics = step(skipped, batch)
    assert bool(metrics["finite"]) and int(metrics["bad_streak"]) == 0 and int(metrics["skipped_steps"]) == 1
    assert not np.array_equal(np.asarray(updated.trainable["embed"]), np.asarray(skipped.trainable["embed"]))


def test_run_stops_after_nonfinite_steps_in_a_row(tiny_chat_model, tmp_path):
    from jaxswift.train.loop import TrainingStopped

    # a learning rate of 1e30 turns the weights to inf at the first update: every later loss is NaN
    with pytest.raises(TrainingStopped, match=r"3 non-finite steps in a row"):
        run_sft(sft_args(tiny_chat_model, tmp_path / "nan", tuner_type="full", learning_rate=1e30,
                         max_grad_norm=0.0, max_nonfinite_steps=3, max_steps=8, mesh="1"), progress=False)
    log = (tmp_path / "nan" / "logging.jsonl").read_text()
    assert '"step": 1' in log  # the finite first step was logged before the stop


@pytest.mark.parametrize("flags, message", [
    ({"pipeline_schedule": "1f1b"}, "--pipeline_schedule '1f1b'"),
    ({"ring_attention_layout": "spiral"}, "--ring_attention_layout 'spiral'"),
    ({"num_microbatches": 0}, "--num_microbatches must be positive"),
    ({"virtual_stages": 0}, "--virtual_stages must be positive"),
])
def test_bad_parallelism_flags_get_clear_errors(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SftArguments(**flags)
