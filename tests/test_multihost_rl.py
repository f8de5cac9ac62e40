"""Multi-process RLHF and GRPO: two JAX processes on localhost (4 virtual CPU devices each, gloo) train DPO and GRPO
exactly like one 8-device process given the same global batch; processes started with different counts or flags
stop with a message naming the flag."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.recipes import grpo as grpo_recipe
from jaxswift.recipes import rlhf as rlhf_recipe
from jaxswift.train.args import parse_args
from jaxswift.train.grpo_args import GrpoArguments
from jaxswift.train.rlhf_args import RlhfArguments
from test_multihost import MESH, PROCESS_TIMEOUT_S, free_port, launch_two_processes

COMMON = ["--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--demo_question", "",
          "--disable_tqdm", "true", "--save_steps", "1000", "--lr_scheduler_type", "constant", "--lora_dropout", "0.0",
          "--mesh", MESH]


def dpo_flags(model, out) -> list[str]:
    # 8 rows per step (1 per device x data 2 x fsdp 2, 2 micro batches): each process holds 2 rows of each micro
    # batch; the reference log-probs are precomputed over the mesh (each process scores its rows, all are gathered),
    # and the final metrics run the eval path over the training items
    return ["--model", str(model), "--output_dir", str(out), "--dataset", "builtin:preference_demo#16",
            "--max_length", "128", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--per_device_eval_batch_size", "2", "--split_dataset_ratio", "0", "--packing", "false",
            "--precompute_ref_log_probs", "true", *COMMON]


REWARD_PLUGIN = '''
import os
from pathlib import Path

def low_ids(prompts, completions, completion_ids, **columns):
    """A reward that differs between completions (a random tiny model earns no accuracy): the share of tokens from
    the lower half of the vocabulary. Each call notes how many completions this process scored."""
    with open(Path(__file__).parent / f"scored_by_{os.getpid()}.txt", "a") as f:
        f.write(f"{len(completions)}\\n")
    return [sum(t < 24576 for t in ids) / max(len(ids), 1) for ids in completion_ids]
'''


@pytest.fixture
def reward_plugin(tmp_path) -> Path:
    path = tmp_path / "plugin" / "multihost_rewards.py"
    path.parent.mkdir()
    path.write_text(REWARD_PLUGIN)
    return path


def grpo_flags(model, out, plugin="") -> list[str]:
    # 8 completions per step (1 prompt x G 8): each process decodes and scores 4 of them (rows 0-3 / 4-7), so the
    # group's advantages need the other process's rewards; the step takes them in 2 micro batches of 4 rows, of
    # which each process feeds 2 (rows 0, 1, 4, 5 / 2, 3, 6, 7: not the rows it decoded)
    return ["--model", str(model), "--output_dir", str(out), "--dataset", "builtin:arithmetic#32",
            "--num_generations", "8", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--max_completion_length", "4", "--temperature", "1.0", "--reward_funcs", "accuracy",
            *([f"{plugin}:low_ids"] if plugin else []), *COMMON]


def step_records(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "logging.jsonl").read_text().splitlines()) if r.get("split") == "train"]


def assert_same_run(multi, single, keys):
    got, expected = step_records(multi), step_records(single)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]  # written once, by process 0
    for key in keys:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in expected], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def run_both(recipe, flags_of, model, tmp_path, reference):
    multi, single = tmp_path / "multi", tmp_path / "single"
    for i, result in enumerate(launch_two_processes(flags_of(model, multi), free_port(), recipe)):
        assert result.returncode == 0, f"process {i} failed:\n{result.stdout[-4000:]}"
        assert "mesh data=2 x fsdp=2 x tensor=2" in result.stdout  # one 8-device mesh across both processes
    reference(flags_of(model, single))
    return multi, single


def test_dpo_in_two_processes_equals_one_eight_device_process(tiny_chat_model, tmp_path):
    multi, single = run_both("rlhf", dpo_flags, tiny_chat_model, tmp_path, lambda flags: rlhf_recipe.train(
        parse_args(RlhfArguments, flags), progress=False))
    assert_same_run(multi, single, ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                    "rewards/accuracies", "logps/chosen", "logps/rejected"])
    final = [json.loads(line) for line in (multi / "logging.jsonl").read_text().splitlines()][-1]
    expected = [json.loads(line) for line in (single / "logging.jsonl").read_text().splitlines()][-1]
    assert final["split"] == expected["split"] == "train_items" and final["items"] == 16
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert (multi / "adapter" / "adapter_model.safetensors").is_file()


def test_grpo_in_two_processes_equals_one_eight_device_process(tiny_chat_model, tmp_path, reward_plugin):
    scored = lambda: sorted(reward_plugin.parent.glob("scored_by_*.txt"))  # noqa: E731
    flags_of = lambda model, out: grpo_flags(model, out, reward_plugin)  # noqa: E731
    multi, single = run_both("grpo", flags_of, tiny_chat_model, tmp_path, lambda flags: (
        [p.rename(p.with_suffix(".multi")) for p in scored()],
        grpo_recipe.train(parse_args(GrpoArguments, flags), progress=False)))
    # each of the two processes scored its own 4 of the 8 completions of each of the 3 generations; one process all 8
    assert [p.read_text().split() for p in sorted(reward_plugin.parent.glob("*.multi"))] == [["4"] * 3] * 2
    assert [p.read_text().split() for p in scored()] == [["8"] * 3]
    low_ids = f"rewards/{reward_plugin}:low_ids"  # a plugin's metrics carry its spec
    assert_same_run(multi, single, ["loss", "grad_norm", "reward", "reward_std", f"{low_ids}/mean", f"{low_ids}/std",
                                    "rewards/accuracy/mean", "completion_length", "kl", "entropy"])
    assert all(r["reward_std"] > 0 for r in step_records(multi))  # the rewards differ: advantages are not all 0
    completions = lambda out: (out / "completions.jsonl").read_text().splitlines()  # noqa: E731
    assert completions(multi) == completions(single)  # the same sampled texts, logged once
    assert (multi / "adapter" / "adapter_model.safetensors").is_file()


def test_processes_with_different_flags_stop_naming_them(tiny_chat_model, tmp_path):
    flags = dpo_flags(tiny_chat_model, tmp_path / "out")
    results = launch_two_processes(flags, free_port(), "rlhf",
                                   per_process=((), ("--per_device_train_batch_size", "2")))
    for result in results:
        assert result.returncode == 2, result.stdout[-4000:]
        assert "started with different --per_device_train_batch_size" in result.stdout


def test_a_process_count_the_coordinator_does_not_expect_is_named(tiny_chat_model, tmp_path):
    """Process 0 (the coordinator) expects 3 processes, process 1 was told 2: both stop once the wait runs out
    (jax ends them), after saying which flag to check."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXSWIFT_INIT_TIMEOUT_S="5")
    port = free_port()
    flags = [*dpo_flags(tiny_chat_model, tmp_path / "out"), "--mesh", "data=6", "--coordinator_address",
             f"localhost:{port}"]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.rlhf", *flags, "--num_processes", str(n),
                               "--process_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i, n in ((0, 3), (1, 2))]
    try:
        outputs = [p.communicate(timeout=PROCESS_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out, n in zip(procs, outputs, (3, 2)):
        assert p.returncode != 0, out[-4000:]
        assert f"not all {n} processes of --num_processes {n} were started, or they were given different " \
               "--num_processes" in out


@pytest.mark.parametrize("recipe, flags, message", [
    ("grpo", ["--rollout_backend", "engine"], "--rollout_backend engine runs in one process so far"),
    ("grpo", ["--multi_turn_env", "plugin:Env"], "--multi_turn_env runs in one process so far"),
    ("rlhf", ["--rlhf_type", "gkd", "--teacher_model", "x"], "--rlhf_type gkd runs in one process so far"),
])
def test_one_process_parts_are_refused_in_a_multi_process_job(monkeypatch, tmp_path, recipe, flags, message):
    monkeypatch.setattr("jax.process_count", lambda: 2)  # refused before anything loads: no processes needed
    module, cls = (grpo_recipe, GrpoArguments) if recipe == "grpo" else (rlhf_recipe, RlhfArguments)
    with pytest.raises(ConfigError, match=message):
        module.train(parse_args(cls, ["--output_dir", str(tmp_path), *flags]), progress=False)


def test_a_process_told_another_count_than_its_job_stops_naming_the_flag(tiny_chat_model, tmp_path):
    """The coordinator expects 2 processes; process 1 was told 3 (and so made 2 of the 6 mesh devices, not 3): the job
    forms, and process 1 stops naming --num_processes (process 0, left alone, is ended by the test)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXSWIFT_INIT_TIMEOUT_S="60")
    flags = [*dpo_flags(tiny_chat_model, tmp_path / "out"), "--mesh", "data=6", "--coordinator_address",
             f"localhost:{free_port()}"]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxswift.recipes.rlhf", *flags, "--num_processes", str(n),
                               "--process_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i, n in ((0, 2), (1, 3))]
    try:
        out = procs[1].communicate(timeout=PROCESS_TIMEOUT_S)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == 2, out[-4000:]
    assert "--num_processes 3, but the job this process joined has 2 processes" in out
