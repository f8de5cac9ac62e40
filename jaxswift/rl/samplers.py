"""GRPO's parts that live in rl/: the rollout backend (one-batch loop, paged engine, or a multi-turn environment)
and the reward functions, built from the run's arguments and handed to the trainer (`train.grpo.GrpoParts`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.infer.rollout import RolloutSampling, engine_rollout, rollout
from jaxswift.rl import rewards as rw


def reward_settings(args) -> rw.RewardSettings:
    return rw.RewardSettings(args.max_completion_length, args.soft_cache_length, args.repetition_n_grams,
                             args.repetition_max_penalty)


def reward_funcs(args) -> tuple[dict, np.ndarray]:
    """(name -> reward function, weights) from --reward_funcs / --reward_weights; `env` is the environment's."""
    plain = [f for f in args.reward_funcs if f != "env"]
    funcs = rw.resolve_reward_funcs(plain, reward_settings(args)) if plain else {}
    if "env" in args.reward_funcs:
        from jaxswift.rl.envs import env_reward
        funcs = {name: (env_reward if name == "env" else funcs[name]) for name in args.reward_funcs}
    if not funcs:
        raise ConfigError("--reward_funcs is empty: give at least one reward function")
    return funcs, rw.check_weights(args.reward_weights, list(funcs))


def sampler_factory(args):
    """(model, cfg, eos_ids, pad_id, longest prompt, rows_sharding) -> sample(params, prompt rows, key) -> (Rollout,
    env rewards or None), by --rollout_backend and --multi_turn_env. rows_sharding splits the `generate` backend's
    decoding rows over the mesh (the engine and the multi-turn loop run one process, their rows whole)."""
    sampling = RolloutSampling(args.temperature, args.top_p, args.top_k, args.max_completion_length)
    G = args.num_generations

    def make(model, cfg, eos_ids, pad_id, longest_prompt: int, rows_sharding=None):
        if model.is_vlm and (args.multi_turn_env or args.rollout_backend != "engine"):
            raise ConfigError(f"--model {args.model}: a vision-language model's rollouts run on the paged engine "
                              "(--rollout_backend engine: each prompt's images prefilled once per group); "
                              + ("--multi_turn_env is text-only so far" if args.multi_turn_env else
                                 f"--rollout_backend {args.rollout_backend} is text-only so far"))
        if args.multi_turn_env:
            return _multi_turn(args, model, cfg, sampling, eos_ids, pad_id)
        if args.rollout_backend == "engine":
            return _engine(args, model, cfg, sampling, longest_prompt)
        return lambda params, rows, key: (rollout(params, [r.ids for r in rows], cfg.replace(remat="none"),
                                                  sampling=sampling, num_generations=G, eos_ids=eos_ids,
                                                  pad_id=pad_id, key=key, rows_sharding=rows_sharding), None)

    return make


def _multi_turn(args, model, cfg, sampling, eos_ids, pad_id):
    from jaxswift.rl.envs import env_factory, multi_turn_rollout

    make_env = env_factory(args.multi_turn_env)
    return lambda params, rows, key: multi_turn_rollout(
        params, [{"prompt": r.prompt, **r.columns} for r in rows], [r.ids for r in rows], cfg, model.tokenizer,
        make_env=make_env, max_turns=args.max_turns, sampling=sampling, num_generations=args.num_generations,
        eos_ids=eos_ids, pad_id=pad_id, key=key)


def _engine(args, model, cfg, sampling, longest_prompt: int):
    from jaxswift.infer.engine import JaxEngine
    from jaxswift.infer.engine_vlm import request_images
    from jaxswift.models.transformer import unstack_layers

    no_remat = (dataclasses.replace(cfg, text=cfg.text.replace(remat="none")) if model.is_vlm
                else cfg.replace(remat="none"))
    engine = JaxEngine(dataclasses.replace(model, config=no_remat),
                       max_concurrent_decodes=min(64, args.per_device_train_batch_size
                                                  * args.gradient_accumulation_steps),
                       max_model_len=int(2 ** np.ceil(np.log2(longest_prompt + args.max_completion_length + 1))))
    engine.params = None  # the engine samples the train state's params, passed per call: no copy kept

    def sample(params, rows, key):
        seed = int(jax.random.randint(key, (), 0, 2 ** 30))
        images = None
        if model.is_vlm:  # the latest tower and aligner for the prefills; the LLM's weights go with the call
            engine.set_tower_params({k: v for k, v in params.items() if k != "llm"})
            images = [None if r.images is None else request_images(model.processor, r.images) for r in rows]
            params = params["llm"]
        return engine_rollout(engine, unstack_layers(params), [r.ids for r in rows], sampling=sampling,
                              num_generations=args.num_generations, seed=seed, images=images), None
    return sample
