"""Multi-turn environments: the policy answers, the environment replies, up to `--max_turns` turns.

An environment is any object with

    reset(row: dict) -> str                                  the first user message (e.g. the row's prompt)
    step(completion: str) -> (observation: str, reward: float, done: bool)

created fresh for every trajectory by a factory: `--multi_turn_env builtin:arithmetic_retry` or a plugin
`--multi_turn_env mymodule:make_env` (a class or function taking no arguments). The trajectory's reward (the sum of
its step rewards) reaches the reward functions as the column `env_reward`; the built-in reward `env` returns it.

In the training sequence the environment's observations (rendered with the chat template as user turns) sit between
the policy's completions with completion mask 0: they are conditioned on, never trained on.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.rl.rewards import RewardError, answers_equal, extract_answer
from jaxswift.infer.rollout import Rollout, RolloutSampling, rollout


class Environment(Protocol):
    def reset(self, row: dict) -> str: ...

    def step(self, completion: str) -> tuple[str, float, bool]: ...


class ArithmeticRetryEnv:
    """The toy environment: a question with a known answer; a wrong answer gets 'Not quite, try again.' and
    another turn. Reward 1 for a right answer in the first turn, 0.5 in a later one, else 0."""

    def reset(self, row: dict) -> str:
        self.solution, self.turn = str(row["solution"]), 0
        return row["prompt"]

    def step(self, completion: str) -> tuple[str, float, bool]:
        self.turn += 1
        if answers_equal(extract_answer(completion), self.solution):
            return "", 1.0 if self.turn == 1 else 0.5, True
        return "Not quite, try again. Give only the number inside <answer></answer> tags.", 0.0, False


BUILTIN_ENVS: dict[str, Callable[[], Environment]] = {"arithmetic_retry": ArithmeticRetryEnv}


def env_factory(spec: str) -> Callable[[], Environment]:
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTIN_ENVS:
            raise ConfigError(f"--multi_turn_env {spec}: unknown built-in; available: "
                              f"{', '.join('builtin:' + n for n in BUILTIN_ENVS)}")
        return BUILTIN_ENVS[name]
    from jaxswift.rl.rewards import load_plugin

    return load_plugin(spec)


def env_reward(prompts, completions, **columns) -> list[float]:
    """The environment's reward for the trajectory (the column `env_reward`)."""
    if "env_reward" not in columns:
        raise RewardError("reward function env: no environment ran (set --multi_turn_env)")
    return [float(r) for r in columns["env_reward"]]


def _observation_ids(tokenizer, observation: str) -> list[int]:
    """Tokens between the policy's eos and its next turn: the template's user turn + assistant header."""
    eos = tokenizer.eos_token
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    before = tokenizer.apply_chat_template(msgs, tokenize=False)
    after = tokenizer.apply_chat_template([*msgs, {"role": "user", "content": observation}], tokenize=False,
                                          add_generation_prompt=True)
    cut = before.rindex(eos) + len(eos)
    return tokenizer.encode(after[cut:], add_special_tokens=False)


def _call(env, method: str, *args):
    try:
        return getattr(env, method)(*args)
    except Exception as e:
        raise RewardError(f"environment {type(env).__name__}.{method} raised {type(e).__name__}: {e}") from e


def multi_turn_rollout(params, prompt_rows: list[dict], prompt_ids: list[list[int]], cfg, tokenizer, *,
                       make_env: Callable[[], Environment], max_turns: int, sampling: RolloutSampling,
                       num_generations: int, eos_ids, pad_id: int, key) -> tuple[Rollout, np.ndarray]:
    """(rollout, env rewards [N]): every trajectory alternates policy turns and observations within
    max_completion_length tokens; a turn ends at eos, a trajectory at done, max_turns, or the length budget."""
    import jax

    C = sampling.max_completion_length
    rows = [r for r in prompt_rows for _ in range(num_generations)]
    starts = [ids for ids in prompt_ids for _ in range(num_generations)]
    envs = [make_env() for _ in rows]
    for env, row in zip(envs, rows):
        _call(env, "reset", row)
    N = len(rows)
    comp = [[] for _ in range(N)]
    mask = [[] for _ in range(N)]
    logps = [[] for _ in range(N)]
    rewards, active = np.zeros(N), np.ones(N, bool)
    for turn in range(max_turns):
        live = [i for i in range(N) if active[i] and len(comp[i]) < C]
        if not live:
            break
        budget = C - min(len(comp[i]) for i in live)
        turn_sampling = RolloutSampling(sampling.temperature, sampling.top_p, sampling.top_k, budget)
        r = rollout(params, [starts[i] + comp[i] for i in live], cfg, sampling=turn_sampling, num_generations=1,
                    eos_ids=eos_ids, pad_id=pad_id, key=jax.random.fold_in(key, turn))
        for j, i in enumerate(live):
            n = min(int(r.lengths[j]), C - len(comp[i]))
            comp[i] += r.completion_ids[j, :n].tolist()
            mask[i] += [1.0] * n
            logps[i] += r.logprobs[j, :n].tolist()
            text = tokenizer.decode(r.completion_ids[j, :n], skip_special_tokens=True)
            observation, reward, done = _call(envs[i], "step", text)
            rewards[i] += float(reward)
            ended = r.truncated[j] or n < int(r.lengths[j])
            obs = [] if done or ended or turn == max_turns - 1 else _observation_ids(tokenizer, observation)
            if done or ended or not obs or len(comp[i]) + len(obs) >= C:
                active[i] = False
                continue
            comp[i] += obs
            mask[i] += [0.0] * len(obs)
            logps[i] += [0.0] * len(obs)
    return _assemble(starts, comp, mask, logps, C, pad_id, eos_ids, active), rewards


def _assemble(starts, comp, mask, logps, C, pad_id, eos_ids, active) -> Rollout:
    from jaxswift.infer.generate import left_pad

    tokens, positions, segments = left_pad(starts, pad_id)
    N = len(starts)
    out = np.full((N, C), int(eos_ids[0]), np.int32)
    m = np.zeros((N, C), np.float32)
    lp = np.zeros((N, C), np.float32)
    for i in range(N):
        n = len(comp[i])
        out[i, :n], m[i, :n], lp[i, :n] = comp[i], mask[i], logps[i]
    ended_with_eos = np.array([bool(c) and c[-1] in set(int(e) for e in eos_ids) for c in comp])
    return Rollout(tokens, positions, segments, out, m, lp, ~ended_with_eos & np.array([len(c) >= C for c in comp]))
