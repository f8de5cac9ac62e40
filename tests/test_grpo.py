"""GRPO trainer: rollout log-probs vs the trainer's (both backends), built-in rewards vs their formulas, reward
rising on a tiny model, multi-turn layout, and bad inputs (reward plugins, G < 2, prompt-less rows)."""

import json
import math
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxswift
from jaxswift.errors import ConfigError, DataError
from jaxswift.rl import rewards as rw
from jaxswift.infer.rollout import RolloutSampling, completion_logps, engine_rollout, rollout, sequences
from jaxswift.recipes.grpo import train as run_grpo
from jaxswift.train.grpo_args import GrpoArguments

PLUGIN = '''
def low_ids(prompts, completions, completion_ids, **columns):
    """Trivially learnable: the share of completion tokens from the lower half of the vocabulary."""
    return [sum(t < 24576 for t in ids) / max(len(ids), 1) for ids in completion_ids]

def broken(prompts, completions, **columns):
    raise ValueError("no score today")

def short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)

def texts(prompts, completions, **columns):
    return ["high"] * len(completions)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "grpo_test_rewards.py"
    path.write_text(textwrap.dedent(PLUGIN))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return jaxswift.load_model(str(tiny_chat_model))


def grpo_args(model, out, **overrides) -> GrpoArguments:
    base = dict(model=str(model), output_dir=str(out), dataset=["builtin:arithmetic#32"], max_steps=2,
                logging_steps=1, learning_rate=1e-3, demo_question="", disable_tqdm=True, save_steps=1000,
                mesh="1", num_generations=4, per_device_train_batch_size=8, max_completion_length=4,
                rollout_backend="generate", reward_funcs=["accuracy", "answer_format"])
    return GrpoArguments(**{**base, **overrides})


def prompt_ids(model, n):
    rows = [json.loads(line) for line in open(rw.__file__.replace("rl/rewards.py", "data/builtin/arithmetic.jsonl"))]
    return [jaxswift.api.chat_prompt_ids(model, [{"role": "user", "content": r["prompt"]}]) for r in rows[:n]]


def recomputed(model, r, temperature):
    seqs = sequences(r)
    fn = jax.jit(lambda p, t, pos, seg: completion_logps(p, t, pos, seg, model.config, prompt_length=t.shape[1]
                                                         - r.completion_ids.shape[1], temperature=temperature))
    return np.asarray(fn(model.params, seqs["tokens"], seqs["positions"], seqs["segment_ids"]))


# --- the training/inference mismatch -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_trainers(tiny, temperature):
    from jaxswift.infer.generate import stop_token_ids

    sampling = RolloutSampling(temperature=temperature, max_completion_length=6)
    r = rollout(tiny.params, prompt_ids(tiny, 3), tiny.config, sampling=sampling, num_generations=2,
                eos_ids=stop_token_ids(tiny.config, tiny.tokenizer), pad_id=0, key=jax.random.key(1))
    assert r.completion_ids.shape == (6, 6) and r.completion_mask.sum() > 0
    np.testing.assert_array_equal(r.prompt_ids[0], r.prompt_ids[1])  # G consecutive rows per prompt
    want = recomputed(tiny, r, temperature) * r.completion_mask
    np.testing.assert_allclose(r.logprobs, want, atol=1e-4)


def test_engine_rollout_logprobs_equal_the_trainers(tiny):
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.models.transformer import unstack_layers

    engine = JaxEngine(tiny, max_concurrent_decodes=4, max_model_len=128, prefill_buckets=(64,))
    r = engine_rollout(engine, unstack_layers(tiny.params), prompt_ids(tiny, 3),
                       sampling=RolloutSampling(temperature=1.0, max_completion_length=6), num_generations=2, seed=3)
    assert r.completion_mask.sum() > 0
    np.testing.assert_allclose(r.logprobs, recomputed(tiny, r, 1.0) * r.completion_mask, atol=1e-4)


def test_grouped_scoring_runs_each_prompt_once_and_equals_the_plain_path(tiny):
    from jaxswift.infer.generate import stop_token_ids
    from jaxswift.infer.rollout import grouped_completion_logps, shares_prompts

    r = rollout(tiny.params, prompt_ids(tiny, 3), tiny.config, sampling=RolloutSampling(max_completion_length=6),
                num_generations=3, eos_ids=stop_token_ids(tiny.config, tiny.tokenizer), pad_id=0, key=jax.random.key(2))
    seqs = sequences(r)
    arrays = (seqs["tokens"], seqs["positions"], seqs["segment_ids"])
    P = r.prompt_ids.shape[1]
    assert shares_prompts(*arrays, P, 3)
    assert not shares_prompts(*arrays, P, 2)  # 9 rows are not groups of 2
    assert not shares_prompts(*(x[[0, 1, 3, 2, 4, 5, 6, 7, 8]] for x in arrays), P, 3)  # a row in the wrong group
    grouped = grouped_completion_logps(tiny.params, *arrays, cfg=tiny.config, prompt_length=P, temperature=0.7,
                                       num_generations=3)
    np.testing.assert_allclose(np.asarray(grouped) * r.completion_mask,
                               recomputed(tiny, r, 0.7) * r.completion_mask, atol=1e-5)


# --- rewards ------------------------------------------------------------------------------------------------------


def test_accuracy_extracts_and_compares_numbers():
    completions = ["so the answer is \\boxed{\\frac{1}{2}}", "#### 1,234", "<answer>12</answer>", "it is 7, no 8",
                   "\\boxed{x+1}", "no idea"]
    solutions = ["0.5", "The total is 617 * 2 = 1234\n#### 1234", "12.0", "8", "\\boxed{x + 1}", "3"]
    assert rw.accuracy(None, completions, solution=solutions) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert rw.answers_equal("50%", "0.5") and not rw.answers_equal("5", "50")


def test_format_rewards():
    good, bad = "<think>7 + 8 is 15</think>\n<answer>15</answer>", "<answer>15</answer> and more"
    assert rw.format_reward(None, [good, bad, "<answer>15</answer>"]) == [1.0, 0.0, 0.0]
    assert rw.answer_format(None, [bad, " <answer>15</answer>\n"]) == [0.0, 1.0]


def test_length_rewards_match_their_formulas():
    lengths = [0, 5, 10, 20]
    got = rw.CosineReward(max_len=20)(None, ["<answer>3</answer>", "4", "3", "4"], solution=["3"] * 4,
                                      completion_lengths=lengths)
    want = []
    for ok, n in zip([1, 0, 1, 0], lengths):
        hi, lo = (1.0, 0.5) if ok else (-0.5, 0.0)
        want.append(hi - (hi - lo) * (1 - math.cos(math.pi * n / 20)) / 2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    overlong = rw.SoftOverlongReward(max_len=20, cache_len=5)(None, ["x"] * 4, completion_lengths=[10, 15, 17, 20])
    np.testing.assert_allclose(overlong, [0.0, 0.0, -0.4, -1.0])
    rep = rw.RepetitionReward(ngram_size=2, max_penalty=-1.0)(None, ["a b a b a b", "one two three", "hi"])
    np.testing.assert_allclose(rep, [-(1 - 2 / 5), 0.0, 0.0])


def test_reward_plugin_errors_name_the_function(plugin):
    funcs = rw.resolve_reward_funcs([f"{plugin}:broken"], rw.RewardSettings())
    with pytest.raises(rw.RewardError, match=r"grpo_test_rewards.py:broken raised ValueError: no score today"):
        rw.score(funcs, ["p", "q"], ["a", "b"], {})
    funcs = rw.resolve_reward_funcs([f"{plugin}:short"], rw.RewardSettings())
    with pytest.raises(rw.RewardError, match=r":short returned 1 values for 2 completions"):
        rw.score(funcs, ["p", "q"], ["a", "b"], {})
    funcs = rw.resolve_reward_funcs([f"{plugin}:texts"], rw.RewardSettings())
    with pytest.raises(rw.RewardError, match=r":texts returned 'high' \(str\), expected numbers"):
        rw.score(funcs, ["p"], ["a"], {})
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        rw.resolve_reward_funcs([f"{plugin}:missing"], rw.RewardSettings())
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        rw.resolve_reward_funcs(["no_such_module_xyz:fn"], rw.RewardSettings())
    with pytest.raises(ConfigError, match="not a built-in"):
        rw.resolve_reward_funcs(["acuracy"], rw.RewardSettings())
    with pytest.raises(ConfigError, match="--reward_weights has 1 values for 2 reward functions"):
        rw.check_weights([1.0], ["accuracy", "format"])


# --- the trainer --------------------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(tiny_chat_model, tmp_path, plugin):
    with pytest.raises(ConfigError, match="--num_generations.*at least 2"):
        grpo_args(tiny_chat_model, tmp_path, num_generations=1)
    grpo_args(tiny_chat_model, tmp_path, num_generations=1, scale_rewards="batch", per_device_train_batch_size=1)
    with pytest.raises(ConfigError, match="multiple of --num_generations 4"):
        run_grpo(grpo_args(tiny_chat_model, tmp_path / "a", per_device_train_batch_size=6), progress=False)
    bad = tmp_path / "no_prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?", "solution": "2"}) + "\n"
                   + json.dumps({"question": "What is 2 + 2?", "solution": "4"}) + "\n")
    with pytest.raises(DataError, match=r"no_prompts.jsonl:2: no prompt: expected a non-empty prompt \| messages"):
        run_grpo(grpo_args(tiny_chat_model, tmp_path / "b", dataset=[str(bad)]), progress=False)
    with pytest.raises(rw.RewardError, match="reward function .*:broken raised ValueError"):
        run_grpo(grpo_args(tiny_chat_model, tmp_path / "c", reward_funcs=[f"{plugin}:broken"]), progress=False)
    with pytest.raises(rw.RewardError, match=r"reward function .*:short returned 7 values for 8 completions"):
        run_grpo(grpo_args(tiny_chat_model, tmp_path / "d", reward_funcs=[f"{plugin}:short"]), progress=False)


def test_reward_rises_on_a_trivially_learnable_reward(tiny_chat_model, tmp_path, plugin):
    args = grpo_args(tiny_chat_model, tmp_path, reward_funcs=[f"{plugin}:low_ids"], max_steps=12,
                     learning_rate=3e-2, tuner_type="full", per_device_train_batch_size=16, max_completion_length=8,
                     beta=0.0, loss_type="dapo", epsilon_high=0.28)
    result = run_grpo(args, progress=False)
    rewards = [result.history[s]["reward"] for s in sorted(result.history)]
    assert len(rewards) == 12
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    logged = [json.loads(line) for line in open(tmp_path / "logging.jsonl")]
    train = [r for r in logged if r.get("split", "train") == "train" and "reward" in r]
    assert {"entropy", "completion_length", "clip_ratio/region", "rewards/" + f"{plugin}:low_ids/mean"} <= set(
        train[-1])


def test_lora_run_with_reference_iterations_and_resume(tiny_chat_model, tmp_path):
    args = grpo_args(tiny_chat_model, tmp_path, max_steps=4, num_iterations=2, beta=0.04, save_steps=2,
                     dynamic_sample=True, overlong_filter=True, loss_type="grpo", importance_sampling_level="sequence",
                     rollout_backend="engine")
    result = run_grpo(args, progress=False)
    assert set(result.history) == {1, 2, 3, 4}
    h = result.history
    assert all(np.isfinite(h[s]["loss"]) and h[s]["kl"] >= 0 for s in h)
    assert h[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero: policy == reference (adapters off)
    resumed = run_grpo(grpo_args(tiny_chat_model, tmp_path, max_steps=6, num_iterations=2, beta=0.04,
                                 resume_from_checkpoint="latest", rollout_backend="engine"), progress=False)
    assert set(resumed.history) == {5, 6}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_multi_turn_rollout_masks_observations(tiny, tmp_path):
    from jaxswift.rl.envs import ArithmeticRetryEnv, multi_turn_rollout

    class NeverRight(ArithmeticRetryEnv):
        def step(self, completion):
            self.turn += 1
            return "Not quite, try again.", 0.0, False

    rows = [{"prompt": "What is 1 + 2?", "solution": "3"}]
    eos = np.arange(24576, dtype=np.int32)  # the random model ends a turn on any lower-half token: short turns
    sampling = RolloutSampling(temperature=1.0, max_completion_length=48)
    r, env_rewards = multi_turn_rollout(tiny.params, rows, prompt_ids(tiny, 1), tiny.config, tiny.tokenizer,
                                        make_env=NeverRight, max_turns=3, sampling=sampling, num_generations=4,
                                        eos_ids=eos, pad_id=0, key=jax.random.key(0))
    assert env_rewards.tolist() == [0.0] * 4 and r.completion_ids.shape == (4, 48)
    observation = tiny.tokenizer.encode("Not quite, try again.", add_special_tokens=False)
    for ids, mask in zip(r.completion_ids, r.completion_mask):
        turns = np.flatnonzero(np.diff(mask) > 0)  # where an observation hands back to the policy
        assert len(turns) >= 1, "every trajectory gets a second turn"
        hidden = ids[(mask == 0) & (np.arange(48) < turns[-1] + 1)].tolist()
        assert all(t in hidden for t in observation)  # the observation's tokens are in the sequence, unmasked
    np.testing.assert_allclose(r.logprobs, recomputed(tiny, r, 1.0) * r.completion_mask, atol=1e-4)


def test_reward_model_reward_matches_transformers(tiny_chat_model, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from jaxswift.checkpoints.safetensors_io import write_safetensors

    folder = tmp_path / "rm"
    shutil.copytree(tiny_chat_model, folder)
    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 0.5, (1, 64)).astype(np.float32), np.array([0.3], np.float32)
    write_safetensors(folder / "value_head.safetensors", {"v_head.summary.weight": w, "v_head.summary.bias": b})
    (reward,) = rw.resolve_reward_funcs([f"rm:{folder}"], rw.RewardSettings()).values()
    prompts, completions = ["What is 1 + 2?", "Name a colour."], ["3", "A long answer: blue, like the sea."]
    got = reward(prompts, completions)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([reward._ids(p, c)])
        with torch.no_grad():
            h = hf.model(ids).last_hidden_state[0, -1].numpy()
        want.append(float(h @ w[0] + b[0]))
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ConfigError, match="no value_head.safetensors"):
        rw.resolve_reward_funcs([f"rm:{tiny_chat_model}"], rw.RewardSettings())
